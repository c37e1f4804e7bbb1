"""Loading any model diffprune accepts: a shipped name, a pruned folder, a plain diffusers model or pipeline folder,
or (online) a Hugging Face hub id. No pickle anywhere.

:func:`load_pruned` rebuilds the base model from ``config.json``, replays the recorded structure
(:func:`diffprune.structure.replay_structure_`) and loads the safetensors weights; outputs are bitwise equal to the
model that was saved. :func:`load_model` returns a :class:`LoadedModel` whose adapter is resolved once, here;
:func:`load_pipeline` returns the stock diffusers pipeline with the (pruned) denoiser in place.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .._fs import is_hub_id, missing_path_message, read_json
from .._torch import default_dtype, shape_mismatch, state_shapes
from ..adapters import ModelAdapter, adapter_for_class_name
from ..adapters.pipelines import PipelineFamily, pipeline_family
from ..components import AUTOENCODER_CLASSES, TEXT_ENCODER_CLASSES, TOKENIZER_CLASSES, LatentCodec, TextEncoder, \
    require_transformers
from ..errors import DiffPruneError, require
from ..layout import (CONFIG_NAME, INDEX_NAME, MODEL_FILE_PATTERNS, PICKLE_SUFFIXES, PRUNING_NAME, SCHEDULER_CONFIG,
                      STOCK, check_weights, components, pickle_refusal, read_index, refuse_pickles)
from ..structure import replay_structure_
from ..text_encoders import ENCODINGS, StockTextEncoder

# safetensors' names of the floating dtypes diffprune loads
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


@dataclass(frozen=True)
class PipelineSource:
    """Where a pipeline came from: its folder (components are copied from it), its family and its
    ``model_index.json`` (read once, checked by :func:`diffprune.layout.read_index`)."""

    folder: Path
    family: PipelineFamily
    index: dict = dataclasses.field(default_factory=dict, compare=False)

    def components(self) -> list[str]:
        """The component folders named in ``model_index.json`` (autoencoder, scheduler, denoiser, ...)."""
        return components(self.folder, self.index)


@dataclass
class LoadedModel:
    """A model as :func:`load_model` found it: the denoiser and its adapter (resolved once, at load), its scheduler
    (or None), its pruning record (None when unpruned), where it came from (for a hub id, also the commit it resolved
    to), and for a pipeline its latent codec (latent pipelines), text encoder (text-to-image pipelines) and source."""

    denoiser: nn.Module
    scheduler: object | None
    pruning: dict | None
    source: str
    revision: str | None = None
    codec: LatentCodec | None = None
    pipeline: PipelineSource | None = None
    text_encoder: TextEncoder | None = None
    adapter: ModelAdapter | None = None

    @property
    def class_names(self) -> list[str] | None:
        """The names of the classes the model was trained on (a pipeline's label map, e.g. DiT's ``id2label``), in
        label order; None when unknown. Sampling balances labels over these, not over the whole label table."""
        key = None if self.pipeline is None else self.pipeline.family.label_map
        labels = self.pipeline.index.get(key) if key else None
        if not labels:
            return None
        require(isinstance(labels, dict) and all(str(k).isdigit() for k in labels),
                f"{str(self.pipeline.folder / INDEX_NAME)!r} has {key}={labels!r}; it must map class ids 0, 1, ... "
                "to names")
        return [labels[k] for k in sorted(labels, key=int)]


def _model_class(class_name, where: str) -> tuple[type, ModelAdapter]:
    import diffusers

    require(isinstance(class_name, str), f"{where} has no '_class_name' string (found {class_name!r}); is it a "
                                         "diffusers model config?")
    adapter = adapter_for_class_name(class_name)  # clear error for unsupported classes
    return getattr(diffusers, class_name), adapter


def _read_config(path: Path) -> dict:
    try:
        config = read_json(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise DiffPruneError(f"{str(path)!r} is not valid JSON ({e}); restore the model's config.json") from None
    require(isinstance(config, dict), f"{str(path)!r} is not a JSON object; restore the model's config.json")
    return config


def load_pruned(path: str | os.PathLike, *, device=None, dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a pruned model saved by :func:`diffprune.io.save_pruned` (no pickle; outputs bitwise equal to the
    saved one). ``path``: the pruned denoiser's folder, or a pruned pipeline folder (its denoiser is loaded)."""
    return _load_pruned(Path(path), device, dtype)[0]


def _load_pruned(folder: Path, device, dtype) -> tuple[nn.Module, ModelAdapter]:
    from safetensors.torch import load_file

    require(folder.is_dir(), f"pruned model folder {str(folder)!r} does not exist")
    if (folder / INDEX_NAME).is_file():
        folder = folder / _family(folder, read_index(folder)).denoiser
    require((folder / PRUNING_NAME).is_file(),
            f"{str(folder)!r} has no {PRUNING_NAME}, so it is not a pruned model; load it with load_model")
    require((folder / CONFIG_NAME).is_file(), f"{str(folder)!r} has no {CONFIG_NAME} (the base diffusers config)")
    weights = check_weights(folder)
    config = _read_config(folder / CONFIG_NAME)
    pruning = read_json(folder / PRUNING_NAME)
    cls, adapter = _model_class(config.get("_class_name"), str(folder / CONFIG_NAME))
    if isinstance(pruning, dict) and pruning.get("layout") == STOCK:  # config.json builds it as it is
        model = _from_pretrained(cls, folder, dtype).eval()
        return (model.to(device=device) if device is not None else model), adapter
    with default_dtype(dtype):  # built in the dtype it is loaded in: no float32 copy of a half-precision model
        model = cls.from_config(config)
    require(isinstance(pruning, dict) and isinstance(pruning.get("structure"), dict),
            f"{str(folder / PRUNING_NAME)!r} has no 'structure'")
    replay_structure_(model, pruning["structure"], adapter=adapter)
    state = load_file(str(weights), device="cpu")
    bad = shape_mismatch(state_shapes(model), state_shapes(state))
    if bad:
        raise DiffPruneError(f"{str(weights)!r} does not match the recorded structure (e.g. {bad}); the folder is "
                             "inconsistent")
    model.load_state_dict(state, strict=True)
    model.eval()
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model, adapter


def load_scheduler(folder: str | os.PathLike):
    """A diffusers scheduler from a folder with ``scheduler_config.json`` (class from ``_class_name``)."""
    import diffusers
    from diffusers import SchedulerMixin

    folder = Path(folder)
    cfg_path = folder / SCHEDULER_CONFIG
    require(cfg_path.is_file(), f"{str(folder)!r} has no {SCHEDULER_CONFIG}")
    name = _read_config(cfg_path).get("_class_name")
    cls = getattr(diffusers, str(name), None)
    require(isinstance(cls, type) and issubclass(cls, SchedulerMixin),
            f"{str(cfg_path)!r} names {name!r}, which is not a diffusers scheduler")
    return cls.from_pretrained(folder)


def stored_dtype(weights: Path) -> torch.dtype:
    """The floating dtype that most elements of a safetensors file (or of the first shard of a sharded index) are
    stored in; read from the header, no weights loaded."""
    from safetensors import SafetensorError, safe_open

    if weights.name.endswith(".index.json"):
        weight_map = read_json(weights).get("weight_map") or {}
        require(isinstance(weight_map, dict) and weight_map, f"{str(weights)!r} has no weight_map; restore the folder")
        weights = weights.parent / sorted(set(weight_map.values()))[0]
    counts: dict[str, int] = {}
    try:
        with safe_open(str(weights), "pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                counts[piece.get_dtype()] = counts.get(piece.get_dtype(), 0) + math.prod(piece.get_shape())
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise _unreadable(weights.parent, e, "is damaged or incomplete") from None
    floating = {k: v for k, v in counts.items() if k in SAFETENSORS_DTYPES}
    return SAFETENSORS_DTYPES[max(floating, key=floating.get)] if floating else torch.float32


def _unreadable(folder: Path, e: Exception, what: str) -> Exception:
    """The one-line error for weights that cannot be read (``what``: why, as "the file ..."), or the system's own
    error (disk, permissions: the CLI says it in one line) unchanged."""
    if isinstance(e, OSError) and e.errno is not None:
        return e
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return DiffPruneError(f"cannot load the weights in {str(folder)!r} ({first[:200]}); the file {what}: restore the "
                          "folder")


def _load_denoiser(folder: Path, device, dtype) -> tuple[nn.Module, dict | None, ModelAdapter]:
    """A (pruned or plain) denoiser from its own folder, its pruning record and its adapter. ``dtype="auto"``: the
    dtype its weights are stored in."""
    if dtype == "auto":
        dtype = stored_dtype(check_weights(folder, sharded=True))
    if (folder / PRUNING_NAME).is_file():
        model, adapter = _load_pruned(folder, device, dtype)
        return model, read_json(folder / PRUNING_NAME), adapter
    check_weights(folder, sharded=True)
    cls, adapter = _model_class(_read_config(folder / CONFIG_NAME).get("_class_name"), str(folder / CONFIG_NAME))
    model = _from_pretrained(cls, folder, dtype).eval()
    if device is not None:
        model.to(device=device)
    return model, None, adapter


def _from_pretrained(cls, folder: Path, dtype: torch.dtype | None = None):
    """``cls.from_pretrained`` (safetensors only; in ``dtype``, default float32) with damaged or incomplete weights
    as one-line errors."""
    try:
        model = cls.from_pretrained(folder, use_safetensors=True, **({"torch_dtype": dtype} if dtype else {}))
    except (OSError, ValueError, RuntimeError) as e:
        raise _unreadable(folder, e, "is damaged or does not fit its config.json") from None
    empty = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    require(not empty, f"the weights in {str(folder)!r} lack {len(empty)} tensor(s) that its config.json needs (e.g. "
                       f"{empty[0] if empty else ''!r}); the file is incomplete: restore the folder")
    return model


def _family(folder: Path, index: dict) -> PipelineFamily:
    return pipeline_family(index.get("_class_name"), f"pipeline {str(folder)!r}")


def load_codec(folder) -> LatentCodec:
    """The :class:`~diffprune.components.LatentCodec` of a diffusers autoencoder folder (safetensors only; other
    classes refused)."""
    import diffusers

    folder = Path(folder)
    require((folder / CONFIG_NAME).is_file(), f"autoencoder {str(folder)!r} is not a diffusers model folder (no "
                                              f"{CONFIG_NAME})")
    name = _read_config(folder / CONFIG_NAME).get("_class_name")
    require(name in AUTOENCODER_CLASSES, f"{str(folder)!r} holds a {name!r}; supported autoencoders: "
                                         f"{list(AUTOENCODER_CLASSES)}")
    check_weights(folder, sharded=True)
    return LatentCodec(_from_pretrained(getattr(diffusers, name), folder))


def load_text_encoder(folder, family: PipelineFamily, index: dict) -> TextEncoder | StockTextEncoder:
    """The text encoder of a text-to-image pipeline folder (safetensors only; classes checked against ``index``, the
    folder's ``model_index.json``): Stable Diffusion's :class:`~diffprune.components.TextEncoder`, or for SDXL,
    PixArt, SD3 and Flux a :class:`~diffprune.text_encoders.StockTextEncoder` over all of the family's text
    encoders and tokenizers (SDXL's still needs :meth:`~diffprune.text_encoders.StockTextEncoder.fit`)."""
    folder = Path(folder)
    transformers = require_transformers()
    modules = {}
    slots = [(k, TEXT_ENCODER_CLASSES) for k in family.text_encoders]
    slots += [(k, TOKENIZER_CLASSES) for k in family.tokenizers]
    for key, allowed in slots:
        entry = index.get(key)
        name = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
        require(name in allowed, f"pipeline {str(folder)!r} has {key}={entry!r}; a {family.pipeline_class} is pruned "
                                 f"with all of its text encoders {list(family.text_encoders)}; supported: "
                                 f"{list(allowed)}")
        require((folder / key).is_dir(), f"pipeline {str(folder)!r} names a {key} but has no {key}/ folder; copy "
                                         "the whole pipeline (save_pretrained writes every component)")
        cls = getattr(transformers, name)
        if allowed is TEXT_ENCODER_CLASSES:
            check_weights(folder / key, "model.safetensors", sharded=True)  # T5-XXL comes sharded
            modules[key] = cls.from_pretrained(folder / key, use_safetensors=True)
        else:
            modules[key] = cls.from_pretrained(folder / key)
    if family.pipeline_class in ENCODINGS:
        return StockTextEncoder(family.pipeline_class, modules, index)
    return TextEncoder(modules[family.tokenizer], modules[family.text_encoder])


def _load_pipeline_folder(folder: Path, device, dtype) -> LoadedModel:
    index = read_index(folder)
    family = _family(folder, index)
    den_dir = folder / family.denoiser
    require((den_dir / CONFIG_NAME).is_file(), f"pipeline {str(folder)!r} has no {family.denoiser}/{CONFIG_NAME}")
    named = index.get(family.denoiser)
    found = _read_config(den_dir / CONFIG_NAME).get("_class_name")
    require(isinstance(named, list) and len(named) == 2 and named[1] == found,
            f"pipeline {str(folder)!r}: model_index.json names {family.denoiser}={named!r} but "
            f"{family.denoiser}/{CONFIG_NAME} holds a {found!r}; restore the pipeline's own files")
    denoiser, pruning, adapter = _load_denoiser(den_dir, device, dtype)
    require(adapter.name == family.adapter,
            f"pipeline {str(folder)!r} is a {family.pipeline_class}, whose denoiser is a {family.adapter!r} model, but "
            f"{family.denoiser}/{CONFIG_NAME} holds a {type(denoiser).__name__}; restore the pipeline's own denoiser")
    sched_dir = folder / "scheduler"
    scheduler = load_scheduler(sched_dir) if (sched_dir / SCHEDULER_CONFIG).is_file() else None
    codec = text = None
    dtype = None if dtype == "auto" else dtype  # the other components in float32
    if family.autoencoder is not None:
        codec = load_codec(folder / family.autoencoder)
        if device is not None or dtype is not None:
            codec.autoencoder.to(device=device, dtype=dtype)
        codec.image_shape(adapter.input_shape(denoiser))  # the components fit each other
    if family.text_encoders:
        text = load_text_encoder(folder, family, index)
        if device is not None or dtype is not None:
            text.to(device, dtype)
        if isinstance(text, StockTextEncoder):  # SDXL's time ids: the model's image size, as the pipeline makes them
            text.fit(denoiser, codec.image_shape(adapter.input_shape(denoiser))[1:])
        text.check_fits(adapter.conditioning(denoiser))
    return LoadedModel(denoiser, scheduler, pruning, str(folder), codec=codec,
                       pipeline=PipelineSource(folder, family, index), text_encoder=text, adapter=adapter)


def _load_folder(folder: Path, device, dtype) -> LoadedModel:
    if (folder / INDEX_NAME).is_file():
        return _load_pipeline_folder(folder, device, dtype)
    model_dir, sched_dir = folder, folder / "scheduler"
    if not (folder / CONFIG_NAME).is_file() and (folder / "unet").is_dir():
        model_dir = folder / "unet"  # a pipeline folder without model_index.json
    if not (sched_dir / SCHEDULER_CONFIG).is_file():
        sched_dir = folder  # a flat repo keeps scheduler_config.json beside config.json
    scheduler = load_scheduler(sched_dir) if (sched_dir / SCHEDULER_CONFIG).is_file() else None
    if not (model_dir / CONFIG_NAME).is_file():
        refuse_pickles(folder)
        raise DiffPruneError(f"{str(folder)!r} is not a diffusers model or pipeline folder (no {CONFIG_NAME}, no "
                             f"{INDEX_NAME})")
    denoiser, pruning, adapter = _load_denoiser(model_dir, device, dtype)
    return LoadedModel(denoiser, scheduler, pruning, str(folder), adapter=adapter)


def _load_hub(repo_id: str, device, dtype) -> LoadedModel:
    """Fetch the model's files (pruned ones, pipeline components included) into the hub cache, then load them
    like a local folder."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=MODEL_FILE_PATTERNS))
    except Exception as e:  # network, missing repo, offline mode
        raise DiffPruneError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); check the id and the connection, or pass a local folder"
        ) from None
    try:
        loaded = _load_folder(folder, device, dtype)
    except DiffPruneError as e:  # name the repo, not a path inside the hub cache (only safetensors were fetched)
        raise DiffPruneError(str(e).replace(repr(str(folder)), f"hub repo {repo_id!r}").replace(
            str(folder), repo_id) + ("" if "safetensors" not in str(e) else "; diffprune fetches only safetensors "
                                     "weights from the hub, never pickles (.bin)")) from None
    # the hub cache keeps each commit in snapshots/<commit sha>/: record exactly which weights were loaded
    revision = folder.name if folder.parent.name == "snapshots" else None
    return dataclasses.replace(loaded, source=repo_id, revision=revision)


def load_pipeline(path: str | os.PathLike, *, device=None, dtype: torch.dtype | None = None):
    """The stock diffusers pipeline (``DiTPipeline``, ``LDMPipeline``, ``DDPMPipeline``, ...) of a model folder,
    shipped name or hub id, with its (pruned) denoiser in place, ready to call."""
    pipe = stock_pipeline(load_model(path))
    if device is not None or dtype is not None:
        pipe.to(device=device, dtype=dtype)
    return pipe


def stock_pipeline(loaded: LoadedModel):
    """The stock diffusers pipeline for a :class:`LoadedModel`, with its denoiser in place.

    A pipeline folder gives its own class (all components loaded as saved, safetensors only); a bare unconditional
    UNet2DModel gives a ``DDPMPipeline`` with its scheduler.
    """
    import diffusers

    if loaded.pipeline is not None:
        family = loaded.pipeline.family
        return diffusers.DiffusionPipeline.from_pretrained(
            loaded.pipeline.folder, **{family.denoiser: loaded.denoiser}, use_safetensors=True)
    from ..sampling import default_scheduler

    require(type(loaded.denoiser).__name__ == "UNet2DModel" and loaded.adapter.conditioning(loaded.denoiser) is None,
            f"no stock diffusers pipeline samples a bare {type(loaded.denoiser).__name__} with class labels; sample it "
            "with `diffprune sample --class-labels ...` (or diffprune.sample), or save it inside a pipeline folder")
    return diffusers.DDPMPipeline(unet=loaded.denoiser, scheduler=loaded.scheduler or default_scheduler())


def load_model(name_or_path: str | os.PathLike, *, device=None, dtype: torch.dtype | str | None = None,
               allow_hub: bool = True) -> LoadedModel:
    """Load a denoiser (and its scheduler, and a pipeline's autoencoder) from a shipped name, a folder (pruned,
    diffusers model or pipeline) or a hub id (``owner/name``, online, safetensors only). Pickle checkpoints are
    refused with the reason. ``dtype``: of every component (default float32, as diffusers); ``"auto"``: the
    denoiser in the dtype its weights are stored in (a pipeline's other components in float32)."""
    from ..assets import SHIPPED_MODELS, shipped_model_path

    name = str(name_or_path)
    require(name.strip() != "", f"model {name!r} is empty; pass a model folder, a shipped name "
                                f"{sorted(SHIPPED_MODELS)} or a hub id (owner/name)")
    shipped = shipped_model_path(name)
    path = shipped if shipped is not None else Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise pickle_refusal(f"model {name!r}")
        if path.suffix == ".safetensors":
            raise DiffPruneError(f"model {name!r} is a bare weights file; pass the folder that holds it together "
                                 f"with its {CONFIG_NAME}")
        raise DiffPruneError(f"model {name!r} is a file; pass a model folder, a shipped name or a hub id")
    if path.is_dir():
        return _load_folder(path, device, dtype)
    if allow_hub and is_hub_id(name):
        return _load_hub(name, device, dtype)
    if "/" in name or os.sep in name or name.startswith((".", "~")):  # a local path, never a hub id
        raise DiffPruneError(missing_path_message("model", name))
    raise DiffPruneError(
        f"model {name!r} not found: no such folder, not a shipped model {sorted(SHIPPED_MODELS)}, "
        "and not a hub id (owner/name)"
    )


__all__ = ["LoadedModel", "PipelineSource", "load_codec", "load_model", "load_pipeline", "load_pruned",
           "load_scheduler", "load_text_encoder", "stock_pipeline"]
