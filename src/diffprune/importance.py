"""Importance criteria: a named registry of methods built on Torch-Pruning's importance classes.

Every criterion follows Torch-Pruning's contract ``importance(group) -> Tensor[n_channels]``. Registered names
(API; they keep their meaning):

``diff-pruning``
    Diff-Pruning (Fang, Ma & Wang, NeurIPS 2023). Gradients accumulated over the timesteps chosen by the threshold
    rule (see :mod:`diffprune.timesteps`); score of a weight element ``|w * g|``, of a channel the sum over its
    elements, averaged over the coupled layers of its dependency group: ``TaylorImportance(multivariable=False)``.
    ``taylor_form="squared"`` scores ``sum (w * g)^2`` instead (the paper's experiment code).
``taylor``
    First-order Taylor over all timesteps: ``|sum w * g|`` per layer (``TaylorImportance(multivariable=True)``).
``magnitude``
    L2 magnitude of the weights (``MagnitudeImportance(p=2)``); no data needed.
``random``
    Random scores (``RandomImportance``), seeded by the pruning seed; no data needed.
``reinit``
    Random pruning, then every parameter re-initialised (the "train the pruned architecture from scratch" baseline).

As in Torch-Pruning, only convolution and linear weights enter a score (GroupNorm affine parameters and biases do
not), per-layer scores are averaged over the group (``group_reduction="mean"``) and divided by their mean
(``normalizer="mean"``), which leaves the ranking inside a group unchanged and makes groups comparable for global
ranking.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch_pruning as tp
from torch import nn

from .errors import DiffPruneError, require
from .registry import Registry

TAYLOR_FORMS = ("abs", "squared")


# Settings of the calibration pass, owned by every method that scores with gradients (defaults for PruneConfig).
GRADIENT_SETTINGS = {"calib_batch": 64, "data_free_steps": 10, "timestep_batch": 1, "timesteps": None, "thr": None,
                     "threshold_semantics": None, "stride": None, "max_timesteps": None, "noise_draws": 1}


# diffprune's default keeps half of every conditioning pathway: measured on the shipped DiT (5 seeds, 0.5x MACs) FID
# 25.41 +- 0.56 against 31.31 +- 2.10 without it (the paper's ranking) and 27.09 for magnitude; the UNet ties
# (benchmarks/results/default-vs-baselines.md). Diff-Pruning without it: conditioning_floor=0.
DIFF_PRUNING_FLOOR = 0.5


@dataclass(frozen=True)
class Method:
    """A registered importance criterion: how it scores, what it needs, and the settings it owns.

    ``settings``: the :class:`~diffprune.prune.PruneConfig` fields this method reads, with their defaults; any other
    method-specific field given to it is an error (``thr`` means nothing to ``magnitude``). ``needs``: the data a
    score needs (``"gradients"``: calibration images and a backward pass per timestep). ``default_timesteps``: the
    timestep strategy of a gradient method. ``conditioning_floor``: the share of the adapter's conditioning pathways
    the method keeps by default under global ranking (:class:`~diffprune.prune.PruneConfig`; 0: none, as the
    published baselines). ``after_pruning(model, seed)``: a step run on the pruned model (the
    ``reinit`` baseline re-initialises it). ``factory(config)`` builds the Torch-Pruning importance, or for a method
    that ``removes="blocks"`` a block scorer ``(block) -> float`` (the lowest-scoring blocks go whole).
    """

    name: str
    factory: Callable[..., tp.importance.Importance]
    summary: str
    settings: dict[str, Any] = field(default_factory=dict)
    needs: tuple[str, ...] = ()
    default_timesteps: str | None = None
    conditioning_floor: float = 0.0
    after_pruning: Callable[[nn.Module, int], None] | None = None
    removes: str = "channels"  # or "blocks" (depth pruning)

    @property
    def needs_gradients(self) -> bool:
        return "gradients" in self.needs

    def make(self, config) -> tp.importance.Importance:
        return self.factory(config)


METHODS: Registry[Method] = Registry("method")


class CheckedTaylorImportance(tp.importance.GroupTaylorImportance):
    """Torch-Pruning's ``GroupTaylorImportance`` that fails clearly when a weight has no gradient.

    ``form="squared"`` scores ``sum (w * g)^2``. It reuses the parent's ``|w * g'|`` with ``g' = w * g^2`` (since
    ``|w * w * g^2| = (w * g)^2``), swapped in for the duration of the call, so no scoring code is copied.
    """

    def __init__(self, multivariable: bool = False, form: str = "abs"):
        super().__init__(multivariable=multivariable)
        require(form in TAYLOR_FORMS, f"unknown taylor_form {form!r}; choose from {list(TAYLOR_FORMS)}")
        require(not (multivariable and form == "squared"),
                "taylor_form='squared' is defined for the per-element score |w*g| (diff-pruning), not for 'taylor'")
        self.form = form

    def _scored_layers(self, group) -> list[nn.Module]:
        layers = []
        for dep, _ in group:
            layer = dep.target.module
            if isinstance(layer, tuple(self.target_types)) and dep.handler in (
                tp.prune_conv_out_channels, tp.prune_conv_in_channels,
                tp.prune_linear_out_channels, tp.prune_linear_in_channels,
            ):
                layers.append(layer)
        return layers

    @contextlib.contextmanager
    def _squared_grads(self, layers):
        saved = {}
        for layer in layers:
            if id(layer) not in saved:
                g = layer.weight.grad
                saved[id(layer)] = (layer, g)
                layer.weight.grad = layer.weight.detach() * g * g
        try:
            yield
        finally:
            for layer, g in saved.values():
                layer.weight.grad = g

    @torch.no_grad()
    def __call__(self, group):
        layers = self._scored_layers(group)
        for layer in layers:
            if layer.weight.grad is None:
                raise DiffPruneError(
                    f"Taylor scoring needs gradients but {type(layer).__name__}{tuple(layer.weight.shape)} has none; "
                    "run the calibration pass first (pass calibration images or 'data-free'), "
                    "or use a data-free criterion (--method magnitude or random)"
                )
        if self.form == "squared":
            with self._squared_grads(layers):
                return super().__call__(group)
        return super().__call__(group)


def _register(name: str, summary: str, **kw):
    def deco(factory):
        METHODS.register(name)(Method(name, factory, summary, **kw))
        return factory
    return deco


def _reinitialize(model: nn.Module, seed: int) -> None:
    from .seed import seed_everything

    seed_everything(seed)
    reinitialize_(model)


@_register("diff-pruning", "sum |w*g| over the timesteps kept by the threshold rule", needs=("gradients",),
           settings={**GRADIENT_SETTINGS, "taylor_form": "abs"}, default_timesteps="threshold",
           conditioning_floor=DIFF_PRUNING_FLOOR)
def _diff_pruning(config):
    return CheckedTaylorImportance(multivariable=False, form=config.taylor_form)


@_register("taylor", "|sum w*g| with gradients over all timesteps", needs=("gradients",), settings=GRADIENT_SETTINGS,
           default_timesteps="all")
def _taylor(config):
    return CheckedTaylorImportance(multivariable=True)


def block_taylor_score(block: nn.Module) -> float:
    """First-order Taylor score of a whole block: sum of |w * g| over its parameters (the calibration gradients)."""
    total = 0.0
    for p in block.parameters():
        if p.grad is None:
            raise DiffPruneError("depth scoring needs the calibration gradients but a block parameter has none; pass "
                                 "calibration images (--data) or 'data-free'")
        total += float((p.detach() * p.grad).abs().sum())
    return total


@_register("depth", "whole blocks removed, lowest summed |w*g| first (same calibration as diff-pruning)",
           needs=("gradients",), settings=GRADIENT_SETTINGS, default_timesteps="threshold", removes="blocks")
def _depth(config):
    return block_taylor_score


@_register("magnitude", "L2 norm of the weights")
def _magnitude(config):
    return tp.importance.MagnitudeImportance(p=2)


@_register("random", "random scores (seeded)")
def _random(config):
    return tp.importance.RandomImportance()


@_register("reinit", "random pruning, then all parameters re-initialised", after_pruning=_reinitialize)
def _reinit(config):
    return tp.importance.RandomImportance()


def setting_owners() -> dict[str, list[str]]:
    """Every method-specific setting (a :class:`~diffprune.prune.PruneConfig` field) -> the methods that take it."""
    owners: dict[str, list[str]] = {}
    for name in METHODS:
        for key in METHODS.get(name).settings:
            owners.setdefault(key, []).append(name)
    return owners


def reinitialize_(model: nn.Module) -> None:
    """Re-initialise every module that defines ``reset_parameters`` (call after seeding)."""
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
