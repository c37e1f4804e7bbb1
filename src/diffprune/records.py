"""What a run records beside its outputs: the versions it ran with, the training log's columns, and the reader of
an evaluation's ``metrics.json`` (older files included)."""
from __future__ import annotations

import csv
import math
import os
import platform
from pathlib import Path

import numpy as np
import torch

from ._fs import read_json

LOG_FIELDS = ["step", "loss", "lr", "images_per_s"]


def run_info(**extra) -> dict:
    """Versions and anything else worth recording beside a run's outputs."""
    import diffusers

    from . import __version__
    from .structure import TORCH_PRUNING_VERSION

    return {"versions": {"diffprune": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                         "torch_pruning": TORCH_PRUNING_VERSION}, **extra}


def eval_versions() -> dict:
    """:func:`run_info`'s versions plus the evaluation's own dependencies (None when absent)."""
    from importlib.metadata import PackageNotFoundError, version

    import numpy
    import scipy

    v = {**run_info()["versions"], "numpy": numpy.__version__, "scipy": scipy.__version__,
         "python": platform.python_version()}
    for dist in ("pytorch-msssim", "pytorch-fid"):
        try:
            v[dist.replace("-", "_")] = version(dist)
        except PackageNotFoundError:  # each optional package on its own: one missing must not hide the other
            v[dist.replace("-", "_")] = None
    return v


def read_log(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A training log as columns of floats (empty dict if there is no log)."""
    path = Path(path)
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) for r in rows]) for k in LOG_FIELDS}


# metrics.json named the unpruned model's figures teacher_* before they took pruning.json's names (base_*)
_RENAMED_METRICS = {"teacher_params": "base_params", "teacher_macs": "base_macs",
                    "teacher_macs_per_image": "base_macs_per_image"}


def read_metrics(source: str | os.PathLike | dict) -> dict:
    """An evaluation's ``metrics.json`` (its path, or the dict already read) under today's names: an older file's
    ``teacher_params`` / ``teacher_macs`` / ``teacher_macs_per_image`` become ``base_*``; nothing else is filled in."""
    m = dict(source) if isinstance(source, dict) else read_json(source)
    for old, new in _RENAMED_METRICS.items():
        if old in m:
            m.setdefault(new, m.pop(old))
    return m


def finite_or_none(x):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_or_none(v) for v in x]
    return x


__all__ = ["LOG_FIELDS", "finite_or_none", "eval_versions", "read_log", "read_metrics", "run_info"]
