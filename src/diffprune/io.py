"""The safe pruned-model format, and loading any model diffprune accepts. No pickle anywhere.

A pruned bare model folder::

    .diffprune                           marker: written by diffprune
    config.json                          base diffusers config (the unpruned architecture)
    pruning.json                         recorded structure (replayable), method, settings, seed, versions,
                                         params/MACs before and after, per-timestep losses and cutoff
    diffusion_pytorch_model.safetensors  the pruned weights
    scheduler/                           the noise scheduler, when known

A pruned *pipeline* (the input was a diffusers pipeline folder or hub id, ``model_index.json``) is a pipeline folder:
``model_index.json`` and every component copied unchanged (autoencoder, scheduler, label map), and the denoiser's
folder (``unet/`` or ``transformer/``) in the layout above.

:func:`load_pruned` rebuilds the base model from ``config.json``, replays the recorded structure
(:func:`diffprune.structure.replay_structure_`) and loads the safetensors weights; outputs are bitwise equal to the
model that was saved. :func:`load_model` accepts a shipped model name, a pruned folder, a plain diffusers model or
pipeline folder, or (online) a Hugging Face hub id; :func:`load_pipeline` returns the stock diffusers pipeline with
the (pruned) denoiser in place. Pickle checkpoints are refused.
"""
from __future__ import annotations

import fnmatch
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ._fs import atomic_dir, atomic_write_json, is_hub_id, missing_path_message, read_json
from ._torch import shape_mismatch, state_shapes
from .errors import DiffPruneError, require

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
PRUNING_NAME = "pruning.json"
CONFIG_NAME = "config.json"
INDEX_NAME = "model_index.json"
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl", ".pickle")
# the files that define a model (bare, or a pipeline's components): all a hub id fetches (never pickles), and what
# a run's stage hashes fingerprint
MODEL_FILE_PATTERNS = [CONFIG_NAME, PRUNING_NAME, WEIGHTS_NAME, INDEX_NAME, "scheduler_config.json",
                       f"*/{CONFIG_NAME}", f"*/{PRUNING_NAME}", f"*/{WEIGHTS_NAME}", "*/scheduler_config.json",
                       "*/model.safetensors", "tokenizer/*", "feature_extractor/*"]  # text encoders (transformers)


def model_files(folder: str | os.PathLike) -> list[Path]:
    """The files below ``folder`` that :data:`MODEL_FILE_PATTERNS` names (one level of components deep)."""
    folder = Path(folder)
    found = [p for p in sorted(folder.glob("*")) + sorted(folder.glob("*/*")) if p.is_file()]
    return [p for p in found if any(fnmatch.fnmatchcase(p.relative_to(folder).as_posix(), pat)
                                    for pat in MODEL_FILE_PATTERNS)]


def _pickle_refusal(what: str) -> DiffPruneError:
    return DiffPruneError(
        f"{what} is a pickle checkpoint; diffprune never loads pickles (unpickling runs arbitrary code, and "
        "torch >= 2.6 refuses whole pickled modules); convert it to safetensors: a diffusers folder written by "
        "model.save_pretrained(folder, safe_serialization=True)"
    )


@dataclass(frozen=True)
class PipelineSource:
    """Where a pipeline came from: its folder (components are copied from it) and its family."""

    folder: Path
    family: object  # adapters.pipelines.PipelineFamily

    def components(self) -> list[str]:
        """The component folders named in ``model_index.json`` (autoencoder, scheduler, denoiser, ...)."""
        index = read_json(self.folder / INDEX_NAME)
        return sorted(k for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[0] is not None
                      and (self.folder / k).is_dir())


@dataclass
class LoadedModel:
    """A model as :func:`load_model` found it: the denoiser, its scheduler (or None), its pruning record (None when
    unpruned), where it came from (for a hub id, also the commit it resolved to), and for a pipeline its latent
    codec (latent pipelines), text encoder (text-to-image pipelines) and source folder."""

    denoiser: nn.Module
    scheduler: object | None
    pruning: dict | None
    source: str
    revision: str | None = None
    codec: object | None = None  # adapters.pipelines.LatentCodec
    pipeline: PipelineSource | None = None
    text_encoder: object | None = None  # adapters.pipelines.TextEncoder

    @property
    def unet(self) -> nn.Module:
        """The denoiser (named for the UNets diffprune started with)."""
        return self.denoiser

    @property
    def adapter(self):
        from .adapters import adapter_for

        return adapter_for(self.denoiser)

    @property
    def class_names(self) -> list[str] | None:
        """The names of the classes the model was trained on (a pipeline's label map, e.g. DiT's ``id2label``), in
        label order; None when unknown. Sampling balances labels over these, not over the whole label table."""
        key = None if self.pipeline is None else self.pipeline.family.label_map
        labels = read_json(self.pipeline.folder / INDEX_NAME).get(key) if key else None
        return [labels[k] for k in sorted(labels, key=int)] if labels else None


def require_finite_weights(model: nn.Module, what: str) -> None:
    """Refuse a model with a NaN/inf parameter or buffer (it would give NaN samples, scores or metrics)."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise DiffPruneError(f"the {what} has non-finite values (NaN/inf) in {name!r}; it diverged or its file is "
                                 "damaged: fine-tune it again with a lower learning rate, or load another checkpoint")


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


def write_model(folder: str | os.PathLike, model: nn.Module, *, pruning: dict | None = None, scheduler=None,
                pipeline: PipelineSource | None = None) -> None:
    """Write ``model`` into the new folder ``folder``: pruned (with ``pruning``) or plain; bare or, with
    ``pipeline``, as a pipeline folder whose other components are copied from the source pipeline."""
    from safetensors.torch import save_file

    folder = Path(folder)
    target = folder
    if pipeline is not None:
        for name in pipeline.components():
            if name != pipeline.family.denoiser:
                shutil.copytree(pipeline.folder / name, folder / name)
        shutil.copy2(pipeline.folder / INDEX_NAME, folder / INDEX_NAME)
        target = folder / pipeline.family.denoiser
    elif scheduler is not None:
        scheduler.save_pretrained(folder / "scheduler")
    if pruning is None:
        model.save_pretrained(target, safe_serialization=True)
        return
    _check_record(model, pruning)
    target.mkdir(parents=True, exist_ok=True)
    model.save_config(target)
    save_file(_state_dict_for_saving(model), str(target / WEIGHTS_NAME), metadata={"format": "pt"})
    atomic_write_json(target / PRUNING_NAME, pruning)


def save_pruned(model: nn.Module, out_dir: str | os.PathLike, pruning: dict, scheduler=None,
                overwrite: bool = False, inputs=(), pipeline: PipelineSource | None = None) -> Path:
    """Write a pruned model folder atomically (``pruning``: ``PruneReport.to_dict()`` or a loaded record); with
    ``pipeline`` (``LoadedModel.pipeline``), a pipeline folder.

    Refuses an existing non-empty ``out_dir`` unless ``overwrite`` (and then only a folder diffprune wrote, never
    one that is or contains one of ``inputs``). The record's structure must match the model's parameter shapes.
    """
    _check_record(model, pruning)
    with atomic_dir(out_dir, overwrite=overwrite, kind="pruned-model", inputs=inputs) as tmp:
        write_model(tmp, model, pruning=pruning, scheduler=scheduler, pipeline=pipeline)
    return Path(out_dir)


def _model_class(class_name: str | None, where: str):
    import diffusers

    from .adapters import adapter_for_class_name

    require(class_name is not None, f"{where} has no '_class_name'; is it a diffusers model config?")
    adapter_for_class_name(class_name)  # clear error for unsupported classes
    return getattr(diffusers, class_name)


def _refuse_pickles(folder: Path) -> None:
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise _pickle_refusal(f"{str(folder)!r} holds only {pickles}, which")


def _check_weights(folder: Path) -> Path:
    weights = folder / WEIGHTS_NAME
    if weights.is_file():
        return weights
    _refuse_pickles(folder)
    raise DiffPruneError(f"{str(folder)!r} has no {WEIGHTS_NAME}; save the model with safe_serialization=True")


def load_pruned(path: str | os.PathLike, *, device=None, dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a pruned model saved by :func:`save_pruned` (no pickle; outputs bitwise equal to the saved one).

    ``path``: the pruned denoiser's folder, or a pruned pipeline folder (its denoiser is loaded)."""
    from safetensors.torch import load_file

    from .structure import replay_structure_

    folder = Path(path)
    require(folder.is_dir(), f"pruned model folder {str(folder)!r} does not exist")
    if (folder / INDEX_NAME).is_file():
        folder = folder / _pipeline_family(folder).denoiser
    require((folder / PRUNING_NAME).is_file(),
            f"{str(folder)!r} has no {PRUNING_NAME}, so it is not a pruned model; load it with load_model")
    require((folder / CONFIG_NAME).is_file(), f"{str(folder)!r} has no {CONFIG_NAME} (the base diffusers config)")
    weights = _check_weights(folder)
    config = read_json(folder / CONFIG_NAME)
    pruning = read_json(folder / PRUNING_NAME)
    cls = _model_class(config.get("_class_name"), str(folder / CONFIG_NAME))
    model = cls.from_config(config)
    require(isinstance(pruning.get("structure"), dict), f"{str(folder / PRUNING_NAME)!r} has no 'structure'")
    replay_structure_(model, pruning["structure"])
    state = load_file(str(weights), device="cpu")
    bad = shape_mismatch(state_shapes(model), state_shapes(state))
    if bad:
        raise DiffPruneError(f"{str(weights)!r} does not match the recorded structure (e.g. {bad}); the folder is "
                             "inconsistent")
    model.load_state_dict(state, strict=True)
    model.eval()
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def load_scheduler(folder: str | os.PathLike):
    """A diffusers scheduler from a folder with ``scheduler_config.json`` (class from ``_class_name``)."""
    import diffusers
    from diffusers import SchedulerMixin

    folder = Path(folder)
    cfg_path = folder / "scheduler_config.json"
    require(cfg_path.is_file(), f"{str(folder)!r} has no scheduler_config.json")
    name = read_json(cfg_path).get("_class_name")
    cls = getattr(diffusers, str(name), None)
    require(isinstance(cls, type) and issubclass(cls, SchedulerMixin),
            f"{str(cfg_path)!r} names {name!r}, which is not a diffusers scheduler")
    return cls.from_pretrained(folder)


def _load_denoiser(folder: Path, device, dtype) -> tuple[nn.Module, dict | None]:
    """A (pruned or plain) denoiser from its own folder, and its pruning record."""
    if (folder / PRUNING_NAME).is_file():
        return load_pruned(folder, device=device, dtype=dtype), read_json(folder / PRUNING_NAME)
    _check_weights(folder)
    cls = _model_class(read_json(folder / CONFIG_NAME).get("_class_name"), str(folder / CONFIG_NAME))
    model = cls.from_pretrained(folder, use_safetensors=True).eval()
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model, None


def _pipeline_family(folder: Path):
    from .adapters.pipelines import pipeline_family

    return pipeline_family(read_json(folder / INDEX_NAME).get("_class_name"), f"pipeline {str(folder)!r}")


def _load_pipeline_folder(folder: Path, device, dtype) -> LoadedModel:
    from .adapters.pipelines import load_codec, load_text_encoder

    family = _pipeline_family(folder)
    den_dir = folder / family.denoiser
    require((den_dir / CONFIG_NAME).is_file(), f"pipeline {str(folder)!r} has no {family.denoiser}/{CONFIG_NAME}")
    denoiser, pruning = _load_denoiser(den_dir, device, dtype)
    sched_dir = folder / "scheduler"
    scheduler = load_scheduler(sched_dir) if (sched_dir / "scheduler_config.json").is_file() else None
    codec = None
    if family.autoencoder is not None:
        codec = load_codec(folder / family.autoencoder)
        if device is not None or dtype is not None:
            codec.autoencoder.to(device=device, dtype=dtype)
        codec.image_shape(denoiser_input_shape(denoiser))  # the components fit each other
    text = None
    if family.text_encoder is not None:
        text = load_text_encoder(folder, family)
        if device is not None or dtype is not None:
            text.text_encoder.to(device=device, dtype=dtype)
        from .adapters import adapter_for

        text.check_fits(adapter_for(denoiser).conditioning(denoiser))
    return LoadedModel(denoiser, scheduler, pruning, str(folder), codec=codec, pipeline=PipelineSource(folder, family),
                       text_encoder=text)


def denoiser_input_shape(model: nn.Module) -> tuple[int, int, int]:
    from .adapters import adapter_for

    return adapter_for(model).input_shape(model)


def _load_folder(folder: Path, device, dtype) -> LoadedModel:
    if (folder / INDEX_NAME).is_file():
        return _load_pipeline_folder(folder, device, dtype)
    model_dir, sched_dir = folder, folder / "scheduler"
    if not (folder / CONFIG_NAME).is_file() and (folder / "unet").is_dir():
        model_dir = folder / "unet"  # a pipeline folder without model_index.json
    if not (sched_dir / "scheduler_config.json").is_file():
        sched_dir = folder  # a flat repo keeps scheduler_config.json beside config.json
    scheduler = load_scheduler(sched_dir) if (sched_dir / "scheduler_config.json").is_file() else None
    if not (model_dir / CONFIG_NAME).is_file():
        _refuse_pickles(folder)
        raise DiffPruneError(f"{str(folder)!r} is not a diffusers model or pipeline folder (no {CONFIG_NAME}, no "
                             f"{INDEX_NAME})")
    denoiser, pruning = _load_denoiser(model_dir, device, dtype)
    return LoadedModel(denoiser, scheduler, pruning, str(folder))


def _load_hub(repo_id: str, device, dtype) -> LoadedModel:
    """Fetch the model's files (pruned ones, pipeline components included) into the hub cache, then load them
    like a local folder."""
    import dataclasses

    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=MODEL_FILE_PATTERNS))
    except Exception as e:  # network, missing repo, offline mode
        raise DiffPruneError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); check the id and the connection, or pass a local folder"
        ) from None
    loaded = _load_folder(folder, device, dtype)
    # the hub cache keeps each commit in snapshots/<commit sha>/: record exactly which weights were loaded
    revision = folder.name if folder.parent.name == "snapshots" else None
    return dataclasses.replace(loaded, source=repo_id, revision=revision)


def load_pipeline(path: str | os.PathLike, *, device=None, dtype: torch.dtype | None = None):
    """The stock diffusers pipeline (``DiTPipeline``, ``LDMPipeline``, ``DDPMPipeline``, ...) of a model folder,
    shipped name or hub id, with its (pruned) denoiser in place, ready to call."""
    from .adapters.pipelines import stock_pipeline

    pipe = stock_pipeline(load_model(path))
    if device is not None or dtype is not None:
        pipe.to(device=device, dtype=dtype)
    return pipe


def load_model(name_or_path: str | os.PathLike, *, device=None, dtype: torch.dtype | None = None,
               allow_hub: bool = True) -> LoadedModel:
    """Load a denoiser (and its scheduler, and a pipeline's autoencoder) from a shipped name, a folder (pruned,
    diffusers model or pipeline) or a hub id (``owner/name``, online, safetensors only). Pickle checkpoints are
    refused with the reason."""
    from .assets import SHIPPED_MODELS, shipped_model_path

    name = str(name_or_path)
    require(name.strip() != "", f"model {name!r} is empty; pass a model folder, a shipped name "
                                f"{sorted(SHIPPED_MODELS)} or a hub id (owner/name)")
    shipped = shipped_model_path(name)
    path = shipped if shipped is not None else Path(name)
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise _pickle_refusal(f"model {name!r}")
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


__all__ = ["LoadedModel", "PipelineSource", "load_model", "load_pipeline", "load_pruned", "load_scheduler",
           "model_files", "require_finite_weights", "save_pruned", "write_model"]
