"""The training loop behind ``diffprune train`` (a teacher or scratch baseline) and ``diffprune finetune``.

Read top to bottom: one step = sample a batch, noise it at antithetic timesteps, ε-prediction MSE (optionally
distilled from a teacher), Adam with gradient clipping, EMA. Every random draw of step k on process r comes from
a generator seeded by (seed, k, r) and the data order from a per-epoch permutation seeded by (seed, epoch), so a
run resumed from a checkpoint ends with exactly the weights of an uninterrupted run.

Output folder (written by the main process only):
  config.json, diffusion_pytorch_model.safetensors, [pruning.json], scheduler/   final model (EMA weights)
  raw/                                                                          final model (raw weights)
  train_config.json, train_log.csv, train_summary.json, samples/, checkpoints/step-XXXXXXX/
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import _cond, objective
from .._fs import output_lock
from .._hashing import state_sha256
from .._torch import meta_copy
from ..errors import DiffPruneError, require
from ..records import read_log
from .accel import accelerate_settings, make_accelerator, shard_frozen, sharding
from .checkpoints import CHECKPOINT_PREFIX, restore_newest, save_checkpoint
from .config import TrainConfig, TrainResult
from .outputs import save_final, save_sample_grid, tensorboard, whole_model
from .state import all_finite
from .run_folder import (RunFolder, append_log, begin_segment, check_schedule, diverged, end_run, finished_result,
                         follow_run, open_run)


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def antithetic_timesteps(n: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """n timesteps where the second half mirrors the first (t, T-1-t): lower-variance loss estimates."""
    half = torch.randint(0, num_train_timesteps, ((n + 1) // 2,), generator=generator)
    return torch.cat([half, num_train_timesteps - 1 - half])[:n]


class _DataOrder:
    """Global sample position p -> image index, via a permutation per epoch seeded by (seed, epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perms = n, seed, {}

    def indices(self, start: int, count: int) -> torch.Tensor:
        out = []
        for p in range(start, start + count):
            epoch, offset = divmod(p, self.n)
            if epoch not in self._perms:
                self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(
                    _seed_of(self.seed, epoch, 7)))}
            out.append(self._perms[epoch][offset])
        return torch.stack(out)


@dataclass
class _Run:
    """What every step works on. ``model`` is the denoiser as accelerate prepared it (the forward and backward
    pass use it), ``raw`` the same module unwrapped (the EMA, checkpoints and final save use it); ``shell`` its
    shapes-only copy when FSDP shards it (:mod:`diffprune.train.state`), else None."""

    config: TrainConfig
    acc: Any
    folder: RunFolder
    data: Any
    scheduler: Any
    adapter: Any
    model: Any
    raw: Any
    optimizer: Any
    ema: Any
    shell: Any
    teacher: Any
    codec: Any
    order: _DataOrder
    command: str | None

    @property
    def main(self) -> bool:
        return self.acc.is_main_process


def _as_denoiser_data(model, data, adapter):
    """:class:`~diffprune.inputs.DenoiserData` from what ``train`` accepts (checked against the model)."""
    from .._hashing import content_sha256
    from ..data import ImageData
    from ..inputs import DenoiserData, denoiser_data

    if isinstance(data, DenoiserData):
        return data
    if isinstance(data, ImageData):
        return denoiser_data(model, data, adapter=adapter)
    require(isinstance(data, torch.Tensor) and data.dtype == torch.uint8 and data.ndim == 4,
            "images must be a uint8 tensor [N, C, H, W], an ImageData or a DenoiserData")
    return denoiser_data(model, ImageData(data, None, None, {"source": "tensor", "sha256": content_sha256(data)}),
                         adapter=adapter)


def train(unet, scheduler, images, config: TrainConfig, out_dir: str | os.PathLike, *,
          teacher=None, pruning: dict | None = None, resume: bool = False, overwrite: bool = False,
          run_info: dict | None = None, accelerator=None, progress: bool = True, inputs=(), pipeline=None,
          codec=None, on_step: Callable[[int, float], None] | None = None, adapter=None) -> TrainResult:
    """Train the denoiser ``unet`` (any supported family) on ``images``; write the final EMA model to ``out_dir``.

    ``images``: a uint8 tensor ``[N, C, H, W]``, an :class:`~diffprune.data.ImageData` (with labels for a
    class-conditional model) or a :class:`~diffprune.inputs.DenoiserData` (latents, for a latent pipeline). The
    loss targets what the scheduler's ``prediction_type`` says (:mod:`diffprune.objective`).
    ``pruning``: the pruned model's record; when given, the model is saved in diffprune's pruned format; with
    ``pipeline`` (``LoadedModel.pipeline``) the final model is a pipeline folder (other components copied).
    ``codec``: the latent pipeline's autoencoder, for sample grids. ``resume``: continue from the newest whole
    checkpoint in ``out_dir/checkpoints`` (settings, data, model, teacher and accelerate settings must match;
    ``steps`` may grow), or of an interrupted ``overwrite`` run. ``overwrite`` replaces a folder diffprune wrote,
    never one that is or contains one of ``inputs`` (paths); the old folder stays whole until the new run has
    finished (:mod:`diffprune.train.run_folder`). ``accelerator``: an ``accelerate.Accelerator`` (one is created
    if None; under ``accelerate launch`` it runs data-parallel). ``on_step(step, loss)`` is called after every
    step (a hook for callers and tests). ``adapter``: the model's adapter, when the caller resolved it already.
    """
    from ..adapters import resolve_adapter

    adapter = resolve_adapter(unet, adapter)
    data = _as_denoiser_data(unet, images, adapter)
    objective.prediction_type(scheduler)  # a supported one
    config = _settle(config, data, teacher)
    acc = accelerator or make_accelerator()
    settings = accelerate_settings(acc)
    require(settings["gradient_accumulation_steps"] == 1,
            f"gradient accumulation ({settings['gradient_accumulation_steps']} steps, from accelerate's config or "
            "ACCELERATE_GRADIENT_ACCUMULATION_STEPS) is not supported: it would scale the loss silently; raise "
            "--batch-size or launch more processes instead")
    identity = {"data": data.record["sha256"], "model": state_sha256(unet), "teacher": state_sha256(teacher),
                "accelerate": settings}
    out = Path(out_dir)
    with output_lock(out) if acc.is_main_process else contextlib.nullcontext():
        return _train_locked(unet, scheduler, data, config, out, acc=acc, identity=identity, teacher=teacher,
                             pruning=pruning, resume=resume, overwrite=overwrite, run_info=run_info or {},
                             progress=progress, inputs=inputs, on_step=on_step, adapter=adapter,
                             pipeline=pipeline, codec=codec)


def _settle(config: TrainConfig, data, teacher) -> TrainConfig:
    """The label-dropout default for this data; the distillation settings checked against ``teacher``."""
    if config.label_dropout is None:
        config = dataclasses.replace(config, label_dropout=0.1 if data.null_cond is not None else 0.0)
    require(config.label_dropout == 0 or data.null_cond is not None,
            f"label_dropout={config.label_dropout} needs a conditional model with an unconditional input (a DiT's "
            "null label, a text model's empty prompt); pass --label-dropout 0")
    require(config.kd_weight == 0 or teacher is not None, f"kd_weight={config.kd_weight} needs a teacher (--teacher DIR)")
    if teacher is not None and config.kd_weight == 0:
        raise DiffPruneError("a teacher was given but kd_weight=0; pass --kd-weight (paper: 0.7) or drop --teacher")
    return config


def _train_locked(unet, scheduler, data, config: TrainConfig, out: Path, *, acc, identity, teacher, pruning,
                  resume, overwrite, run_info, progress, inputs, on_step, adapter, pipeline,
                  codec) -> TrainResult:
    """The run, under ``out``'s lock: its folder, the prepared model, a resume, the loop, the final save."""
    main, world = acc.is_main_process, acc.num_processes
    if main:
        folder, config, record = open_run(out, config, identity, world, resume, overwrite, inputs)
    acc.wait_for_everyone()
    if not main:  # the others take the folder the main process chose, and the EMA horizon of the record it checked
        folder, config, record = follow_run(out, config, identity, world, resume)
    model, raw, optimizer, ema, empty, teacher = _prepare(unet, teacher, config, acc, adapter)
    run = _Run(config, acc, folder, data, scheduler, adapter, model, raw, optimizer, ema, empty, teacher, codec,
               order=_DataOrder(len(data), config.seed), command=run_info.get("command"))

    start_step, skipped = restore_newest(folder.checkpoints, raw, ema, optimizer, main) if resume else (0, [])
    if resume:
        require(start_step <= config.steps, f"--steps {config.steps} is below the checkpoint's step {start_step}")
        check_schedule(TrainConfig.from_dict(record["train"]), config, start_step,
                       record.get("diverged_at") is not None)
        finished = finished_result(folder, config, start_step)
        if finished is not None:  # nothing to train, nothing to rewrite; a staged run may still await its swap
            acc.wait_for_everyone()  # every process has read the folder before the main one moves it
            if main:
                folder.publish()
            return finished
    if main:
        begin_segment(folder, config, identity, world, run_info, record, start_step, skipped)
    log = _Log(run, start_step)
    _loop(run, log, start_step, progress, on_step)
    return _finish(run, log, pruning, pipeline)


def _prepare(unet, teacher, config: TrainConfig, acc, adapter):
    """The model set up for training, Adam and the EMA, placed (or sharded) by accelerate; the teacher frozen beside
    them. Returns (model as prepared, raw model, optimizer, EMA, shell or None, teacher)."""
    from diffusers.training_utils import EMAModel

    if config.dropout is not None:
        for m in unet.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = config.dropout
    adapter.prepare_for_training(unet)
    if config.gradient_checkpointing:
        require(getattr(unet, "_supports_gradient_checkpointing", False),
                f"{type(unet).__name__} does not support gradient checkpointing; drop --gradient-checkpointing")
        unet.enable_gradient_checkpointing()
    unet.train()
    # foreach: one fused update over all tensors (PyTorch's default on GPU only; measured on the 2-core CPU: Adam
    # 9.6 -> 5.3 ms and EMA 2.5 -> 1.1 ms per step for the pruned MNIST UNet's 182 tensors)
    optimizer = torch.optim.Adam(unet.parameters(), lr=config.lr, foreach=True)
    empty = meta_copy(unet, buffers=False) if sharding(acc) else None  # before sharding: the shapes whole
    model, optimizer = acc.prepare(unet, optimizer)
    raw = acc.unwrap_model(model)
    decay = config.resolved_ema_decay
    # min_decay = decay makes diffusers' EMAModel constant (its default ramps (1+k)/(10+k) up to `decay`).
    ema = EMAModel(raw.parameters(), decay=decay, min_decay=decay, foreach=True)
    if teacher is not None:
        teacher = teacher.to(acc.device).eval().requires_grad_(False)
        if empty is not None:  # sharded like the student: each process holds 1/N, gathered per call
            teacher = shard_frozen(acc, teacher)
    return model, raw, optimizer, ema, empty, teacher


class _Log:
    """The losses since the last row of train_log.csv (and tensorboard), written by the main process."""

    def __init__(self, run: _Run, start_step: int):
        self.path, self.images_per_step = run.folder.log, run.config.batch_size * run.acc.num_processes
        self.writer = tensorboard(run.folder.path) if run.main else None
        self.started = self.t0 = time.time()
        logged = read_log(self.path) if start_step else {}
        self.window = []
        self.last_loss = float(logged["loss"][-1]) if len(logged.get("loss", [])) else float("nan")

    def add(self, loss: float) -> None:
        self.last_loss = loss
        self.window.append(loss)

    def write(self, step: int, lr: float) -> None:
        ips = len(self.window) * self.images_per_step / max(time.time() - self.t0, 1e-9)
        row = {"step": step, "loss": float(np.mean(self.window)), "lr": lr, "images_per_s": ips}
        append_log(self.path, row)
        if self.writer is not None:
            for k in ("loss", "lr", "images_per_s"):
                self.writer.add_scalar(f"train/{k}", row[k], step)
        self.t0, self.window = time.time(), []

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _loop(run: _Run, log: _Log, start_step: int, progress: bool, on_step) -> None:
    """Steps ``start_step`` to ``steps``; after each, what is due: a log row, a sample grid, a checkpoint."""
    cfg = run.config
    bar = tqdm(total=cfg.steps, initial=start_step, desc="training", unit="step", disable=not (progress and run.main))
    for step in range(start_step, cfg.steps):
        lr = cfg.lr_at(step)
        loss = _step(run, step, lr)
        log.add(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        done = step + 1
        if run.main and (done % cfg.log_every == 0 or done == cfg.steps):
            log.write(done, lr)
        if cfg.sample_every and done % cfg.sample_every == 0:
            _sample_grid(run, done)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            _checkpoint(run, done)
        if on_step is not None:
            on_step(done, loss)
    bar.close()


def _step(run: _Run, step: int, lr: float) -> float:
    """One optimisation step at learning rate ``lr``; returns its loss."""
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    x0, noise, t, cond = _batch(run, step)
    loss = objective.loss_at(run.adapter, run.model, run.scheduler, x0, noise, t, cond, teacher=run.teacher,
                             kd_weight=run.config.kd_weight)
    finite = torch.isfinite(loss.detach()).reshape(1).float()
    if run.acc.num_processes > 1:  # every process must stop together, or the others hang in the next all-reduce
        finite = run.acc.gather(finite)
    if not bool(finite.all()):
        value = loss.item() if not math.isfinite(loss.item()) else "non-finite on another process"
        raise diverged(f"loss became {value}", step, run.config, run.folder, run.main, run.command)
    run.optimizer.zero_grad(set_to_none=True)
    run.acc.backward(loss)
    if run.config.grad_clip > 0:
        run.acc.clip_grad_norm_(run.model.parameters(), run.config.grad_clip)
    run.optimizer.step()
    run.ema.step(run.raw.parameters())
    return loss.item()


def _batch(run: _Run, step: int):
    """This process's batch of ``step``: clean inputs, noise, timesteps, conditioning. Every draw comes from
    (seed, step, rank), so a resumed run draws what the uninterrupted one did."""
    cfg, acc, data = run.config, run.acc, run.data
    B, world, rank = cfg.batch_size, acc.num_processes, acc.process_index
    seed = _seed_of(cfg.seed, step, rank)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    idx = run.order.indices(step * B * world + rank * B, B)
    x0, cond = data.batch(idx, acc.device)
    noise = torch.randn(x0.shape, generator=gen).to(acc.device)
    T = run.scheduler.config.num_train_timesteps
    t = (antithetic_timesteps(B, T, gen) if cfg.antithetic else torch.randint(0, T, (B,), generator=gen))
    t = t.to(acc.device)
    if cond is not None and cfg.label_dropout > 0:  # for classifier-free guidance; teacher sees the same
        drop = (torch.rand(B, generator=gen) < cfg.label_dropout).to(acc.device)
        cond = _cond.where(drop, data.null_cond, cond)
    return x0, noise, t, cond


def _sample_grid(run: _Run, done: int) -> None:
    model = whole_model("ema", run.raw, run.ema, run.shell, run.main)  # every process gathers under FSDP
    if run.main:
        save_sample_grid(model, run.scheduler, run.folder.path / "samples" / f"{CHECKPOINT_PREFIX}{done:07d}.png",
                         run.config.sample_steps, adapter=run.adapter, codec=run.codec, data=run.data)


def _checkpoint(run: _Run, done: int) -> None:
    run.acc.wait_for_everyone()
    # never publish diverged weights as a "good" checkpoint (the loss was checked before this step's update)
    if not all_finite(list(run.raw.parameters()) + list(run.ema.shadow_params), run.acc):
        raise diverged("the weights became non-finite", done, run.config, run.folder, run.main, run.command)
    save_checkpoint(run.folder.checkpoints, done, run.raw, run.ema, run.optimizer, run.config.keep_checkpoints,
                    run.main)


def _finish(run: _Run, log: _Log, pruning: dict | None, pipeline) -> TrainResult:
    """Save the final models, close the record (train_summary.json last), then publish a staged run."""
    run.acc.wait_for_everyone()
    save_final(run.raw, run.ema, run.shell, run.scheduler, run.folder.path, pruning, pipeline, run.main)
    if run.main:
        end_run(run.folder, run.config, log.last_loss, run.acc.num_processes, log.started)
        log.close()
        run.folder.publish()  # an overwrite: the old folder stayed whole until now
    run.acc.wait_for_everyone()
    return TrainResult(run.folder.out, run.config.steps, log.last_loss, time.time() - log.started)
