"""What a run writes besides checkpoints and its record: the final models, sample grids and tensorboard scalars."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from .. import _cond
from .._fs import staged_dir
from ..data import to_uint8


def ema_copy(raw, ema):
    """A copy of ``raw`` holding the EMA weights."""
    model = copy.deepcopy(raw)
    ema.copy_to(model.parameters())
    return model.eval()


def save_final(raw, ema, scheduler, folder: Path, pruning: dict | None, pipeline=None) -> None:
    """Write the raw and EMA models into ``folder/raw`` (the denoiser alone) and ``folder`` (a pipeline folder for a
    pipeline): each written whole into a temporary folder and fsynced, then renamed into place."""
    from ..io import write_model

    with staged_dir(folder / "raw") as tmp:
        write_model(tmp, raw, pruning=pruning, scheduler=scheduler)
    with staged_dir(folder, merge=True) as tmp:  # beside the run's checkpoints, logs and record, which stay
        write_model(tmp, ema_copy(raw, ema), pruning=pruning, scheduler=scheduler, pipeline=pipeline,
                    card={"stage": "fine-tuned", "name": str(folder)})


def save_sample_grid(raw, ema, scheduler, path: Path, steps: int, *, adapter, codec=None, data=None) -> None:
    """36 samples; a text model draws seed i with the caption of training image i (mod the data)."""
    from ..samples import image_grid
    from ..sampling import sample

    model = ema_copy(raw, ema)
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
