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
import copy
import csv
import dataclasses
import hashlib
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ._fs import atomic_write_json, read_json
from .data import to_uint8
from .errors import DiffPruneError, require, require_int, require_seed
from .records import LOG_FIELDS, read_log, run_info

CHECKPOINT_PREFIX = "step-"
LR_SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training or fine-tuning run. Defaults are the Diff-Pruning paper's recipe.

    ``ema_decay=None`` ties the EMA horizon to the run: decay = min(0.9999, 1 - 10 / steps), i.e. the EMA averages
    over the last ~10% of the steps. The paper's constant 0.9999 suits 100K-step runs; over a 2K-step run it would
    leave the EMA weights ~82% the pruned initialisation (0.9999^2000). The first update copies the weights; from then on the decay is constant.
    ``batch_size`` is per process; ``kd_weight`` > 0 needs a teacher (loss = a·‖f_T − f_S‖² + (1 − a)·‖target − f_S‖²,
    :mod:`diffprune.objective`). ``label_dropout``: for a conditional model with an unconditional input (a DiT's
    null label, a text model's empty prompt), the share of labels or captions replaced by it so that classifier-free
    guidance keeps working (None: 0.1, DiT's and Stable Diffusion's recipe).
    ``gradient_checkpointing``: recompute activations in the backward pass (diffusers' own checkpointing; less
    memory, ~30% more time, the same gradients); mixed precision is accelerate's setting (``accelerate launch
    --mixed_precision fp16`` or its config), recorded with the run.
    ``lr_schedule``: "constant" (the paper's), or "linear" / "cosine" decay to 0 at ``steps``, starting at
    ``lr_decay_start`` (or the end of warm-up, if later). A constant-lr run can be resumed into a decay phase with
    ``lr_decay_start`` >= its last step: resuming only refuses changes to the learning rate of steps already done.
    """

    steps: int
    batch_size: int = 64
    lr: float = 2e-4
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    lr_decay_start: int = 0
    grad_clip: float = 1.0
    ema_decay: float | None = None
    antithetic: bool = True
    dropout: float | None = None
    kd_weight: float = 0.0
    label_dropout: float | None = None
    gradient_checkpointing: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    sample_every: int = 0
    sample_steps: int = 20
    log_every: int = 25
    seed: int = 0

    def __post_init__(self):
        require_int("steps", self.steps, 1)
        require_int("batch_size", self.batch_size, 1)
        require_int("warmup_steps", self.warmup_steps, 0)
        require_int("lr_decay_start", self.lr_decay_start, 0)
        require(self.lr_schedule in LR_SCHEDULES,
                f"lr_schedule={self.lr_schedule!r} is unknown; choose from {list(LR_SCHEDULES)}")
        require(self.lr_schedule != "constant" or self.lr_decay_start == 0,
                f"lr_decay_start={self.lr_decay_start} has no effect with lr_schedule='constant'; choose linear or "
                "cosine, or drop it")
        require(self.lr_schedule == "constant" or self.lr_decay_start < self.steps,
                f"lr_decay_start={self.lr_decay_start} must be below steps={self.steps}, or the decay never starts")
        require_int("checkpoint_every", self.checkpoint_every, 1)
        require_int("keep_checkpoints", self.keep_checkpoints, 1)
        require_int("sample_every", self.sample_every, 0)
        require_int("sample_steps", self.sample_steps, 1)
        require_int("log_every", self.log_every, 1)
        require_seed("seed", self.seed)
        require(self.lr > 0 and math.isfinite(self.lr), f"lr={self.lr!r} must be a positive number, e.g. 2e-4")
        require(self.grad_clip >= 0 and math.isfinite(self.grad_clip),
                f"grad_clip={self.grad_clip!r} must be a finite number >= 0 (0 disables clipping), e.g. 1.0")
        require(self.ema_decay is None or 0 <= self.ema_decay < 1,
                f"ema_decay={self.ema_decay!r} must be in [0, 1) or None (auto: 1 - 10/steps)")
        require(self.dropout is None or 0 <= self.dropout < 1, f"dropout={self.dropout!r} must be in [0, 1)")
        require(0 <= self.kd_weight <= 1, f"kd_weight={self.kd_weight!r} must be in [0, 1] (paper: 0.7)")
        require(self.label_dropout is None or 0 <= self.label_dropout < 1,
                f"label_dropout={self.label_dropout!r} must be in [0, 1) or None (0.1 for a model with a null "
                "label, else 0)")

    @property
    def resolved_ema_decay(self) -> float:
        return self.ema_decay if self.ema_decay is not None else min(0.9999, max(0.0, 1 - 10 / self.steps))

    def lr_at(self, step: int) -> float:
        """The learning rate of (0-based) ``step``: warm-up, then constant or decaying to 0 at ``steps``."""
        lr = self.lr * min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else self.lr
        start = max(self.warmup_steps, self.lr_decay_start)
        if self.lr_schedule == "constant" or step < start:
            return lr
        frac = (step - start) / max(1, self.steps - start)
        return lr * ((1 - frac) if self.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * frac)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        from ._config import config_from_dict

        return config_from_dict(cls, d)


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    steps: int
    final_loss: float
    seconds: float


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


# --- checkpoints: safetensors + JSON, never pickles ------------------------------------------------------------
# A checkpoint is written into a temporary folder, fsynced, then renamed to step-XXXXXXX: it exists whole or not at
# all. Its state.json (written last) holds the sha256 of each tensor file, so a checkpoint damaged later (a truncated
# copy, a bad disk) is detected on resume, reported, and the previous one used instead.

CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors")


def _save_checkpoint(folder: Path, step: int, model, ema, optimizer, keep: int) -> None:
    from ._fs import fsync_path, fsync_tree

    tmp = folder / f".{CHECKPOINT_PREFIX}{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    save_file({f"{i}": p.detach().cpu().contiguous() for i, p in enumerate(ema.shadow_params)}, tmp / "ema.safetensors")
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for i, st in opt["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{i}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{i}.{k}"] = v
    save_file(tensors, tmp / "optimizer.safetensors")
    from ._hashing import file_sha256 as sha256_file

    atomic_write_json(tmp / "state.json", {
        "step": step, "param_groups": opt["param_groups"], "optimizer_scalars": scalars,
        "ema": {"optimization_step": ema.optimization_step, "decay": ema.decay},
        "sha256": {name: sha256_file(tmp / name) for name in CHECKPOINT_FILES},
    })
    fsync_tree(tmp)
    final = folder / f"{CHECKPOINT_PREFIX}{step:07d}"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_path(folder)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(folder: Path) -> list[Path]:
    """Published checkpoints (those with state.json), oldest first; :func:`verify_checkpoint` checks one."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / "state.json").is_file()
             and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def verify_checkpoint(ckpt: Path) -> str | None:
    """None if ``ckpt`` is whole (state.json parses, every file matches its recorded sha256); else the reason."""
    from ._hashing import file_sha256 as sha256_file

    try:
        state = read_json(ckpt / "state.json")
        digests = state["sha256"]
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"state.json is unreadable ({type(e).__name__})"
    for name in CHECKPOINT_FILES:
        if not (ckpt / name).is_file():
            return f"{name} is missing"
        if sha256_file(ckpt / name) != digests.get(name):
            return f"{name} does not match its recorded sha256 (truncated or damaged)"
    return None


def _load_checkpoint(ckpt: Path, model, ema, optimizer) -> int:
    state = read_json(ckpt / "state.json")
    weights = load_file(ckpt / "model.safetensors")
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise DiffPruneError(f"checkpoint {str(ckpt)!r} does not fit this model ({first}); resume with the same model") from None
    shadow = load_file(ckpt / "ema.safetensors")
    ema.shadow_params = [shadow[f"{i}"].to(p.device) for i, p in enumerate(ema.shadow_params)]
    ema.optimization_step = state["ema"]["optimization_step"]
    tensors = load_file(ckpt / "optimizer.safetensors")
    opt_state: dict = {}
    for key, v in list(tensors.items()) + list(state["optimizer_scalars"].items()):
        i, k = key.split(".", 1)
        opt_state.setdefault(int(i), {})[k] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    return int(state["step"])


def _restore_newest(ckpt_dir: Path, model, ema, optimizer, main: bool) -> tuple[int, list[str]]:
    """Load the newest whole checkpoint; returns (its step, the names of newer damaged ones that were skipped)."""
    skipped = []
    for ckpt in reversed(list_checkpoints(ckpt_dir)):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            step = _load_checkpoint(ckpt, model, ema, optimizer)
            if skipped and main:
                print(f"diffprune: warning: skipped damaged checkpoint(s) {skipped}; resuming from {ckpt.name}",
                      file=sys.stderr)
            return step, skipped
        skipped.append(f"{ckpt.name} ({problem})")
    if skipped:
        raise DiffPruneError(f"--resume: every checkpoint in {str(ckpt_dir)!r} is damaged ({'; '.join(skipped)}); "
                             "start anew with --overwrite")
    return 0, []


def make_accelerator(device=None):
    """An ``accelerate.Accelerator`` for the caller's ``device``: None leaves the choice to accelerate (its launch
    config, else CUDA when present), "cpu" forces the CPU, "cuda" uses the GPU accelerate assigns each process."""
    from accelerate import Accelerator

    check_training_device(device)
    kind = None if device is None else str(device).split(":")[0]
    return Accelerator(cpu=kind == "cpu")


def check_training_device(device) -> None:
    """Refuse a device that training cannot honour (it runs where accelerate places each process)."""
    require(device is None or str(device) in ("cpu", "cuda", "cuda:0"),
            f"device={str(device)!r} cannot be honoured by training, which runs where accelerate places each "
            "process; pass cpu or cuda and choose GPUs with CUDA_VISIBLE_DEVICES (or accelerate launch --gpu_ids)")


def accelerate_settings(acc) -> dict:
    """The accelerate settings that change what a step computes (from its launch config or environment)."""
    plugin = getattr(acc.state, "dynamo_plugin", None)
    backend = getattr(plugin, "backend", None)
    return {"mixed_precision": str(acc.mixed_precision),
            "gradient_accumulation_steps": int(acc.gradient_accumulation_steps),
            "dynamo_backend": str(getattr(backend, "value", backend) or "no").lower()}


def state_sha256(module) -> str | None:
    """sha256 of a module's state dict (names, dtypes, shapes, values): what a resumed run compares."""
    if module is None:
        return None
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        v = v.detach().cpu().contiguous()
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)};".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


# --- the run folder: new, overwritten or resumed -----------------------------------------------------------------

FREE_ON_RESUME = ("steps", "lr_schedule", "lr_decay_start")  # may change when resuming (lr of done steps checked)
FREE_AFTER_DIVERGENCE = ("lr", "warmup_steps")  # may change too when resuming a run that diverged


def _reconcile(out: Path, config: TrainConfig, identity: dict, world: int, resume: bool, overwrite: bool,
               inputs) -> tuple[TrainConfig, dict | None]:
    """Check the output folder (main process only); on resume, the settings and inputs against the saved run's.

    Returns the config to use (the auto EMA decay resolved as the first run resolved it) and the saved record.
    """
    from ._fs import check_output_dir

    saved_cfg_path = out / "train_config.json"
    if not resume:
        out = check_output_dir(out, overwrite, inputs, resumable=True)
        if out.is_dir() and any(out.iterdir()):
            shutil.rmtree(out)  # check_output_dir allowed it: --overwrite of a folder diffprune wrote
        return config, None
    require(saved_cfg_path.is_file(), f"--resume: {str(out)!r} holds no train_config.json; start without --resume")
    record = read_json(saved_cfg_path)
    saved = record["train"]
    before_world = record.get("world_size", 1)
    require(before_world == world,
            f"--resume: the run trained with {before_world} process(es), this one has {world}; the "
            f"data order and the global batch depend on it, so resume with {before_world} "
            f"(accelerate launch --num_processes {before_world} ...)")
    for key, flag in (("data", "--data"), ("model", "the same MODEL"), ("teacher", "--teacher")):
        was, now = record.get("identity", {}).get(key), identity[key]
        require(was == now, f"--resume: the {key} differs from the interrupted run's ({_short(was)} -> {_short(now)}, "
                            f"sha256); resume with {flag} as before, or start anew with --overwrite")
    was_acc = record.get("accelerate", {})
    for key, value in identity["accelerate"].items():
        require(was_acc.get(key, value) == value,
                f"--resume: accelerate's {key} was {was_acc.get(key)!r} and is now {value!r}; resume with the same "
                f"setting (accelerate launch --{key} {was_acc.get(key)} or the environment variable "
                f"ACCELERATE_{key.upper()}) or start anew with --overwrite")
    if config.ema_decay is None:  # "auto" was resolved from the first run's --steps; keep that horizon
        config = dataclasses.replace(config, ema_decay=saved.get("ema_decay"))
    mine = config.to_dict()
    mine["ema_decay"] = config.resolved_ema_decay
    free = FREE_ON_RESUME + (FREE_AFTER_DIVERGENCE if record.get("diverged_at") is not None else ())
    diff = sorted(k for k in mine if k not in free and saved.get(k) != mine[k])
    require(not diff, f"--resume: settings {diff} differ from the interrupted run's {str(saved_cfg_path)!r}; "
                      "resume with the same settings (only --steps and the lr schedule of later steps may change)")
    return config, record


def _short(digest) -> str:
    return "none" if digest is None else str(digest)[:12]


def _check_schedule(before: TrainConfig, config: TrainConfig, start_step: int, diverged: bool) -> None:
    """Refuse a new schedule that would have given a step already taken another lr (unless the run diverged)."""
    if diverged:
        return
    changed = next((s for s in range(start_step) if not math.isclose(before.lr_at(s), config.lr_at(s),
                                                                     rel_tol=1e-9)), None)
    require(changed is None, f"--resume: the new schedule changes the lr of step {changed}, which checkpoint "
                             f"step {start_step} already took; keep --steps and the schedule, or pass "
                             f"--lr-decay-start {start_step} (or later)")


def _diverged(what: str, step: int, config: TrainConfig, ckpt_dir: Path, record_path: Path, main: bool,
              command: str | None) -> DiffPruneError:
    """Record the divergence and build the error, with a resume command that the next run accepts."""
    good = list_checkpoints(ckpt_dir)
    where = f"the last good checkpoint is {str(good[-1])!r}" if good else "no checkpoint was written yet"
    if main and record_path.is_file():
        record = read_json(record_path)
        record["diverged_at"] = step
        atomic_write_json(record_path, record)
    lower = f"{config.lr / 4:.3g}"
    how = (f"rerun `{command}` with --resume --lr {lower}" if command else
           f"call again with resume=True and TrainConfig(lr={lower}, ...)")
    if not good:
        how = how.replace("--resume ", "--overwrite ").replace("resume=True", "overwrite=True")
    return DiffPruneError(f"{what} at step {step}; {where}; to continue with a lower learning rate, {how}")


def _all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


# --- the loop ----------------------------------------------------------------------------------------------------

def _as_denoiser_data(model, data):
    """:class:`~diffprune.inputs.DenoiserData` from what ``train`` accepts (checked against the model)."""
    from ._hashing import content_sha256
    from .data import ImageData
    from .inputs import DenoiserData, denoiser_data

    if isinstance(data, DenoiserData):
        return data
    if isinstance(data, ImageData):
        return denoiser_data(model, data)
    require(isinstance(data, torch.Tensor) and data.dtype == torch.uint8 and data.ndim == 4,
            "images must be a uint8 tensor [N, C, H, W], an ImageData or a DenoiserData")
    return denoiser_data(model, ImageData(data, None, None, {"source": "tensor", "sha256": content_sha256(data)}))


def train(unet, scheduler, images, config: TrainConfig, out_dir: str | os.PathLike, *,
          teacher=None, pruning: dict | None = None, resume: bool = False, overwrite: bool = False,
          run_info: dict | None = None, accelerator=None, progress: bool = True, inputs=(), pipeline=None,
          codec=None, on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train the denoiser ``unet`` (any supported family) on ``images``; write the final EMA model to ``out_dir``.

    ``images``: a uint8 tensor ``[N, C, H, W]``, an :class:`~diffprune.data.ImageData` (with labels for a
    class-conditional model) or a :class:`~diffprune.inputs.DenoiserData` (latents, for a latent pipeline). The
    loss targets what the scheduler's ``prediction_type`` says (:mod:`diffprune.objective`).
    ``pruning``: the pruned model's record; when given, the model is saved in diffprune's pruned format; with
    ``pipeline`` (``LoadedModel.pipeline``) the final model is a pipeline folder (other components copied).
    ``codec``: the latent pipeline's autoencoder, for sample grids. ``resume``: continue from the newest whole
    checkpoint in ``out_dir/checkpoints`` (settings, data, model, teacher and accelerate settings must match;
    ``steps`` may grow). ``overwrite`` replaces a folder diffprune wrote, never one that is or contains one of
    ``inputs`` (paths). ``accelerator``: an ``accelerate.Accelerator`` (one is created if None; under ``accelerate
    launch`` it runs data-parallel). ``on_step(step, loss)`` is called after every step (a hook for callers and
    tests).
    """
    from ._fs import mark_output, output_lock
    from .adapters import adapter_for
    from .objective import prediction_type

    adapter = adapter_for(unet)
    data = _as_denoiser_data(unet, images)
    prediction_type(scheduler)  # a supported one
    if config.label_dropout is None:
        config = dataclasses.replace(config, label_dropout=0.1 if data.null_cond is not None else 0.0)
    require(config.label_dropout == 0 or data.null_cond is not None,
            f"label_dropout={config.label_dropout} needs a conditional model with an unconditional input (a DiT's "
            "null label, a text model's empty prompt); pass --label-dropout 0")
    require(config.kd_weight == 0 or teacher is not None, f"kd_weight={config.kd_weight} needs a teacher (--teacher DIR)")
    if teacher is not None and config.kd_weight == 0:
        raise DiffPruneError("a teacher was given but kd_weight=0; pass --kd-weight (paper: 0.7) or drop --teacher")

    acc = accelerator or make_accelerator()
    settings = accelerate_settings(acc)
    require(settings["gradient_accumulation_steps"] == 1,
            f"gradient accumulation ({settings['gradient_accumulation_steps']} steps, from accelerate's config or "
            "ACCELERATE_GRADIENT_ACCUMULATION_STEPS) is not supported: it would scale the loss silently; raise "
            "--batch-size or launch more processes instead")
    identity = {"data": data.record["sha256"], "model": state_sha256(unet), "teacher": state_sha256(teacher),
                "accelerate": settings}
    main = acc.is_main_process
    out = Path(out_dir)
    with output_lock(out) if main else contextlib.nullcontext():
        return _train_locked(unet, scheduler, data, config, out, acc=acc, identity=identity, teacher=teacher,
                             pruning=pruning, resume=resume, overwrite=overwrite, run_info=run_info or {},
                             progress=progress, inputs=inputs, on_step=on_step, mark=mark_output,
                             adapter=adapter, pipeline=pipeline, codec=codec)


def _train_locked(unet, scheduler, data, config: TrainConfig, out: Path, *, acc, identity, teacher, pruning,
                  resume, overwrite, run_info, progress, inputs, on_step, mark, adapter, pipeline,
                  codec) -> TrainResult:
    from .objective import loss_at

    from diffusers.training_utils import EMAModel

    main, world, rank = acc.is_main_process, acc.num_processes, acc.process_index
    ckpt_dir, record_path = out / "checkpoints", out / "train_config.json"
    record = None
    if main:
        config, record = _reconcile(out, config, identity, world, resume, overwrite, inputs)
    acc.wait_for_everyone()
    if not main and resume:  # the others take the resolved EMA horizon from the record the main process checked
        config, record = _reconcile(out, config, identity, world, True, False, ())

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
    model, optimizer = acc.prepare(unet, optimizer)
    raw = acc.unwrap_model(model)
    decay = config.resolved_ema_decay
    # min_decay = decay makes diffusers' EMAModel constant (its default ramps (1+k)/(10+k) up to `decay`).
    ema = EMAModel(raw.parameters(), decay=decay, min_decay=decay, foreach=True)
    if teacher is not None:
        teacher = teacher.to(acc.device).eval().requires_grad_(False)

    start_step, skipped = (_restore_newest(ckpt_dir, raw, ema, optimizer, main) if resume else (0, []))
    if resume:
        require(start_step <= config.steps, f"--steps {config.steps} is below the checkpoint's step {start_step}")
        _check_schedule(TrainConfig.from_dict(record["train"]), config, start_step,
                        record.get("diverged_at") is not None)
        summary = out / "train_summary.json"
        if start_step == config.steps and summary.is_file() and read_json(summary).get("steps") == config.steps:
            done = read_json(summary)  # finished already: nothing to train, nothing to rewrite
            return TrainResult(out, config.steps, float(done.get("final_loss", float("nan"))), 0.0)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        mark(out, "train")
        segments = record.get("segments", []) if record else []
        if start_step < config.steps:  # (== : killed while saving the final model; only that is redone)
            segments.append({"command": run_info.get("command"), "from_step": start_step, "to_step": config.steps,
                             "world_size": world, "lr": config.lr,
                             **({"skipped_checkpoints": skipped} if skipped else {})})
        atomic_write_json(record_path, {"train": config.to_dict() | {"ema_decay": decay}, "world_size": world,
                                        "identity": {k: v for k, v in identity.items() if k != "accelerate"},
                                        "accelerate": identity["accelerate"], **run_info, "segments": segments})
        _truncate_log(out / "train_log.csv", start_step)

    T = scheduler.config.num_train_timesteps
    order = _DataOrder(len(data), config.seed)
    B = config.batch_size
    writer = _tensorboard(out) if main else None
    bar = tqdm(total=config.steps, initial=start_step, desc="training", unit="step", disable=not (progress and main))
    started = t0 = time.time()
    logged = read_log(out / "train_log.csv") if start_step else {}
    window, last_loss = [], float(logged["loss"][-1]) if len(logged.get("loss", [])) else float("nan")
    command = run_info.get("command")
    for step in range(start_step, config.steps):
        lr = config.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        seed = _seed_of(config.seed, step, rank)
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # dropout
        idx = order.indices(step * B * world + rank * B, B)
        x0, cond = data.batch(idx, acc.device)
        noise = torch.randn(x0.shape, generator=gen).to(acc.device)
        t = (antithetic_timesteps(B, T, gen) if config.antithetic else torch.randint(0, T, (B,), generator=gen))
        t = t.to(acc.device)
        if cond is not None and config.label_dropout > 0:  # for classifier-free guidance; teacher sees the same
            drop = (torch.rand(B, generator=gen) < config.label_dropout).to(acc.device)
            null = data.null_cond.to(acc.device, cond.dtype).expand_as(cond)
            cond = torch.where(drop.view(-1, *[1] * (cond.dim() - 1)), null, cond)
        loss = loss_at(adapter, model, scheduler, x0, noise, t, cond, teacher=teacher, kd_weight=config.kd_weight)
        finite = torch.isfinite(loss.detach()).reshape(1).float()
        if world > 1:  # every process must stop together, or the others hang in the next all-reduce
            finite = acc.gather(finite)
        if not bool(finite.all()):
            value = loss.item() if not math.isfinite(loss.item()) else "non-finite on another process"
            raise _diverged(f"loss became {value}", step, config, ckpt_dir, record_path, main, command)
        optimizer.zero_grad(set_to_none=True)
        acc.backward(loss)
        if config.grad_clip > 0:
            acc.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        ema.step(raw.parameters())
        last_loss = loss.item()
        window.append(last_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.4f}")
        done = step + 1
        if main and (done % config.log_every == 0 or done == config.steps):
            ips = len(window) * B * world / max(time.time() - t0, 1e-9)
            row = {"step": done, "loss": float(np.mean(window)), "lr": lr, "images_per_s": ips}
            _append_log(out / "train_log.csv", row)
            if writer is not None:
                for k in ("loss", "lr", "images_per_s"):
                    writer.add_scalar(f"train/{k}", row[k], done)
            t0, window = time.time(), []
        if main and config.sample_every and done % config.sample_every == 0:
            _save_sample_grid(raw, ema, scheduler, out / "samples" / f"{CHECKPOINT_PREFIX}{done:07d}.png",
                              config.sample_steps, codec, data)
        if done % config.checkpoint_every == 0 or done == config.steps:
            acc.wait_for_everyone()
            # never publish diverged weights as a "good" checkpoint (the loss was checked before this step's update)
            if not _all_finite(list(raw.parameters()) + list(ema.shadow_params)):
                raise _diverged("the weights became non-finite", done, config, ckpt_dir, record_path, main, command)
            if main:
                _save_checkpoint(ckpt_dir, done, raw, ema, optimizer, config.keep_checkpoints)
        if on_step is not None:
            on_step(done, last_loss)
    bar.close()
    acc.wait_for_everyone()
    if main:
        _save_final(raw, ema, scheduler, out, pruning, pipeline)
        record = read_json(record_path)
        if record["segments"] and record["segments"][-1]["to_step"] == config.steps:
            record["segments"][-1]["wall_minutes"] = round((time.time() - started) / 60, 1)
        record.pop("diverged_at", None)  # the run reached its end
        atomic_write_json(record_path, record)
        # written last: a final model is complete when train_summary.json names its step count
        atomic_write_json(out / "train_summary.json", {"steps": config.steps, "final_loss": last_loss,
                                                        "ema_decay": decay, "world_size": world})
        if writer is not None:
            writer.close()
    acc.wait_for_everyone()
    return TrainResult(out, config.steps, last_loss, time.time() - started)


def ema_copy(raw, ema):
    """A copy of ``raw`` holding the EMA weights."""
    model = copy.deepcopy(raw)
    ema.copy_to(model.parameters())
    return model.eval()


def _save_final(raw, ema, scheduler, out: Path, pruning: dict | None, pipeline=None) -> None:
    """Write the raw and EMA models into ``out/raw`` (the denoiser alone) and ``out`` (a pipeline folder for a
    pipeline): each file written whole and fsynced, then renamed."""
    from ._fs import fsync_path, fsync_tree
    from .io import write_model

    for folder, model in ((out / "raw", raw), (out, ema_copy(raw, ema))):
        tmp = out / f".final-{folder.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write_model(tmp, model, pruning=pruning, scheduler=scheduler,
                    pipeline=pipeline if folder == out else None)
        fsync_tree(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for item in tmp.iterdir():
            target = folder / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
        tmp.rmdir()
        fsync_path(folder)


def _save_sample_grid(raw, ema, scheduler, path: Path, steps: int, codec=None, data=None) -> None:
    """36 samples; a text model draws seed i with the caption of training image i (mod the data)."""
    from .adapters import adapter_for
    from .samples import image_grid
    from .sampling import sample

    model = ema_copy(raw, ema)
    spec = adapter_for(model).conditioning(model)
    context = None
    if spec is not None and spec.kind == "text":
        context = data.cond[torch.arange(36) % len(data)]
    imgs = sample(model, scheduler, seeds=range(36), num_inference_steps=steps, progress=False, codec=codec,
                  prompt_embeds=context)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(to_uint8(imgs), nrow=6).save(path)


def _append_log(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        if new:
            w.writeheader()
        w.writerow(row)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows past ``step`` (a resumed run rewrites them) and a row torn by a kill; rewrite atomically."""
    import io

    from ._fs import atomic_write_bytes

    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if _whole_row(r) and int(r["step"]) <= step]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LOG_FIELDS, lineterminator="\r\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def _whole_row(row: dict) -> bool:
    try:
        return int(row["step"]) >= 0 and all(math.isfinite(float(row[k])) or row[k] == "nan" for k in LOG_FIELDS)
    except (TypeError, ValueError, KeyError):
        return False


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is an optional extra
        return None
    return SummaryWriter(str(out / "tensorboard"))
