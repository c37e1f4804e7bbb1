"""The settings of a training run (:class:`TrainConfig`, the Diff-Pruning paper's recipe by default) and what it
returns (:class:`TrainResult`)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import require, require_int, require_seed

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
        from .._config import config_from_dict

        return config_from_dict(cls, d)


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    steps: int
    final_loss: float
    seconds: float
