"""Small torch helpers shared by the modules (one place each)."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .errors import DiffPruneError


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode inside the block; its train/eval mode is restored after, even on error."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def state_shapes(model_or_state) -> dict[str, list[int]]:
    """``{name: shape}`` of a module's state dict (or of a state dict)."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    return {k: list(v.shape) for k, v in state.items()}


def shape_mismatch(a: dict, b: dict, n: int = 3) -> list[str]:
    """The first ``n`` names whose shapes differ between two ``{name: shape}`` maps (missing on one side counts)."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))[:n]


def require_finite_weights(model: nn.Module, what: str) -> None:
    """Refuse a model with a NaN/inf parameter or buffer (it would give NaN samples, scores or metrics)."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise DiffPruneError(f"the {what} has non-finite values (NaN/inf) in {name!r}; it diverged or its file is "
                                 "damaged: fine-tune it again with a lower learning rate, or load another checkpoint")
