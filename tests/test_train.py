import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from diffprune.data import load_images
from diffprune.errors import DiffPruneError
from diffprune.presets import build_model
from diffprune.sampling import default_scheduler
from diffprune.objective import denoising_loss
from diffprune.train import TrainConfig, list_checkpoints, read_log, train


@pytest.fixture(scope="module")
def images():
    return load_images("mnist", resolution=8, channels=1, limit=256)


def _unet(seed=0):
    torch.manual_seed(seed)
    return build_model("tiny")


def test_loss_decreases(images, tmp_path):
    cfg = TrainConfig(steps=60, batch_size=16, lr=2e-3, log_every=10, checkpoint_every=60)
    train(_unet(), default_scheduler(), images, cfg, tmp_path, progress=False)
    log = read_log(tmp_path / "train_log.csv")
    assert log["step"].tolist() == [10, 20, 30, 40, 50, 60]
    assert log["loss"][-2:].mean() < 0.6 * log["loss"][0]
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                 "raw/diffusion_pytorch_model.safetensors", "train_config.json"):
        assert (tmp_path / name).is_file(), name


def test_resume_is_exact(images, tmp_path):
    cfg = TrainConfig(steps=12, batch_size=8, checkpoint_every=4, dropout=0.1, warmup_steps=3, ema_decay=0.9)
    init = _unet().state_dict()
    full = _unet()
    train(full, default_scheduler(), images, cfg, tmp_path / "a", progress=False)

    class Interrupt(Exception):
        """Stops the run at step 9, as a crash would."""

    def stop_at_9(step, loss):
        if step == 9:
            raise Interrupt

    part = _unet(seed=1)
    part.load_state_dict(init)
    with pytest.raises(Interrupt):
        train(part, default_scheduler(), images, cfg, tmp_path / "b", progress=False, on_step=stop_at_9)
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step-0000004", "step-0000008"]
    train(_unet(), default_scheduler(), images, cfg, tmp_path / "b", progress=False, resume=True)
    for name in ("diffusion_pytorch_model.safetensors", "raw/diffusion_pytorch_model.safetensors"):
        a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_resume_refuses_changed_settings(images, tmp_path):
    cfg = TrainConfig(steps=20, batch_size=4, checkpoint_every=20)
    train(_unet(), default_scheduler(), images, cfg, tmp_path, progress=False)
    with pytest.raises(DiffPruneError, match=r"settings \['lr'\] differ"):
        train(_unet(), default_scheduler(), images, TrainConfig(steps=40, batch_size=4, checkpoint_every=20, lr=1e-3),
              tmp_path, progress=False, resume=True)
    # --steps may grow; the automatic EMA decay keeps the horizon the first run resolved (1 - 10/20)
    res = train(_unet(), default_scheduler(), images, TrainConfig(steps=22, batch_size=4, checkpoint_every=20),
                tmp_path, progress=False, resume=True)
    record = json.loads((tmp_path / "train_config.json").read_text())
    assert res.steps == 22 and record["train"]["ema_decay"] == 0.5
    assert [(s["from_step"], s["to_step"]) for s in record["segments"]] == [(0, 20), (20, 22)]
    assert all(0 <= s["wall_minutes"] < 5 for s in record["segments"])
    with pytest.raises(DiffPruneError, match="exists and is not empty"):
        train(_unet(), default_scheduler(), images, cfg, tmp_path, progress=False)
    record["world_size"] = 2  # as if trained under `accelerate launch --num_processes 2`
    (tmp_path / "train_config.json").write_text(json.dumps(record))
    with pytest.raises(DiffPruneError, match=r"trained with 2 process\(es\), this one has 1; .* resume with 2"):
        train(_unet(), default_scheduler(), images, TrainConfig(steps=24, batch_size=4, checkpoint_every=20),
              tmp_path, progress=False, resume=True)


def test_kd_loss_formula():
    pred = torch.tensor([[1.0, 2.0]])
    noise = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[1.0, 0.0]])
    # a * mean((pred - teacher)^2) + (1 - a) * mean((pred - noise)^2) = 0.7 * 2 + 0.3 * 2.5
    assert denoising_loss(pred, noise, teacher, 0.7).item() == pytest.approx(0.7 * 2.0 + 0.3 * 2.5)
    assert denoising_loss(pred, noise).item() == pytest.approx(2.5)


def test_ema_decay_is_constant(images, tmp_path):
    from diffusers.training_utils import EMAModel

    d = 0.95
    ema = EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=d, min_decay=d)
    assert [ema.get_decay(k) for k in (2, 3, 10, 1000)] == [d] * 4
    # stock EMAModel is *not* constant: it ramps (1 + k) / (10 + k) up to `decay`
    assert EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=d).get_decay(3) == pytest.approx(3 / 12)
    # end to end: with d=0 the EMA weights equal the raw ones
    cfg = TrainConfig(steps=5, batch_size=4, ema_decay=0.0, checkpoint_every=5)
    train(_unet(), default_scheduler(), images, cfg, tmp_path, progress=False)
    a = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "raw" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "train_config.json").read_text())["train"]["ema_decay"] == 0.0
    assert TrainConfig(steps=2000).resolved_ema_decay == pytest.approx(0.995)
    assert TrainConfig(steps=5).resolved_ema_decay == 0.0


def test_training_loop_ema_is_the_constant_decay_average(images, tmp_path):
    d = 0.8
    unet = _unet()
    seen = []
    cfg = TrainConfig(steps=5, batch_size=4, ema_decay=d, checkpoint_every=5)
    train(unet, default_scheduler(), images, cfg, tmp_path, progress=False,
          on_step=lambda step, loss: seen.append(unet.conv_in.weight.detach().clone()))
    ema = seen[0]  # diffusers' EMAModel copies the weights at its first update, then decays by d every step
    for w in seen[1:]:
        ema = d * ema + (1 - d) * w
    saved = load_file(tmp_path / "diffusion_pytorch_model.safetensors")["conv_in.weight"]
    torch.testing.assert_close(saved, ema)
    assert not torch.allclose(saved, seen[-1])  # and it is not simply the raw weights


def test_training_device_that_accelerate_cannot_honour_is_refused():
    from diffprune.train import make_accelerator

    with pytest.raises(DiffPruneError, match="cannot be honoured"):
        make_accelerator("cuda:1")
    assert make_accelerator("cpu").device.type == "cpu"


def test_nan_loss_stops_and_keeps_last_checkpoint(images, tmp_path):
    unet = _unet()

    def poison(step, loss):
        if step == 4:
            with torch.no_grad():
                next(unet.parameters()).fill_(float("nan"))

    cfg = TrainConfig(steps=10, batch_size=4, checkpoint_every=2)
    with pytest.raises(DiffPruneError, match=r"loss became nan at step 4; the last good checkpoint is .*step-0000004"):
        train(unet, default_scheduler(), images, cfg, tmp_path, progress=False, on_step=poison)
    ckpt = load_file(tmp_path / "checkpoints" / "step-0000004" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in ckpt.values())


def test_lr_schedules():
    lin = TrainConfig(steps=110, lr=1.0, warmup_steps=10, lr_schedule="linear")
    assert [lin.lr_at(s) for s in (0, 9, 10, 60, 109)] == pytest.approx([0.1, 1.0, 1.0, 0.5, 0.01])
    cos = TrainConfig(steps=100, lr=2.0, lr_schedule="cosine", lr_decay_start=50)
    assert [cos.lr_at(s) for s in (0, 49, 50, 75, 99)] == pytest.approx([2.0, 2.0, 2.0, 1.0, 2.0 * 0.5 * (1 + math.cos(math.pi * 49 / 50))])
    assert TrainConfig(steps=5, lr=3e-4).lr_at(4) == 3e-4
    with pytest.raises(DiffPruneError, match=r"lr_schedule='step' is unknown; choose from \['constant', 'linear', 'cosine'\]"):
        TrainConfig(steps=5, lr_schedule="step")
    with pytest.raises(DiffPruneError, match="lr_decay_start=3 has no effect with lr_schedule='constant'"):
        TrainConfig(steps=5, lr_decay_start=3)
    with pytest.raises(DiffPruneError, match="lr_decay_start=5 must be below steps=5"):
        TrainConfig(steps=5, lr_schedule="linear", lr_decay_start=5)


def test_resume_into_a_decay_phase(images, tmp_path):
    """A constant-lr run resumes into a cosine anneal from its last step; a schedule that rewrites done steps is refused."""
    const = dict(batch_size=4, checkpoint_every=10, log_every=2, ema_decay=0.9)
    train(_unet(), default_scheduler(), images, TrainConfig(steps=10, **const), tmp_path, progress=False)
    with pytest.raises(DiffPruneError, match="changes the lr of step 1, which checkpoint step 10 already took.*--lr-decay-start 10"):
        train(_unet(), default_scheduler(), images, TrainConfig(steps=20, lr_schedule="cosine", **const), tmp_path,
              progress=False, resume=True)
    anneal = TrainConfig(steps=20, lr_schedule="cosine", lr_decay_start=10, **const)
    train(_unet(), default_scheduler(), images, anneal, tmp_path, progress=False, resume=True)
    log = read_log(tmp_path / "train_log.csv")
    assert log["lr"].tolist() == pytest.approx([2e-4] * 5 + [anneal.lr_at(s - 1) for s in (12, 14, 16, 18, 20)])
    assert log["lr"][-1] < 0.03 * 2e-4


def test_config_validation():
    with pytest.raises(DiffPruneError, match="kd_weight=1.5 must be in"):
        TrainConfig(steps=1, kd_weight=1.5)
    with pytest.raises(DiffPruneError, match="steps=0 must be an integer >= 1"):
        TrainConfig(steps=0)
    with pytest.raises(DiffPruneError, match=r"unknown key TrainConfig.lrr; allowed: \["):
        TrainConfig.from_dict({"steps": 1, "lrr": 1})


def test_two_process_accelerate_run(tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo): one run, written once by the main process."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "diffprune", "train",
           "--preset", "tiny", "--data", "mnist", "--steps", "4", "--batch-size", "4", "--log-every", "2",
           "--checkpoint-every", "2", "--out", str(out), "--device", "cpu"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((out / "train_config.json").read_text())["world_size"] == 2
    assert res.stdout.count("trained 4 steps") == 1  # printed and written by the main process only
    assert read_log(out / "train_log.csv")["step"].tolist() == [2, 4]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-0000002", "step-0000004"]
