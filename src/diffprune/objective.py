"""The denoising objective, shared by calibration (Taylor scores) and training: family-independent.

The model (through its adapter, :meth:`diffprune.adapters.ModelAdapter.forward`) predicts what the scheduler's
``prediction_type`` says it predicts, and the target follows from it:

* ``epsilon``: the noise ``ε``;
* ``v_prediction``: ``v = sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) x₀`` (``scheduler.get_velocity``);
* ``sample``: the clean ``x₀``;
* ``flow``: for a flow-matching scheduler (``FlowMatchEulerDiscreteScheduler``: SD3, Flux), the velocity
  ``ε − x₀`` of the straight path ``x_σ = (1 − σ) x₀ + σ ε``.

Timesteps: diffprune's training and calibration timestep is an integer ``t`` in ``0 .. T−1``, low noise first (the
walk of Diff-Pruning starts at ``t = 0``). For the DDPM-family schedulers it is also what the model is called with.
A flow-matching scheduler's training noise level is ``σ_t = (t + 1) / T``, shifted by the scheduler's ``shift``
unless it shifts dynamically (by resolution, at sampling only), as diffusers' schedulers set their training sigmas;
the model is called with ``σ_t · T`` (:func:`model_timesteps`), the value the stock pipelines pass.

Output distillation mixes in the teacher's prediction of the same quantity:
``a·‖f_T − f_S‖² + (1 − a)·‖target − f_S‖²``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from .errors import DiffPruneError, require

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # what a DDPM-family scheduler may say; flow matching: "flow"


def is_flow_matching(scheduler) -> bool:
    """Whether ``scheduler`` is a flow-matching one (diffusers' ``FlowMatch*`` schedulers)."""
    return type(scheduler).__name__.startswith("FlowMatch")


def flow_sigmas(scheduler, t: torch.Tensor) -> torch.Tensor:
    """The noise level ``σ_t`` of integer timesteps ``t`` (float32, on ``t``'s device) of a flow-matching scheduler."""
    cfg = scheduler.config
    sigma = (t.to(torch.float32) + 1) / int(cfg.num_train_timesteps)
    shift = float(getattr(cfg, "shift", 1.0) or 1.0)
    if not getattr(cfg, "use_dynamic_shifting", False) and shift != 1.0:
        sigma = shift * sigma / (1 + (shift - 1) * sigma)
    return sigma


def noisy(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t``: the scheduler's ``add_noise``, or the flow path ``(1 − σ_t) x₀ + σ_t ε``."""
    if not is_flow_matching(scheduler):
        return scheduler.add_noise(x0, noise, t)
    sigma = flow_sigmas(scheduler, t).to(x0.dtype).view(-1, *[1] * (x0.dim() - 1))
    return (1 - sigma) * x0 + sigma * noise


def model_timesteps(scheduler, t: torch.Tensor) -> torch.Tensor:
    """What the model is called with at integer timesteps ``t``: ``t`` itself, or ``σ_t · T`` for flow matching."""
    if not is_flow_matching(scheduler):
        return t
    return flow_sigmas(scheduler, t) * int(scheduler.config.num_train_timesteps)


def prediction_type(scheduler) -> str:
    if is_flow_matching(scheduler):
        return "flow"
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


def default_scheduler(prediction_type: str = "epsilon", clip_sample: bool = True) -> DDPMScheduler:
    """The DDPM training schedule diffprune uses when a model ships none: 1000 steps, linear betas. ``clip_sample``
    clips predicted images to [-1, 1] while sampling: right for pixels, wrong for latents (a latent pipeline gets
    ``clip_sample=False``)."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                         prediction_type=prediction_type, clip_sample=clip_sample)


def resolve_scheduler(scheduler, requested: str | None = None):
    """The model's scheduler, checked against a requested prediction type; for a model without one, diffprune's
    default DDPM schedule predicting ``requested`` (default ``epsilon``)."""
    if scheduler is None:
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
    if kind == "flow":
        return noise - x0
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
    x_t, s = noisy(scheduler, x0, noise, t), model_timesteps(scheduler, t)
    pred = adapter.forward(model, x_t, s, cond)
    teacher_pred = None
    if teacher is not None and kd_weight > 0:
        with torch.no_grad():
            teacher_pred = adapter.forward(teacher, x_t, s, cond)
    return denoising_loss(pred, prediction_target(scheduler, x0, noise, t), teacher_pred, kd_weight)
