"""diffusers ``Attention`` after pruning: heads, widths and scale written back (shared by the adapters).

Torch-Pruning prunes ``to_q``/``to_k``/``to_v`` (coupled through ``scaled_dot_product_attention``) and ``to_out``'s
input; with ``num_heads`` the same positions go in every head (head dims shrink) or, with ``prune_heads``, whole
heads go. The module's bookkeeping (``heads``, ``inner_dim``, ``inner_kv_dim``, ``query_dim``, ``out_dim``,
``scale``) is then stale, and diffusers reads it in forward: it is written back here.

Scale: the trained model used ``dim_head ** -0.5``, but ``AttnProcessor2_0`` leaves the scale to SDPA, which takes
``1 / sqrt(q.shape[-1])`` — shrinking ``dim_head`` would silently change the logits. The trained effective scale is
kept by folding ``old_scale / new_scale`` into ``to_q`` (weight and bias) and setting
``attn.scale = new_dim_head ** -0.5``: every processor (SDPA, or the classic one that reads ``attn.scale``) then
computes exactly the trained logits.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import DiffPruneError


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    from diffusers.models.attention_processor import Attention

    return {n: m for n, m in model.named_modules() if isinstance(m, Attention)}


def num_heads(model: nn.Module) -> dict[nn.Module, int]:
    """q/k/v projection -> heads of its attention (Torch-Pruning's ``num_heads``)."""
    heads = {}
    for attn in attention_modules(model).values():
        for proj in (attn.to_q, attn.to_k, attn.to_v):
            heads[proj] = int(attn.heads)
    return heads


def snapshot(model: nn.Module) -> dict:
    return {n: {"heads": int(a.heads), "dim_head": a.to_q.out_features // int(a.heads), "scale": float(a.scale)}
            for n, a in attention_modules(model).items()}


def write(model: nn.Module, attention_meta: dict, fold: dict | None) -> None:
    """Write heads/widths/scale of every attention named in ``attention_meta``; fold ``fold[name]`` into ``to_q``."""
    modules = attention_modules(model)
    for name, meta in attention_meta.items():
        if name not in modules:
            raise DiffPruneError(f"pruning record names attention {name!r}, which this model does not have")
        attn = modules[name]
        heads, q_out = int(meta["heads"]), attn.to_q.out_features
        dim_head = int(meta.get("dim_head", q_out // max(heads, 1)))
        if (heads < 1 or q_out % heads or heads * dim_head != q_out or attn.to_k.out_features != q_out
                or attn.to_v.out_features != q_out):
            raise DiffPruneError(
                f"attention {name!r}: q/k/v widths {q_out}/{attn.to_k.out_features}/{attn.to_v.out_features} "
                f"do not split into {heads} heads of {dim_head}; the pruning record does not match the weights")
        if fold is not None and fold.get(name, 1.0) != 1.0:
            with torch.no_grad():
                attn.to_q.weight.mul_(fold[name])
                if attn.to_q.bias is not None:
                    attn.to_q.bias.mul_(fold[name])
        attn.heads = heads
        attn.inner_dim = q_out
        attn.inner_kv_dim = attn.to_k.out_features
        attn.query_dim = attn.to_q.in_features
        attn.out_dim = attn.to_out[0].out_features
        attn.scale = float(meta["scale"])


def finalize(model: nn.Module, before: dict, heads: dict[str, int] | None) -> dict:
    """After pruning: new heads/dim_head/scale per attention (the record), written with the scale folded."""
    heads = heads or {}
    record, fold = {}, {}
    for name, attn in attention_modules(model).items():
        old = before[name]
        n_heads = int(heads.get(name, old["heads"]))
        q_out = attn.to_q.out_features
        if n_heads < 1 or q_out % n_heads:
            raise DiffPruneError(f"attention {name!r}: {q_out} channels do not split into {n_heads} heads")
        dim_head = q_out // n_heads
        new_scale = dim_head ** -0.5 if getattr(attn, "scale_qk", True) else 1.0
        fold[name] = old["scale"] / new_scale
        record[name] = {"heads": n_heads, "dim_head": dim_head, "scale": new_scale,
                        "q_scale_folded": fold[name], "trained_scale": old["scale"]}
    write(model, record, fold)
    return record
