"""Files that ship with diffprune: bundled data and pre-trained models, verified by sha256 on load.

``assets/manifest.json`` maps every shipped file (relative to ``assets/``) to its sha256. Shipped model names
(``mnist-teacher``, ``mnist-classifier``) resolve to folders under ``assets/`` wherever a model path is accepted.
"""
from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path

from ._hashing import file_sha256
from .errors import DiffPruneError

SHIPPED_MODELS = {"mnist-teacher": "mnist-teacher", "mnist-dit": "mnist-dit", "mnist-classifier": "mnist-classifier"}


def bundled_path(name: str) -> Path:
    """A file or folder under the installed package's ``assets/``."""
    return Path(str(resources.files("diffprune") / "assets" / name))


def verify_asset_dir(folder: Path) -> None:
    """Check every file of a shipped folder against the manifest; raise on a mismatch."""
    manifest = json.loads(bundled_path("manifest.json").read_text(encoding="utf-8"))
    root = bundled_path("")
    prefix = folder.relative_to(root).as_posix() + "/"
    entries = {k: v for k, v in manifest.items() if k.startswith(prefix)}
    if not entries:
        raise DiffPruneError(f"shipped folder {folder.name!r} is missing from assets/manifest.json; reinstall diffprune")
    for rel, digest in entries.items():
        p = root / rel
        if not p.is_file() or file_sha256(p) != digest:
            raise DiffPruneError(f"shipped file {rel!r} is missing or its sha256 differs from the manifest; reinstall diffprune")


def shipped_configs() -> dict[str, Path]:
    """The run configs that ship with diffprune (``configs/NAME.yaml``), by name."""
    folder = Path(str(resources.files("diffprune") / "configs"))
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def shipped_config_path(name: str) -> Path | None:
    """The shipped run config ``name`` (``demo``, ``demo-dit``, ...), or None if ``name`` is not one; a local file of
    that name wins, as for models."""
    path = shipped_configs().get(str(name))
    return None if path is None or Path(name).is_file() else path


def shipped_model_path(name: str) -> Path | None:
    """The verified folder of a shipped model name, or None if ``name`` is not one. One rule everywhere: a local
    folder of that name wins over the shipped model (with a one-line notice), as it does for data."""
    if name not in SHIPPED_MODELS:
        return None
    if Path(name).is_dir():
        print(f"diffprune: using the local folder {name!r}, not the shipped model of that name (write "
              f"./{name} to silence this notice, or rename the folder to use the shipped one)", file=sys.stderr)
        return None
    folder = bundled_path(SHIPPED_MODELS[name])
    if not folder.is_dir():
        raise DiffPruneError(f"shipped model {name!r} is not installed (no folder {str(folder)!r}); reinstall diffprune")
    verify_asset_dir(folder)
    return folder
