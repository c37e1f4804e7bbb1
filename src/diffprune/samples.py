"""Sample sets and the folders that hold them: what ``diffprune sample`` writes and ``diffprune eval`` reads.

A :class:`SampleSet` is uint8 images ``[N, C, H, W]`` with the seed each came from; two sets are compared by seed
(:func:`pair_by_seed`), never by file order. A sample folder holds ``{i:05d}.png`` (image i from ``seeds[i]``),
``samples.npz`` (images and seeds), ``samples.json`` (the seeds and how they were made) and ``grid.png``.

Ground level: this module knows images, seeds and files, nothing about models or metrics.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ._fs import atomic_write_json
from .data import _stack_images, read_image
from .errors import DiffPruneError, require

__all__ = ["SAMPLES_NPZ", "SampleSet", "image_grid", "load_sample_folder", "load_samples", "pair_by_seed",
           "save_samples"]

SAMPLES_NPZ = "samples.npz"


@dataclass(frozen=True)
class SampleSet:
    """Generated images and the seed each came from (image ``i`` from ``seeds[i]``)."""

    seeds: list[int]
    images: torch.Tensor  # uint8 [N, C, H, W]

    def __post_init__(self):
        require(self.images.dtype == torch.uint8 and self.images.ndim == 4,
                f"sample images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        require(len(self.seeds) == len(self.images), f"{len(self.seeds)} seeds for {len(self.images)} images")
        require(len(set(self.seeds)) == len(self.seeds), "sample seeds repeat; every image needs its own seed")


def pair_by_seed(a: SampleSet, b: SampleSet) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """The seeds both sets hold (ascending) and the two image stacks in that order — never file order."""
    common = sorted(set(a.seeds) & set(b.seeds))
    require(len(common) > 0, "the two sample sets share no seed; sample both from the same --seed")
    ia = {s: i for i, s in enumerate(a.seeds)}
    ib = {s: i for i, s in enumerate(b.seeds)}
    return common, a.images[[ia[s] for s in common]], b.images[[ib[s] for s in common]]


def image_grid(images_uint8: torch.Tensor, nrow: int | None = None, pad: int = 2):
    """A PIL image tiling uint8 ``[N, C, H, W]`` images in rows of ``nrow`` (default: about square)."""
    from PIL import Image

    n, c, h, w = images_uint8.shape
    nrow = nrow or max(1, int(np.ceil(np.sqrt(n))))
    rows = int(np.ceil(n / nrow))
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for k in range(n):
        r, col = divmod(k, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = (
            images_uint8[k].permute(1, 2, 0).numpy()
        )
    return Image.fromarray(grid[:, :, 0] if c == 1 else grid)


def save_samples(images_uint8: torch.Tensor, seeds: Sequence[int], out_dir, meta: dict | None = None) -> None:
    """Write a sample folder: ``{i:05d}.png`` (image i from ``seeds[i]``), ``samples.npz`` (images, seeds),
    ``samples.json`` (seeds and how they were made) and ``grid.png`` (the first 64)."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = np.asarray([int(s) for s in seeds], dtype=np.int64)
    require(len(seeds) == len(images_uint8), f"{len(images_uint8)} images but {len(seeds)} seeds")
    arr = images_uint8.permute(0, 2, 3, 1).numpy()
    for i, a in enumerate(arr):
        Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a).save(out / f"{i:05d}.png")
    np.savez_compressed(out / SAMPLES_NPZ, images=images_uint8.numpy(), seeds=seeds)
    atomic_write_json(out / "samples.json", {"seeds": seeds.tolist(), **(meta or {})})
    image_grid(images_uint8[:64]).save(out / "grid.png")


def load_samples(folder) -> tuple[torch.Tensor, np.ndarray]:
    """(uint8 images [N, C, H, W], seeds [N]) from a folder written by :func:`save_samples`."""
    path = Path(folder) / SAMPLES_NPZ
    require(path.is_file(), f"{str(folder)!r} is not a sample folder (no {SAMPLES_NPZ}); write one with "
                            "`diffprune sample`")
    with np.load(path, allow_pickle=False) as d:
        return torch.from_numpy(d["images"].copy()), d["seeds"].copy()


def load_sample_folder(folder: str | os.PathLike) -> SampleSet:
    """Read a ``diffprune sample`` folder (or an ``evaluate`` samples folder) as a :class:`SampleSet`.

    Seeds come from ``samples.npz`` (arrays ``images`` + ``seeds``); failing that, from PNG files named by index
    (``00017.png``) with ``samples.json``'s ``seeds`` list (image i from ``seeds[i]``) or base ``seed`` (image i from
    ``seed + i``); with neither, the index itself is the pairing key. File order is never used.
    """
    folder = Path(folder)
    require(folder.is_dir(), f"sample folder {str(folder)!r} does not exist; pass a folder written by diffprune sample")
    if (folder / SAMPLES_NPZ).is_file():
        images, seeds = load_samples(folder)
        return SampleSet(seeds=[int(s) for s in seeds], images=images)
    pngs = {}
    for p in folder.iterdir():
        if p.suffix.lower() == ".png" and re.fullmatch(r"\d+", p.stem):
            pngs[int(p.stem)] = p
    require(len(pngs) > 0, f"sample folder {str(folder)!r} has neither samples.npz with seeds nor PNGs named by "
                           "index (0.png, 1.png, ...); pass a folder written by diffprune sample")
    recorded = _recorded_seeds(folder)
    idx = sorted(pngs)
    images = _stack_images([read_image(pngs[i]) for i in idx], [repr(str(pngs[i])) for i in idx])
    if isinstance(recorded, list):
        require(idx[-1] < len(recorded), f"{str(folder)!r}: PNG index {idx[-1]} but samples.json lists only "
                                         f"{len(recorded)} seeds")
        seeds = [int(recorded[i]) for i in idx]
    else:
        seeds = [(recorded or 0) + i for i in idx]
    return SampleSet(seeds=seeds, images=images)


def _recorded_seeds(folder: Path) -> list | int | None:
    """``samples.json``'s ``seeds`` list (image i from seeds[i]) or its base ``seed`` (image i from seed + i)."""
    p = folder / "samples.json"
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text(encoding="utf-8"))  # written as UTF-8 (prompts may be any text)
    except (OSError, ValueError):
        raise DiffPruneError(f"{str(p)!r} is not valid JSON; rewrite the folder with diffprune sample") from None
    if isinstance(d, dict) and isinstance(d.get("seeds"), list):
        return d["seeds"]
    if isinstance(d, dict) and isinstance(d.get("seed"), int):
        return int(d["seed"])
    return None
