import pytest
import torch

from diffprune.cli import main
from diffprune.presets import build_model
from diffprune.samples import load_samples
from diffprune.sampling import default_scheduler


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("m") / "tiny"
    torch.manual_seed(0)
    build_model("tiny").save_pretrained(folder, safe_serialization=True)
    default_scheduler().save_pretrained(folder / "scheduler")
    return folder


def test_sample_writes_pngs_npz_grid_and_is_batch_invariant(model_dir, tmp_path):
    for bs in (1, 7):
        args = ["sample", str(model_dir), "--n", "7", "--steps", "4", "--seed", "100", "--batch-size", str(bs),
                "--out", str(tmp_path / f"b{bs}"), "--device", "cpu"]
        assert main(args) == 0
    a, seeds_a = load_samples(tmp_path / "b1")
    b, seeds_b = load_samples(tmp_path / "b7")
    assert a.shape == (7, 1, 8, 8) and seeds_a.tolist() == seeds_b.tolist() == list(range(100, 107))
    assert (a.int() - b.int()).abs().max() <= 1  # uint8 rounding of float noise only
    assert len(list((tmp_path / "b7").glob("0000[0-6].png"))) == 7 and (tmp_path / "b7" / "grid.png").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--n", "0"], "--n 0 must be >= 1"),
    (["--steps", "5000"], "num_inference_steps=5000 must be in [1, 1000]"),
])
def test_sample_bad_input(model_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "o"
    code = main(["sample", str(model_dir), "--out", str(out), "--device", "cpu", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]
    assert not out.exists()


def test_sample_refuses_non_empty_out(model_dir, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["sample", str(model_dir), "--n", "1", "--steps", "1", "--out", str(tmp_path), "--device", "cpu"]) == 2
    assert (tmp_path / "keep.txt").read_text() == "mine" and not (tmp_path / "samples.npz").exists()
