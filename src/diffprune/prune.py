"""The pruning verb: ``report = prune_(unet, PruneConfig(...), calibration, scheduler=...)`` (in place).

Diff-Pruning, exactly (``method="diff-pruning"``):

1. One calibration batch ``x0`` (``calib_batch`` images in [-1, 1], or their latents for a latent pipeline; with
   each image's label for a class-conditional model) and one fixed noise
   ``eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))`` (drawn on the CPU).
2. For ``t = 0, 1, 2, ...``: ``x_t = scheduler.add_noise(x0, eps, t)``, ``L_t = mse(f(x_t, t, cond), target)``
   (the model called through its adapter; the target is ``eps``, ``v`` or ``x0`` as the scheduler's
   ``prediction_type`` says, :mod:`diffprune.objective`), ``L_t.backward()`` **without zeroing gradients**, until
   the timestep strategy stops (by default the threshold rule ``L_t < thr * max(L_0..L_t)``, see
   :mod:`diffprune.timesteps`).
3. Channel scores from the accumulated gradients (:mod:`diffprune.importance`), then structural pruning with
   Torch-Pruning's dependency graph, model surgery by the adapter (:mod:`diffprune.adapters`).

How much to prune (exactly one of):

``ratio`` with ``ratio_mode="paper"`` (default for ``ratio``)
    Local pruning as in the Diff-Pruning repository's bundled Torch-Pruning: for each group with ``n`` channels,
    ``n_pruned = n - int(n * (1 - ratio))``; a group coupled to GroupNorm (or to attention heads) is split into
    ``num_groups`` contiguous chunks and each chunk drops its own ``n_pruned // num_groups`` lowest-scoring
    channels. google/ddpm-cifar10-32 at ratio 0.3: 35.75M -> 19.85M parameters.
``ratio`` with ``ratio_mode="uniform"``
    Torch-Pruning 1.6.1's own semantics: per-chunk scores are averaged over the chunks and each chunk keeps
    ``int(chunk_size * (1 - ratio))`` channels (35.75M -> 13.95M at 0.3). ``global_ranking`` ranks all groups
    together (Torch-Pruning's global pruning).
``target_macs=F``
    Bisection on the ratio until the MACs of one UNet call are ``F`` x the original within ``macs_tolerance``
    (relative, default 2%). Uses ``ratio_mode="uniform"`` with global ranking unless told otherwise: per-layer
    (local) rounding moves MACs in steps that are often coarser than the tolerance; when the target cannot be
    reached the error names the nearest achievable fraction.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from ._torch import state_shapes
from .adapters import ModelAdapter, adapter_for
from .errors import DiffPruneError, require, require_int, require_seed
from .importance import METHODS, TAYLOR_FORMS, setting_owners
from .macs import count_macs
from .seed import seed_everything
from .structure import STRUCTURE_FORMAT, TORCH_PRUNING_VERSION, chain_records, layer_widths, replay_structure_
from .timesteps import STRATEGY_FIELDS, TimestepStrategy, make_strategy

RATIO_MODES = ("paper", "uniform")
LATENCY_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DATA_FREE = "data-free"
_MAX_SEARCH_RATIO = 0.9
_MIN_RATIO_STEP = 2e-3  # the search stops once its bracket is narrower (ratios a few channels per thousand apart)
_MAX_FILL = 4  # positions the target search may keep out of rank order to step past a jump in the cost


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
    forward/backward pass (same scores, faster; see :func:`accumulate_gradients`), the timestep strategy ``timesteps``
    (default: "threshold" for diff-pruning, "all" for taylor) and that strategy's own fields, passed by name
    (``thr``/``threshold_semantics`` for "threshold", ``stride`` for "threshold" (an approximate walk over every
    k-th timestep, under the same rule) and "strided", ``max_timesteps`` for any);
    diff-pruning also owns ``taylor_form``.
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
    # owned by the method (None: its default)
    calib_batch: int | None = None
    data_free_steps: int | None = None
    timestep_batch: int | None = None
    timesteps: str | None = None
    thr: float | None = None
    threshold_semantics: str | None = None
    stride: int | None = None
    max_timesteps: int | None = None
    taylor_form: str | None = None

    def __post_init__(self):
        method = METHODS.get(self.method)  # unknown name -> error listing the choices
        require(sum(v is not None for v in (self.ratio, self.target_macs, self.target_latency)) == 1,
                "give exactly one of ratio (e.g. --ratio 0.3), target_macs (e.g. --target-macs 0.5) and "
                "target_latency (e.g. --target-latency 0.6)")
        if self.target_latency is not None:
            require(isinstance(self.target_latency, (int, float)) and 0.0 < self.target_latency < 1.0,
                    f"target_latency={self.target_latency!r} must be in (0, 1), the fraction of the measured latency "
                    "to keep; e.g. 0.6")
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
        require(self.round_to == 1 or method.removes != "blocks",
                f"round_to={self.round_to} rounds channel widths; method {self.method!r} removes whole blocks")
        require(self.round_to == 1 or ((mode == "paper" or self.global_ranking) and not self.prune_heads),
                f"round_to={self.round_to} needs diffprune's channel selection: ratio_mode 'paper' or global ranking "
                "(the default with a target), without prune_heads")
        require(0.0 < self.macs_tolerance < 1.0, f"macs_tolerance={self.macs_tolerance!r} must be in (0, 1)")
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
        from ._config import config_from_dict

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


# ---- calibration ----------------------------------------------------------------------------------------------

def calibration_noise(shape, seed: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The fixed calibration noise: ``torch.randn(shape, generator=Generator().manual_seed(seed))`` on the CPU."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(seed))).to(device=device, dtype=dtype)


def _check_tensor(x: torch.Tensor, shape: tuple[int, int, int], what: str) -> torch.Tensor:
    c, h, w = shape
    if x.ndim != 4 or tuple(x.shape[1:]) != (c, h, w):
        raise DiffPruneError(
            f"{what} have shape {tuple(x.shape)} but the model takes [N, {c}, {h}, {w}]; "
            f"resize them to {h}x{w} with {c} channel(s) (or pass a folder/dataset name, which is fitted)"
        )
    require(x.shape[0] >= 1, f"{what} are empty")
    if x.dtype == torch.uint8:
        return x
    require(x.is_floating_point(), f"{what} must be float in [-1, 1] or uint8, got {x.dtype}")
    lo, hi = float(x.min()), float(x.max())
    require(lo >= -1.0 - 1e-4 and hi <= 1.0 + 1e-4,
            f"{what} range [{lo:.3g}, {hi:.3g}] is outside [-1, 1]; map uint8 images with diffprune.data.to_model_range")
    return x.float()


def _load_tensor_file(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images (and labels, key ``labels`` of a safetensors file) from a ``.npy`` or ``.safetensors`` file."""
    if path.suffix == ".npy":
        import numpy as np

        try:
            return torch.from_numpy(np.load(path, allow_pickle=False)), None
        except ValueError as e:
            raise DiffPruneError(f"cannot read {str(path)!r} without pickle ({e}); save a plain numeric array") from None
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    labels = tensors.pop("labels", None)
    require(len(tensors) == 1 or "images" in tensors,
            f"{str(path)!r} holds tensors {sorted(tensors)}; store the images under the key 'images'")
    return (tensors["images"] if "images" in tensors else next(iter(tensors.values()))), labels


def calibration_batch(model, source, *, batch_size: int, seed: int = 0, scheduler=None, codec=None,
                      split: str = "train", data_free_steps: int = 10, device=None, cache_dir=None,
                      num_classes: int | None = None, text_encoder=None, prompts=None, progress: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """The calibration batch: clean inputs ``x0`` in model range (images in [-1, 1], or latents for a latent
    model), each image's conditioning (its label for a class-conditional model, its caption's context for a
    text-conditioned one, encoded with ``text_encoder``; else None), and a JSON description of the source.

    ``source``: a tensor ``[N, C, H, W]`` (float in [-1, 1] or uint8) of exactly the image shape; a ``.npy`` or
    ``.safetensors`` file holding one (key ``images``, optional ``labels``); a folder of images, a bundled dataset
    name or a Hugging Face id (:func:`diffprune.data.load_data`, fitted to the model; class sub-folders give
    labels); or ``"data-free"``: inputs sampled from the model itself with ``data_free_steps`` DDIM steps (latents
    for a latent model; class labels balanced by seed over ``num_classes``, default the model's label table; for a
    text model, seed ``s`` is generated from ``prompts[s mod len(prompts)]``, without guidance). When more than
    ``batch_size`` images are available a seeded random subset is used.
    """
    from ._hashing import content_sha256
    from .data import ImageData
    from .inputs import denoiser_data, pixel_shape

    device = device if device is not None else next(model.parameters()).device
    if isinstance(source, str) and source == DATA_FREE:
        require(scheduler is not None, "data-free calibration samples from the model and needs its noise scheduler")
        from .sampling import labels_for, prompts_for, sample

        seeds = list(range(seed, seed + batch_size))
        desc = {"source": DATA_FREE, "ddim_steps": data_free_steps, "sample_seeds": [seeds[0], seeds[-1]]}
        spec = adapter_for(model).conditioning(model)
        labels = context = None
        if spec is not None and spec.kind == "text":
            require(text_encoder is not None and prompts,
                    "data-free calibration of a text model generates its inputs from prompts: pass the pipeline's "
                    "text encoder and prompts (CLI: --prompt-file FILE, one prompt per line)")
            context = text_encoder.encode(prompts_for(seeds, prompts))
            desc["prompts"] = len(prompts)
        else:
            labels = labels_for(model, seeds, num_classes=num_classes)
        x0 = sample(model, scheduler, seeds=seeds, class_labels=labels, prompt_embeds=context,
                    num_inference_steps=data_free_steps, device=device, progress=progress, codec=codec, decode=False)
        cond = labels if context is None else context
        return x0.to(device), None if cond is None else cond.to(device), {**desc, "batch": len(seeds)}
    shape = pixel_shape(model, codec)
    labels = captions = None
    if isinstance(source, torch.Tensor):
        images, desc = _check_tensor(source, shape, "calibration images"), {"source": "tensor"}
    elif isinstance(source, (str, os.PathLike)) and Path(source).is_file() and Path(source).suffix in (".npy",
                                                                                                      ".safetensors"):
        images, labels = _load_tensor_file(Path(source))
        images = _check_tensor(images, shape, f"calibration images in {str(source)!r}")
        desc = {"source": str(source)}
    elif isinstance(source, (str, os.PathLike)):
        from .data import load_data

        require(shape[1] == shape[2], f"the model takes {shape[1]}x{shape[2]} images; pass a tensor of that shape")
        data = load_data(source, resolution=shape[1], channels=shape[0], split=split)
        images, labels, captions = data.images, data.labels, data.captions
        desc = {"source": str(source), "split": split, "revision": data.record.get("revision")}
    else:
        raise DiffPruneError(f"calibration must be a tensor, a path/dataset name or {DATA_FREE!r}, got {type(source).__name__}")
    if images.shape[0] > batch_size:
        idx = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(int(seed)))[:batch_size]
        images, labels = images[idx], (None if labels is None else labels[idx])
        captions = None if captions is None else tuple(captions[i] for i in idx.tolist())
        desc["subset_seed"] = int(seed)
    data = ImageData(images, labels, None, {"source": desc["source"], "sha256": content_sha256(images, labels,
                                                                                             captions)}, captions)
    prepared = denoiser_data(model, data, codec=codec, text_encoder=text_encoder, cache_dir=cache_dir)
    x0, y = prepared.batch(torch.arange(len(prepared)), device=device)
    desc["batch"] = int(x0.shape[0])
    return x0, y, desc


def accumulate_gradients(model: nn.Module, scheduler, x0: torch.Tensor, noise: torch.Tensor,
                         strategy: TimestepStrategy, *, cond=None, adapter=None, timestep_batch: int = 1,
                         progress: bool = True) -> CalibrationResult:
    """Step 2 of Diff-Pruning: walk the strategy's timesteps, ``backward()`` each loss without zeroing gradients.

    Gradients are zeroed once at the start. Each planned ``(t, weight)`` gives ``L_t = mse(f(x_t, t, cond),
    target)`` (the target follows the scheduler's prediction type, :mod:`diffprune.objective`; ``cond``: each
    input's label for a conditional model); ``strategy.decide`` says whether it is accumulated
    (``(weight * L_t).backward()``) and whether to stop. ``adapter``: how to call the model (default: its family's).

    ``timestep_batch=k`` walks ``k`` timesteps per pass: one forward of the batch repeated at ``k`` timesteps gives
    their ``k`` losses, the stopping rule reads them in order, and one ``backward`` of the sum of the accumulated
    ones adds the same gradient as ``k`` separate passes (equal up to float summation order; the model's layers
    act on each sample alone). At most ``k - 1`` forward passes past the stop are wasted; memory grows ``k``-fold.
    """
    from .adapters import adapter_for
    from .objective import prediction_target

    require_int("timestep_batch", timestep_batch, 1)
    started, started_cpu = time.perf_counter(), time.process_time()
    adapter = adapter or adapter_for(model)
    require(hasattr(scheduler, "add_noise"), "the scheduler must have add_noise (a diffusers noise scheduler)")
    T = int(scheduler.config.num_train_timesteps)
    plan = strategy.plan(T)
    full = len(type(strategy)(**{**dataclasses.asdict(strategy), "max_timesteps": None}).plan(T))
    model.zero_grad(set_to_none=True)
    dtype = next(model.parameters()).dtype
    x0, noise = x0.to(dtype=dtype), noise.to(device=x0.device, dtype=dtype)
    B = x0.shape[0]
    losses: list[tuple[int, float]] = []
    accumulated: list[int] = []
    stopped = False
    bar = tqdm(total=len(plan), desc="calibration", unit="t", disable=not progress)
    for start in range(0, len(plan), timestep_batch):
        chunk = plan[start:start + timestep_batch]
        k = len(chunk)
        tt = torch.tensor([t for t, _ in chunk], device=x0.device).repeat_interleave(B)
        xx0, nn_ = x0.repeat(k, *([1] * (x0.ndim - 1))), noise.repeat(k, *([1] * (x0.ndim - 1)))
        cc = None if cond is None else cond.repeat(k, *[1] * (cond.dim() - 1))
        pred = adapter.forward(model, scheduler.add_noise(xx0, nn_, tt), tt, cc)
        per_t = (pred - prediction_target(scheduler, xx0, nn_, tt)).pow(2).flatten(1).mean(1).view(k, B).mean(1)
        total = None
        for (t, weight), loss in zip(chunk, per_t):
            value = float(loss.detach())
            if not math.isfinite(value):  # a NaN score would prune arbitrary channels
                raise DiffPruneError(f"calibration loss at t={t} is {value}; the model has non-finite weights or the "
                                     "calibration images are broken; check the model (diffprune info) and --data")
            losses.append((t, value))
            accumulate, stop = strategy.decide([v for _, v in losses])
            if accumulate:
                term = loss * weight if weight != 1.0 else loss
                total = term if total is None else total + term
                accumulated.append(t)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            if stop:
                stopped = True
                break
        if total is not None:
            total.backward()
        if stopped:
            break
    bar.close()
    stopped_by = "threshold" if stopped else ("cap" if len(plan) < full else "end")
    return CalibrationResult(losses, accumulated, accumulated[-1] if accumulated else None, stopped_by,
                             strategy.to_dict(), time.perf_counter() - started, time.process_time() - started_cpu)


# ---- pruning ----------------------------------------------------------------------------------------------------

class _SelectingPruner(tp.pruner.BasePruner):
    """Torch-Pruning 1.6.1's pruner with diffprune's own channel selection (subclasses: :meth:`_select`).

    All groups are scored on the unpruned model first (as Torch-Pruning 1.6.1 does), then the selection picks the
    channels of every group, then the groups are pruned. Everything else (dependency graph, importance, pruning
    functions, history) is Torch-Pruning's. Groups are disjoint channel sets, so earlier prunes do not shift later
    groups' indices.
    """

    @torch.no_grad()
    def _prune(self):
        if self.current_step > self.iterative_steps:
            return
        records = []  # (module, pruning fn, scores, channel groups, current channels, initial channels)
        for group in self.DG.get_all_groups(ignored_layers=self.ignored_layers,
                                            root_module_types=self.root_module_types):
            if not self._check_pruning_ratio(group):
                continue
            is_attn, _ = self._is_atten_group(group)
            if is_attn:
                group = self._downstream_node_as_root_if_attention(group)
                if group is None:
                    continue
            imp = self.estimate_importance(group)
            if imp is None:
                continue
            module, pruning_fn = group[0].dep.target.module, group[0].dep.handler
            is_out = self.DG.is_out_channel_pruning_fn(pruning_fn)
            current = (self.DG.get_out_channels if is_out else self.DG.get_in_channels)(module)
            initial = (self.layer_init_out_ch if is_out else self.layer_init_in_ch)[module]
            records.append((module, pruning_fn, imp.detach().cpu(), self._get_channel_groups(group), current,
                            initial))
        for (module, pruning_fn, *_), idxs in zip(records, self._select(records)):
            if len(idxs) > 0:
                group = self.DG.get_pruning_group(module, pruning_fn, sorted(int(i) for i in idxs))
                if self.DG.check_pruning_group(group):
                    yield group

    def _select(self, records) -> list:
        """The channel indices to prune in each record's group."""
        raise NotImplementedError

    def _kept(self, keep: int, size: int, chunks: int) -> int:
        """Positions per chunk to keep when the ratio asks for ``keep`` of ``size``: with ``round_to`` N, the most
        positions <= ``keep`` whose total width ``chunks * kept`` is a multiple of N (at least one; if only wider ones
        qualify, the narrowest of those; an untouched group stays whole)."""
        n = self.round_to or 1
        if n == 1 or keep >= size:
            return keep
        allowed = [p for p in range(1, size + 1) if (chunks * p) % n == 0] or [size]
        below = [p for p in allowed if p <= keep]
        return max(below) if below else min(allowed)


class PaperPruner(_SelectingPruner):
    """The Diff-Pruning repository's local selection rule ("paper" mode).

    For each group: ``n_pruned = current - int(initial * (1 - ratio))``; with ``k`` channel groups (GroupNorm
    groups or attention heads) the channels form ``k`` contiguous chunks and each chunk drops its own
    ``n_pruned // k`` lowest-scoring channels; otherwise the ``n_pruned`` lowest-scoring channels go.
    All groups are scored on the unpruned model before any is pruned (the repository's old Torch-Pruning scored
    each group after pruning the previous ones, an ordering artefact that does not change the architecture).
    """

    def _select(self, records):
        out = []
        for module, _, imp, ch_groups, current, initial in records:
            n_pruned = current - int(initial * (1 - self.get_target_pruning_ratio(module)))
            if n_pruned <= 0:
                out.append([])
            elif ch_groups > 1:
                size = current // ch_groups
                per = size - self._kept(size - n_pruned // ch_groups, size, ch_groups)
                out.append(torch.cat([torch.argsort(imp[g * size:(g + 1) * size])[:per] + g * size
                                      for g in range(ch_groups)]).tolist())
            else:
                out.append(torch.argsort(imp)[:current - self._kept(current - n_pruned, current, 1)].tolist())
        return out


class GlobalPruner(_SelectingPruner):
    """Torch-Pruning 1.6.1's global ranking ("uniform" mode with ``global_ranking``), with every group keeping at least
    one position.

    As in Torch-Pruning, a group with ``k`` channel groups (GroupNorm groups, attention heads) is ranked by its
    position scores averaged over the ``k`` chunks, the same positions go in every chunk, and ``ratio`` is the share
    of all positions to remove, lowest scores first across groups. The difference: Torch-Pruning prunes every
    position below one global threshold, and a group whose positions all fall below it would lose every channel,
    which its dependency check refuses, so the group is left *whole*: the MACs then go back up at deeper cuts
    (measured on the MNIST configuration: ratio 0.6 kept 0.08 of the MACs, 0.75 kept 0.73). Here each group keeps its
    best position, the next-lowest positions elsewhere go instead, and the MACs fall monotonically with the ratio.
    """

    def _select(self, records):
        positions = [imp.view(k, -1).mean(dim=0) if k > 1 else imp for _, _, imp, k, _, _ in records]
        names = [self.module_names.get(id(rec[0]), "?") for rec in records]
        self.total_positions = total = sum(len(p) for p in positions)
        n_pruned = total - int(total * (1 - self.pruning_ratio))
        ranked = sorted((float(score), r, i) for r, pos in enumerate(positions) for i, score in enumerate(pos))
        left = [len(p) for p in positions]
        chosen: list[list[int]] = [[] for _ in records]
        for _, r, i in ranked:
            if n_pruned <= 0:
                break
            if left[r] > 1 and (names[r], i) not in self.skip:  # every group keeps at least one position
                chosen[r].append(i)
                left[r] -= 1
                n_pruned -= 1
                self.picks.append((names[r], i))
        for r, pos in enumerate(positions):  # round_to: a group's kept width, then its lowest positions go
            kept = self._kept(len(pos) - len(chosen[r]), len(pos), records[r][3])
            chosen[r] = torch.argsort(pos)[:len(pos) - kept].tolist()
        return [[i + g * len(pos) for g in range(rec[3]) for i in picked]
                for rec, pos, picked in zip(records, positions, chosen)]


class _RecordingImportance:
    """Wraps an importance: records each group's scores under its root module name (``report.scores``), or replays
    scores recorded before (``cached``: the target-MACs search scores once and probes many ratios)."""

    def __init__(self, importance, names: dict[int, str], cached: dict | None = None):
        self.importance, self.names, self.cached = importance, names, cached
        self.scores: dict[str, torch.Tensor] = {}

    def __call__(self, group):
        key = self.names.get(id(group[0].dep.target.module), "?")
        imp = self.cached[key].clone() if self.cached is not None and key in self.cached else self.importance(group)
        if imp is not None:
            self.scores[key] = imp.detach().cpu().clone()
        return imp


def _prune_once(unet, adapter: ModelAdapter, config: PruneConfig, ratio: float, importance,
                cached: dict | None = None, skip=()) -> tuple[list, dict, dict, "_SelectingPruner"]:
    """Prune ``unet`` in place at ``ratio``; returns (Torch-Pruning history, heads per attention, scores, the
    pruner). ``cached``: scores recorded by an earlier call on the same unpruned model, used instead of
    ``importance``. ``skip``: positions global ranking keeps whatever their rank (:class:`GlobalPruner`)."""
    seed_everything(config.seed)  # random scores are reproducible
    names = {id(m): n for n, m in unet.named_modules()}
    recorder = _RecordingImportance(importance, names, cached)
    num_heads = adapter.num_heads(unet)
    kwargs: dict[str, Any] = dict(
        importance=recorder, pruning_ratio=float(ratio), global_pruning=config.global_ranking,
        ignored_layers=adapter.ignored_layers(unet), num_heads=dict(num_heads),
        in_channel_groups={}, out_channel_groups={}, channel_groups={},
    )
    if config.prune_heads:
        kwargs.update(prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=float(ratio))
    cls = (PaperPruner if config.ratio_mode == "paper" else
           GlobalPruner if config.global_ranking and not config.prune_heads else tp.pruner.BasePruner)
    pruner = cls(unet, adapter.example_inputs(unet), **kwargs)
    pruner.round_to = config.round_to  # read by diffprune's own selection (_SelectingPruner._kept)
    pruner.module_names, pruner.skip, pruner.picks, pruner.total_positions = names, frozenset(skip), [], None
    pruner.step()
    heads = {}
    for name, m in unet.named_modules():
        q = getattr(m, "to_q", None)
        if q is not None and q in pruner.num_heads:
            heads[name] = int(pruner.num_heads[q])
    history = [[n, bool(out), [int(i) for i in idxs]] for n, out, idxs in pruner.pruning_history()]
    return history, heads, recorder.scores, pruner


def _copy_with_grads(unet: nn.Module) -> nn.Module:
    twin = copy.deepcopy(unet)
    for p, q in zip(unet.parameters(), twin.parameters()):
        q.grad = None if p.grad is None else p.grad.detach().clone()
    return twin


@dataclass(frozen=True)
class _Target:
    """What the ratio search aims at: ``measure(pruned copy)`` -> fraction of the original, within ``tolerance``."""

    name: str  # "macs" | "latency"
    value: float
    tolerance: float
    measure: Any
    flag: str


def _macs_target(config: PruneConfig, macs_before: int) -> _Target:
    return _Target("macs", float(config.target_macs), float(config.macs_tolerance),
                   lambda m: count_macs(m).macs / macs_before, "--macs-tolerance")


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers live on the meta device (shapes only, nothing copied): a
    probe that only counts MACs prunes and traces it without touching the weights."""
    memo: dict[int, Any] = {}
    for t in model.parameters():
        memo[id(t)] = nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=t.requires_grad)
    for t in model.buffers():
        memo[id(t)] = torch.empty_like(t, device="meta")
    return copy.deepcopy(model, memo)


def latency_timer(config: PruneConfig, device):
    """``timer(model) -> seconds``: the median of ``latency_repeats`` denoiser calls at ``latency_batch``, in
    ``latency_dtype``, on ``device``, after warm-up (as :mod:`diffprune.latency` measures)."""
    from .latency import denoiser_latency

    dtype = LATENCY_DTYPES[config.latency_dtype]

    def timer(model) -> float:
        timed = copy.deepcopy(model).to(device=device, dtype=dtype)
        rec = denoiser_latency(timed, device=device, batch_sizes=(config.latency_batch,),
                               repeats=config.latency_repeats)
        return rec[str(config.latency_batch)]["median_s"]

    return timer


def _search_ratio(unet, adapter, config, importance, snapshot, macs_before: int, progress: bool,
                  target: _Target | None = None):
    """Bisection on the ratio so that ``target.measure`` (default: the MAC fraction) lands within the tolerance;
    returns ``(ratio, trials, skip)``.

    The channel scores are computed once (on a copy holding the calibration gradients) and replayed by every probe,
    so a probe is a copy, a prune and a measurement; after the first, a MAC probe works on a meta-device copy
    (shapes only: no weights copied, no arithmetic in its traces and counts). The deepest ratio is probed first: a
    target beyond it fails at once. Every probe also records its MAC fraction.

    The fill (global ranking): when one more pruned position moves the cost past the whole tolerance band (a
    position of a group coupled through many layers), the search finds that position by bisecting the number of
    pruned positions, keeps it (``skip``) and prunes the next-ranked positions instead, up to ``_MAX_FILL`` times.
    The positions kept out of rank order are recorded with each probe (``kept_out_of_order``).
    """
    target = target or _macs_target(config, macs_before)
    key = f"{target.name}_fraction"
    tol = target.tolerance
    trials: list[dict] = []
    cache: dict[str, torch.Tensor] = {}
    skip: list[tuple[str, int]] = []
    picks: dict[tuple[int, int], list] = {}  # (len(skip), positions pruned) -> the positions, in pick order
    totals: list[int] = []  # global ranking: the positions a ratio is a share of
    bar = tqdm(total=None, desc=f"target-{target.name} search", disable=not progress)

    def probe(ratio: float) -> float:
        n = totals[0] - int(totals[0] * (1 - ratio)) if totals else None  # positions this ratio prunes
        if (len(skip), n) in picks:  # probed already (a ratio rounding to the same positions)
            return next(t[key] for t in reversed(trials) if t.get("positions") == n
                        and len(t.get("kept_out_of_order", ())) == len(skip))
        twin = (_copy_with_grads(unet) if not cache else _meta_copy(unet) if target.name == "macs" else
                copy.deepcopy(unet))
        with adapter.tracing(twin):
            _, heads, scores, pruner = _prune_once(twin, adapter, config, ratio, importance, cached=cache or None,
                                                   skip=skip)
            adapter.finalize_(twin, snapshot, heads)
        cache.update(scores)
        rel = target.measure(twin)
        macs = rel if target.name == "macs" else count_macs(twin).macs / macs_before
        trial = {"ratio": ratio, key: rel, "macs_fraction": macs}
        if pruner.total_positions is not None:  # global ranking: positions are what the ratio counts
            trial["positions"] = len(pruner.picks)
            picks[len(skip), len(pruner.picks)] = pruner.picks
            totals.append(pruner.total_positions)
        if skip:
            trial["kept_out_of_order"] = [list(x) for x in skip]
        trials.append(trial)
        bar.update()
        bar.set_postfix(ratio=f"{ratio:.4f}", **{target.name: f"{rel:.4f}"})
        return rel

    def close(rel: float, share: float) -> bool:
        return abs(rel / target.value - 1) <= tol * share

    def bisect(lo: float, hi: float, step: float) -> bool:
        """Ratios in (lo, hi): True once a probe lands within a quarter of the tolerance."""
        while hi - lo >= step:
            mid = (lo + hi) / 2
            rel = probe(mid)
            if close(rel, 1 / 4):
                return True
            lo, hi = (mid, hi) if rel > target.value else (lo, mid)
        return False

    deepest = probe(_MAX_SEARCH_RATIO)
    if deepest > target.value * (1 + tol):
        ignored = sum(count_macs(unet).per_layer.get(n, 0) for n, m in unet.named_modules()
                      if m in adapter.ignored_layers(unet))
        raise DiffPruneError(
            f"target_{target.name}={target.value} is out of reach: pruning {_MAX_SEARCH_RATIO:.0%} of the channels "
            f"still keeps {deepest:.4f} of the {'MACs' if target.name == 'macs' else target.name} (the "
            f"layers that are never pruned do {ignored / macs_before:.1%} of the MACs, and every group keeps at least "
            f"one channel); ask for {deepest:.2f} or more")
    done = bisect(0.0, _MAX_SEARCH_RATIO, _MIN_RATIO_STEP)  # the ratios left prune nearly the same channels
    floor = None  # positions pruned at which the current skip is known to stay above the target
    for _ in range(_MAX_FILL if totals else 0):
        if done or any(close(t[key], 1) for t in trials):
            break
        now = [t for t in trials if len(t.get("kept_out_of_order", ())) == len(skip)]
        known = [floor] if floor is not None else []
        above = max([t["positions"] for t in now if t[key] > target.value] + known, default=None)
        below = min((t["positions"] for t in now if t[key] < target.value), default=None)
        if above is None or below is None:
            break
        while below - above > 1:  # narrow to one position: the one whose removal steps over the band
            n = (above + below) // 2
            rel = probe((n - 0.5) / totals[0])  # exactly n positions
            if close(rel, 1 / 4):
                break
            above, below = (n, below) if rel > target.value else (above, n)
        if below - above > 1:  # landed
            break
        skip.append(picks[len(skip), below][above])  # keep it; the next-ranked positions go instead
        floor = above
        done = bisect((above - 0.5) / totals[0], _MAX_SEARCH_RATIO, 1 / totals[0])
    bar.close()
    best = min(trials, key=lambda r: abs(r[key] / target.value - 1))
    if abs(best[key] / target.value - 1) > tol:
        above = min((r[key] for r in trials if r[key] > target.value), default=None)
        below = max((r[key] for r in trials if r[key] < target.value), default=None)
        steps = " and ".join(f"{v:.4f}" for v in (above, below) if v is not None)
        hint = ("; per-layer steps are coarse: try global ranking (--ranking global --ratio-mode uniform)"
                if not config.global_ranking else
                "; channels coupled through GroupNorm groups and shared layers go together, so the cost moves in "
                f"steps here: ask for one of {steps}, or widen {target.flag} (now {tol:.0%})")
        raise DiffPruneError(
            f"target_{target.name}={target.value} cannot be reached within +-{tol:.0%}: the nearest pruning keeps "
            f"{best[key]:.4f} of the {'MACs' if target.name == 'macs' else target.name} (ratio {best['ratio']:.4f})"
            f"{hint}")
    return best["ratio"], trials, [tuple(x) for x in best.get("kept_out_of_order", ())]


def _prune_blocks(model, adapter, config: PruneConfig, score, macs_before: int):
    """Depth pruning: remove the lowest-scoring removable blocks, as many as ``ratio`` (a share of the blocks) or
    ``target_macs`` asks; returns ``(ratio, search, replayable meta, {"blocks": scores})``."""
    blocks = adapter.blocks(model)
    require(blocks is not None, f"method {config.method!r} removes whole blocks, which the {adapter.name} adapter does "
                                "not define; use a channel method (diff-pruning, taylor, magnitude, random)")
    scores = torch.tensor([score(b) for b in blocks])
    order = [i for i in torch.argsort(scores).tolist() if i not in adapter.fixed_blocks(model)]
    trials: list[dict] = []
    for k in range(len(order) + 1):
        twin = copy.deepcopy(model)
        adapter.remove_blocks_(twin, order[:k])
        trials.append({"ratio": k / len(blocks), "blocks_removed": k, "macs_fraction": count_macs(twin).macs / macs_before})
    if config.target_macs is not None:
        best = min(trials, key=lambda r: abs(r["macs_fraction"] / config.target_macs - 1))
        require(abs(best["macs_fraction"] / config.target_macs - 1) <= config.macs_tolerance,
                f"target_macs={config.target_macs} cannot be reached within +-{config.macs_tolerance:.0%} by removing "
                f"whole blocks: the nearest removes {best['blocks_removed']} of {len(blocks)} and keeps "
                f"{best['macs_fraction']:.4f} of the MACs; ask for that, or widen --macs-tolerance")
    else:
        best = min(trials, key=lambda r: abs(r["ratio"] - config.ratio))
    removed = sorted(order[:best["blocks_removed"]])
    adapter.remove_blocks_(model, removed)
    # the kept blocks are unchanged: their state, under their new names, is the replayable metadata
    return best["ratio"], trials, {"removed_blocks": removed, **adapter.finalize_(model, adapter.snapshot(model))}, {
        "blocks": scores}


def prune_(unet: nn.Module, config: PruneConfig, calibration=None, *, scheduler=None, codec=None, device=None,
           split: str = "train", cache_dir=None, num_classes: int | None = None, text_encoder=None, prompts=None,
           timer=None, progress: bool = True) -> PruneReport:
    """Prune the denoiser ``unet`` (any supported family) in place according to ``config``; returns a
    :class:`PruneReport`.

    ``calibration`` (gradient methods only): see :func:`calibration_batch`; a tensor, a file, a folder, a
    dataset name or ``"data-free"`` (a class-conditional model needs labelled data: each image is calibrated with
    its own label). ``scheduler``: the model's noise scheduler (``add_noise``, ``num_train_timesteps`` and the
    ``prediction_type`` the loss targets), required by gradient methods. ``codec``: a latent pipeline's
    autoencoder (:class:`~diffprune.adapters.pipelines.LatentCodec`): calibration images are encoded with it
    (cached under ``cache_dir``). ``num_classes``: the classes a conditional model was trained on, for data-free
    calibration. ``text_encoder`` (a text-to-image pipeline's :class:`~diffprune.adapters.pipelines.TextEncoder`):
    encodes the calibration captions, or the ``prompts`` of data-free calibration. ``device``: where to run (default: where the model is; the model is moved there); a
    ``target_latency`` is timed there. ``timer(model) -> seconds``: replaces the latency measurement (tests, or a
    timer of your own, e.g. of a whole pipeline call).
    """
    require(isinstance(config, PruneConfig), f"config must be a PruneConfig, got {type(config).__name__}")
    from ._torch import require_finite_weights

    t0 = time.time()
    adapter = adapter_for(unet)
    method = METHODS.get(config.method)
    require_finite_weights(unet, "model to prune")
    if device is not None:
        unet.to(device)
    device = next(unet.parameters()).device
    calibration_record = latency = None
    with adapter.tracing(unet):
        before = count_macs(unet)
        widths_before = layer_widths(unet)
        snapshot = adapter.snapshot(unet)
        if method.needs_gradients:
            require(calibration is not None,
                    f"method {config.method!r} scores channels with gradients and needs calibration images: pass a "
                    f"tensor, an image folder or dataset name, or {DATA_FREE!r} (CLI: --data DIR_OR_NAME)")
            require(scheduler is not None,
                    f"method {config.method!r} needs the model's noise scheduler (scheduler=...) to add noise")
            x0, cond, desc = calibration_batch(
                unet, calibration, batch_size=config.calib_batch, seed=config.seed, scheduler=scheduler, codec=codec,
                split=split, data_free_steps=config.data_free_steps, device=device, cache_dir=cache_dir,
                num_classes=num_classes, text_encoder=text_encoder, prompts=prompts, progress=progress)
            noise = calibration_noise(x0.shape, config.seed, device=device)
            result = accumulate_gradients(unet, scheduler, x0, noise, config.timestep_strategy(), cond=cond,
                                          timestep_batch=config.timestep_batch, progress=progress)
            calibration_record = {**desc, "noise_seed": config.seed, **result.to_dict()}
        importance = method.make(config)
        search: list[dict] = []
        skip: list[tuple[str, int]] = []
        if method.removes == "blocks":
            ratio, search, meta, scores = _prune_blocks(unet, adapter, config, importance, before.macs)
            history = []
        else:
            if config.target_macs is not None:
                ratio, search, skip = _search_ratio(unet, adapter, config, importance, snapshot, before.macs,
                                                    progress)
            elif config.target_latency is not None:
                timer = timer or latency_timer(config, device)
                base_s = timer(unet)
                target = _Target("latency", float(config.target_latency), float(config.latency_tolerance),
                                 lambda m: timer(m) / base_s, "--latency-tolerance")
                ratio, search, skip = _search_ratio(unet, adapter, config, importance, snapshot, before.macs,
                                                    progress, target)
            else:
                ratio = float(config.ratio)
            history, heads, scores, _ = _prune_once(unet, adapter, config, ratio, importance, skip=skip)
            meta = adapter.finalize_(unet, snapshot, heads)
        unet.zero_grad(set_to_none=True)
        if method.after_pruning is not None:
            method.after_pruning(unet, config.seed)
            adapter.check(unet)
        after = count_macs(unet)
        if config.target_latency is not None:  # the pruned model itself, timed as the probes were
            achieved = timer(unet)
            latency = {"base_s": base_s, "s": achieved, "fraction": achieved / base_s, "batch": config.latency_batch,
                       "dtype": config.latency_dtype, "device": str(device), "threads": torch.get_num_threads(),
                       "repeats": config.latency_repeats}
    structure = {
        "format": STRUCTURE_FORMAT, "adapter": adapter.name, "torch_pruning": TORCH_PRUNING_VERSION,
        "history": history, "meta": meta,
        "shapes": state_shapes(unet),
    }
    return PruneReport(
        config=config.to_dict(), method=config.method, ratio=ratio, family=adapter.name,
        base_params=before.params, params=after.params, base_macs=before.macs, macs=after.macs,
        structure=structure, calibration=calibration_record, search=search,
        base_widths=widths_before, widths=layer_widths(unet),
        base_macs_per_layer=before.per_layer, macs_per_layer=after.per_layer,
        seconds=round(time.time() - t0, 3), scores=scores, latency=latency,
        kept_out_of_order=[list(x) for x in skip],
    )


def prune_model(model: str | os.PathLike, config: PruneConfig, calibration=None, *, device=None,
                split: str = "train", cache_dir=None, prediction_type: str | None = None, prompts=None,
                progress: bool = True):
    """Load ``model`` (a shipped name, a folder — bare model or pipeline, pruned or not — or a hub id) and prune its
    denoiser in place; returns ``(loaded, report)`` with ``loaded.pruning`` set to the record to save (chained
    onto the previous one for a model pruned again) and ``loaded.scheduler`` to the scheduler used.
    ``prediction_type``: what the model predicts, for a model without a scheduler (checked against one it has).
    ``prompts``: for a text-to-image pipeline calibrated ``"data-free"``, the prompts its inputs are generated from.

    Save it with ``save_pruned(loaded.denoiser, out, loaded.pruning, scheduler=loaded.scheduler,
    pipeline=loaded.pipeline)``.
    """
    from .io import load_model
    from .objective import resolve_scheduler

    loaded = load_model(model)
    require(not (loaded.pruning or {}).get("structure", {}).get("meta", {}).get("removed_blocks"),
            f"{str(model)!r} was depth-pruned (whole blocks removed); prune the original model instead")
    scheduler = resolve_scheduler(loaded.scheduler, prediction_type)
    for part in (loaded.codec, loaded.text_encoder):
        if part is not None and device is not None:
            part.to(device)
    names = loaded.class_names
    report = prune_(loaded.denoiser, config, calibration, scheduler=scheduler, codec=loaded.codec, device=device,
                    split=split, cache_dir=cache_dir, num_classes=len(names) if names else None,
                    text_encoder=loaded.text_encoder, prompts=prompts, progress=progress)
    record = {**report.to_dict(), "model_source": str(model), "model_revision": loaded.revision,
              "scheduler_source": "model" if loaded.scheduler is not None else
              f"default (DDPM, 1000 steps, linear, {scheduler.config.prediction_type})"}
    if loaded.pruning is not None:
        record = chain_records(loaded.pruning, record)
    loaded.pruning, loaded.scheduler = record, scheduler
    return loaded, report


__all__ = [
    "PruneConfig", "PruneReport", "CalibrationResult", "PaperPruner", "prune_", "accumulate_gradients",
    "calibration_batch", "calibration_noise", "layer_widths", "prune_model", "replay_structure_", "chain_records",
    "RATIO_MODES",
    "DATA_FREE", "METHODS",
]
