"""What a run writes besides checkpoints and its record: the final models, sample grids and tensorboard scalars."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from .. import _cond
from .._fs import staged_dir
from ..data import to_uint8
from .state import plain_model, whole_state, whole_tensors


def ema_copy(raw, ema):
    """A copy of ``raw`` holding the EMA weights."""
    model = copy.deepcopy(raw)
    ema.copy_to(model.parameters())
    return model.eval()


def whole_model(kind: str, raw, ema, shell, main: bool):
    """The ``kind`` ("raw" or "ema") model as an ordinary, whole module on the main process (None elsewhere). With a
    ``shell`` (``raw`` before FSDP sharded it, as ``meta_copy(raw, buffers=False)``) it is gathered from every process, which
    must all call this; else the main process uses ``raw`` itself or an EMA copy of it."""
    if shell is None:
        return None if not main else raw if kind == "raw" else ema_copy(raw, ema)
    if kind == "raw":
        tensors = whole_state(raw, main)
    else:
        names = [name for name, _ in shell.named_parameters()]
        tensors = dict(zip(names, whole_tensors(ema.shadow_params, main)))
    return plain_model(shell, tensors) if main else None


def save_final(raw, ema, shell, scheduler, folder: Path, pruning: dict | None, pipeline=None, main: bool = True):
    """Write the raw and EMA models into ``folder/raw`` (the denoiser alone) and ``folder`` (a pipeline folder for a
    pipeline): each written whole into a temporary folder and fsynced, then renamed into place. Every process calls
    it (see :func:`whole_model`: one whole model at a time); the main process writes."""
    from ..io import write_model

    model = whole_model("raw", raw, ema, shell, main)
    if main:
        with staged_dir(folder / "raw") as tmp:
            write_model(tmp, model, pruning=pruning, scheduler=scheduler)
    model = None  # the raw copy goes before the EMA one is gathered: one whole model in memory at a time
    model = whole_model("ema", raw, ema, shell, main)
    if main:
        with staged_dir(folder, merge=True) as tmp:  # beside the run's checkpoints, logs and record, which stay
            write_model(tmp, model, pruning=pruning, scheduler=scheduler, pipeline=pipeline,
                        card={"stage": "fine-tuned", "name": str(folder)})


def save_sample_grid(model, scheduler, path: Path, steps: int, *, adapter, codec=None, data=None) -> None:
    """36 samples of ``model`` (the EMA model, whole); a text model draws seed i with the caption of training
    image i (mod the data)."""
    from ..samples import image_grid
    from ..sampling import sample

    spec = adapter.conditioning(model)
    context = None
    if spec is not None and spec.kind == "text":
        context = _cond.take(data.cond, torch.arange(36) % len(data))
    imgs = sample(model, scheduler, seeds=range(36), num_inference_steps=steps, progress=False, codec=codec,
                  prompt_embeds=context, adapter=adapter)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(to_uint8(imgs), nrow=6).save(path)


def tensorboard(folder: Path):
    """A tensorboard writer into ``folder/tensorboard``; None without tensorboard (an optional extra)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is an optional extra
        return None
    return SummaryWriter(str(folder / "tensorboard"))
