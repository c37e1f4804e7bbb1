"""The one module that hashes: files, bytes, JSON keys, tensors and module state (sha256 throughout).

Every cache key, content fingerprint and checkpoint digest in diffprune is made here, so two places that hash the
same thing give the same digest, and a change to how something is hashed happens once.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def json_sha256(obj, length: int | None = None) -> str:
    """sha256 of ``json.dumps(obj, sort_keys=True, default=str)``: a key over settings; ``length`` truncates."""
    digest = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
    return digest if length is None else digest[:length]


def source_sha256(root: str | os.PathLike) -> str:
    """sha256 over the relative names and bytes of every ``.py`` file below ``root`` (sorted)."""
    root = Path(root)
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


class Hasher:
    """An incremental sha256 over text, raw tensor bytes and module state: ``Hasher().text(...).tensor(...)``."""

    def __init__(self, text: str = ""):
        self._h = hashlib.sha256(text.encode())

    def text(self, s: str) -> "Hasher":
        self._h.update(s.encode())
        return self

    def raw(self, t: torch.Tensor) -> "Hasher":
        """The tensor's bytes alone (no name, dtype or shape)."""
        t = t.detach().cpu().contiguous()
        self._h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return self

    def tensor(self, name: str, t: torch.Tensor) -> "Hasher":
        """``name:dtype:shape:`` then the bytes: two tensors of equal bytes but other shapes differ."""
        t = t.detach().cpu().contiguous()
        self._h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
        return self.raw(t)

    def state(self, module: torch.nn.Module) -> "Hasher":
        """Each state-dict entry's name then its bytes, in state-dict order."""
        for k, v in module.state_dict().items():
            self.text(k).raw(v)
        return self

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def state_sha256(module: torch.nn.Module | None) -> str | None:
    """sha256 of a module's state dict (names, dtypes, shapes, values): what a resumed run compares."""
    if module is None:
        return None
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        v = v.detach().cpu().contiguous()
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)};".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def content_sha256(images: torch.Tensor, labels: torch.Tensor | None = None, captions=None) -> str:
    """sha256 of a data set's content: the images' bytes, then the labels' (int64), then the captions (JSON)."""
    h = hashlib.sha256(images.contiguous().numpy().tobytes())
    if labels is not None:
        h.update(labels.to(torch.int64).contiguous().numpy().tobytes())
    if captions is not None:
        h.update(json.dumps(list(captions)).encode())
    return h.hexdigest()


__all__ = ["Hasher", "content_sha256", "file_sha256", "json_sha256", "source_sha256", "state_sha256"]
