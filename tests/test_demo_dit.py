"""The quick DiT demo end to end, through the CLI, on the shipped class-conditional latent DiT."""
import json
import math

import pytest
import torch

from diffprune.cli import main
from diffprune.io import load_model, load_pipeline


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-dit") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["demo", "--model", "mnist-dit", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_quick_dit_demo_metrics_and_report(run_dir):
    m = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert m["macs"] / m["base_macs"] <= 0.52 and m["params"] < m["base_params"]
    for key in ("fid", "fid_teacher", "ssim", "class_accuracy", "class_accuracy_teacher", "speedup"):
        assert isinstance(m[key], (int, float)) and math.isfinite(m[key]), key
    assert m["class_accuracy_teacher"] >= 0.8  # the shipped teacher draws the digit it is asked for
    assert len(m["class_accuracy_detail"]["student"]["per_class"]) == 10
    assert m["config"]["guidance_scale"] > 1
    for name in ("report.html", "class_accuracy.png", "class_grid.png", "timestep_loss.png", "channel_widths.png"):
        assert (run_dir / "eval" / name).stat().st_size > 1000, name


def test_the_pruned_dit_is_a_stock_pipeline(run_dir):
    student = load_model(run_dir / "finetune" / "model")
    assert student.adapter.name == "dit" and student.pruning["method"] == "diff-pruning"
    assert student.class_names == [str(d) for d in range(10)]
    pipe = load_pipeline(run_dir / "finetune" / "model")
    assert type(pipe).__name__ == "DiTPipeline" and pipe.get_label_ids(["7"]) == [7]
    images = pipe(class_labels=[7], guidance_scale=2.0, num_inference_steps=4, output_type="np").images
    assert images.shape == (1, 16, 16, 1)
