"""Image data: bundled MNIST, scikit-learn digits, folders of images, Hugging Face datasets.

:func:`load_data` returns an :class:`ImageData`: ``uint8`` images ``[N, C, H, W]`` already fitted to the model's
resolution and channel count (both come from the model config, never from a name), class labels when the source
has them (MNIST and digits do; a folder of class sub-folders does; a hub dataset with a ``label`` column does),
captions when it has them (a folder's ``metadata.jsonl``, a hub dataset's ``text``/``caption``/``prompt`` column), and a
record of what was read (source, split, hub revision, content sha256). :func:`to_model_range` maps images to
``[-1, 1]``.
Fitting rule: equal sizes pass; a square image a few pixels smaller is padded with background (MNIST 28 -> 32);
anything else is centre-cropped to a square and resized with antialiasing (MNIST 28 -> 16).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ._hashing import content_sha256
from .assets import bundled_path
from .errors import DiffPruneError, require
from .registry import Registry

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
# a bundled dataset: split -> (uint8 images [N, C, H, W], labels [N] or None, class names or None)
DATASETS: Registry[Callable[[str], tuple]] = Registry("dataset")


@dataclass(frozen=True)
class ImageData:
    """Images (uint8 ``[N, C, H, W]``), their class labels (int64 ``[N]``, or None), their captions (one string per
    image, or None) and where they came from.

    ``record``: JSON-able description (``source``, ``split``, ``count``, ``revision`` for hub ids, ``sha256`` of
    the fitted images, labels and captions) that outputs keep and resumed runs compare.
    """

    images: torch.Tensor
    labels: torch.Tensor | None = None
    class_names: list[str] | None = None
    record: dict = field(default_factory=dict)
    captions: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int | None:
        return None if self.labels is None else len(self.class_names or []) or int(self.labels.max()) + 1


LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's convert("L")


def to_grey(x: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` -> ``[N, 1, H, W]`` luma in the same dtype (uint8 rounded); other channel counts unchanged."""
    if x.shape[1] != 3:
        return x
    w = torch.tensor(LUMA, device=x.device).view(1, 3, 1, 1)
    grey = (x.float() * w).sum(1, keepdim=True)
    return grey.round().clamp(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else grey.to(x.dtype)


def read_image(path) -> np.ndarray:
    """An image file as an HWC uint8 array: grey stays 1 channel, anything else becomes RGB."""
    from PIL import Image

    with Image.open(path) as im:
        return _pil_array(im)


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
            x = to_grey(x)
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
def _mnist(split: str) -> tuple:
    require(split in ("train", "test"), f"split {split!r} is not available for 'mnist'; choose 'train' or 'test'")
    with np.load(bundled_path("mnist.npz")) as d:
        images = torch.from_numpy(d[f"{split}_images"].copy()).unsqueeze(1)
        labels = torch.from_numpy(d[f"{split}_labels"].copy()).long()
    return images, labels, [str(k) for k in range(10)]


def mnist_labels(split: str) -> torch.Tensor:
    return _mnist(split)[1]


@DATASETS.register("digits")
def _digits(split: str) -> tuple:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DiffPruneError("dataset 'digits' needs scikit-learn; pip install 'diffprune[digits]'") from None
    d = load_digits()  # 1797 x 8 x 8, values 0..16
    x = torch.from_numpy(np.rint(d.images * (255 / 16)).astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(d.target).long()
    n_test = len(x) // 10
    part = slice(n_test, None) if split == "train" else slice(None, n_test)
    return x[part], y[part], [str(k) for k in range(10)]


CAPTIONS_FILE = "metadata.jsonl"
CAPTION_COLUMNS = ("text", "caption", "prompt")


def read_captions(folder: Path, files: list[Path]) -> tuple[str, ...] | None:
    """The caption of each file from ``folder/metadata.jsonl`` (one JSON object per line with ``file_name``, relative
    to ``folder``, and ``text``: the Hugging Face ``imagefolder`` convention); None without that file. Every image
    must have exactly one caption."""
    path = folder / CAPTIONS_FILE
    if not path.is_file():
        return None
    captions: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DiffPruneError(f"{str(path)!r} is not UTF-8 (byte {e.start}); save it as UTF-8") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DiffPruneError(f"{str(path)!r} line {n} is not JSON ({e.msg}); write one object per line, e.g. "
                                 '{"file_name": "0001.png", "text": "a photo of a cat"}') from None
        column = next((k for k in CAPTION_COLUMNS if k in row), None) if isinstance(row, dict) else None
        require(column is not None and "file_name" in row,
                f"{str(path)!r} line {n} has no 'file_name' and 'text'; write one object per line, e.g. "
                '{"file_name": "0001.png", "text": "a photo of a cat"}')
        require(row["file_name"] not in captions, f"{str(path)!r} line {n}: {row['file_name']!r} is captioned twice")
        captions[row["file_name"]] = str(row[column])
    names = [p.relative_to(folder).as_posix() for p in files]
    missing = [n for n in names if n not in captions]
    if missing:
        raise DiffPruneError(f"{len(missing)} of {len(names)} images in {str(folder)!r} have no caption in "
                             f"{CAPTIONS_FILE} (e.g. {missing[0]!r}); caption every image or remove the uncaptioned "
                             "ones")
    return tuple(captions[n] for n in names)


def load_folder(folder: Path) -> tuple:
    """Every image below ``folder``; labelled by class sub-folder when every image sits in one (``root/cat/x.png``),
    as torchvision's ``ImageFolder`` (classes in sorted order); captioned by ``metadata.jsonl`` when the folder has
    one (:func:`read_captions`). Returns ``(images, labels, classes, captions)``."""
    from PIL import UnidentifiedImageError

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    require(len(files) > 0, f"image folder {str(folder)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    arrays = []
    for p in files:
        try:
            arrays.append(read_image(p))
        except (UnidentifiedImageError, OSError) as e:
            raise DiffPruneError(f"cannot read image {str(p)!r} ({e}); remove or replace the file") from None
    images = _stack_images(arrays, [repr(str(p)) for p in files])
    captions = read_captions(folder, files)
    parts = [p.relative_to(folder).parts for p in files]
    if all(len(q) == 2 for q in parts) and len({q[0] for q in parts}) >= 2:
        classes = sorted({q[0] for q in parts})
        index = {c: i for i, c in enumerate(classes)}
        return images, torch.tensor([index[q[0]] for q in parts], dtype=torch.long), classes, captions
    return images, None, None, captions


def _hf_dataset(name: str, split: str) -> tuple:
    try:
        import datasets as hfds
    except ImportError:
        raise DiffPruneError(
            f"data {name!r} is neither a folder nor a bundled dataset {DATASETS.names()}; "
            "for a Hugging Face dataset id, pip install 'diffprune[datasets]'"
        ) from None
    revision = hub_dataset_revision(name)
    # never run a dataset's own loading script; pin the commit the id resolved to, so the record says what was read
    ds = hfds.load_dataset(name, split=split, revision=revision, trust_remote_code=False)
    key = next((k for k in ("image", "img", "pixel_values") if k in ds.column_names), None)
    require(key is not None, f"dataset {name!r} has no image column (looked for image/img); columns: {ds.column_names}")
    images = _stack_images([_pil_array(im) for im in ds[key]], [f"{name}[{i}]" for i in range(len(ds))])
    label_key = next((k for k in ("label", "labels") if k in ds.column_names), None)
    labels = classes = None
    if label_key is not None:
        labels = torch.tensor(ds[label_key], dtype=torch.long)
        classes = getattr(ds.features[label_key], "names", None)
    text_key = next((k for k in CAPTION_COLUMNS if k in ds.column_names), None)
    captions = None if text_key is None else tuple(str(t) for t in ds[text_key])
    return images, labels, classes, captions, revision


def hub_dataset_revision(name: str) -> str | None:
    """The commit sha a hub dataset id resolves to now (None when the hub cannot say, e.g. offline)."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(name).sha
    except Exception:  # offline or unknown: datasets' own error (or its cache) decides below
        return None


def _pil_array(im) -> np.ndarray:
    a = np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im)
    return a[:, :, None] if a.ndim == 2 else a


def _stack_images(arrays: list[np.ndarray], names: list[str]) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` from HWC arrays that must share one shape (the error names the first odd one)."""
    for a, name in zip(arrays, names):
        if a.shape != arrays[0].shape:
            raise DiffPruneError(f"image {name} has shape {a.shape} but {names[0]} has {arrays[0].shape}; "
                                 "use images of one size and mode (resize them first)")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def load_data(source: str | os.PathLike, *, resolution: int, channels: int, split: str = "train",
              limit: int | None = None) -> ImageData:
    """Load images (and labels, where the source has them), fitted to ``resolution`` and ``channels``.

    ``source``: a folder of images (searched recursively; class sub-folders give labels), a bundled name
    (``mnist``, ``digits``), or a Hugging Face dataset id ``owner/name`` (needs the ``datasets`` extra and a
    connection). A path that looks local (``./x``, ``/x``, ``a/b/c``, or whose parent exists) is never sent to the hub.
    """
    from ._fs import is_hub_id, missing_path_message

    name = str(source)
    require(name.strip() != "", f"data {name!r} is empty; pass an image folder, one of {DATASETS.names()} or a "
                                "Hugging Face dataset id (owner/name)")
    path = Path(source)
    revision = captions = None
    if path.is_dir():
        x, y, classes, captions = load_folder(path)
    elif name in DATASETS:
        x, y, classes = DATASETS.get(name)(split)
    elif path.exists():
        raise DiffPruneError(f"data {name!r} is a file; pass a folder of images or one of {DATASETS.names()}")
    elif is_hub_id(name):
        x, y, classes, captions, revision = _hf_dataset(name, split)
    elif "/" in name or os.sep in name or name.startswith((".", "~")):  # a local path, never a hub id
        raise DiffPruneError(missing_path_message("data", name))
    else:
        raise DiffPruneError(
            f"data {name!r} is not a folder, nor one of {DATASETS.names()}, nor a Hugging Face id (owner/name)"
        )
    if limit is not None:
        x, y = x[:limit], (None if y is None else y[:limit])
        captions = None if captions is None else captions[:limit]
    x = fit_images(x, resolution, channels)
    record = {"source": name, "split": split, "count": len(x), "resolution": resolution, "channels": channels,
              "labelled": y is not None, "captioned": captions is not None, "revision": revision,
              "sha256": content_sha256(x, y, captions)}
    return ImageData(x, y, classes, record, captions)


def load_images(source: str | os.PathLike, *, resolution: int, channels: int, split: str = "train",
                limit: int | None = None) -> torch.Tensor:
    """The images of :func:`load_data` alone: uint8 ``[N, channels, resolution, resolution]``."""
    return load_data(source, resolution=resolution, channels=channels, split=split, limit=limit).images
