"""Small torch helpers shared by the modules (one place each)."""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator

import torch
from torch import nn

from .errors import DiffPruneError


# the floating dtypes diffprune loads, prunes, saves and times models in, by their names
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def weights_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype that most of ``model``'s parameter elements are in (float32 for a model without any)."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def param_dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    """``{name: dtype}`` of ``model``'s floating parameters and buffers (to restore after a float32 pass)."""
    return {n: t.dtype for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.is_floating_point()}


def restore_dtypes_(model: nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Cast each floating parameter and buffer of ``model`` back to its dtype in ``dtypes`` (names ``dtypes`` lacks,
    and names gone from the model, are left alone); gradients are dropped."""
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name in dtypes and t.dtype != dtypes[name]:
                t.grad = None
                t.data = t.data.to(dtypes[name])


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Inside the block, new floating tensors default to ``dtype`` (None: unchanged); restored after."""
    before = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@contextlib.contextmanager
def float32_while(model: nn.Module, needed: bool) -> Iterator[torch.dtype]:
    """With ``needed``, ``model`` is float32 inside the block (a gradient pass in float32) and each parameter and
    buffer goes back to its own dtype after (exactly: a kept value was one of that dtype); yields the dtype most of
    the weights are in."""
    dtypes, dtype = param_dtypes(model), weights_dtype(model)
    upcast = needed and dtype != torch.float32
    if upcast:
        model.float()
    try:
        yield dtype
    finally:
        if upcast:
            restore_dtypes_(model, dtypes)


@contextlib.contextmanager
def float32_params(modules) -> Iterator[None]:
    """Inside the block the low-precision (bfloat16/float16) parameters of ``modules`` (not their submodules') are
    float32, and so are their gradients, so that scores computed from them are summed in float32; the original
    tensors are put back after, even on error."""
    saved = []
    for module in {id(m): m for m in modules if isinstance(m, nn.Module)}.values():
        for p in module.parameters(recurse=False):
            if p.is_floating_point() and p.dtype != torch.float32:
                saved.append((p, p.data, p.grad))
                p.grad = None
                p.data = p.data.float()
                if saved[-1][2] is not None:
                    p.grad = saved[-1][2].float()
    try:
        yield
    finally:
        for p, data, grad in saved:
            p.grad = None
            p.data = data
            p.grad = grad


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


def meta_copy(model: nn.Module, buffers: bool = True) -> nn.Module:
    """A copy of ``model`` whose parameters (and ``buffers``, unless False: then copied as they are) live on the meta
    device (shapes only, nothing copied): a probe that only counts MACs prunes and traces it without touching the
    weights; with real buffers, a shell that whole weights can later be assigned to."""
    memo: dict[int, Any] = {}
    for t in model.parameters():
        memo[id(t)] = nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=t.requires_grad)
    for t in model.buffers() if buffers else ():
        memo[id(t)] = torch.empty_like(t, device="meta")
    return copy.deepcopy(model, memo)
