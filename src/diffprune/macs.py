"""MACs and parameters of one denoiser call at batch 1 (conditioning included), counted with torch's flop counter.

``torch.utils.flop_counter`` counts convolutions, matmuls and fused attention (Torch-Pruning's counter misses the
attention matmuls). MACs = FLOPs / 2. On the CPU, ``scaled_dot_product_attention`` runs a kernel the counter
does not know (``_scaled_dot_product_flash_attention_for_cpu``); we register torch's own SDPA formula for it so
a model gets the same count on every device.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ._torch import eval_mode, meta_copy

__all__ = ["MacsReport", "count_params", "count_macs"]


@dataclass(frozen=True)
class MacsReport:
    """``macs``: total of one call at batch 1; ``per_layer``: module-qualified name -> MACs done by that module
    itself (not by its children; an attention module's own entry is its attention matmuls); ``params``."""

    macs: int
    params: int
    per_layer: dict[str, int] = field(default_factory=dict)


def count_params(model: nn.Module) -> int:
    """Number of parameters (each shared tensor counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _custom_mapping() -> dict:
    aten = torch.ops.aten
    mapping = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable"):
        op = getattr(aten, name, None)
        if op is not None:
            mapping[op] = _cpu_sdpa_flops
    return mapping


def count_macs(model: nn.Module, example_inputs: dict | None = None, *, device=None, adapter=None,
               shapes_only: bool = False) -> MacsReport:
    """Count MACs of one call at batch 1 (``example_inputs`` default: ``adapter``'s, conditioning included; the
    model's own adapter when none is given). ``shapes_only``: on a meta-device copy (no weight is read, nothing
    computed; the count is the same)."""
    if shapes_only:
        model = meta_copy(model)
    if example_inputs is None:
        from .adapters import resolve_adapter

        example_inputs = resolve_adapter(model, adapter).example_inputs(model, 1, device)
    inputs = example_inputs
    counter = FlopCounterMode(display=False, depth=None, custom_mapping=_custom_mapping())
    with eval_mode(model), torch.no_grad(), counter:
        model(**inputs)
    totals = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    total_flops = counter.get_total_flops()
    root = type(model).__name__
    # FlopCounterMode names modules "<RootClass>.<qualified name>"; keep each module's own share.
    named = {}
    for name, flops in totals.items():
        if name == "Global":
            continue
        qual = "" if name == root else name[len(root) + 1:] if name.startswith(root + ".") else name
        named[qual] = flops
    # A module's own MACs: its total minus the totals of its nearest counted descendants.
    children_sum = dict.fromkeys(named, 0)
    for qual, flops in named.items():
        if not qual:
            continue
        parts = qual.split(".")
        parent = next((".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1) if ".".join(parts[:i]) in named), None)
        if parent is not None:
            children_sum[parent] += flops
    per_layer = {q: (f - children_sum[q]) // 2 for q, f in named.items() if q and f - children_sum[q] > 0}
    return MacsReport(macs=total_flops // 2, params=count_params(model), per_layer=dict(sorted(per_layer.items())))

