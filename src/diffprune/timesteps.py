"""Which timesteps the calibration pass accumulates gradients over: strategy objects in a named registry.

A strategy does two things, kept apart from the importance score:

* :meth:`TimestepStrategy.plan` lists the candidate ``(t, weight)`` pairs in walk order (``t = 0, 1, 2, ...`` for
  the threshold rule), already cut to ``max_timesteps``;
* :meth:`TimestepStrategy.decide` looks at the losses seen so far (the current one last) and says whether the
  current step's gradient is accumulated and whether the walk stops after it.

Registered names (API; they keep their meaning):

``threshold``
    Diff-Pruning's rule. Walk ``t = 0, 1, 2, ...``; keep ``L_max = max(L_0..L_t)``; stop at the first ``t`` with
    ``L_t < thr * L_max`` (``thr = 0`` never stops: all timesteps). ``threshold_semantics="accumulate-trigger"`` (default,
    the diffusers reference script ``ddpm_prune.py``) accumulates the step that triggers the stop;
    ``"exclude-trigger"`` (the paper's experiment code) does not. ``stride=k`` (default 1) walks ``t = 0, k, 2k, ...``
    with each loss weighted by ``k``, under the same rule: an approximate walk, about ``k`` times cheaper.
``all``
    Every timestep ``0 .. T-1`` with weight 1 (the plain Taylor baseline).
``strided``
    Every ``stride``-th timestep ``0, k, 2k, ...``, each loss weighted by ``k`` so the sum estimates the full one.

All take ``max_timesteps``: a cap on the number of timesteps visited. On an untrained model the loss is flat and
the threshold rule never fires; the cap bounds the cost.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Sequence

from .errors import DiffPruneError, require
from .registry import Registry

TIMESTEP_STRATEGIES: Registry[type] = Registry("timestep strategy")
STRATEGY_FIELDS = ("thr", "threshold_semantics", "stride", "max_timesteps")  # every strategy's settings, by name

THRESHOLD_SEMANTICS = ("accumulate-trigger", "exclude-trigger")


def _check_cap(max_timesteps: int | None) -> None:
    require(max_timesteps is None or (isinstance(max_timesteps, int) and max_timesteps >= 1),
            f"max_timesteps={max_timesteps!r} must be a positive integer or None (no cap)")


def _check_stride(stride: int) -> None:
    require(isinstance(stride, int) and stride >= 1, f"stride={stride!r} must be an integer >= 1")


@dataclass(frozen=True)
class TimestepStrategy:
    """Base class: ``plan`` lists candidate timesteps, ``decide`` applies the stopping rule."""

    name: ClassVar[str] = ""
    max_timesteps: int | None = None

    def plan(self, num_train_timesteps: int) -> list[tuple[int, float]]:
        """Candidate ``(t, loss weight)`` pairs in walk order, cut to ``max_timesteps``."""
        raise NotImplementedError

    def decide(self, losses: Sequence[float]) -> tuple[bool, bool]:
        """Given the losses so far (current last): ``(accumulate current step, stop after it)``."""
        return True, False

    def to_dict(self) -> dict:
        return {"name": self.name, **dataclasses.asdict(self)}

    def _cap(self, pairs: list[tuple[int, float]]) -> list[tuple[int, float]]:
        return pairs if self.max_timesteps is None else pairs[: self.max_timesteps]


@TIMESTEP_STRATEGIES.register("threshold")
@dataclass(frozen=True)
class ThresholdTimesteps(TimestepStrategy):
    """Diff-Pruning's rule: stop at the first ``t`` with ``L_t < thr * max(L_0..L_t)`` (every ``stride``-th ``t``)."""

    name: ClassVar[str] = "threshold"
    thr: float = 0.05
    threshold_semantics: str = "accumulate-trigger"
    stride: int = 1
    max_timesteps: int | None = None

    def __post_init__(self):
        require(isinstance(self.thr, (int, float)) and 0.0 <= self.thr < 1.0,
                f"thr={self.thr!r} must be in [0, 1); 0 means all timesteps, the paper uses 0.05")
        require(self.threshold_semantics in THRESHOLD_SEMANTICS,
                f"unknown threshold semantics {self.threshold_semantics!r}; choose from {list(THRESHOLD_SEMANTICS)}")
        _check_stride(self.stride)
        _check_cap(self.max_timesteps)

    def plan(self, num_train_timesteps: int) -> list[tuple[int, float]]:
        return self._cap([(t, float(self.stride)) for t in range(0, num_train_timesteps, self.stride)])

    def decide(self, losses: Sequence[float]) -> tuple[bool, bool]:
        current = float(losses[-1])
        triggered = self.thr > 0 and current < self.thr * max(float(x) for x in losses)
        if not triggered:
            return True, False
        return self.threshold_semantics == "accumulate-trigger", True


@TIMESTEP_STRATEGIES.register("all")
@dataclass(frozen=True)
class AllTimesteps(TimestepStrategy):
    """Every timestep ``0 .. T-1`` with weight 1."""

    name: ClassVar[str] = "all"
    max_timesteps: int | None = None

    def __post_init__(self):
        _check_cap(self.max_timesteps)

    def plan(self, num_train_timesteps: int) -> list[tuple[int, float]]:
        return self._cap([(t, 1.0) for t in range(num_train_timesteps)])


@TIMESTEP_STRATEGIES.register("strided")
@dataclass(frozen=True)
class StridedTimesteps(TimestepStrategy):
    """Every ``stride``-th timestep ``0, k, 2k, ...``, each loss weighted by ``k``."""

    name: ClassVar[str] = "strided"
    stride: int = 10
    max_timesteps: int | None = None

    def __post_init__(self):
        _check_stride(self.stride)
        _check_cap(self.max_timesteps)

    def plan(self, num_train_timesteps: int) -> list[tuple[int, float]]:
        return self._cap([(t, float(self.stride)) for t in range(0, num_train_timesteps, self.stride)])


def make_strategy(name: str, **params) -> TimestepStrategy:
    """Build a registered strategy; parameters it does not take are ignored only when they are ``None``."""
    cls = TIMESTEP_STRATEGIES.get(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k, v in params.items() if k not in fields and v is not None)
    if unknown:
        raise DiffPruneError(f"timestep strategy {name!r} takes no {unknown}; it takes {sorted(fields)}")
    return cls(**{k: v for k, v in params.items() if k in fields and v is not None})

