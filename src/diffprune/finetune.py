"""The ``finetune`` verb: load a (pruned) model and its data, then run :func:`diffprune.train.train`."""
from __future__ import annotations

import os

from .data import load_data
from .macs import sample_shape
from .sampling import default_scheduler
from .seed import seed_everything
from .train import TrainConfig, TrainResult, run_info, train


def finetune(model: str | os.PathLike, data: str | os.PathLike, config: TrainConfig, out_dir: str | os.PathLike, *,
             teacher: str | os.PathLike | None = None, resume: bool = False, overwrite: bool = False,
             accelerator=None, progress: bool = True, command: str | None = None) -> TrainResult:
    """Fine-tune the model at ``model`` on ``data``; the result (EMA weights) keeps the pruned format."""
    from .io import load_model

    seed_everything(config.seed)
    loaded = load_model(model)
    unet = loaded.unet
    channels, size, _ = sample_shape(unet)
    images = load_data(data, resolution=size, channels=channels)
    teacher_unet = load_model(teacher).unet if teacher is not None else None
    info = run_info(command=command, model=str(model), model_revision=loaded.revision,
                    teacher=None if teacher is None else str(teacher),
                    data=str(data), data_record=images.record, num_images=len(images))
    return train(unet, loaded.scheduler or default_scheduler(), images, config, out_dir, teacher=teacher_unet,
                 pruning=loaded.pruning, resume=resume, overwrite=overwrite, run_info=info,
                 accelerator=accelerator, progress=progress, inputs=(model, data, teacher))
