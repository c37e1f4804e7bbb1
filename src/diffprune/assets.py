"""Files that ship with diffprune: bundled data and pre-trained models, verified by sha256 on load.

``assets/manifest.json`` maps every shipped file (relative to ``assets/``) to its sha256. Shipped model names
(``mnist-teacher``, ``mnist-classifier``) resolve to folders under ``assets/`` wherever a model path is accepted.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from ._fs import read_json
from .data import bundled_path
from .errors import DiffPruneError

SHIPPED_MODELS = {"mnist-teacher": "mnist-teacher", "mnist-dit": "mnist-dit", "mnist-classifier": "mnist-classifier"}


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_asset_dir(folder: Path) -> None:
    """Check every file of a shipped folder against the manifest; raise on a mismatch."""
    manifest = read_json(bundled_path("manifest.json"))
    root = bundled_path("")
    prefix = folder.relative_to(root).as_posix() + "/"
    entries = {k: v for k, v in manifest.items() if k.startswith(prefix)}
    if not entries:
        raise DiffPruneError(f"shipped folder {folder.name!r} is missing from assets/manifest.json; reinstall diffprune")
    for rel, digest in entries.items():
        p = root / rel
        if not p.is_file() or sha256_file(p) != digest:
            raise DiffPruneError(f"shipped file {rel!r} is missing or its sha256 differs from the manifest; reinstall diffprune")


def shipped_model_path(name: str) -> Path | None:
    """The verified folder of a shipped model name, or None if ``name`` is not one."""
    if name not in SHIPPED_MODELS:
        return None
    folder = bundled_path(SHIPPED_MODELS[name])
    if not folder.is_dir():
        raise DiffPruneError(f"shipped model {name!r} is not installed (no folder {str(folder)!r}); reinstall diffprune")
    verify_asset_dir(folder)
    return folder
