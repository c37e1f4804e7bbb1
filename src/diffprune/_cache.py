"""The one load-or-compute cache (encoded latents, text embeddings, FID reference statistics, teacher samples,
per-layer latency timings).

An entry is a safetensors file ``<root>/<kind>/<name>.safetensors`` whose metadata records its key, the format, each
tensor's shape and a sha256 of the tensors' bytes. :func:`cached` reads an entry only when all of that checks out
(and the caller's own ``check`` passes); a damaged, mismatched or unreadable entry is recomputed and replaced, with
one line on stderr saying so. The cache is optional: a failed write (disk full, read-only) warns and goes on.

Size: entries are used least-recently-first evicted once the cache holds more than its limit
(``DIFFPRUNE_CACHE_MAX``, e.g. ``20G``; default 20 GiB); a hit refreshes the entry's time. ``diffprune cache
info|clear`` shows and empties it. Temporaries left by killed processes are removed when the cache is next used.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Callable

import torch

from ._fs import atomic_write_bytes, clean_stale_temporaries
from ._hashing import Hasher
from .errors import DiffPruneError

FORMAT = "diffprune-cache/1"
KINDS = ("latents", "text", "fid-stats", "teacher-samples", "latency")
DEFAULT_MAX_BYTES = 20 * 2**30
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``path``, else ``$DIFFPRUNE_CACHE``, else ``~/.cache/diffprune`` (``~`` expanded)."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get("DIFFPRUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "diffprune"


def max_bytes() -> int:
    """The size limit from ``DIFFPRUNE_CACHE_MAX`` (bytes, or a number with K/M/G/T), default 20 GiB."""
    raw = os.environ.get("DIFFPRUNE_CACHE_MAX")
    if not raw:
        return DEFAULT_MAX_BYTES
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", raw, re.IGNORECASE)
    if m is None:
        raise DiffPruneError(f"DIFFPRUNE_CACHE_MAX={raw!r} is not a size; write bytes or a number with K, M, G or T, "
                             "e.g. DIFFPRUNE_CACHE_MAX=20G")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = Hasher()
    for name in sorted(tensors):
        h.tensor(name, tensors[name])
    return h.hexdigest()


def _problem(path: Path, key: str, check) -> tuple[dict | None, str | None]:
    """``(tensors, None)`` for a sound entry, else ``(None, why not)``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # truncated, not safetensors, unreadable
        return None, f"unreadable ({type(e).__name__})"
    if meta.get("key") != key or meta.get("format") != FORMAT:
        return None, "written for another key or format"
    shapes = {k: list(v.shape) for k, v in tensors.items()}
    if json.loads(meta.get("shapes", "null")) != shapes or meta.get("sha256") != _digest(tensors):
        return None, "its content does not match its recorded shapes and checksum"
    reason = check(tensors) if check is not None else None
    return (None, reason) if reason else (tensors, None)


def cached(kind: str, key: str, compute: Callable[[], dict[str, torch.Tensor]], *, root=None, name: str | None = None,
           check: Callable[[dict], str | None] | None = None, enabled: bool = True) -> tuple[dict, dict]:
    """The tensors of entry ``key``: read when the entry is sound, else ``compute()`` d and written.

    ``check(tensors) -> reason or None``: the caller's own test of a read entry (shapes it must have). Returns
    ``(tensors, info)`` with ``info = {"key", "path", "hit"}`` (and ``"replaced"``: why a damaged entry was redone).
    """
    folder = cache_dir(root) / kind
    path = folder / f"{name or key}.safetensors"
    info: dict = {"key": key, "path": str(path), "hit": False}
    if not enabled:
        return compute(), info
    if folder.is_dir():
        clean_stale_temporaries(folder)
    if path.is_file():
        tensors, why = _problem(path, key, check)
        if tensors is not None:
            _touch(path)
            return tensors, {**info, "hit": True}
        info["replaced"] = why
        print(f"diffprune: cache entry {str(path)!r} is {why if why.startswith('unreadable') else 'damaged: ' + why}"
              "; recomputing it", file=sys.stderr)
    tensors = {k: v.contiguous() for k, v in compute().items()}
    _store(path, key, tensors)
    return tensors, info


def _store(path: Path, key: str, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    meta = {"key": key, "format": FORMAT, "sha256": _digest(tensors),
            "shapes": json.dumps({k: list(v.shape) for k, v in tensors.items()})}
    try:
        atomic_write_bytes(path, save({k: v.detach().cpu() for k, v in tensors.items()}, metadata=meta))
        evict(path.parent.parent, keep=path)
    except OSError as e:
        print(f"diffprune: warning: could not write the cache entry {str(path)!r} ({e.strerror or e}); going on "
              "without it (set --cache-dir or DIFFPRUNE_CACHE to a writable folder to keep results)", file=sys.stderr)


def _touch(path: Path) -> None:
    try:
        os.utime(path)  # least-recently-used order follows the modification time
    except OSError:
        pass


def entries(root=None) -> list[Path]:
    """Every cache entry below ``root`` (the known kinds' safetensors files)."""
    base = cache_dir(root)
    return [p for kind in KINDS if (base / kind).is_dir() for p in sorted((base / kind).glob("*.safetensors"))]


def evict(root=None, *, keep: Path | None = None, limit: int | None = None) -> list[Path]:
    """Remove least-recently-used entries until the cache holds at most ``limit`` bytes (default
    :func:`max_bytes`); never ``keep``. Returns the removed paths."""
    limit = max_bytes() if limit is None else limit
    found = [(p.stat().st_mtime, p.stat().st_size, p) for p in entries(root)]
    total = sum(size for _, size, _ in found)
    removed = []
    for _, size, p in sorted(found):
        if total <= limit:
            break
        if p == keep:
            continue
        p.unlink(missing_ok=True)
        total -= size
        removed.append(p)
    return removed


def info(root=None) -> dict:
    """``{"root", "limit_bytes", "total_bytes", "kinds": {kind: {"entries", "bytes"}}}``."""
    base = cache_dir(root)
    kinds = {}
    for kind in KINDS:
        files = sorted((base / kind).glob("*.safetensors")) if (base / kind).is_dir() else []
        kinds[kind] = {"entries": len(files), "bytes": sum(p.stat().st_size for p in files)}
    return {"root": str(base), "limit_bytes": max_bytes(), "total_bytes": sum(k["bytes"] for k in kinds.values()),
            "kinds": kinds}


def clear(root=None, kinds=KINDS) -> int:
    """Remove every entry (and stale temporary) of ``kinds``; nothing else in the folder. Returns the count."""
    base = cache_dir(root)
    n = 0
    for kind in kinds:
        if kind not in KINDS:
            raise DiffPruneError(f"unknown cache kind {kind!r}; choose from {list(KINDS)}")
        if (base / kind).is_dir():
            clean_stale_temporaries(base / kind)
            for p in (base / kind).glob("*.safetensors"):
                p.unlink(missing_ok=True)
                n += 1
    return n


__all__ = ["KINDS", "cache_dir", "cached", "clear", "entries", "evict", "info", "max_bytes"]
