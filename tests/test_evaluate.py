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
REQUIRED = ["fid", "fid_teacher", "ssim", "params", "teacher_params", "macs", "teacher_macs", "speedup"]


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
    assert saved["params"] == models["pruning"]["params"] < saved["teacher_params"] == models["pruning"]["base_params"]
    assert saved["macs"] == models["pruning"]["macs"] < saved["teacher_macs"]
    assert saved["mac_ratio"] == pytest.approx(saved["teacher_macs"] / saved["macs"])
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
