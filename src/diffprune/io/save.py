"""Writing models: the safe pruned-model format (safetensors + JSON, never pickles) and pipeline folders.

A pruned *pipeline* is a pipeline folder: ``model_index.json``, every other component copied from the source
pipeline (only what the safe format allows: JSON, safetensors and tokenizer files; anything else, ``.py`` files and
pickles included, is left out and named on stderr), and the denoiser's folder (``unet/`` or ``transformer/``) in
the layout of :mod:`diffprune.layout`.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from .._fs import atomic_dir, atomic_write_json, write_safetensors
from .._torch import shape_mismatch, state_shapes
from ..adapters.pipelines import latent_family
from ..errors import DiffPruneError, require
from ..layout import CONFIG_NAME, FREE, INDEX_NAME, LAYOUTS, PRUNING_NAME, STOCK, WEIGHTS_NAME
from .load import PipelineSource, load_codec

# what a pipeline component may hold, by suffix or by name: weights and configs, and the tokenizers' own files
SAFE_SUFFIXES = (".json", ".safetensors", ".txt")
SAFE_NAMES = ("spiece.model", "sentencepiece.bpe.model", "tokenizer.model")


def _state_dict_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def _check_record(model: nn.Module, pruning: dict) -> None:
    require(isinstance(pruning, dict) and isinstance(pruning.get("structure"), dict),
            "pruning must be the pruning record (PruneReport.to_dict() or LoadedModel.pruning) with a 'structure'")
    recorded = pruning["structure"].get("shapes")
    bad = shape_mismatch(state_shapes(model), recorded) if recorded is not None else []
    if bad:
        raise DiffPruneError(f"the model's shapes differ from the pruning record (e.g. {bad}); save the model "
                             "that this record describes")


def copy_component(src: Path, dst: Path) -> list[str]:
    """Copy the safe files of a pipeline component folder (recursively); return what was left out."""
    left_out = []
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if p.is_dir() or p.is_symlink():
            if p.is_symlink():
                left_out.append(rel.as_posix())
            continue
        if p.suffix.lower() in SAFE_SUFFIXES or p.name in SAFE_NAMES:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dst / rel)
        else:
            left_out.append(rel.as_posix())
    dst.mkdir(parents=True, exist_ok=True)
    return [f"{dst.name}/{r}" for r in left_out]


def _copy_pipeline(pipeline: PipelineSource, folder: Path) -> Path:
    """Copy the source pipeline's other components into ``folder``; return the denoiser's target folder."""
    left_out = []
    for name in pipeline.components():
        if name != pipeline.family.denoiser:
            left_out += copy_component(pipeline.folder / name, folder / name)
    shutil.copy2(pipeline.folder / INDEX_NAME, folder / INDEX_NAME)
    if left_out:
        shown = ", ".join(left_out[:5]) + (f" and {len(left_out) - 5} more" if len(left_out) > 5 else "")
        print(f"diffprune: left out of the output pipeline (not JSON, safetensors or tokenizer files): {shown}",
              file=sys.stderr)
    return folder / pipeline.family.denoiser


def write_model(folder: str | os.PathLike, model: nn.Module, *, pruning: dict | None = None, scheduler=None,
                pipeline: PipelineSource | None = None, card: dict | None = None) -> None:
    """Write ``model`` into the new folder ``folder``: pruned (with ``pruning``) or plain; bare or, with
    ``pipeline``, as a pipeline folder whose other components are copied from the source pipeline. ``card``: the
    settings of its model card (:func:`diffprune.card.write_card`: ``stage``, ``name``), written with a pruned
    model; None writes none."""
    folder = Path(folder)
    target = folder
    if pipeline is not None:
        target = _copy_pipeline(pipeline, folder)
    elif scheduler is not None:
        scheduler.save_pretrained(folder / "scheduler")
    if pruning is None:
        model.save_pretrained(target, safe_serialization=True)
        return
    _check_record(model, pruning)
    target.mkdir(parents=True, exist_ok=True)
    (stock_twin(model) if pruning.get("layout") == STOCK else model).save_config(target)
    write_safetensors(target / WEIGHTS_NAME, _state_dict_for_saving(model), metadata={"format": "pt"})
    atomic_write_json(target / PRUNING_NAME, pruning)
    if card is not None:
        _write_card(folder, model, pruning, pipeline, card)


def layout_adapter(adapter, config):
    """``adapter`` as the channel selection of ``config.layout`` sees it (:meth:`ModelAdapter.stock_layout`); refused,
    before any work, where this family or the pruning ``config``'s method and selection cannot give that layout (see
    :func:`stock_twin`)."""
    from ..importance import METHODS

    if config.layout == FREE:
        return adapter
    if METHODS.get(config.method).removes == "blocks":
        require(bool(adapter.block_counts), f"--layout stock with --method depth: {adapter.name} models have no "
                                            "blocks to remove; prune their widths (e.g. --method diff-pruning)")
        return adapter.stock_layout()
    require(adapter.stock_widths,
            f"--layout stock needs --method depth for {adapter.name} models: their stock config fixes every width "
            f"(heads x head dim is the residual stream, the MLP a multiple of it), so only removed whole blocks fit "
            f"it; method {config.method!r} prunes widths: drop --layout stock to keep them (free layout)")
    require(config.ratio_mode == "paper" or (config.global_ranking and not config.prune_heads),
            "--layout stock keeps one width per config value through diffprune's channel selection, which "
            "Torch-Pruning's own pruner (--prune-heads, or local ranking in uniform mode) bypasses; drop "
            "--prune-heads / use global ranking")
    return adapter.stock_layout()


def stock_twin(model: nn.Module) -> nn.Module:
    """A shapes-only (meta-device) model built from the stock diffusers config that describes the pruned ``model``
    (:meth:`~diffprune.adapters.ModelAdapter.stock_config`), checked to have exactly ``model``'s shapes: its
    ``save_config`` writes the ``config.json`` with which plain ``from_pretrained`` loads the pruned weights."""
    from ..adapters import resolve_adapter

    adapter, name = resolve_adapter(model), type(model).__name__
    config = adapter.stock_config(model, dict(model.config))
    fix = ("save it in the free layout (the default; load it with diffprune.load_pipeline) or export it to ONNX "
           "(diffprune export)")
    require(config is not None, f"a pruned {name} cannot be saved in the stock layout: its diffusers config cannot "
                                f"express pruned widths, and the {adapter.name} family has no blocks to remove; {fix}")
    config.pop("_use_default_values", None)  # from_config would take those keys' defaults, not the pruned values
    with torch.device("meta"):
        twin = type(model).from_config(config)
    bad = shape_mismatch(state_shapes(twin), state_shapes(model))
    require(not bad, f"this pruned {name} cannot be saved in the stock layout: its diffusers config builds other "
                     f"shapes (e.g. {bad}); prune it with --layout stock, which keeps only what the config can express "
                     f"(the transformer families: --method depth), or {fix}")
    return twin


def _write_card(folder: Path, model: nn.Module, pruning: dict, pipeline: PipelineSource | None, card: dict) -> None:
    """The folder's model card: its conditioning from the family's adapter, the license from the input's card."""
    from ..adapters import adapter_named
    from ..card import input_license, write_card

    adapter = adapter_named(pruning.get("family"))
    spec = adapter.conditioning(model) if adapter is not None else None
    source = pipeline.folder if pipeline is not None else pruning.get("model_source")
    license = input_license(source) if source and Path(source).is_dir() else None
    write_card(folder, pruning, **{"conditioning": spec.kind if spec else None, "license": license, **card})


def with_layout(record: dict, model: nn.Module, layout: str | None) -> dict:
    """The pruning record of ``model`` saved in ``layout`` (None: as the record says, or as its pruning config
    asked, default free); the stock layout keeps the unpruned config as ``base_config`` (config.json will build the
    pruned model)."""
    layout = layout or record.get("layout") or (record.get("config") or {}).get("layout")
    if layout is None or layout == record.get("layout", FREE):
        return record
    require(layout in LAYOUTS, f"unknown layout {layout!r}; choose from {list(LAYOUTS)}")
    require(layout == STOCK, f"a record in the {record.get('layout')} layout cannot be saved in the {layout} one")
    return {**record, "layout": STOCK, "base_config": {"_class_name": type(model).__name__, **dict(model.config)}}


def save_pruned(model: nn.Module, out_dir: str | os.PathLike, pruning: dict, scheduler=None,
                overwrite: bool = False, inputs=(), pipeline: PipelineSource | None = None,
                layout: str | None = None) -> Path:
    """Write a pruned model folder atomically (``pruning``: ``PruneReport.to_dict()`` or a loaded record); with
    ``pipeline`` (``LoadedModel.pipeline``), a pipeline folder. ``layout``: "stock" writes the config.json that
    builds the pruned model, so plain diffusers ``from_pretrained`` loads the folder (whole blocks removed only;
    anything else is refused, see :func:`stock_twin`); default: the record's (free unless it says stock).

    Refuses an existing non-empty ``out_dir`` unless ``overwrite`` (and then only a folder diffprune wrote, never
    one that is or contains one of ``inputs``). The record's structure must match the model's parameter shapes.
    """
    _check_record(model, pruning)
    pruning = with_layout(pruning, model, layout)
    if pruning.get("layout") == STOCK:
        stock_twin(model)  # refused before anything is written
    with atomic_dir(out_dir, overwrite=overwrite, kind="pruned-model", inputs=inputs) as tmp:
        write_model(tmp, model, pruning=pruning, scheduler=scheduler, pipeline=pipeline,
                    card={"stage": "pruned", "name": str(out_dir)})
    return Path(out_dir)


def assemble_pipeline(folder, denoiser: nn.Module, autoencoder_dir, scheduler, class_names=None, *,
                      adapter) -> PipelineSource:
    """Lay out a latent pipeline's fixed components in the new folder ``folder`` (model_index.json naming the
    denoiser's pipeline class, the autoencoder copied from ``autoencoder_dir``, the scheduler, and the class names
    where the pipeline keeps them, e.g. DiT's ``id2label``), for training a new denoiser into it; returns its
    :class:`PipelineSource`."""
    import diffusers

    folder, autoencoder_dir = Path(folder), Path(autoencoder_dir)
    codec = load_codec(autoencoder_dir)
    family = latent_family(adapter.name)
    ae = folder / family.autoencoder
    ae.mkdir(parents=True)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        shutil.copy2(autoencoder_dir / name, ae / name)
    scheduler.save_pretrained(folder / "scheduler")
    labels = {family.label_map: {str(i): n for i, n in enumerate(class_names)}} if family.label_map and class_names \
        else {}
    index = {"_class_name": family.pipeline_class, "_diffusers_version": diffusers.__version__,
             family.denoiser: ["diffusers", type(denoiser).__name__],
             family.autoencoder: ["diffusers", type(codec.autoencoder).__name__],
             "scheduler": ["diffusers", type(scheduler).__name__], **labels}
    atomic_write_json(folder / INDEX_NAME, index)
    codec.image_shape(adapter.input_shape(denoiser))  # the autoencoder's latents fit the denoiser
    return PipelineSource(folder, family, index)


__all__ = ["assemble_pipeline", "layout_adapter", "copy_component", "save_pruned", "stock_twin", "with_layout",
           "write_model"]
