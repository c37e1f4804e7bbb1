"""File names of diffprune's model folders and the checks every loader makes on them (one place each).

A pruned bare model folder::

    .diffprune                           marker: written by diffprune
    config.json                          base diffusers config (the unpruned architecture)
    pruning.json                         recorded structure (replayable), method, settings, seed, versions,
                                         params/MACs before and after, per-timestep losses and cutoff
    diffusion_pytorch_model.safetensors  the pruned weights
    scheduler/                           the noise scheduler, when known

In the *stock layout* (``prune --layout stock``; ``"layout": "stock"`` in pruning.json) config.json is instead the
stock diffusers config that builds the pruned model as it is (e.g. a DiT's ``num_layers`` after whole blocks went),
so plain ``from_pretrained`` loads it without diffprune; pruning.json keeps the record (``base_config``: the
unpruned config) and diffprune loads the folder with ``from_pretrained`` too.

A pipeline folder holds ``model_index.json`` and one folder per component; :func:`read_index` is the one reader of
``model_index.json`` and refuses component names that are not plain folder names of the pipeline.
"""
from __future__ import annotations

import fnmatch
import os
from pathlib import Path

from ._fs import read_json
from .errors import DiffPruneError, require

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
STOCK, FREE = "stock", "free"  # pruning.json's "layout": config.json builds the pruned model, or the unpruned base
LAYOUTS = (FREE, STOCK)
PRUNING_NAME = "pruning.json"
CONFIG_NAME = "config.json"
INDEX_NAME = "model_index.json"
SCHEDULER_CONFIG = "scheduler_config.json"
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl", ".pickle")
# the files that define a model (bare, or a pipeline's components): all a hub id fetches (never pickles), and what
# a run's stage hashes fingerprint
MODEL_FILE_PATTERNS = [CONFIG_NAME, PRUNING_NAME, WEIGHTS_NAME, INDEX_NAME, SCHEDULER_CONFIG,
                       f"*/{CONFIG_NAME}", f"*/{PRUNING_NAME}", f"*/{WEIGHTS_NAME}", f"*/{SCHEDULER_CONFIG}",
                       "*/model.safetensors", "tokenizer/*", "feature_extractor/*",  # text encoders (transformers)
                       "tokenizer_2/*", "tokenizer_3/*", "*/*.safetensors.index.json",  # and several of them, sharded
                       "*/model-*-of-*.safetensors", "*/diffusion_pytorch_model-*-of-*.safetensors"]


def model_files(folder: str | os.PathLike) -> list[Path]:
    """The files below ``folder`` that :data:`MODEL_FILE_PATTERNS` names (one level of components deep)."""
    folder = Path(folder)
    found = [p for p in sorted(folder.glob("*")) + sorted(folder.glob("*/*")) if p.is_file()]
    return [p for p in found if any(fnmatch.fnmatchcase(p.relative_to(folder).as_posix(), pat)
                                    for pat in MODEL_FILE_PATTERNS)]


def pickle_refusal(what: str) -> DiffPruneError:
    """The one error for a pickle checkpoint (``what`` names it)."""
    return DiffPruneError(
        f"{what} is a pickle checkpoint; diffprune never loads pickles (unpickling runs arbitrary code, and "
        "torch >= 2.6 refuses whole pickled modules); convert it to safetensors: a diffusers folder written by "
        "model.save_pretrained(folder, safe_serialization=True)"
    )


def refuse_pickles(folder: Path) -> None:
    """Raise :func:`pickle_refusal` when ``folder`` holds pickle files."""
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise pickle_refusal(f"{str(folder)!r} holds only {pickles}, which")


def check_weights(folder: Path, name: str = WEIGHTS_NAME, sharded: bool = False) -> Path:
    """The safetensors weights file of a model folder (with ``sharded``, its shards' index ``<name>.index.json``
    where the weights are split, as large text encoders and transformers are); a pickle-only folder is refused with
    the reason."""
    weights = folder / name
    if weights.is_file():
        return weights
    if sharded and (folder / f"{name}.index.json").is_file():
        return folder / f"{name}.index.json"
    refuse_pickles(folder)
    raise DiffPruneError(f"{str(folder)!r} has no {name}; save the model with safe_serialization=True")


def read_index(folder: Path) -> dict:
    """``model_index.json`` of a pipeline folder, checked: a JSON object whose component names are plain folder
    names (no ``/``, ``\\``, ``..`` or leading ``.``), so nothing is read from or written outside the pipeline."""
    path = Path(folder) / INDEX_NAME
    try:
        index = read_json(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise DiffPruneError(f"{str(path)!r} is not valid JSON ({e}); restore the pipeline's model_index.json") from None
    require(isinstance(index, dict), f"{str(path)!r} is not a JSON object; restore the pipeline's model_index.json")
    for key, value in index.items():
        if isinstance(value, list):
            require(_plain_name(key), f"{str(path)!r} names the component {key!r}, which is not a plain folder name "
                                      "of the pipeline; component names must not contain '/', '\\\\' or '..'")
    return index


def _plain_name(key: str) -> bool:
    return bool(key) and not key.startswith(".") and "/" not in key and "\\" not in key and key not in ("..", ".")


def components(folder: Path, index: dict) -> list[str]:
    """The component folders ``index`` (the folder's :func:`read_index`) names and the pipeline holds (autoencoder,
    scheduler, ...)."""
    return sorted(k for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[0] is not None
                  and (folder / k).is_dir())


__all__ = ["CONFIG_NAME", "INDEX_NAME", "MODEL_FILE_PATTERNS", "PICKLE_SUFFIXES", "PRUNING_NAME", "SCHEDULER_CONFIG",
           "WEIGHTS_NAME", "check_weights", "components", "model_files", "pickle_refusal", "read_index",
           "refuse_pickles"]
