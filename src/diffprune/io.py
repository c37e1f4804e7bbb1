"""The safe pruned-model format, and loading any model diffprune accepts. No pickle anywhere.

A pruned model folder::

    config.json                          base diffusers config (the unpruned architecture)
    pruning.json                         recorded structure (replayable), method, settings, seed, versions,
                                         params/MACs before and after, per-timestep losses and cutoff
    diffusion_pytorch_model.safetensors  the pruned weights
    scheduler/                           the noise scheduler, when known

:func:`load_pruned` rebuilds the base model from ``config.json``, replays the recorded structure
(:func:`diffprune.prune.replay_structure_`) and loads the safetensors weights; outputs are bitwise equal to the
model that was saved. :func:`load_model` accepts a shipped model name, a pruned folder, a plain diffusers model or
pipeline folder, or (online) a Hugging Face hub id. Pickle checkpoints are refused.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ._fs import atomic_dir, atomic_write_json, is_hub_id, missing_path_message, read_json
from .errors import DiffPruneError, require

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
PRUNING_NAME = "pruning.json"
CONFIG_NAME = "config.json"
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl", ".pickle")


def _pickle_refusal(what: str) -> DiffPruneError:
    return DiffPruneError(
        f"{what} is a pickle checkpoint; diffprune never loads pickles (unpickling runs arbitrary code, and "
        "torch >= 2.6 refuses whole pickled modules); convert it to safetensors: a diffusers folder written by "
        "model.save_pretrained(folder, safe_serialization=True)"
    )


@dataclass
class LoadedModel:
    """A model as :func:`load_model` found it: the UNet, its scheduler (or None), its pruning record (None when
    unpruned), where it came from and, for a hub id, the commit it resolved to."""

    unet: nn.Module
    scheduler: object | None
    pruning: dict | None
    source: str
    revision: str | None = None


def require_finite_weights(model: nn.Module, what: str) -> None:
    """Refuse a model with a NaN/inf parameter or buffer (it would give NaN samples, scores or metrics)."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise DiffPruneError(f"the {what} has non-finite values (NaN/inf) in {name!r}; it diverged or its file is "
                                 "damaged: fine-tune it again with a lower learning rate, or load another checkpoint")


def _state_dict_for_saving(unet: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in unet.state_dict().items()}


def save_pruned(unet: nn.Module, out_dir: str | os.PathLike, pruning: dict, scheduler=None,
                overwrite: bool = False, inputs=()) -> Path:
    """Write a pruned model folder atomically (``pruning``: ``PruneReport.to_dict()`` or a loaded record).

    Refuses an existing non-empty ``out_dir`` unless ``overwrite`` (and then only a folder diffprune wrote, never
    one that is or contains one of ``inputs``). The record's structure must match the model's parameter shapes.
    """
    from safetensors.torch import save_file

    require(isinstance(pruning, dict) and isinstance(pruning.get("structure"), dict),
            "pruning must be the pruning record (PruneReport.to_dict() or LoadedModel.pruning) with a 'structure'")
    shapes = {k: list(v.shape) for k, v in unet.state_dict().items()}
    recorded = pruning["structure"].get("shapes")
    if recorded is not None and recorded != shapes:
        bad = sorted(k for k in set(shapes) | set(recorded) if shapes.get(k) != recorded.get(k))[:3]
        raise DiffPruneError(f"the model's shapes differ from the pruning record (e.g. {bad}); save the model "
                             "that this record describes")
    with atomic_dir(out_dir, overwrite=overwrite, kind="pruned-model", inputs=inputs) as tmp:
        unet.save_config(tmp)
        save_file(_state_dict_for_saving(unet), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        atomic_write_json(tmp / PRUNING_NAME, pruning)
        if scheduler is not None:
            scheduler.save_pretrained(tmp / "scheduler")
    return Path(out_dir)


def _model_class(class_name: str | None, where: str):
    import diffusers

    from .adapters import adapter_for_class_name

    require(class_name is not None, f"{where} has no '_class_name'; is it a diffusers model config?")
    adapter_for_class_name(class_name)  # clear error for unsupported classes
    return getattr(diffusers, class_name)


def _check_weights(folder: Path) -> Path:
    weights = folder / WEIGHTS_NAME
    if weights.is_file():
        return weights
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise _pickle_refusal(f"{str(folder)!r} holds only {pickles}, which")
    raise DiffPruneError(f"{str(folder)!r} has no {WEIGHTS_NAME}; save the model with safe_serialization=True")


def load_pruned(path: str | os.PathLike, *, device=None, dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a pruned model saved by :func:`save_pruned` (no pickle; outputs bitwise equal to the saved one)."""
    from safetensors.torch import load_file

    from .prune import replay_structure_

    folder = Path(path)
    require(folder.is_dir(), f"pruned model folder {str(folder)!r} does not exist")
    require((folder / PRUNING_NAME).is_file(),
            f"{str(folder)!r} has no {PRUNING_NAME}, so it is not a pruned model; load it with load_model")
    require((folder / CONFIG_NAME).is_file(), f"{str(folder)!r} has no {CONFIG_NAME} (the base diffusers config)")
    weights = _check_weights(folder)
    config = read_json(folder / CONFIG_NAME)
    pruning = read_json(folder / PRUNING_NAME)
    cls = _model_class(config.get("_class_name"), str(folder / CONFIG_NAME))
    unet = cls.from_config(config)
    require(isinstance(pruning.get("structure"), dict), f"{str(folder / PRUNING_NAME)!r} has no 'structure'")
    replay_structure_(unet, pruning["structure"])
    state = load_file(str(weights), device="cpu")
    own = {k: list(v.shape) for k, v in unet.state_dict().items()}
    got = {k: list(v.shape) for k, v in state.items()}
    if own != got:
        bad = sorted(k for k in set(own) | set(got) if own.get(k) != got.get(k))[:3]
        raise DiffPruneError(f"{str(weights)!r} does not match the recorded structure (e.g. {bad}); the folder is "
                             "inconsistent")
    unet.load_state_dict(state, strict=True)
    unet.eval()
    if device is not None or dtype is not None:
        unet.to(device=device, dtype=dtype)
    return unet


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


def _load_folder(folder: Path, device, dtype) -> LoadedModel:
    unet_dir, sched_dir = folder, folder / "scheduler"
    if not (folder / CONFIG_NAME).is_file() and (folder / "unet").is_dir():
        unet_dir = folder / "unet"  # a pipeline folder
    if not (sched_dir / "scheduler_config.json").is_file():
        sched_dir = folder  # a flat repo keeps scheduler_config.json beside config.json
    scheduler = load_scheduler(sched_dir) if (sched_dir / "scheduler_config.json").is_file() else None
    if (unet_dir / PRUNING_NAME).is_file():
        unet = load_pruned(unet_dir, device=device, dtype=dtype)
        return LoadedModel(unet, scheduler, read_json(unet_dir / PRUNING_NAME), str(folder))
    if not (unet_dir / CONFIG_NAME).is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise _pickle_refusal(f"{str(folder)!r} holds only {pickles}, which")
        raise DiffPruneError(f"{str(folder)!r} is not a diffusers model folder (no {CONFIG_NAME}, no unet/)")
    _check_weights(unet_dir)
    cls = _model_class(read_json(unet_dir / CONFIG_NAME).get("_class_name"), str(unet_dir / CONFIG_NAME))
    unet = cls.from_pretrained(unet_dir, use_safetensors=True)
    unet.eval()
    if device is not None or dtype is not None:
        unet.to(device=device, dtype=dtype)
    return LoadedModel(unet, scheduler, None, str(folder))


# the files that define a model, as load_model reads them (a model folder, or a pipeline's unet/ and scheduler/):
# all a hub id fetches (never pickles), and what a run's stage hashes fingerprint
MODEL_FILES = [f"{d}{f}" for d in ("", "unet/") for f in (CONFIG_NAME, PRUNING_NAME, WEIGHTS_NAME)] + [
    "scheduler/scheduler_config.json", "scheduler_config.json", "model_index.json"]


def _load_hub(repo_id: str, device, dtype) -> LoadedModel:
    """Fetch the UNet's files (pruned ones included) into the hub cache, then load them like a local folder."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=MODEL_FILES))
    except Exception as e:  # network, missing repo, offline mode
        raise DiffPruneError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); check the id and the connection, or pass a local folder"
        ) from None
    loaded = _load_folder(folder, device, dtype)
    # the hub cache keeps each commit in snapshots/<commit sha>/: record exactly which weights were loaded
    revision = folder.name if folder.parent.name == "snapshots" else None
    return LoadedModel(loaded.unet, loaded.scheduler, loaded.pruning, repo_id, revision)


def load_model(name_or_path: str | os.PathLike, *, device=None, dtype: torch.dtype | None = None,
               allow_hub: bool = True) -> LoadedModel:
    """Load a UNet (and its scheduler) from a shipped name, a folder (pruned, diffusers model or pipeline) or a
    hub id (``owner/name``, online, safetensors only). Pickle checkpoints are refused with the reason."""
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



__all__ = ["LoadedModel", "save_pruned", "load_pruned", "load_model", "load_scheduler", "require_finite_weights"]
