"""Image data: bundled MNIST, scikit-learn digits, folders of images, Hugging Face datasets.

Every loader returns a ``uint8`` tensor ``[N, C, H, W]`` already fitted to the model's resolution and channel
count (both come from the model config, never from a name). :func:`to_model_range` maps it to ``[-1, 1]``.
Fitting rule: equal sizes pass; a square image a few pixels smaller is padded with background (MNIST 28 -> 32);
anything else is centre-cropped to a square and resized with antialiasing (MNIST 28 -> 16).
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DiffPruneError, require
from .registry import Registry

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
DATASETS: Registry[Callable[..., torch.Tensor]] = Registry("dataset")


def bundled_path(name: str) -> Path:
    return Path(str(resources.files("diffprune") / "assets" / name))


def fit_images(x: torch.Tensor, resolution: int, channels: int) -> torch.Tensor:
    """Fit uint8 images ``[N, C, H, W]`` to ``resolution`` x ``resolution`` with ``channels`` channels."""
    require(x.ndim == 4, f"images must be [N, C, H, W], got shape {tuple(x.shape)}")
    c = x.shape[1]
    if c == 4:  # RGBA: drop alpha
        x, c = x[:, :3], 3
    if c != channels:
        if c == 1 and channels == 3:
            x = x.expand(-1, 3, -1, -1)
        elif c == 3 and channels == 1:
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            x = (x.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
        else:
            raise DiffPruneError(f"images have {c} channels but the model takes {channels}; convert them to 1 or 3")
    h, w = x.shape[-2:]
    if h == w == resolution:
        return x.contiguous()
    if h == w and 0 < resolution - h <= 8 and (resolution - h) % 2 == 0:
        p = (resolution - h) // 2
        return F.pad(x, (p, p, p, p), value=0).contiguous()
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = x[:, :, top:top + s, left:left + s].float()
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).contiguous()


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return x.float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (clamped)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@DATASETS.register("mnist")
def _mnist(split: str) -> torch.Tensor:
    require(split in ("train", "test"), f"split {split!r} is not available for 'mnist'; choose 'train' or 'test'")
    with np.load(bundled_path("mnist.npz")) as d:
        return torch.from_numpy(d[f"{split}_images"].copy()).unsqueeze(1)


def mnist_labels(split: str) -> torch.Tensor:
    with np.load(bundled_path("mnist.npz")) as d:
        return torch.from_numpy(d[f"{split}_labels"].copy())


@DATASETS.register("digits")
def _digits(split: str) -> torch.Tensor:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DiffPruneError("dataset 'digits' needs scikit-learn; pip install 'diffprune[digits]'") from None
    x = load_digits().images  # 1797 x 8 x 8, values 0..16
    x = torch.from_numpy(np.rint(x * (255 / 16)).astype(np.uint8)).unsqueeze(1)
    n_test = len(x) // 10
    return x[n_test:] if split == "train" else x[:n_test]


def load_folder(folder: Path) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    require(len(files) > 0, f"image folder {str(folder)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    arrays = []
    for p in files:
        try:
            with Image.open(p) as im:
                im = im.convert("RGB") if im.mode not in ("L", "RGB") else im
                a = np.asarray(im)
        except (UnidentifiedImageError, OSError) as e:
            raise DiffPruneError(f"cannot read image {str(p)!r} ({e}); remove or replace the file") from None
        a = a[:, :, None] if a.ndim == 2 else a
        if arrays and a.shape != arrays[0].shape:
            raise DiffPruneError(
                f"image {str(p)!r} has shape {a.shape} but {str(files[0])!r} has {arrays[0].shape}; "
                "use images of one size and mode"
            )
        arrays.append(a)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _hf_dataset(name: str, split: str) -> torch.Tensor:
    try:
        import datasets as hfds
    except ImportError:
        raise DiffPruneError(
            f"data {name!r} is neither a folder nor a bundled dataset {DATASETS.names()}; "
            "for a Hugging Face dataset id, pip install 'diffprune[datasets]'"
        ) from None
    ds = hfds.load_dataset(name, split=split)
    key = next((k for k in ("image", "img", "pixel_values") if k in ds.column_names), None)
    require(key is not None, f"dataset {name!r} has no image column (looked for image/img); columns: {ds.column_names}")
    arrays = [np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im) for im in ds[key]]
    arrays = [a[:, :, None] if a.ndim == 2 else a for a in arrays]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def load_images(source: str | os.PathLike, *, resolution: int, channels: int, split: str = "train",
                limit: int | None = None) -> torch.Tensor:
    """Load images as uint8 ``[N, channels, resolution, resolution]``.

    ``source``: a folder of images (searched recursively), a bundled name (``mnist``, ``digits``), or a Hugging
    Face dataset id (needs the ``datasets`` extra and a connection).
    """
    path = Path(source)
    if path.is_dir():
        x = load_folder(path)
    elif str(source) in DATASETS:
        x = DATASETS.get(str(source))(split)
    elif path.exists():
        raise DiffPruneError(f"data {str(source)!r} is a file; pass a folder of images or one of {DATASETS.names()}")
    elif "/" in str(source) and not str(source).startswith((".", "/")):
        x = _hf_dataset(str(source), split)
    else:
        raise DiffPruneError(
            f"data {str(source)!r} is not a folder, nor one of {DATASETS.names()}, nor a Hugging Face id (owner/name)"
        )
    if limit is not None:
        x = x[:limit]
    return fit_images(x, resolution, channels)
