"""The ``finetune`` verb: load a (pruned) model and its data, then run :func:`diffprune.train.train`."""
from __future__ import annotations

import os

from .errors import require
from .seed import seed_everything
from .records import run_info
from .train import TrainConfig, TrainResult, train


def finetune(model: str | os.PathLike, data: str | os.PathLike, config: TrainConfig, out_dir: str | os.PathLike, *,
             teacher: str | os.PathLike | None = None, resume: bool = False, overwrite: bool = False,
             accelerator=None, progress: bool = True, command: str | None = None,
             cache_dir: str | os.PathLike | None = None, prediction_type: str | None = None) -> TrainResult:
    """Fine-tune the model at ``model`` (a bare model or a pipeline, pruned or not) on ``data``.

    For a latent pipeline the images are encoded once with its autoencoder (cached under ``cache_dir``); a
    class-conditional model trains on each image's label, a text-to-image pipeline on each image's caption
    (encoded once with its text encoder, cached). The result (EMA weights) keeps the pruned format, and a
    pipeline stays a pipeline. ``prediction_type``: what the model predicts, for a model without a scheduler.
    """
    from .inputs import load_denoiser_data
    from .io import load_model
    from .objective import resolve_scheduler

    seed_everything(config.seed)
    loaded = load_model(model)
    scheduler = resolve_scheduler(loaded.scheduler, prediction_type)
    denoiser = loaded.denoiser
    adapter = loaded.adapter  # looked up once, handed down
    prepared = load_denoiser_data(denoiser, data, codec=loaded.codec, text_encoder=loaded.text_encoder,
                                  cache_dir=cache_dir, progress=progress, adapter=adapter,
                                  class_names=loaded.class_names)
    teacher_model, teacher_revision = _teacher(teacher, denoiser, adapter)
    info = run_info(command=command, model=str(model), model_revision=loaded.revision,
                    teacher=None if teacher is None else str(teacher), teacher_revision=teacher_revision,
                    data=str(data), data_record=prepared.record, num_images=len(prepared))
    return train(denoiser, scheduler, prepared, config, out_dir, teacher=teacher_model,
                 pruning=loaded.pruning, resume=resume, overwrite=overwrite, run_info=info,
                 accelerator=accelerator, progress=progress, inputs=(model, data, teacher), pipeline=loaded.pipeline,
                 codec=loaded.codec, adapter=adapter)


def _teacher(teacher, denoiser, adapter):
    """The distillation teacher's denoiser and its hub revision (None, None without one), checked against the
    student before anything is written: the same class, conditioning and input shape."""
    from .io import load_model

    if teacher is None:
        return None, None
    loaded = load_model(teacher)
    model = loaded.denoiser
    require(type(model) is type(denoiser) and adapter.conditioning(model) == adapter.conditioning(denoiser),
            f"teacher {str(teacher)!r} is a {type(model).__name__} but the student is a "
            f"{type(denoiser).__name__} (or they take other conditioning); distil from the unpruned original")
    shapes = adapter.input_shape(model), adapter.input_shape(denoiser)
    require(shapes[0] == shapes[1], f"teacher {str(teacher)!r} takes inputs of shape {shapes[0]} but the student "
                                    f"takes {shapes[1]}; distil from the model the student was pruned from")
    return model, loaded.revision
