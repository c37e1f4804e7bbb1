"""Conditioning values as one batch: ``None`` (unconditional), a tensor whose first dimension is the batch (class
labels ``[N]``, a text context ``[N, L, D]``), or a dict of such tensors (a text-to-image family whose denoiser takes
several text inputs: ``{"context": [N, L, D], "pooled": [N, P], "mask": [N, L]}``, see
:class:`diffprune.adapters.Conditioning`). Every batch operation that calibration, training and sampling apply to a
conditioning goes through here, so the three forms behave alike.
"""
from __future__ import annotations

import torch

from .errors import require


def _map(cond, fn):
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: fn(v) for k, v in cond.items()}
    return fn(cond)


def batch_size(cond) -> int:
    """The batch size (the first dimension, the same for every tensor of a dict)."""
    sizes = {len(v) for v in cond.values()} if isinstance(cond, dict) else {len(cond)}
    require(len(sizes) == 1, f"conditioning tensors disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()


def take(cond, idx):
    """Rows ``idx`` (an index tensor, a slice or a list)."""
    return _map(cond, lambda v: v[idx])


def to(cond, device=None, dtype=None):
    """Moved to ``device``; floating tensors cast to ``dtype`` (labels and masks stay integers)."""
    return _map(cond, lambda v: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point()
                                      else None))


def repeat(cond, k: int):
    """The batch repeated ``k`` times (``[c0, c1, c0, c1, ...]`` as ``Tensor.repeat``)."""
    return _map(cond, lambda v: v.repeat(k, *[1] * (v.dim() - 1)))


def expand(cond, n: int):
    """A batch of one broadcast to ``n`` rows (a view); a batch of ``n`` unchanged."""
    return _map(cond, lambda v: v.expand(n, *v.shape[1:]) if len(v) == 1 and n != 1 else v)


def cat(conds: list):
    """The batches one after the other; every item has the same form (and, for dicts, the same keys)."""
    first = conds[0]
    if isinstance(first, dict):
        return {k: torch.cat([c[k].to(first[k].device) for c in conds]) for k in first}
    return torch.cat([c.to(first.device) for c in conds])


def where(drop: torch.Tensor, null, cond):
    """Row ``i`` of ``null`` where ``drop[i]``, else of ``cond`` (``null`` broadcast from one row)."""
    def pick(n, c):
        n = n.to(c.device, c.dtype).expand_as(c)
        return torch.where(drop.to(c.device).view(-1, *[1] * (c.dim() - 1)), n, c)

    if isinstance(cond, dict):
        return {k: pick(null[k], v) for k, v in cond.items()}
    return pick(null, cond)


def is_floating(cond) -> bool:
    """Whether the conditioning is made of features (text), not labels."""
    v = next(iter(cond.values())) if isinstance(cond, dict) else cond
    return v.is_floating_point()


__all__ = ["batch_size", "cat", "expand", "is_floating", "repeat", "take", "to", "where"]
