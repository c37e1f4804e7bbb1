"""Every bad input, over all commands and the run config: one line `diffprune: error: ...` naming the value, the
constraint and the fix; exit status 2; no traceback; no output folder; nothing of the user's changed."""
import errno
import json
import sys
import types

import numpy as np
import pytest
import torch
from conftest import save_tiny_model
from diffusers import DDPMScheduler

from diffprune.cli import main
from diffprune.io import save_pruned
from diffprune.presets import build_model
from diffprune.prune import PruneConfig, prune_


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("bad")
    sched = DDPMScheduler(num_train_timesteps=10)
    unet = save_tiny_model(r / "model", sched)
    report = prune_(unet, PruneConfig(method="magnitude", ratio=0.5, ratio_mode="uniform"), progress=False)
    save_pruned(unet, r / "pruned", report.to_dict(), scheduler=sched)
    # a pruned folder whose recorded head counts disagree with its weights (8-wide q/k/v, "4 heads of 4")
    rec = report.to_dict()
    name = next(iter(rec["structure"]["meta"]["attention"]))
    rec["structure"]["meta"]["attention"][name]["heads"] = 4 * rec["structure"]["meta"]["attention"][name]["heads"]
    save_pruned(unet, r / "bad-heads", rec, scheduler=sched)
    (r / "imgs").mkdir()
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(r / "imgs" / f"{i}.png")
    (r / "broken").mkdir()
    (r / "broken" / "a.png").write_bytes(b"not a png")
    torch.save(build_model("tiny").state_dict(), r / "unet.pth")
    (r / "arch.json").write_text('{"block_out_channels": [8, 16],')  # truncated JSON
    (r / "odd.json").write_text(json.dumps({**_tiny(), "block_out_channels": [10, 16]}))
    run = {"model": str(r / "model"), "data": "mnist", "prune": {"method": "magnitude", "ratio": 0.3},
           "finetune": {"steps": 1, "batch_size": 2}, "eval": {"n": 2, "steps": 1, "latency_batches": []}}
    (r / "run.yaml").write_text(json.dumps(run))  # JSON is YAML
    (r / "bad.yaml").write_text("model: [unclosed\n")
    (r / "user").mkdir()
    (r / "user" / "notes.txt").write_text("mine")
    return r


def _tiny():
    from diffprune.presets import PRESETS

    return {k: list(v) if isinstance(v, tuple) else v for k, v in PRESETS.get("tiny").items()}


PRUNE = ["prune", "--model", "{r}/model", "--method", "magnitude", "--ratio", "0.3", "--device", "cpu"]
TRAIN = ["train", "--preset", "tiny", "--data", "mnist", "--steps", "1", "--batch-size", "2", "--device", "cpu"]
FINETUNE = ["finetune", "{r}/pruned", "--data", "mnist", "--steps", "1", "--batch-size", "2", "--device", "cpu"]
SAMPLE = ["sample", "{r}/model", "--n", "2", "--steps", "1", "--device", "cpu"]
EVAL = ["eval", "--model", "{r}/pruned", "--teacher", "{r}/model", "--n", "2", "--steps", "1",
        "--latency-batches", "none", "--device", "cpu"]

# name: (arguments, "--out" or None (the case names its own), what the message must say)
CASES = {
    "prune-empty-model": (["prune", "--model", "", "--ratio", "0.3", "--method", "magnitude"], "out",
                          "model '' is empty"),
    "prune-empty-data": ([*PRUNE[:4], "diff-pruning", *PRUNE[5:], "--data", ""], "out", "data '' is empty"),
    "prune-empty-out": ([*PRUNE, "--out", ""], None, "--out is empty"),
    "prune-typo-path-not-hub": ([*PRUNE[:2], "{r}/modle", *PRUNE[3:]], "out", "not found: no such file or folder"),
    "prune-typo-relative": ([*PRUNE[:2], "./nope/model", *PRUNE[3:]], "out", "no such file or folder"),
    "prune-data-typo-not-hub": ([*PRUNE[:4], "diff-pruning", *PRUNE[5:], "--data", "{r}/imgz"], "out",
                                "data '.*imgz' not found: no such file or folder"),
    "prune-seed-2-63": ([*PRUNE, "--seed", str(2**63)], "out", r"seed=9223372036854775808 is too large"),
    "prune-ratio-1.5": ([*PRUNE[:5], "--ratio", "1.5", "--device", "cpu"], "out", r"ratio=1.5 must be in \(0, 1\)"),
    "prune-setting-of-another-method": ([*PRUNE, "--thr", "0.1"], "out",
                                        r"thr=0.1 does not apply to method 'magnitude'; it is a setting of"),
    "prune-unknown-method": ([*PRUNE[:3], "--method", "l1", *PRUNE[5:]], "out", "unknown method 'l1'; choose from"),
    "prune-ratio-and-target": ([*PRUNE, "--target-macs", "0.5"], "out", "give exactly one of ratio"),
    "prune-ratio-not-a-number": ([*PRUNE[:5], "--ratio", "lots", "--device", "cpu"], "out",
                                 "argument --ratio: invalid float value: 'lots'"),
    "prune-pickle-model": (["prune", "--model", "{r}/unet.pth", "--ratio", "0.3", "--method", "magnitude"], "out",
                           "is a pickle checkpoint; diffprune never loads pickles"),
    "prune-out-is-input": ([*PRUNE, "--out", "{r}/model", "--overwrite"], None, "is or contains the input"),
    "prune-out-holds-input": ([*PRUNE, "--out", "{r}", "--overwrite"], None, "is or contains the input"),
    "prune-out-user-folder": ([*PRUNE, "--out", "{r}/user", "--overwrite"], None, "was not written by diffprune"),
    "prune-unreadable-image": ([*PRUNE[:4], "diff-pruning", *PRUNE[5:], "--data", "{r}/broken"], "out",
                               "cannot read image .*a.png"),
    "prune-hf-mixed-sizes": ([*PRUNE[:4], "diff-pruning", *PRUNE[5:], "--data", "someone/mixed"], "out",
                             r"image someone/mixed\[1\] has shape .* one size"),
    "prune-disk-full": ([*PRUNE], "out", "No space left on device"),
    "prune-depth-target-latency": ([*PRUNE[:4], "depth", "--target-latency", "0.6", "--device", "cpu"], "out",
                                   "target_latency=0.6 does not apply to method 'depth': depth pruning takes ratio "
                                   "or target_macs"),
    "prune-round-to-wider-than-every-layer": ([*PRUNE, "--round-to", "4096"], "out",
                                              r"round_to=4096 leaves every layer whole: .*the widest prunable layer, "
                                              r"\S+, has \d+ channels; choose a round_to below"),
    "info-heads-disagree": (["info", "{r}/bad-heads"], None, "do not split into .* heads of .*does not match the weights"),
    "train-grad-clip-inf": ([*TRAIN, "--grad-clip", "inf"], "out", r"grad_clip=inf must be a finite number"),
    "train-malformed-config": (["train", "--config", "{r}/arch.json", *TRAIN[3:]], "out", "is not valid JSON"),
    "train-groups-do-not-divide": (["train", "--config", "{r}/odd.json", *TRAIN[3:]], "out",
                                   r"\[10, 16\] must all be divisible by norm_num_groups=4"),
    "train-seed-2-63": ([*TRAIN, "--seed", str(2**63)], "out", "is too large: seeds must be below 2\\*\\*63"),
    "train-steps-0": ([*TRAIN[:5], "--steps", "0", *TRAIN[7:]], "out", "steps=0 must be an integer >= 1"),
    "train-lr-0": ([*TRAIN, "--lr", "0"], "out", "lr=0.0 must be a positive number"),
    "train-resume-nothing": ([*TRAIN, "--resume"], "out", "holds no train_config.json; start without --resume"),
    "train-out-is-data": (["train", "--preset", "tiny", "--data", "{r}/imgs", *TRAIN[5:], "--overwrite"], "{r}/imgs",
                          "is or contains the input"),
    "train-empty-data": (["train", "--preset", "tiny", "--data", "", *TRAIN[5:]], "out", "data '' is empty"),
    "train-unknown-preset": (["train", "--preset", "huge", *TRAIN[3:]], "out", "unknown preset 'huge'; choose from"),
    "finetune-kd-without-teacher": ([*FINETUNE, "--kd-weight", "0.7"], "out", "kd_weight=0.7 needs a teacher"),
    "finetune-device-cuda-1": ([*FINETUNE[:-1], "cuda:1"], "out", "device='cuda:1' cannot be honoured by training"),
    "finetune-out-is-model": ([*FINETUNE, "--overwrite"], "{r}/pruned", "is or contains the input"),
    "sample-n-0": ([*SAMPLE[:2], "--n", "0", *SAMPLE[4:]], "out", "--n 0 must be >= 1"),
    "sample-seed-2-63": ([*SAMPLE, "--seed", str(2**63 - 1)], "out", "and --seed \\+ 1 too"),
    "sample-steps-too-many": ([*SAMPLE[:4], "--steps", "5000", *SAMPLE[6:]], "out", r"num_inference_steps=5000 must be"),
    "eval-missing-model": ([*EVAL[:2], "{r}/gone", *EVAL[3:]], "out", "not found: no such file or folder"),
    "eval-latency-repeats-3": ([*EVAL, "--latency-repeats", "3"], "out", "latency_repeats=3 must be an integer >= 10"),
    "eval-not-a-sample-folder": ([*EVAL, "--student-samples", "{r}/user"], "out", "has neither samples.npz"),
    "eval-threads-0": ([*EVAL, "--threads", "0"], "out", "--threads 0 must be >= 1"),
    "run-device-cpu0-before-any-stage": (["run", "{r}/run.yaml", "--device", "cpu:0"], "out",
                                         "device='cpu:0' cannot be honoured by training"),
    "run-malformed-yaml": (["run", "{r}/bad.yaml"], "out", "is not valid YAML"),
    "run-out-user-folder": (["run", "{r}/run.yaml", "--device", "cpu"], "{r}/user", "not a diffprune run folder"),
    "run-missing-config": (["run", "{r}/nope.yaml"], "out", "does not exist; pass a YAML file"),
}


def _snapshot(r):
    return {str(p.relative_to(r)): p.read_bytes() for p in sorted(r.rglob("*")) if p.is_file()}


def test_there_are_at_least_30_distinct_bad_inputs():
    assert len(CASES) >= 30 and len({c[2] for c in CASES.values()}) >= 30


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case, root, tmp_path, capsys, monkeypatch):
    args, out, message = CASES[case]
    if out == "out":
        out = str(tmp_path / "out")
    args = [a.format(r=root) for a in args] + (["--out", out.format(r=root)] if out else [])
    if case == "prune-disk-full":
        import safetensors.torch

        def full(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".out.tmp"))

        monkeypatch.setattr(safetensors.torch, "save_file", full)
    if case == "prune-hf-mixed-sizes":
        import huggingface_hub
        from PIL import Image

        class DS:
            column_names = ["image"]

            def __len__(self):
                return 2

            def __getitem__(self, key):
                return [Image.new("L", (8, 8)), Image.new("L", (9, 9))]

        monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, **k: DS()))
        monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda self, n: types.SimpleNamespace(sha="abc"))
    before = _snapshot(root)
    capsys.readouterr()
    rc = main(args)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == 2, (case, captured.out[-500:], err)
    assert len(err.splitlines()) == 1 and err.startswith("diffprune: error: ") and "Traceback" not in err, err
    import re

    assert re.search(message, err), (case, err)
    assert _snapshot(root) == before, case  # nothing of the user's changed
    assert not (tmp_path / "out").exists(), case  # no output folder
    assert not list(tmp_path.glob(".out.*")), case  # no temporary leftovers
