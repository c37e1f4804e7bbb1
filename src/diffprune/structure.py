"""A pruned structure as replayable data: per-layer widths, replay onto a fresh base model, chained records.

``pruning.json``'s ``structure`` holds Torch-Pruning's pruning history (replayed on a freshly traced dependency
graph of the unpruned model), the adapter's metadata (attention heads and scale, resampling channels, removed blocks)
and every parameter's shape. :func:`replay_structure_` is what loading a pruned model calls; it sits below the prune
verb, which writes the record.
"""
from __future__ import annotations

import importlib.metadata

import torch_pruning as tp
from torch import nn

from ._torch import shape_mismatch, state_shapes
from .adapters import ModelAdapter, resolve_adapter
from .errors import DiffPruneError, require

STRUCTURE_FORMAT = "diffprune-structure/1"
# The installed distribution's version: torch_pruning.__version__ of the 1.6.1 wheel still says "1.6.0".
TORCH_PRUNING_VERSION = importlib.metadata.version("torch-pruning")


def layer_widths(model: nn.Module) -> dict[str, list[int]]:
    """``name -> [in, out]`` channels of every Conv/Linear/GroupNorm layer (Embedding: ``[rows, width]``)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[name] = [m.in_channels, m.out_channels]
        elif isinstance(m, nn.Linear):
            out[name] = [m.in_features, m.out_features]
        elif isinstance(m, nn.GroupNorm):
            out[name] = [m.num_channels, m.num_channels]
        elif isinstance(m, nn.Embedding):
            out[name] = [m.num_embeddings, m.embedding_dim]
    return out


def replay_structure_(unet: nn.Module, structure: dict, *, adapter: ModelAdapter | None = None) -> None:
    """Re-apply a recorded pruning structure to a freshly built (unpruned) model, in place.

    Replays Torch-Pruning's history on a freshly traced dependency graph, then the adapter's metadata (attention
    heads and scale, resampling channels); finally checks every parameter shape against the record.
    """
    require(structure.get("format") == STRUCTURE_FORMAT,
            f"unknown pruning structure format {structure.get('format')!r}; expected {STRUCTURE_FORMAT!r} "
            "(written by a newer diffprune?)")
    adapter = resolve_adapter(unet, adapter)
    with adapter.tracing(unet):
        frozen = [p for p in adapter.ignored_layers(unet) if isinstance(p, nn.Parameter)]  # e.g. QK-norm weights
        dg = tp.DependencyGraph().build_dependency(unet, example_inputs=adapter.trace_inputs(unet), verbose=False,
                                                   ignored_params=frozen)
        try:
            dg.load_pruning_history([tuple(h) for h in structure["history"]])
        except (AttributeError, IndexError, KeyError) as e:
            raise DiffPruneError(f"the pruning record does not fit this base model ({e}); is config.json the right one?") from None
        adapter.restore_(unet, structure.get("meta", {}))
    recorded = structure.get("shapes")
    bad = shape_mismatch(state_shapes(unet), recorded) if recorded is not None else []
    if bad:
        raise DiffPruneError(f"replayed pruning gives other shapes than recorded (e.g. {bad}); the record is corrupt")


def chain_records(previous: dict, current: dict) -> dict:
    """Pruning record of a model pruned twice: ``previous`` (the loaded model's) then ``current``.

    The structure history is the concatenation (replayed in order on the base model); ``base_params``,
    ``base_macs``, ``base_widths`` and ``base_macs_per_layer`` refer to the original base model.
    """
    require(isinstance(previous.get("structure"), dict), "the previous pruning record has no 'structure'")
    out = dict(current)
    out["structure"] = {**current["structure"],
                        "history": list(previous["structure"]["history"]) + list(current["structure"]["history"])}
    for key in ("base_params", "base_macs", "base_widths", "base_macs_per_layer"):
        out[key] = previous.get(key, current[key])
    out["previous"] = {k: previous.get(k) for k in ("method", "config", "params", "macs", "previous")}
    return out


__all__ = ["STRUCTURE_FORMAT", "TORCH_PRUNING_VERSION", "chain_records", "layer_widths", "replay_structure_"]
