"""Model adapters: all model-specific surgery lives here, one adapter per model family.

An adapter tells the pruning engine what to feed the model for tracing, which layers never to prune, how attention
projections group into heads, and how to put a pruned model back in a consistent state (attributes that mirror
shapes, attention heads and scale). It also replays that state when a pruned model is loaded.

``ADAPTERS`` is a named registry; :func:`adapter_for` picks the adapter by the model's class.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from ..errors import DiffPruneError
from ..registry import Registry


class ModelAdapter:
    """Interface every adapter implements (see :class:`diffprune.adapters.unet2d.UNet2DAdapter`)."""

    name: str = ""
    model_classes: tuple[str, ...] = ()

    def example_inputs(self, model: nn.Module, batch_size: int = 1, device=None) -> dict:
        """Keyword inputs of one forward call (shapes from the model config)."""
        raise NotImplementedError

    def ignored_layers(self, model: nn.Module) -> list[nn.Module]:
        """Layers whose channels must never be pruned (e.g. the output convolution)."""
        raise NotImplementedError

    def num_heads(self, model: nn.Module) -> dict[nn.Module, int]:
        """Projection layer -> number of attention heads, for per-head-consistent pruning."""
        return {}

    def snapshot(self, model: nn.Module) -> dict:
        """State needed by :meth:`finalize_`, taken before pruning."""
        return {}

    def finalize_(self, model: nn.Module, snapshot: dict, heads: dict[str, int] | None = None) -> dict:
        """Make a just-pruned model consistent; return the replayable metadata (JSON-able)."""
        raise NotImplementedError

    def restore_(self, model: nn.Module, meta: dict) -> None:
        """Apply metadata from :meth:`finalize_` to a model whose shapes were replayed (at load time)."""
        raise NotImplementedError

    def check(self, model: nn.Module, device=None) -> None:
        """Run one forward pass; raise DiffPruneError if the output shape is wrong or not finite."""
        raise NotImplementedError

    @contextlib.contextmanager
    def tracing(self, model: nn.Module) -> Iterator[nn.Module]:
        """Context in which the model can be traced by Torch-Pruning (eval mode, no checkpointing)."""
        was_training = model.training
        model.eval()
        try:
            yield model
        finally:
            model.train(was_training)


ADAPTERS: Registry[ModelAdapter] = Registry("model adapter")


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The registered adapter for ``type(model)`` (matched by class name along its MRO)."""
    from . import unet2d  # noqa: F401  (registers "unet2d")

    names = [c.__name__ for c in type(model).__mro__]
    for key in ADAPTERS:
        adapter = ADAPTERS.get(key)
        if any(n in adapter.model_classes for n in names):
            return adapter
    supported = sorted(c for key in ADAPTERS for c in ADAPTERS.get(key).model_classes)
    raise DiffPruneError(f"no pruning adapter for model class {type(model).__name__!r}; supported: {supported}")


def adapter_for_class_name(class_name: str) -> ModelAdapter:
    """The adapter for a model class name as written in a diffusers ``config.json`` (``_class_name``)."""
    from . import unet2d  # noqa: F401

    for key in ADAPTERS:
        adapter = ADAPTERS.get(key)
        if class_name in adapter.model_classes:
            return adapter
    supported = sorted(c for key in ADAPTERS for c in ADAPTERS.get(key).model_classes)
    raise DiffPruneError(f"no pruning adapter for model class {class_name!r}; supported: {supported}")


__all__ = ["ADAPTERS", "ModelAdapter", "adapter_for", "adapter_for_class_name"]
