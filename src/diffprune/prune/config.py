"""What decides a pruning run (:class:`PruneConfig`) and what it reports (:class:`PruneReport`,
:class:`CalibrationResult`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .. import __version__
from .._torch import DTYPES
from ..errors import require, require_int, require_seed
from ..importance import METHODS, TAYLOR_FORMS, setting_owners
from ..layout import FREE, LAYOUTS
from ..structure import TORCH_PRUNING_VERSION
from ..timesteps import STRATEGY_FIELDS, TimestepStrategy, make_strategy

RATIO_MODES = ("paper", "uniform")
ALLOCATIONS = ("score", "cost", "latency")
NORMALIZERS = ("none", "mean")
# the allocation settings at their defaults (the paper's global ranking); runs made before they existed used these
ALLOCATION_DEFAULTS = {"allocation": "score", "normalize": "none", "max_layer_ratio": None, "conditioning_floor": 0.0}
# settings added after runs were recorded, at the value those runs used (None: a method that does not own it)
LATER_DEFAULTS = {**ALLOCATION_DEFAULTS, "noise_draws": 1, "layout": FREE}
LATENCY_DTYPES = DTYPES
DATA_FREE = "data-free"


@dataclass(frozen=True)
class PruneConfig:
    """Everything that decides a pruning run; validated on construction, serialisable with :meth:`to_dict`.

    Exactly one of ``ratio`` (fraction of channels to remove, in (0, 1)) and ``target_macs`` (fraction of the
    original MACs to keep, in (0, 1)) is given. ``ratio_mode`` defaults to "paper" for ``ratio`` and "uniform"
    for ``target_macs``; ``global_ranking`` defaults to True for ``target_macs`` in uniform mode (local steps are
    often too coarse for the tolerance) and False otherwise. ``seed`` fixes the calibration noise, the image subset
    and random scores. ``round_to=N`` keeps every pruned width a multiple of ``N`` (a group is cut to the nearest
    such width below what the ratio asks, keeping whole GroupNorm groups and heads; widths that are not pruned stay
    as they are); with a target the search compensates.

    The remaining fields belong to the method (:data:`diffprune.importance.METHODS`): ``None`` takes the method's
    default, and a field the method does not own is refused. Gradient methods own the calibration: ``calib_batch``
    images, ``data_free_steps`` DDIM steps for ``calibration="data-free"``, ``timestep_batch`` timesteps per
    forward/backward pass (same scores, faster; see :func:`accumulate_gradients`), ``noise_draws``: the timestep walk
    repeated with that many noise draws of the same batch, gradients summed over all of them (scores that depend
    less on one draw, at ``noise_draws`` times the calibration cost; 1 is the paper), the timestep strategy ``timesteps``
    (default: "threshold" for diff-pruning, "all" for taylor) and that strategy's own fields, passed by name
    (``thr``/``threshold_semantics`` for "threshold", ``stride`` for "threshold" (an approximate walk over every
    k-th timestep, under the same rule) and "strided", ``max_timesteps`` for any);
    diff-pruning also owns ``taylor_form``.

    Allocation across layers (global ranking only): ``allocation="score"`` ranks positions by importance alone (the
    paper, Torch-Pruning); ``"cost"`` by importance per MAC its removal saves (a greedy knapsack, as HALP does with
    latency), so that parameter-heavy, MAC-cheap layers (timestep and class embedders, adaLN inputs) are not
    removed first for nothing; ``"latency"`` by importance per second its removal saves, from per-layer latency
    tables measured on the pruning device at ``latency_batch`` and ``latency_dtype`` (HALP's allocation;
    :mod:`diffprune.prune.costs`). ``normalize="mean"`` divides each group's scores by their mean (groups of different
    kinds and sizes compete on their relative scores). ``max_layer_ratio``: no group loses more than this share of
    its positions. ``conditioning_floor``: the conditioning pathways the adapter names keep at least this share, in
    [0, 1); None takes the method's default under global ranking (diff-pruning: 0.5, diffprune's measured default;
    the baselines: 0) and 0 elsewhere; 0 is the paper's unconstrained ranking.

    ``layout``: "free" (any widths; the saved folder needs diffprune to load) or "stock" (only what the family's stock
    diffusers config can express, so plain ``from_pretrained`` loads the saved folder: for UNet2DModel one width per
    level, whole heads; for the transformer families ``method="depth"``); checked against the model's family by
    :func:`diffprune.io.save.layout_adapter`.
    """

    method: str = "diff-pruning"
    ratio: float | None = None
    ratio_mode: str | None = None
    target_macs: float | None = None
    target_latency: float | None = None
    global_ranking: bool | None = None
    prune_heads: bool = False
    round_to: int = 1
    seed: int = 0
    macs_tolerance: float = 0.02
    latency_batch: int = 16
    latency_dtype: str = "float32"
    latency_tolerance: float = 0.05
    latency_repeats: int = 10
    allocation: str = "score"
    normalize: str = "none"
    max_layer_ratio: float | None = None
    conditioning_floor: float | None = None
    layout: str = FREE
    # owned by the method (None: its default)
    calib_batch: int | None = None
    data_free_steps: int | None = None
    timestep_batch: int | None = None
    noise_draws: int | None = None
    timesteps: str | None = None
    thr: float | None = None
    threshold_semantics: str | None = None
    stride: int | None = None
    max_timesteps: int | None = None
    taylor_form: str | None = None

    def __post_init__(self):
        method = METHODS.get(self.method)  # unknown name -> error listing the choices
        self._check_amount(method)
        self._resolve_selection(method)
        self._resolve_method_settings(method)

    def _check_amount(self, method) -> None:
        """How much to prune: exactly one of ratio, target_macs and target_latency (with its timing settings)."""
        require(sum(v is not None for v in (self.ratio, self.target_macs, self.target_latency)) == 1,
                "give exactly one of ratio (e.g. --ratio 0.3), target_macs (e.g. --target-macs 0.5) and "
                "target_latency (e.g. --target-latency 0.6)")
        if self.target_latency is not None:
            require(isinstance(self.target_latency, (int, float)) and 0.0 < self.target_latency < 1.0,
                    f"target_latency={self.target_latency!r} must be in (0, 1), the fraction of the measured latency "
                    "to keep; e.g. 0.6")
            require(method.removes != "blocks",
                    f"target_latency={self.target_latency!r} does not apply to method {self.method!r}: depth pruning "
                    "takes ratio or target_macs (e.g. --target-macs 0.5); whole blocks are chosen by their MACs")
            require(self.latency_dtype in LATENCY_DTYPES,
                    f"latency_dtype={self.latency_dtype!r} is unknown; choose from {list(LATENCY_DTYPES)}")
        require_int("latency_batch", self.latency_batch, 1)
        require_int("latency_repeats", self.latency_repeats, 10)
        require(0.0 < self.latency_tolerance < 1.0,
                f"latency_tolerance={self.latency_tolerance!r} must be in (0, 1), e.g. 0.05")
        if self.ratio is not None:
            require(isinstance(self.ratio, (int, float)) and 0.0 < self.ratio < 1.0,
                    f"ratio={self.ratio!r} must be in (0, 1); pass e.g. --ratio 0.3")
        if self.target_macs is not None:
            require(isinstance(self.target_macs, (int, float)) and 0.0 < self.target_macs < 1.0,
                    f"target_macs={self.target_macs!r} must be in (0, 1), the fraction of MACs to keep; e.g. 0.5")

    def _resolve_selection(self, method) -> None:
        """How channels are chosen: ``ratio_mode`` and ``global_ranking`` (defaults follow the amount), heads and
        ``round_to``."""
        mode = self.ratio_mode
        if mode is None:
            mode = "paper" if self.ratio is not None else "uniform"
            object.__setattr__(self, "ratio_mode", mode)
        require(mode in RATIO_MODES, f"unknown ratio_mode {mode!r}; choose from {list(RATIO_MODES)}")
        if self.global_ranking is None:
            # a target (MACs, latency): cross-layer ranking gives the fine steps needed to land within the tolerance
            object.__setattr__(self, "global_ranking", self.ratio is None and mode == "uniform")
        require(not (self.global_ranking and mode == "paper"),
                "global ranking uses Torch-Pruning's semantics; pass ratio_mode='uniform' (--ratio-mode uniform)")
        require(not (self.prune_heads and mode == "paper"),
                "prune_heads (drop whole attention heads) needs ratio_mode='uniform' (--ratio-mode uniform)")
        require_seed("seed", self.seed)
        require_int("round_to", self.round_to, 1)
        require(self.layout in LAYOUTS, f"unknown layout {self.layout!r}; choose from {list(LAYOUTS)}")
        require(self.round_to == 1 or method.removes != "blocks",
                f"round_to={self.round_to} rounds channel widths; method {self.method!r} removes whole blocks")
        require(self.round_to == 1 or ((mode == "paper" or self.global_ranking) and not self.prune_heads),
                f"round_to={self.round_to} needs diffprune's channel selection: ratio_mode 'paper' or global ranking "
                "(the default with a target), without prune_heads")
        require(0.0 < self.macs_tolerance < 1.0, f"macs_tolerance={self.macs_tolerance!r} must be in (0, 1)")
        self._check_allocation(method)

    def _check_allocation(self, method) -> None:
        if self.conditioning_floor is None:  # the method's default where layers compete (global ranking), else none
            ranked = self.global_ranking and not self.prune_heads and method.removes == "channels"
            object.__setattr__(self, "conditioning_floor", method.conditioning_floor if ranked else 0.0)
        require(self.allocation in ALLOCATIONS, f"unknown allocation {self.allocation!r}; choose from {list(ALLOCATIONS)}")
        require(self.normalize in NORMALIZERS, f"unknown normalize {self.normalize!r}; choose from {list(NORMALIZERS)}")
        value = self.max_layer_ratio
        require(value is None or (isinstance(value, (int, float)) and 0.0 < value < 1.0),
                f"max_layer_ratio={value!r} must be in (0, 1) or None, e.g. 0.75")
        value = self.conditioning_floor
        require(isinstance(value, (int, float)) and 0.0 <= value < 1.0,
                f"conditioning_floor={value!r} must be in [0, 1), e.g. 0.5 (0: no floor, the paper's ranking)")
        custom = [k for k, v in ALLOCATION_DEFAULTS.items() if getattr(self, k) != v]
        require(not custom or (self.global_ranking and not self.prune_heads),
                f"{custom} choose between layers, which needs global ranking (the default with --target-macs, or "
                "--ranking global --ratio-mode uniform), without prune_heads")

    def _resolve_method_settings(self, method) -> None:
        """The method's own settings: its defaults filled in, other methods' refused, the timestep strategy resolved."""
        for name, owners in setting_owners().items():  # the method's: fill its defaults, refuse others' settings
            value = getattr(self, name)
            if name not in method.settings:
                require(value is None, f"{name}={value!r} does not apply to method {self.method!r}; it is a setting "
                                       f"of {owners}")
            elif value is None:
                object.__setattr__(self, name, method.settings[name])
        if method.needs_gradients:
            require_int("calib_batch", self.calib_batch, 1)
            require_int("data_free_steps", self.data_free_steps, 1)
            require_int("timestep_batch", self.timestep_batch, 1)
            require_int("noise_draws", self.noise_draws, 1)
            strategy = self.timestep_strategy()  # validates its own fields; record the values it resolved
            object.__setattr__(self, "timesteps", strategy.name)
            for name in STRATEGY_FIELDS:
                if hasattr(strategy, name):
                    object.__setattr__(self, name, getattr(strategy, name))
        if self.taylor_form is not None:
            require(self.taylor_form in TAYLOR_FORMS,
                    f"unknown taylor_form {self.taylor_form!r}; choose from {list(TAYLOR_FORMS)}")

    def timestep_strategy(self) -> TimestepStrategy | None:
        """The timestep strategy of a gradient method (None for data-free criteria): the strategy named by
        ``timesteps`` (or the method's default) with the fields of this config that carry its field names."""
        method = METHODS.get(self.method)
        if not method.needs_gradients:
            return None
        return make_strategy(self.timesteps or method.default_timesteps,
                             **{f: getattr(self, f) for f in STRATEGY_FIELDS})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PruneConfig":
        from .._config import config_from_dict

        return config_from_dict(cls, d)


@dataclass
class CalibrationResult:
    """Per-timestep losses of the calibration pass and where it stopped."""

    losses: list[tuple[int, float]]
    accumulated: list[int]
    cutoff_t: int | None
    stopped_by: str  # "threshold" | "cap" | "end"
    strategy: dict
    seconds: float = 0.0  # wall time of the walk (forward and backward passes)
    cpu_seconds: float = 0.0  # this process's CPU time over the walk, all threads (a paused process spends none)

    def to_dict(self) -> dict:
        return {"losses": {"t": [t for t, _ in self.losses], "loss": [v for _, v in self.losses]},
                "accumulated": self.accumulated,
                "cutoff_t": self.cutoff_t, "stopped_by": self.stopped_by, "timesteps": self.strategy,
                "seconds": round(self.seconds, 3), "cpu_seconds": round(self.cpu_seconds, 3)}


@dataclass
class PruneReport:
    """What :func:`prune_` did. ``to_dict()`` is the ``pruning.json`` payload (``scores`` are not serialised).

    One name per figure: ``base_*`` is the model before pruning (the unpruned base, for a model pruned twice), the
    plain name is after: ``params``/``base_params``, ``macs``/``base_macs`` (one call at batch 1),
    ``widths``/``base_widths`` (``{layer: [in, out]}`` of every Conv/Linear/GroupNorm layer),
    ``macs_per_layer``/``base_macs_per_layer``. ``calibration`` holds the per-timestep losses and the cutoff.
    ``dtype``: the dtype the weights were pruned and are saved in (scores are always computed in float32).
    ``kept_out_of_order``: ``[group root layer, position]`` pairs that global ranking kept although they rank among
    the pruned ones, so that a target could land past a step in the cost (see ``search``).
    """

    config: dict
    method: str
    ratio: float
    base_params: int
    params: int
    base_macs: int
    macs: int
    structure: dict
    family: str = ""
    calibration: dict | None = None
    search: list[dict] = field(default_factory=list)
    base_widths: dict[str, list[int]] = field(default_factory=dict)
    widths: dict[str, list[int]] = field(default_factory=dict)
    base_macs_per_layer: dict[str, int] = field(default_factory=dict)
    macs_per_layer: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    latency: dict | None = None
    kept_out_of_order: list[list] = field(default_factory=list)
    dtype: str = "float32"
    scores: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def losses(self) -> list[tuple[int, float]]:
        if self.calibration is None:
            return []
        rec = self.calibration["losses"]
        return list(zip(rec["t"], rec["loss"]))

    @property
    def cutoff_t(self) -> int | None:
        return None if self.calibration is None else self.calibration["cutoff_t"]

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "scores"}
        return {**d, "diffprune_version": __version__, "torch_pruning_version": TORCH_PRUNING_VERSION}
