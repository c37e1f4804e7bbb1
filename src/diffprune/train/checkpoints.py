"""Training checkpoints: safetensors + JSON, never pickles.

A checkpoint ``checkpoints/step-XXXXXXX/`` is written into a temporary folder, fsynced, then renamed into place
(:func:`diffprune._fs.staged_dir`): it exists whole or not at all. Its state.json (written last) holds the sha256 of
each tensor file, so a checkpoint damaged later (a truncated copy, a bad disk) is detected on resume, reported, and
the previous one used instead.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from .._fs import atomic_write_json, read_json, staged_dir, write_safetensors
from .._hashing import file_sha256
from ..errors import DiffPruneError
from .state import (like, load_whole_optimizer_state, load_whole_state, whole_optimizer_state, whole_state,
                    whole_tensors)

CHECKPOINT_PREFIX = "step-"
CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors")


def save_checkpoint(folder: Path, step: int, model, ema, optimizer, keep: int, main: bool = True) -> None:
    """Publish the checkpoint of ``step`` in ``folder``, then drop all but the newest ``keep``. Every process calls
    it (a sharded model's state is gathered from all of them); the main process writes."""
    weights, shadow = whole_state(model, main), whole_tensors(ema.shadow_params, main)
    opt = whole_optimizer_state(model, optimizer, main)
    if not main:
        return
    with staged_dir(folder / f"{CHECKPOINT_PREFIX}{step:07d}") as tmp:
        write_safetensors(tmp / "model.safetensors", weights)
        write_safetensors(tmp / "ema.safetensors", {f"{i}": p for i, p in enumerate(shadow)})
        tensors, scalars = {}, {}
        for i, st in opt["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"{i}.{k}"] = v.detach().cpu().contiguous()
                else:
                    scalars[f"{i}.{k}"] = v
        write_safetensors(tmp / "optimizer.safetensors", tensors)
        atomic_write_json(tmp / "state.json", {
            "step": step, "param_groups": opt["param_groups"], "optimizer_scalars": scalars,
            "ema": {"optimization_step": ema.optimization_step, "decay": ema.decay},
            "sha256": {name: file_sha256(tmp / name) for name in CHECKPOINT_FILES},
        })
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(folder: Path) -> list[Path]:
    """Published checkpoints (those with state.json), oldest first; :func:`verify_checkpoint` checks one."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / "state.json").is_file()
             and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def verify_checkpoint(ckpt: Path) -> str | None:
    """None if ``ckpt`` is whole (state.json parses, every file matches its recorded sha256); else the reason."""
    try:
        state = read_json(ckpt / "state.json")
        digests = state["sha256"]
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"state.json is unreadable ({type(e).__name__})"
    for name in CHECKPOINT_FILES:
        if not (ckpt / name).is_file():
            return f"{name} is missing"
        if file_sha256(ckpt / name) != digests.get(name):
            return f"{name} does not match its recorded sha256 (truncated or damaged)"
    return None


def _load_checkpoint(ckpt: Path, model, ema, optimizer) -> int:
    state = read_json(ckpt / "state.json")
    weights = load_file(ckpt / "model.safetensors")
    try:
        load_whole_state(model, weights)
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise DiffPruneError(f"checkpoint {str(ckpt)!r} does not fit this model ({first}); resume with the same model") from None
    shadow = load_file(ckpt / "ema.safetensors")
    ema.shadow_params = [like(shadow[f"{i}"], p) for i, p in enumerate(ema.shadow_params)]
    ema.optimization_step = state["ema"]["optimization_step"]
    tensors = load_file(ckpt / "optimizer.safetensors")
    opt_state: dict = {}
    for key, v in list(tensors.items()) + list(state["optimizer_scalars"].items()):
        i, k = key.split(".", 1)
        opt_state.setdefault(int(i), {})[k] = v
    load_whole_optimizer_state(model, optimizer, {"state": opt_state, "param_groups": state["param_groups"]})
    return int(state["step"])


def restore_newest(ckpt_dir: Path, model, ema, optimizer, main: bool) -> tuple[int, list[str]]:
    """Load the newest whole checkpoint; returns (its step, the names of newer damaged ones that were skipped)."""
    skipped = []
    for ckpt in reversed(list_checkpoints(ckpt_dir)):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            step = _load_checkpoint(ckpt, model, ema, optimizer)
            if skipped and main:
                print(f"diffprune: warning: skipped damaged checkpoint(s) {skipped}; resuming from {ckpt.name}",
                      file=sys.stderr)
            return step, skipped
        skipped.append(f"{ckpt.name} ({problem})")
    if skipped:
        raise DiffPruneError(f"--resume: every checkpoint in {str(ckpt_dir)!r} is damaged ({'; '.join(skipped)}); "
                             "start anew with --overwrite")
    return 0, []
