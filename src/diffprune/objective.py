"""The denoising objective, shared by calibration (Taylor scores) and training: family-independent.

The model (through its adapter, :meth:`diffprune.adapters.ModelAdapter.forward`) predicts what the scheduler's
``prediction_type`` says it predicts, and the target follows from it:

* ``epsilon``: the noise ``ε``;
* ``v_prediction``: ``v = sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) x₀`` (``scheduler.get_velocity``);
* ``sample``: the clean ``x₀``.

Output distillation mixes in the teacher's prediction of the same quantity:
``a·‖f_T − f_S‖² + (1 − a)·‖target − f_S‖²``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import DiffPruneError, require

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def prediction_type(scheduler) -> str:
    kind = getattr(scheduler.config, "prediction_type", "epsilon")
    require(kind in PREDICTION_TYPES, f"scheduler prediction_type {kind!r} is not supported; choose from "
                                      f"{list(PREDICTION_TYPES)}")
    return kind


def check_prediction_type(scheduler, requested: str | None) -> None:
    """Refuse a requested prediction type that the model's own scheduler contradicts."""
    if requested is None:
        return
    require(requested in PREDICTION_TYPES, f"prediction type {requested!r} is unknown; choose from "
                                           f"{list(PREDICTION_TYPES)}")
    actual = prediction_type(scheduler)
    if actual != requested:
        raise DiffPruneError(f"--prediction-type {requested} contradicts the model's scheduler, which says "
                             f"{actual!r}; drop the flag (the scheduler's setting is used) or fix the scheduler's "
                             "scheduler_config.json")


def resolve_scheduler(scheduler, requested: str | None = None):
    """The model's scheduler, checked against a requested prediction type; for a model without one, diffprune's
    default DDPM schedule predicting ``requested`` (default ``epsilon``)."""
    if scheduler is None:
        from .sampling import default_scheduler

        require(requested is None or requested in PREDICTION_TYPES,
                f"prediction type {requested!r} is unknown; choose from {list(PREDICTION_TYPES)}")
        return default_scheduler(requested or "epsilon")
    check_prediction_type(scheduler, requested)
    return scheduler


def prediction_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    kind = prediction_type(scheduler)
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return x0
    return scheduler.get_velocity(x0, noise, t)


def denoising_loss(pred: torch.Tensor, target: torch.Tensor, teacher_pred: torch.Tensor | None = None,
                   kd_weight: float = 0.0) -> torch.Tensor:
    """MSE to the target, optionally mixed with output distillation: a·‖f_T − f_S‖² + (1 − a)·‖target − f_S‖²."""
    loss = F.mse_loss(pred, target)
    if teacher_pred is not None and kd_weight > 0:
        loss = kd_weight * F.mse_loss(pred, teacher_pred) + (1 - kd_weight) * loss
    return loss


def loss_at(adapter, model, scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, cond=None, *,
            teacher=None, kd_weight: float = 0.0) -> torch.Tensor:
    """The denoising loss of ``model`` at timesteps ``t`` for clean inputs ``x0`` (pixels or latents)."""
    x_t = scheduler.add_noise(x0, noise, t)
    pred = adapter.forward(model, x_t, t, cond)
    teacher_pred = None
    if teacher is not None and kd_weight > 0:
        with torch.no_grad():
            teacher_pred = adapter.forward(teacher, x_t, t, cond)
    return denoising_loss(pred, prediction_target(scheduler, x0, noise, t), teacher_pred, kd_weight)
