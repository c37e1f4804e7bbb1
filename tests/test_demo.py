"""The quick demo end to end (what a newcomer runs first), through the CLI, on the shipped teacher."""
import json
import math

import pytest
import torch

from diffprune.cli import main
from diffprune.data import to_uint8
from diffprune.importance import reinitialize_
from diffprune.io import load_model, load_pruned
from diffprune.metrics import paired_consistency
from diffprune.samples import load_sample_folder
from diffprune.sampling import sample


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the demo's 16x16 convolutions use both cores (the tiny test models do not)
    try:
        assert main(["demo", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_quick_demo_metrics(run_dir, capsys):
    m = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert m["macs"] / m["base_macs"] <= 0.55
    assert m["params"] < m["base_params"]
    for key in ("fid", "fid_teacher", "ssim", "params", "base_params", "macs", "base_macs", "speedup"):
        assert isinstance(m[key], (int, float)) and math.isfinite(m[key]), key
    for name in ("report.html", "report.md", "samples.png", "channel_widths.png", "timestep_loss.png",
                 "finetune_loss.png"):
        assert (run_dir / "eval" / name).stat().st_size > 1000, name
    stages = [json.loads((run_dir / s / "stage.json").read_text())["stage"] for s in ("prune", "finetune", "eval")]
    assert stages == ["prune", "finetune", "eval"]


def test_student_loads_and_beats_an_untrained_twin(run_dir):
    loaded = load_model(run_dir / "finetune" / "model")
    assert loaded.pruning is not None and loaded.pruning["method"] == "diff-pruning"
    cfg = json.loads((run_dir / "run_config.json").read_text())["eval"]
    teacher = load_sample_folder(run_dir / "eval" / "samples" / "teacher")
    student = load_sample_folder(run_dir / "eval" / "samples" / "student")
    assert student.seeds == teacher.seeds == list(range(cfg["seed"], cfg["seed"] + cfg["n"]))
    # the saved student reproduces its own evaluation samples from the same seeds
    again = sample(loaded.denoiser, loaded.scheduler, seeds=teacher.seeds[:4], num_inference_steps=cfg["steps"],
                   progress=False)
    assert (to_uint8(again).int() - student.images[:4].int()).abs().max() <= 1
    # an untrained model of the same (pruned) shape, same seeds: far less like the teacher
    twin = load_pruned(run_dir / "finetune" / "model")
    torch.manual_seed(0)
    reinitialize_(twin)
    untrained = to_uint8(sample(twin, loaded.scheduler, seeds=teacher.seeds, num_inference_steps=cfg["steps"],
                                progress=False))
    ssim_student = paired_consistency(teacher.images, student.images)["ssim"]
    ssim_untrained = paired_consistency(teacher.images, untrained)["ssim"]
    assert ssim_student > ssim_untrained + 0.2, (ssim_student, ssim_untrained)


def test_rerun_skips_finished_stages(run_dir, capsys):
    before = (run_dir / "eval" / "metrics.json").stat().st_mtime_ns
    assert main(["demo", "--quick", "--out", str(run_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("complete with the same settings; skipped") == 3
    assert (run_dir / "eval" / "metrics.json").stat().st_mtime_ns == before
    assert "MACs / denoiser call" in out and "report:" in out


def test_every_output_folder_carries_its_model_card(run_dir):
    """prune, fine-tune and eval outputs each get a README.md card (hub format) with the figures of their record."""
    from huggingface_hub import ModelCard

    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    for folder, stage in (("prune/model", "pruned"), ("finetune/model", "fine-tuned"), ("eval", "evaluated")):
        card = ModelCard.load(str(run_dir / folder / "README.md"))
        assert card.data.to_dict()["library_name"] == "diffusers" and f"({stage} with diffprune)" in card.text
        assert "needs diffprune to load" in card.text
    text = ModelCard.load(str(run_dir / "eval" / "README.md")).text
    assert f"| FID | {metrics['fid_teacher']:.4g} | {metrics['fid']:.4g} |" in text and "![samples](samples.png)" in text
    pruning = load_model(run_dir / "finetune" / "model").pruning
    assert f"({pruning['params'] / pruning['base_params']:.1%})" in text
