"""Joint (MMDiT) attention shared by the SD3 and Flux adapters: the text-stream conditioning as a dict, the
projections of one attention, its QK-norm weights, and its head count after whole heads were removed.

A joint attention projects the image stream (``to_q``/``to_k``/``to_v``) and the text stream
(``add_q_proj``/``add_k_proj``/``add_v_proj``) into the same heads and attends over both sequences at once, so a
head is kept or removed in all six projections together, and in both output projections (``to_out.0``,
``to_add_out``) that read it. The head dim itself never changes: a QK-norm (RMSNorm over the head dim) and Flux's
rotary embedding are laid out over it.
"""
from __future__ import annotations

from torch import nn

from ..errors import DiffPruneError

PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
QK_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")


def text_inputs(spec, cond) -> tuple:
    """``(context, pooled)`` of a ``{"context", "pooled"}`` conditioning; a clear error for anything else."""
    if not isinstance(cond, dict) or set(cond) != set(spec.keys):
        got = f"a dict with keys {sorted(cond)}" if isinstance(cond, dict) else f"a {type(cond).__name__}"
        raise DiffPruneError(f"this model takes its text conditioning as a dict with keys {list(spec.keys)} (context "
                             f"[N, L, {spec.context_dim}], pooled [N, {spec.pooled_dim}]), got {got}; encode the "
                             "prompts with its pipeline's text encoders")
    return cond["context"], cond["pooled"]


def projections(attn: nn.Module) -> list[nn.Linear]:
    """The q/k/v projections of both streams that ``attn`` has."""
    return [getattr(attn, n) for n in PROJECTIONS if getattr(attn, n, None) is not None]


def qk_norm_parameters(attentions) -> list[nn.Parameter]:
    """The weights of every QK-norm (RMSNorm over the head dim): never pruned, whole heads keep them valid."""
    params = []
    for attn in attentions:
        for name in QK_NORMS:
            norm = getattr(attn, name, None)
            if norm is not None:
                params += list(norm.parameters())
    return params


def heads_left(name: str, attn: nn.Module, dim_head: int) -> int:
    """The heads ``attn`` has after whole heads were removed (every projection as wide, a multiple of ``dim_head``)."""
    widths = {p.out_features for p in projections(attn)}
    width = widths.pop() if len(widths) == 1 else None
    if width is None or width % dim_head or width == 0:
        raise DiffPruneError(f"joint attention {name!r}: projection widths "
                             f"{[p.out_features for p in projections(attn)]} are not one whole number of heads of "
                             f"{dim_head}; the pruning record does not match the weights")
    return width // dim_head
