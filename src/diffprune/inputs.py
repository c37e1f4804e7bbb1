"""What a denoiser is calibrated and trained on: its clean inputs ``x0`` (images, or their latents for a latent
pipeline) and, for a conditional model, each image's own conditioning: its label, or its caption's text-encoder
context for a text-to-image model.

Latents are encoded once with the pipeline's autoencoder and cached on disk (safetensors) under a key made of the
autoencoder's identity (class, config, weights) and the data's content hash, so a changed autoencoder or changed
data never reuses stale latents. Captions are encoded once the same way (:meth:`TextEncoder.encode_cached
<diffprune.components.TextEncoder.encode_cached>`), keyed by the tokenizer and text encoder.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import _cond
from .errors import DiffPruneError, require

LATENT_FORMAT = 1  # bump when the way latents are computed changes


@dataclass(frozen=True)
class DenoiserData:
    """``x0``: images ``[N, C, H, W]`` (uint8, or float in [-1, 1]) for pixel models, float32 latents for latent
    ones; ``cond``: each row's conditioning (int64 labels ``[N]``, float32 text context ``[N, L, D]``, or a dict of
    text tensors for a family that takes several, see :mod:`diffprune._cond`) or None;
    ``null_cond``: the unconditional conditioning ``[1, ...]`` (a null label, the empty prompt's context) when the
    model has one, for classifier-free guidance; ``record``: where they came from (the data's record, plus the
    latent and text cache keys); ``class_names``: the name of each label, when the source has them."""

    x0: torch.Tensor
    cond: torch.Tensor | None
    record: dict
    class_names: list[str] | None = None
    null_cond: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.x0)

    def batch(self, idx: torch.Tensor, device=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Clean inputs in model range (``[-1, 1]`` images or latents) and conditioning of the rows ``idx``."""
        from .data import to_model_range

        x = self.x0[idx]
        x = to_model_range(x) if x.dtype == torch.uint8 else x.float()
        return x.to(device), _cond.to(_cond.take(self.cond, idx), device)


def pixel_shape(model, codec=None, *, adapter=None) -> tuple[int, int, int]:
    """``(C, H, W)`` of the images the model's data must have (through the autoencoder for latent models)."""
    from .adapters import resolve_adapter

    shape = resolve_adapter(model, adapter).input_shape(model)
    return codec.image_shape(shape) if codec is not None else shape


def encode_cached(codec, images: torch.Tensor, data_sha256: str, *, cache_dir=None, batch_size: int = 64,
                  progress: bool = False) -> tuple[torch.Tensor, str]:
    """Latents of ``images`` (uint8, or float in [-1, 1]), encoded once then read from the cache; returns
    ``(latents, cache key)``."""
    from ._cache import cached
    from ._hashing import json_sha256
    from .data import to_model_range

    key = json_sha256({"format": LATENT_FORMAT, "autoencoder": codec.identity(), "data": data_sha256,
                       "n": len(images)}, 32)

    def encode() -> dict:
        chunks = []
        for i in tqdm(range(0, len(images), batch_size), desc="encoding latents", disable=not progress):
            x = images[i:i + batch_size]
            chunks.append(codec.encode(to_model_range(x) if x.dtype == torch.uint8 else x.float()).cpu())
        return {"latents": torch.cat(chunks)}

    def check(t: dict) -> str | None:
        z = t.get("latents")
        return None if z is not None and len(z) == len(images) else f"it holds no latents for {len(images)} images"

    tensors, _ = cached("latents", key, encode, root=cache_dir, check=check)
    return tensors["latents"], key


def denoiser_data(model, data, *, codec=None, text_encoder=None, cache_dir=None,
                  progress: bool = False, adapter=None, class_names: list[str] | None = None) -> DenoiserData:
    """The model's clean inputs for :class:`~diffprune.data.ImageData` ``data`` (labels checked for a
    class-conditional model, captions encoded with ``text_encoder`` for a text-to-image one, images encoded with
    ``codec`` for a latent one). ``class_names``: the classes the model was trained on (``LoadedModel.class_names``):
    the data's classes are mapped to them by name, and a class the model does not know is refused."""
    from .adapters import resolve_adapter

    adapter = resolve_adapter(model, adapter)
    spec = adapter.conditioning(model)
    source = data.record.get("source", "the data")
    record = dict(data.record)
    cond = null = None
    if spec is not None and spec.kind == "text":
        require(text_encoder is not None, "a text-conditioned model needs its pipeline's text encoder to encode "
                                          "captions; load the whole pipeline folder, not the bare UNet")
        require(data.captions is not None,
                f"the model is text-conditioned but data {source!r} has no captions; caption it: a folder with "
                "metadata.jsonl (one {\"file_name\": ..., \"text\": ...} per image), or a dataset with a 'text' column")
        text_encoder.check_fits(spec)
        cond, record["text_cache_key"] = text_encoder.encode_cached(data.captions, cache_dir=cache_dir,
                                                                    progress=progress)
        null = text_encoder.null()
    elif spec is not None:
        require(data.labels is not None,
                f"the model is class-conditional ({spec.num_classes} classes) but data {source!r} has no labels; "
                "label it: a folder with one sub-folder per class (root/<class>/image.png, classes in sorted order), "
                "a dataset with a 'label' column, or pass --data data-free")
        labels = _labels_by_name(data, class_names, source)
        cond, null = spec.check_labels(labels, f"class labels of {source!r}"), spec.null()
    if codec is not None:
        x0, key = encode_cached(codec, data.images, data.record["sha256"], cache_dir=cache_dir, progress=progress)
        record["latent_cache_key"] = key
    else:
        x0 = data.images
    expect = adapter.input_shape(model)
    if tuple(x0.shape[1:]) != expect:
        raise DiffPruneError(f"data {source!r} gives inputs of shape {tuple(x0.shape[1:])} but the model takes "
                             f"{expect}; the autoencoder and the denoiser do not fit")
    names = (class_names or data.class_names) if spec is not None and spec.kind == "class" else None
    return DenoiserData(x0, cond, record, names, null)


def _labels_by_name(data, class_names: list[str] | None, source: str) -> torch.Tensor:
    """The data's labels in the model's label space: mapped by class name when both sides have names, checked
    against the trained classes (not only the label table) either way."""
    labels = data.labels
    if class_names is None:
        return labels
    if data.class_names is not None:
        index = {str(n): i for i, n in enumerate(class_names)}
        unknown = [n for n in data.class_names if str(n) not in index]
        require(not unknown, f"data {source!r} has classes {unknown[:5]} that the model was not trained on (its "
                             f"classes: {list(class_names)[:10]}{' ...' if len(class_names) > 10 else ''}); remove "
                             "those class folders, or rename them to the model's class names")
        labels = torch.tensor([index[str(n)] for n in data.class_names], dtype=torch.long)[labels]
    bad = sorted(set(labels[(labels < 0) | (labels >= len(class_names))].tolist()))
    require(not bad, f"class labels {bad[:5]} of {source!r} are out of range: the model was trained on "
                     f"{len(class_names)} classes (0..{len(class_names) - 1})")
    return labels


def load_denoiser_data(model, source, *, codec=None, text_encoder=None, split: str = "train",
                       limit: int | None = None, cache_dir=None, progress: bool = False,
                       adapter=None, class_names: list[str] | None = None) -> DenoiserData:
    """Load ``source`` (see :func:`diffprune.data.load_data`) fitted to what the model (and autoencoder) take."""
    from .data import load_data

    c, h, w = pixel_shape(model, codec, adapter=adapter)
    require(h == w, f"the model takes {h}x{w} inputs; diffprune's data loaders make square images")
    data = load_data(source, resolution=h, channels=c, split=split, limit=limit)
    return denoiser_data(model, data, codec=codec, text_encoder=text_encoder, cache_dir=cache_dir, progress=progress,
                         adapter=adapter, class_names=class_names)


__all__ = ["DenoiserData", "denoiser_data", "encode_cached", "load_denoiser_data", "pixel_shape"]
