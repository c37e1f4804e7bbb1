"""Metric functions against hand-computed values, FID sanity on bundled MNIST, seed pairing, the stats cache."""
import math

import numpy as np
import pytest
import torch

from diffprune.errors import DiffPruneError
from diffprune.metrics import (
    INCEPTION_WEIGHTS_NAME, cache_dir, compute_features, feature_statistics, fid_from_features, frechet_distance,
    load_extractor, paired_consistency, reference_statistics, resolve_inception_weights, stats_cache_key,
)
from diffprune.samples import SampleSet, load_sample_folder, pair_by_seed


def _inception_importable() -> bool:
    try:
        import pytorch_fid.inception  # noqa: F401
    except Exception:
        return False
    return True


# --- Fréchet distance ------------------------------------------------------------------------------------------

def test_frechet_distance_of_diagonal_gaussians_by_hand():
    # ‖(1, 2)‖² = 5; Tr = (1 + 4) + (4 + 9) - 2 (sqrt(1*4) + sqrt(4*9)) = 18 - 16 = 2  ->  7
    d = frechet_distance([0, 0], np.diag([1.0, 4.0]), [1, 2], np.diag([4.0, 9.0]))
    assert d == pytest.approx(7.0, abs=1e-9)


def test_frechet_distance_of_correlated_gaussian_by_hand():
    # Σ1 = [[2, 1], [1, 2]] has eigenvalues 3 and 1; Σ2 = I  ->  Tr = 4 + 2 - 2 (sqrt 3 + 1) = 4 - 2 sqrt 3
    d = frechet_distance([3, 3], [[2.0, 1.0], [1.0, 2.0]], [3, 3], np.eye(2))
    assert d == pytest.approx(4 - 2 * math.sqrt(3), abs=1e-9)


def test_frechet_distance_of_a_non_psd_covariance_is_a_clear_error():
    # sqrtm(diag(1, -1)) = diag(1, i): an imaginary part of 1, far beyond numerical noise
    with pytest.raises(DiffPruneError, match="imaginary component 1 .*use more images than feature dimensions"):
        frechet_distance([0, 0], np.diag([1.0, -1.0]), [0, 0], np.eye(2))


def test_frechet_distance_singular_covariance_is_finite_and_shape_mismatch_raises():
    s = np.zeros((3, 3))
    s[0, 0] = 1.0  # rank 1
    assert frechet_distance(np.zeros(3), s, np.ones(3), s) == pytest.approx(3.0, abs=1e-4)
    with pytest.raises(DiffPruneError, match="differ in length"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_feature_statistics_and_fid_of_identical_features_is_zero():
    f = torch.randn(200, 8, generator=torch.Generator().manual_seed(1))
    st = feature_statistics(f)
    assert st.n == 200 and st.mu.shape == (8,) and st.sigma.shape == (8, 8)
    np.testing.assert_allclose(st.sigma, np.cov(f.double().numpy(), rowvar=False))
    assert abs(fid_from_features(f, f)) < 1e-6
    with pytest.raises(DiffPruneError, match="N >= 2"):
        feature_statistics(f[:1])


@pytest.fixture(scope="module")
def mnist_features():
    from diffprune.data import load_images

    ex = load_extractor("mnist-classifier")  # the shipped, trained classifier (committed with its sha256)
    train = load_images("mnist", resolution=16, channels=1, split="train", limit=1000)
    test = load_images("mnist", resolution=16, channels=1, split="test", limit=1000)
    noise = torch.randint(0, 256, train.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return {k: compute_features(ex, x) for k, x in (("train", train), ("test", test), ("noise", noise))}


def test_mnist_fid_sanity(mnist_features):
    f = mnist_features
    assert f["train"].shape == (1000, 128)
    same_dist = fid_from_features(f["train"], f["test"])  # measured 12.0
    vs_noise = fid_from_features(f["train"], f["noise"])  # measured 1062
    assert same_dist < 15
    assert vs_noise > 500
    assert vs_noise > 50 * same_dist
    assert abs(fid_from_features(f["train"], f["train"])) < 1e-6


# --- consistency ------------------------------------------------------------------------------------------------

def _digits(n=12, seed=0):
    from diffprune.data import load_images

    return load_images("mnist", resolution=16, channels=1, split="test", limit=n)


def test_ssim_of_identical_images_is_one_and_ms_ssim_says_why_it_is_missing():
    x = _digits()
    r = paired_consistency(x, x.clone())
    assert r["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert r["mse"] == 0.0 and r["pairs"] == 12 and r["ssim_win_size"] == 11
    assert r["ms_ssim"] is None and "160" in r["ms_ssim_note"] and "16" in r["ms_ssim_note"]
    other = paired_consistency(x, 255 - x)
    assert other["ssim"] < 0.1
    assert other["mse"] == pytest.approx(((255 - 2 * x.double()) / 255).pow(2).mean().item(), rel=1e-9)


def test_ms_ssim_where_the_size_allows_and_small_window_for_tiny_images():
    big = torch.randint(0, 256, (1, 1, 176, 176), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    r = paired_consistency(big, big.clone())
    assert r["ms_ssim"] == pytest.approx(1.0, abs=1e-6)
    tiny = torch.randint(0, 256, (2, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert paired_consistency(tiny, tiny)["ssim_win_size"] == 7


def test_pairing_is_by_seed_not_by_order():
    teacher = _digits(12)
    student = teacher.flip(-1)  # a different image per seed
    seeds = list(range(100, 112))
    ref = paired_consistency(teacher, student)["ssim"]
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(3)).tolist()
    shuffled = SampleSet([seeds[i] for i in perm], student[perm])
    common, t, s = pair_by_seed(SampleSet(seeds, teacher), shuffled)
    assert common == seeds
    assert paired_consistency(t, s)["ssim"] == pytest.approx(ref, abs=1e-12)
    # Pairing by file order instead would give another value:
    assert abs(paired_consistency(teacher, student[perm])["ssim"] - ref) > 1e-3
    with pytest.raises(DiffPruneError, match="share no seed"):
        pair_by_seed(SampleSet([1, 2], teacher[:2]), SampleSet([3, 4], teacher[:2]))


def test_sample_folders_pair_by_seed_whatever_the_file_order(tmp_path):
    from diffprune.samples import save_samples

    teacher = _digits(10)
    student = teacher.flip(-2)
    seeds = list(range(7, 17))
    save_samples(teacher, seeds, tmp_path / "t")
    perm = [9, 3, 0, 5, 1, 8, 2, 7, 4, 6]
    save_samples(student[perm], [seeds[i] for i in perm], tmp_path / "s")  # PNG i holds seed seeds[perm[i]]
    ref = paired_consistency(teacher, student)["ssim"]
    for drop_npz in (False, True):  # from samples.npz, then from the PNGs + samples.json alone
        if drop_npz:
            (tmp_path / "s" / "samples.npz").unlink()
        t = load_sample_folder(tmp_path / "t")
        s = load_sample_folder(tmp_path / "s")
        common, a, b = pair_by_seed(t, s)
        assert common == seeds
        assert paired_consistency(a, b)["ssim"] == pytest.approx(ref, abs=1e-12)
    with pytest.raises(DiffPruneError, match="does not exist"):
        load_sample_folder(tmp_path / "missing")


# --- reference statistics cache ---------------------------------------------------------------------------------

def test_cache_key_changes_when_any_keyed_input_changes():
    base = dict(dataset="mnist", split="train", count=1000, resolution=16, channels=1, data_sha256="a" * 64,
                extractor="mnist-classifier", weights_sha256="b" * 64, preprocessing="p")
    k0 = stats_cache_key(**base)
    assert k0 == stats_cache_key(**dict(base))
    changed = dict(dataset="digits", split="test", count=999, resolution=32, channels=3, data_sha256="c" * 64,
                   extractor="inception", weights_sha256="d" * 64, preprocessing="q")
    keys = {k0}
    for field, value in changed.items():
        k = stats_cache_key(**{**base, field: value})
        assert k not in keys, field
        keys.add(k)


def test_reference_statistics_cached_as_safetensors_and_keyed(tmp_path, monkeypatch):
    from diffprune.data import load_images

    monkeypatch.setenv("DIFFPRUNE_CACHE", str(tmp_path / "env-cache"))
    assert cache_dir() == tmp_path / "env-cache"
    assert cache_dir(tmp_path / "arg") == tmp_path / "arg"
    ex = load_extractor("mnist-classifier")
    x = load_images("mnist", resolution=16, channels=1, split="train", limit=300)
    s1, i1 = reference_statistics(x, ex, dataset="mnist", split="train")
    assert not i1["hit"] and i1["path"].startswith(str(tmp_path / "env-cache")) and i1["path"].endswith(".safetensors")
    s2, i2 = reference_statistics(x, ex, dataset="mnist", split="train")
    assert i2["hit"] and i2["key"] == i1["key"]
    np.testing.assert_array_equal(s1.sigma, s2.sigma)
    np.testing.assert_array_equal(s1.mu, s2.mu)
    # different content (same name, split and count) -> a different entry
    _, i3 = reference_statistics(x.flip(-1), ex, dataset="mnist", split="train")
    assert not i3["hit"] and i3["key"] != i1["key"]
    # the cached file is safetensors, not a pickle
    from safetensors import safe_open

    with safe_open(i1["path"], "pt") as f:
        assert sorted(f.keys()) == ["mu", "sigma"] and f.metadata()["key"] == i1["key"]


@pytest.mark.parametrize("entry", ["wrong-width", "not-finite"])
def test_reference_statistics_refuse_a_sound_entry_that_does_not_fit(tmp_path, capfd, entry):
    """An entry whose checksum holds but whose statistics cannot be this extractor's (another width, NaN) is
    computed again, to the same values as a cold cache."""
    from pathlib import Path

    from diffprune import _cache
    from diffprune.data import load_images

    ex = load_extractor("mnist-classifier")
    x = load_images("mnist", resolution=16, channels=1, split="train", limit=300)
    cold, info = reference_statistics(x, ex, dataset="mnist", split="train", cache=tmp_path)
    dim = ex.dim + 1 if entry == "wrong-width" else ex.dim
    mu = torch.zeros(dim, dtype=torch.float64)
    mu[0] = float("nan") if entry == "not-finite" else 0.0
    _cache._store(Path(info["path"]), info["key"], {"mu": mu, "sigma": torch.eye(dim, dtype=torch.float64)})
    again, info2 = reference_statistics(x, ex, dataset="mnist", split="train", cache=tmp_path)
    assert not info2["hit"] and info2["key"] == info["key"] and info2["replaced"]
    assert "recomputing it" in capfd.readouterr().err
    np.testing.assert_array_equal(again.mu, cold.mu)
    np.testing.assert_array_equal(again.sigma, cold.sigma)
    _, info3 = reference_statistics(x, ex, dataset="mnist", split="train", cache=tmp_path)
    assert info3["hit"]


def test_reference_statistics_go_on_when_the_cache_cannot_be_written(tmp_path, capfd, monkeypatch):
    import errno

    from diffprune.data import load_images

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    ex = load_extractor("mnist-classifier")
    x = load_images("mnist", resolution=16, channels=1, split="train", limit=300)
    cold, _ = reference_statistics(x, ex, dataset="mnist", split="train", cache=tmp_path / "a")
    monkeypatch.setattr("diffprune._cache.atomic_write_bytes", full)
    stats, info = reference_statistics(x, ex, dataset="mnist", split="train", cache=tmp_path / "b")
    assert not info["hit"] and "No space left on device" in capfd.readouterr().err
    np.testing.assert_array_equal(stats.sigma, cold.sigma)


# --- extractors --------------------------------------------------------------------------------------------------

def test_unknown_extractor_lists_choices():
    with pytest.raises(DiffPruneError, match=r"unknown feature extractor 'clip'.*inception.*mnist-classifier"):
        load_extractor("clip")


def test_missing_inception_weights_error_says_how_to_supply_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(DiffPruneError) as e:
        resolve_inception_weights(None)
    msg = str(e.value)
    assert INCEPTION_WEIGHTS_NAME in msg and "--inception-weights" in msg and "mnist-classifier" in msg
    assert "\n" not in msg
    with pytest.raises(DiffPruneError, match="do not exist"):
        resolve_inception_weights(tmp_path / "nope.pth")
    cached = tmp_path / "torch-home" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_NAME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert resolve_inception_weights(None) == cached


@pytest.mark.skipif(_inception_importable(), reason="pytorch-fid imports here; the install hint is not shown")
def test_inception_without_the_extra_gives_the_install_hint(tmp_path):
    with pytest.raises(DiffPruneError, match=r"pip install 'diffprune\[inception\]'"):
        load_extractor("inception", tmp_path / "w.pth")


@pytest.mark.skipif(not _inception_importable(), reason="needs the inception extra (pytorch-fid + torchvision)")
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_inception_loads_a_local_weights_file_without_download(tmp_path, monkeypatch, fmt):
    from pytorch_fid import inception as pfi

    # A random-weight FID Inception state dict, built with pytorch-fid's own constructor and no download.
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: None)
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", lambda self, *a, **k: None)
    net = pfi.fid_inception_v3()
    monkeypatch.undo()
    g = torch.Generator().manual_seed(0)  # init_weights=False leaves memory uninitialised: fill it ourselves
    state = {k: torch.rand(v.shape, generator=g) if v.is_floating_point() else v.clone()
             for k, v in net.state_dict().items()}
    path = tmp_path / f"w.{fmt}"
    if fmt == "pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, path)
    ex = load_extractor("inception", path)
    assert ex.dim == 2048 and len(ex.weights_sha256) == 64
    loaded = dict(ex.module.named_parameters())
    name = "blocks.0.0.conv.weight"
    assert torch.equal(loaded[name], state["Conv2d_1a_3x3.conv.weight"])
    x = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)
    assert compute_features(ex, x).shape == (2, 2048)


def test_class_accuracy_on_real_digits_and_wrong_requests():
    """Real test digits requested as their own class score as the classifier's accuracy; as another class, ~0."""
    from diffprune.classifier import load_classifier
    from diffprune.data import load_data
    from diffprune.metrics import class_accuracy

    data = load_data("mnist", resolution=16, channels=1, split="test", limit=300)
    clf = load_classifier("mnist-classifier")
    right = class_accuracy(data.images, data.labels, clf, num_classes=10)
    assert right["accuracy"] >= 0.99 and right["confident_accuracy"] >= 0.95 and right["n"] == 300
    assert len(right["per_class"]) == 10 and min(right["per_class"]) >= 0.9
    wrong = class_accuracy(data.images, (data.labels + 1) % 10, clf, num_classes=10)
    assert wrong["accuracy"] <= 0.02
    only3 = class_accuracy(data.images[data.labels == 3], torch.full((int((data.labels == 3).sum()),), 3), clf,
                           num_classes=10)
    assert only3["per_class"][3] == only3["accuracy"] and only3["per_class"][0] is None
