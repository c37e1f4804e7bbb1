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
from dataclasses import dataclass
from typing import Callable

import torch
import torch_pruning as tp
from torch import nn

from .errors import DiffPruneError, require
from .registry import Registry

TAYLOR_FORMS = ("abs", "squared")


@dataclass(frozen=True)
class Method:
    """A registered importance method.

    ``needs_gradients``: calibration images and a gradient pass are required. ``default_timesteps``: the timestep
    strategy used when the config names none. ``reinit``: re-initialise all parameters after pruning.
    """

    name: str
    needs_gradients: bool
    default_timesteps: str | None
    reinit: bool
    factory: Callable[[str], tp.importance.Importance]
    summary: str

    def make(self, taylor_form: str = "abs") -> tp.importance.Importance:
        require(taylor_form in TAYLOR_FORMS, f"unknown taylor_form {taylor_form!r}; choose from {list(TAYLOR_FORMS)}")
        return self.factory(taylor_form)


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


def _register(name, needs_gradients, default_timesteps, reinit, summary):
    def deco(factory):
        METHODS.register(name)(Method(name, needs_gradients, default_timesteps, reinit, factory, summary))
        return factory
    return deco


@_register("diff-pruning", True, "threshold", False, "sum |w*g| over the timesteps kept by the threshold rule")
def _diff_pruning(taylor_form: str):
    return CheckedTaylorImportance(multivariable=False, form=taylor_form)


@_register("taylor", True, "all", False, "|sum w*g| with gradients over all timesteps")
def _taylor(taylor_form: str):
    require(taylor_form == "abs", "taylor_form='squared' applies to --method diff-pruning only")
    return CheckedTaylorImportance(multivariable=True)


@_register("magnitude", False, None, False, "L2 norm of the weights")
def _magnitude(taylor_form: str):
    return tp.importance.MagnitudeImportance(p=2)


@_register("random", False, None, False, "random scores (seeded)")
def _random(taylor_form: str):
    return tp.importance.RandomImportance()


@_register("reinit", False, None, True, "random pruning, then all parameters re-initialised")
def _reinit(taylor_form: str):
    return tp.importance.RandomImportance()


def get_method(name: str) -> Method:
    """The registered method ``name`` (unknown names raise DiffPruneError listing the choices)."""
    return METHODS.get(name)


def make_importance(method: str, taylor_form: str = "abs") -> tp.importance.Importance:
    """Torch-Pruning importance object for a registered method name."""
    return get_method(method).make(taylor_form)


def reinitialize_(model: nn.Module) -> None:
    """Re-initialise every module that defines ``reset_parameters`` (call after seeding)."""
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
