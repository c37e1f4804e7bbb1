"""The evaluate verb and `diffprune eval` on a pruned tiny UNet and its teacher."""
import copy
import json
import math

import pytest
import torch

from diffprune.errors import DiffPruneError
from diffprune.evaluate import EvalConfig, evaluate
from diffprune.samples import load_sample_folder

FAST = dict(n=12, steps=3, data="mnist", ref_count=200, latency_batches=(1, 2), sampler_latency_batch=2,
            batch_size=8, grid_count=8)
REQUIRED = ["fid", "fid_teacher", "ssim", "params", "base_params", "macs", "base_macs", "speedup"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny teacher and its diff-pruned student (ratio 0.5), saved as model folders."""
    from diffprune.io import save_pruned
    from diffprune.presets import build_model
    from diffprune.prune import PruneConfig, prune_
    from diffprune.sampling import default_scheduler

    torch.manual_seed(0)
    teacher = build_model("tiny").eval()
    sched = default_scheduler()
    student = copy.deepcopy(teacher)
    rep = prune_(student, PruneConfig(method="diff-pruning", ratio=0.5, calib_batch=4, max_timesteps=4), "mnist",
                 scheduler=sched, progress=False)
    root = tmp_path_factory.mktemp("models")
    teacher.save_pretrained(root / "teacher", safe_serialization=True)
    sched.save_pretrained(root / "teacher" / "scheduler")
    save_pruned(student, root / "student", rep.to_dict(), scheduler=sched)
    (root / "student" / "train_log.csv").write_text("step,loss,lr,images_per_s\n0,0.5,1e-4,10\n10,0.3,1e-4,10\n")
    return dict(teacher=teacher, student=student.eval(), scheduler=sched, pruning=rep.to_dict(), root=root)


@pytest.fixture(scope="module")
def evaluated(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    m = evaluate(models["student"], models["teacher"], config=EvalConfig(**FAST, cache_dir=str(out.parent / "cache")),
                 out_dir=out, scheduler=models["scheduler"], pruning=models["pruning"])
    return m, out


def test_metrics_json_has_the_required_finite_values(evaluated, models):
    m, out = evaluated
    saved = json.loads((out / "metrics.json").read_text())
    for key in REQUIRED:
        assert isinstance(saved[key], (int, float)) and math.isfinite(saved[key]), key
    assert saved["params"] == models["pruning"]["params"] < saved["base_params"] == models["pruning"]["base_params"]
    assert saved["macs"] == models["pruning"]["macs"] < saved["base_macs"]
    assert saved["mac_ratio"] == pytest.approx(saved["base_macs"] / saved["macs"])
    assert saved["macs_per_image"] == saved["macs"] * 3  # 3 DDIM steps = 3 UNet calls per image
    assert saved["speedup"] > 0 and math.isfinite(saved["speedup_over_mac_ratio"])
    assert 0 < saved["fid"] and 0 < saved["fid_teacher"] and -1 <= saved["ssim"] <= 1
    assert saved["seeds"] == {"first": 0, "n": 12, "paired": 12}
    assert saved["device"] == "cpu" and saved["threads"] == 1
    assert saved["versions"]["torch"] == torch.__version__
    for role in ("student", "teacher"):
        lat = saved["latency"][role]["latency_unet"]
        assert sorted(lat) == ["1", "2"] and all(r["threads"] == 1 and r["device"] == "cpu" for r in lat.values())
    assert saved["fid_setup"]["extractor"]["extractor"] == "mnist-classifier"
    assert "ssim" not in saved["consistency"] and "student" not in saved["fid_setup"]  # one name per figure


def test_report_and_reusable_sample_folders_are_written(evaluated):
    _, out = evaluated
    for name in ("report.html", "report.md", "samples.png", "channel_widths.png", "timestep_loss.png"):
        assert (out / name).is_file(), name
    for role in ("student", "teacher"):
        assert (out / "samples" / role / "samples.npz").is_file()
        assert (out / "samples" / role / "00011.png").is_file()


def test_teacher_student_share_seeds_and_samples_are_reproducible(evaluated, models):
    from diffprune.data import to_uint8
    from diffprune.sampling import sample

    _, out = evaluated
    t = load_sample_folder(out / "samples" / "teacher")
    s = load_sample_folder(out / "samples" / "student")
    assert t.seeds == s.seeds == list(range(12))
    again = to_uint8(sample(models["teacher"], models["scheduler"], seeds=[5], num_inference_steps=3, progress=False))
    assert torch.equal(again[0], t.images[5])


def test_reusing_sample_folders_gives_the_same_consistency_whatever_the_order(evaluated, tmp_path):
    import numpy as np

    from diffprune.samples import load_samples, save_samples

    m, out = evaluated
    images, seeds = load_samples(out / "samples" / "teacher")
    perm = list(reversed(range(len(seeds))))
    save_samples(images[perm], seeds[perm], tmp_path / "shuffled")
    m2 = evaluate(None, None, config=EvalConfig(**{**FAST, "data": None}), out_dir=tmp_path / "reuse",
                  student_samples=out / "samples" / "student", teacher_samples=tmp_path / "shuffled", device="cpu")
    assert m2["ssim"] == pytest.approx(m["ssim"], abs=1e-12)
    assert m2["mse"] == pytest.approx(m["mse"], abs=1e-12)
    assert m2["fid"] is None and m2["speedup"] is None and m2["params"] is None
    assert json.loads((tmp_path / "reuse" / "metrics.json").read_text())["ssim"] == pytest.approx(m["ssim"])
    assert np.asarray(seeds).tolist() == list(range(12))


def test_teacher_samples_are_cached_by_content(evaluated, models, tmp_path):
    """A sweep evaluates many students against one teacher: its samples come from the cache, bitwise the same; a
    teacher with other weights misses."""
    first, out = evaluated
    config = EvalConfig(**FAST, cache_dir=str(out.parent / "cache"))
    assert first["teacher_samples_cache"]["hit"] is False
    again = evaluate(models["student"], models["teacher"], config=config, out_dir=tmp_path / "again",
                     scheduler=models["scheduler"])
    assert again["teacher_samples_cache"] == {**first["teacher_samples_cache"], "hit": True}
    for role in ("teacher", "student"):
        a = load_sample_folder(out / "samples" / role)
        b = load_sample_folder(tmp_path / "again" / "samples" / role)
        assert a.seeds == b.seeds and torch.equal(a.images, b.images)
    assert again["ssim"] == first["ssim"] and again["fid_teacher"] == first["fid_teacher"]
    other = copy.deepcopy(models["teacher"])
    with torch.no_grad():
        other.conv_out.bias.add_(0.01)
    changed = evaluate(models["student"], other, config=config, out_dir=tmp_path / "other",
                       scheduler=models["scheduler"])
    assert changed["teacher_samples_cache"]["hit"] is False
    assert changed["teacher_samples_cache"]["key"] != first["teacher_samples_cache"]["key"]


def test_eval_config_validation():
    with pytest.raises(DiffPruneError, match="latency_repeats=3 must be an integer >= 10"):
        EvalConfig(latency_repeats=3)
    with pytest.raises(DiffPruneError, match="unknown feature extractor 'fid'"):
        EvalConfig(extractor="fid")
    with pytest.raises(DiffPruneError, match="unknown skip"):
        EvalConfig(skip="cubic")
    assert EvalConfig(data="mnist").resolved_extractor == "mnist-classifier"
    assert EvalConfig(data="some/folder").resolved_extractor == "inception"


def test_refuses_an_existing_output_folder(evaluated, models):
    _, out = evaluated
    with pytest.raises(DiffPruneError, match="--overwrite"):
        evaluate(models["student"], models["teacher"], config=EvalConfig(**FAST), out_dir=out)


def test_cli_eval_end_to_end_and_errors(models, tmp_path, capsys):
    from diffprune.cli import main

    root = models["root"]
    out = tmp_path / "cli"
    args = ["eval", "--model", str(root / "student"), "--teacher", str(root / "teacher"), "--data", "mnist",
            "--ref-count", "200", "--n", "8", "--steps", "2", "--out", str(out), "--latency-batches", "1",
            "--sampler-latency-batch", "2", "--device", "cpu", "--cache-dir", str(tmp_path / "cache"),
            "--threads", "1"]
    assert main(args) == 0
    saved = json.loads((out / "metrics.json").read_text())
    assert all(math.isfinite(saved[k]) for k in REQUIRED)
    assert (out / "finetune_loss.png").is_file()  # from the student folder's train_log.csv
    capsys.readouterr()
    assert main(args) == 2  # existing output
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--overwrite" in err
    assert main(["eval", "--out", str(tmp_path / "x")]) == 2
    assert "--model" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# --- the cache: a damaged or unwritable entry never changes a result ------------------------------------------------

QUIET = {**FAST, "latency_batches": ()}  # what the cache holds does not depend on timing: leave it out
FIGURES = ("ssim", "ms_ssim", "mse", "fid", "fid_teacher", "fid_student_vs_teacher", "params", "macs")


@pytest.fixture(scope="module")
def cold(models, tmp_path_factory):
    """One evaluation on an empty cache: the figures every damaged-cache run must give to the last digit."""
    root = tmp_path_factory.mktemp("cold")
    m = evaluate(models["student"], models["teacher"], config=EvalConfig(**QUIET, cache_dir=str(root / "cache")),
                 out_dir=root / "eval", scheduler=models["scheduler"])
    assert m["teacher_samples_cache"]["hit"] is False and m["fid_setup"]["reference"]["hit"] is False
    return m, root / "cache"


def _damage(path, how: str) -> None:
    """Damage the cache entry at ``path``: cut it short, change its content keeping its metadata (a valid
    safetensors file whose tensors have the right shapes), fill it with garbage, or put a folder in its place."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "other-content":
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        t = load_file(path)
        if "images" in t:
            t["images"][0] = 255 - t["images"][0]  # one teacher image inverted
        else:
            t["mu"] = t["mu"] + 1.0  # the reference mean shifted
        save_file(t, path, metadata=meta)
    elif how == "garbage":
        path.write_bytes(bytes(range(256)) * 8)
    else:
        assert how == "folder"
        path.unlink()
        path.mkdir()


@pytest.mark.parametrize("how", ["truncated", "other-content", "garbage", "folder"])
@pytest.mark.parametrize("kind", ["teacher-samples", "fid-stats"])
def test_a_damaged_cache_entry_is_recomputed_and_the_result_is_the_cold_one(cold, models, tmp_path, capfd, kind,
                                                                           how):
    import shutil
    from pathlib import Path

    first, cache = cold
    shutil.copytree(cache, tmp_path / "cache")
    info = first["teacher_samples_cache"] if kind == "teacher-samples" else first["fid_setup"]["reference"]
    entry = tmp_path / "cache" / kind / Path(info["path"]).name
    _damage(entry, how)
    m = evaluate(models["student"], models["teacher"], config=EvalConfig(**QUIET, cache_dir=str(tmp_path / "cache")),
                 out_dir=tmp_path / "eval", scheduler=models["scheduler"])
    for key in FIGURES:
        assert m[key] == first[key], key  # to the last digit
    again = m["teacher_samples_cache"] if kind == "teacher-samples" else m["fid_setup"]["reference"]
    other = m["fid_setup"]["reference"] if kind == "teacher-samples" else m["teacher_samples_cache"]
    assert again["hit"] is False and again["key"] == info["key"] and other["hit"] is True
    assert (tmp_path / "eval" / "metrics.json").is_file()
    if how == "folder":  # nowhere to write the entry: a warning, and the run goes on
        assert "could not write the cache entry" in capfd.readouterr().err
    else:  # the entry is replaced, and says why
        assert again["replaced"] and "recomputing it" in capfd.readouterr().err
        healed = evaluate(models["student"], models["teacher"],
                          config=EvalConfig(**QUIET, cache_dir=str(tmp_path / "cache")), out_dir=tmp_path / "healed",
                          scheduler=models["scheduler"])
        assert healed["teacher_samples_cache"]["hit"] and healed["fid_setup"]["reference"]["hit"]


@pytest.mark.parametrize("how", ["below-a-file", "disk-full"])
def test_an_unwritable_cache_still_writes_the_evaluation(cold, models, tmp_path, capfd, monkeypatch, how):
    import errno

    first, _ = cold
    cache = tmp_path / "cache"
    if how == "below-a-file":
        (tmp_path / "file").write_text("not a folder")
        cache = tmp_path / "file" / "cache"
    else:
        def full(path, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr("diffprune._cache.atomic_write_bytes", full)
    m = evaluate(models["student"], models["teacher"], config=EvalConfig(**QUIET, cache_dir=str(cache)),
                 out_dir=tmp_path / "eval", scheduler=models["scheduler"])
    for key in FIGURES:
        assert m[key] == first[key], key
    assert capfd.readouterr().err.count("could not write the cache entry") == 2  # teacher samples, FID statistics
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["ssim"] == first["ssim"] and (tmp_path / "eval" / "report.html").is_file()
    assert (tmp_path / "eval" / "samples" / "teacher" / "samples.npz").is_file()


# --- metrics.json: one name per figure, older files still read -------------------------------------------------------

def test_metrics_json_names_the_unpruned_model_base_and_records_latency_once(evaluated):
    _, out = evaluated
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["base_macs_per_image"] == saved["base_macs"] * 3
    assert not [k for k in saved if k.startswith("teacher_") and k != "teacher_samples_cache"]
    assert "latency_per_image_s" not in saved and "teacher_latency_per_image_s" not in saved
    lat = {role: saved["latency"][role]["latency_sampler"]["per_image_s"] for role in ("student", "teacher")}
    assert saved["speedup"] == pytest.approx(lat["teacher"] / lat["student"])


def test_an_older_metrics_json_reads_under_todays_names():
    from pathlib import Path

    from diffprune.cli.run import summary_table
    from diffprune.records import read_metrics

    path = Path(__file__).parents[1] / "benchmarks" / "results" / "demo_metrics.json"  # written with teacher_*
    old = json.loads(path.read_text())
    m = read_metrics(path)
    for key in ("params", "macs", "macs_per_image"):
        assert m[f"base_{key}"] == old[f"teacher_{key}"] and f"teacher_{key}" not in m
    assert {k: v for k, v in m.items() if not k.startswith("base_")} == {
        k: v for k, v in old.items() if k not in ("teacher_params", "teacher_macs", "teacher_macs_per_image")}
    assert read_metrics(m) == m and read_metrics({"macs": 1}) == {"macs": 1}  # nothing filled in
    table = summary_table(old, "run", 60)
    assert table == summary_table(m, "run", 60) and f"{old['teacher_macs']:,d}" in table


def test_the_adapter_is_looked_up_once_and_handed_down(models, tmp_path, monkeypatch):
    import diffprune.adapters as adapters

    calls = []
    lookup = adapters.adapter_for
    monkeypatch.setattr(adapters, "adapter_for", lambda model: calls.append(model) or lookup(model))
    config = EvalConfig(**{**FAST, "data": None, "latency_batches": (1,)})
    evaluate(models["student"], models["teacher"], config=config, out_dir=tmp_path / "a", scheduler=models["scheduler"])
    assert len(calls) == 1
    evaluate(models["student"], models["teacher"], config=config, out_dir=tmp_path / "b", scheduler=models["scheduler"],
             adapter=lookup(models["student"]))
    assert len(calls) == 1
