"""Pipelines in, pipelines out: which component of a diffusers pipeline is the denoiser, and its latent space.

``PIPELINES`` names the supported pipeline classes. For each: the component folder that holds the denoiser (pruned
and trained), the autoencoder (kept as it was), and the stock pipeline class that :func:`diffprune.load_pipeline`
returns. Every other component (scheduler, label map, ...) is copied unchanged into the output.

:class:`LatentCodec` wraps the autoencoder: images in ``[-1, 1]`` -> latents ``encode(x) * scaling_factor`` and
back, as the stock pipelines do (``LDMPipeline`` with a ``VQModel``, ``DiTPipeline`` with an ``AutoencoderKL``,
whose deterministic latent, the posterior mean, is used).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import DiffPruneError, require
from ..registry import Registry


@dataclass(frozen=True)
class PipelineFamily:
    pipeline_class: str
    adapter: str  # the model family of its denoiser
    denoiser: str  # component folder of the denoiser: "unet" or "transformer"
    autoencoder: str | None = None  # component folder of the autoencoder, for latent pipelines
    label_map: str | None = None  # model_index.json key of the class names, for class-conditional pipelines
    text_encoder: str | None = None  # component folders of the text encoder and its tokenizer, for text-to-image
    tokenizer: str | None = None


PIPELINES: Registry[PipelineFamily] = Registry("pipeline")
for _family in (PipelineFamily("DDPMPipeline", "unet2d", "unet"), PipelineFamily("DDIMPipeline", "unet2d", "unet"),
                PipelineFamily("LDMPipeline", "unet2d", "unet", "vqvae"),
                PipelineFamily("DiTPipeline", "dit", "transformer", "vae", "id2label"),
                PipelineFamily("StableDiffusionPipeline", "unet2d-cond", "unet", "vae", text_encoder="text_encoder",
                               tokenizer="tokenizer")):
    PIPELINES.register(_family.pipeline_class)(_family)

AUTOENCODER_CLASSES = ("VQModel", "AutoencoderKL")


def pipeline_family(class_name: str | None, where: str) -> PipelineFamily:
    if class_name not in PIPELINES:
        raise DiffPruneError(f"{where} is a {class_name!r}, which diffprune cannot prune; supported pipelines: "
                             f"{PIPELINES.names()} (their denoisers: {_denoiser_classes()})")
    return PIPELINES.get(class_name)


def load_codec(folder) -> "LatentCodec":
    """The :class:`LatentCodec` of a diffusers autoencoder folder (safetensors only; other classes refused)."""
    from pathlib import Path

    import diffusers

    from .._fs import read_json
    from ..io import CONFIG_NAME, _check_weights

    folder = Path(folder)
    require((folder / CONFIG_NAME).is_file(), f"autoencoder {str(folder)!r} is not a diffusers model folder (no "
                                              f"{CONFIG_NAME})")
    name = read_json(folder / CONFIG_NAME).get("_class_name")
    require(name in AUTOENCODER_CLASSES, f"{str(folder)!r} holds a {name!r}; supported autoencoders: "
                                         f"{list(AUTOENCODER_CLASSES)}")
    _check_weights(folder)
    return LatentCodec(getattr(diffusers, name).from_pretrained(folder, use_safetensors=True))


def assemble_pipeline(folder, denoiser: nn.Module, autoencoder_dir, scheduler, class_names=None):
    """Lay out a latent pipeline's fixed components in the new folder ``folder`` (model_index.json naming the
    denoiser's pipeline class, the autoencoder copied from ``autoencoder_dir``, the scheduler, and the class names
    where the pipeline keeps them, e.g. DiT's ``id2label``), for training a new denoiser into it; returns its
    :class:`~diffprune.io.PipelineSource`."""
    import shutil
    from pathlib import Path

    import diffusers

    from .._fs import atomic_write_json
    from ..io import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, PipelineSource
    from . import adapter_for

    folder, autoencoder_dir = Path(folder), Path(autoencoder_dir)
    codec = load_codec(autoencoder_dir)
    ae_class = type(codec.autoencoder).__name__
    adapter = adapter_for(denoiser)
    families = [PIPELINES.get(n) for n in PIPELINES if PIPELINES.get(n).adapter == adapter.name
                and PIPELINES.get(n).autoencoder is not None]
    require(len(families) == 1, f"no latent pipeline holds a {type(denoiser).__name__}; latent pipelines: "
                                f"{[n for n in PIPELINES if PIPELINES.get(n).autoencoder]}")
    family = families[0]
    ae = folder / family.autoencoder
    ae.mkdir(parents=True)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        shutil.copy2(autoencoder_dir / name, ae / name)
    scheduler.save_pretrained(folder / "scheduler")
    labels = {family.label_map: {str(i): n for i, n in enumerate(class_names)}} if family.label_map and class_names \
        else {}
    atomic_write_json(folder / INDEX_NAME, {
        "_class_name": family.pipeline_class, "_diffusers_version": diffusers.__version__,
        family.denoiser: ["diffusers", type(denoiser).__name__], family.autoencoder: ["diffusers", ae_class],
        "scheduler": ["diffusers", type(scheduler).__name__], **labels})
    codec.image_shape(adapter.input_shape(denoiser))  # the autoencoder's latents fit the denoiser
    return PipelineSource(folder, family)


def _denoiser_classes() -> list[str]:
    from . import supported_classes

    return supported_classes()


class LatentCodec:
    """The pipeline's autoencoder as a map between images in [-1, 1] and the denoiser's latents."""

    def __init__(self, autoencoder: nn.Module):
        name = type(autoencoder).__name__
        require(name in AUTOENCODER_CLASSES, f"autoencoder {name!r} is not supported; supported: "
                                             f"{list(AUTOENCODER_CLASSES)}")
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.scale = float(getattr(autoencoder.config, "scaling_factor", 1.0) or 1.0)

    @property
    def channels(self) -> int:
        return int(self.autoencoder.config.in_channels)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.autoencoder.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.autoencoder.config.latent_channels)

    def image_shape(self, latent_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images whose latents have ``latent_shape``."""
        c, h, w = latent_shape
        require(c == self.latent_channels, f"the denoiser takes {c} latent channels but the autoencoder makes "
                                           f"{self.latent_channels}; the pipeline's components do not fit")
        return self.channels, h * self.downscale, w * self.downscale

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[N, C, H, W]`` in [-1, 1] -> scaled latents."""
        p = next(self.autoencoder.parameters())
        out = self.autoencoder.encode(x.to(p.device, p.dtype))
        z = out.latents if hasattr(out, "latents") else out.latent_dist.mean
        return (z * self.scale).float()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] (float32, clamped)."""
        p = next(self.autoencoder.parameters())
        return self.autoencoder.decode(z.to(p.device, p.dtype) / self.scale).sample.float().clamp(-1, 1)

    def identity(self) -> str:
        """sha256 of the autoencoder's class, config and weights: part of every latent cache key."""
        h = hashlib.sha256(type(self.autoencoder).__name__.encode())
        h.update(repr(sorted(dict(self.autoencoder.config).items())).encode())
        _hash_state(h, self.autoencoder)
        return h.hexdigest()

    def to(self, device) -> "LatentCodec":
        self.autoencoder.to(device)
        return self


TEXT_ENCODER_CLASSES = ("CLIPTextModel",)
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")
TEXT_FORMAT = 1  # bump when the way prompt embeddings are computed changes


def _transformers():
    try:
        import transformers
    except ImportError:
        raise DiffPruneError("a text-to-image pipeline needs the transformers package (its text encoder and "
                             "tokenizer); pip install 'diffprune[sd]'") from None
    return transformers


def load_text_encoder(folder, family: PipelineFamily) -> "TextEncoder":
    """The :class:`TextEncoder` of a text-to-image pipeline folder (safetensors only; classes checked)."""
    from pathlib import Path

    from .._fs import read_json
    from ..io import INDEX_NAME

    folder = Path(folder)
    transformers = _transformers()
    index = read_json(folder / INDEX_NAME)
    classes = {}
    for key, allowed in ((family.text_encoder, TEXT_ENCODER_CLASSES), (family.tokenizer, TOKENIZER_CLASSES)):
        entry = index.get(key)
        name = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
        require(name in allowed, f"pipeline {str(folder)!r} has {key}={entry!r}; supported: {list(allowed)}")
        require((folder / key).is_dir(), f"pipeline {str(folder)!r} names a {key} but has no {key}/ folder; copy "
                                         "the whole pipeline (save_pretrained writes every component)")
        classes[key] = getattr(transformers, name)
    weights = folder / family.text_encoder / "model.safetensors"
    require(weights.is_file(), f"{str(weights.parent)!r} has no model.safetensors; save the text encoder with "
                               "safe_serialization=True (diffprune never loads pickles)")
    encoder = classes[family.text_encoder].from_pretrained(folder / family.text_encoder, use_safetensors=True)
    tokenizer = classes[family.tokenizer].from_pretrained(folder / family.tokenizer)
    return TextEncoder(tokenizer, encoder)


class TextEncoder:
    """A text-to-image pipeline's tokenizer and text encoder as a map from prompts to the denoiser's context
    ``[N, L, D]``: each prompt padded (and, when longer, truncated) to the tokenizer's ``model_max_length``, and the
    encoder's ``last_hidden_state``, exactly as ``StableDiffusionPipeline.encode_prompt`` does (``clip_skip=None``).
    The unconditional context of classifier-free guidance is the empty prompt's (:meth:`null`).

    Prompts longer than the tokenizer allows are truncated, as the stock pipeline truncates them, and every call
    that truncates says how many on stderr (:attr:`truncated` counts them)."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.truncated = 0

    @property
    def width(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def check_fits(self, spec) -> None:
        """The encoder's width must be the denoiser's ``cross_attention_dim``."""
        require(self.width == spec.context_dim,
                f"the text encoder outputs {self.width}-wide embeddings but the UNet's cross_attention_dim is "
                f"{spec.context_dim}; the pipeline's components do not fit (use the text encoder the UNet was "
                "trained with)")

    @torch.no_grad()
    def encode(self, prompts, batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """float32 context ``[len(prompts), max_length, width]`` on the CPU."""
        import sys

        from tqdm.auto import tqdm

        prompts = [str(p) for p in prompts]
        tok = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")
        lengths = [len(ids) for ids in self.tokenizer(prompts, truncation=False).input_ids]
        cut = sum(n > self.max_length for n in lengths)
        if cut:
            self.truncated += cut
            print(f"diffprune: {cut} of {len(prompts)} prompt(s) are longer than the text encoder's "
                  f"{self.max_length} tokens and were truncated, as the stock pipeline truncates them",
                  file=sys.stderr)
        use_mask = bool(getattr(self.text_encoder.config, "use_attention_mask", False))
        p = next(self.text_encoder.parameters())
        out = []
        for i in tqdm(range(0, len(prompts), batch_size), desc="encoding prompts", disable=not progress):
            ids = tok.input_ids[i:i + batch_size].to(p.device)
            mask = tok.attention_mask[i:i + batch_size].to(p.device) if use_mask else None
            out.append(self.text_encoder(ids, attention_mask=mask)[0].float().cpu())
        return torch.cat(out)

    def null(self) -> torch.Tensor:
        """The empty prompt's context ``[1, L, D]``: the unconditional branch of classifier-free guidance."""
        return self.encode([""])

    def sampling_inputs(self, prompts, guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(prompt_embeds, negative_prompt_embeds)`` for :func:`diffprune.sampling.sample`: one context per prompt,
        and the empty prompt's when guiding (None at guidance 1)."""
        return self.encode(prompts), (self.null() if guidance_scale != 1 else None)

    def identity(self) -> str:
        """sha256 of the tokenizer and the text encoder (class, config, weights): part of every text cache key."""
        h = hashlib.sha256(type(self.text_encoder).__name__.encode())
        h.update(repr(sorted(self.text_encoder.config.to_dict().items())).encode())
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        h.update((backend.to_str() if backend is not None else repr(sorted(self.tokenizer.get_vocab().items())))
                 .encode())
        h.update(str(self.max_length).encode())
        _hash_state(h, self.text_encoder)
        return h.hexdigest()

    def encode_cached(self, prompts, *, cache_dir=None, progress: bool = False) -> tuple[torch.Tensor, str]:
        """The context of each prompt, encoded once (unique prompts) then read from the cache; ``(context, key)``."""
        import json

        from safetensors.torch import load_file, save

        from .._fs import atomic_write_bytes, cache_dir as _cache

        prompts = [str(p) for p in prompts]
        unique = sorted(set(prompts))
        key = hashlib.sha256(json.dumps({"format": TEXT_FORMAT, "encoder": self.identity(),
                                         "prompts": unique}).encode()).hexdigest()[:32]
        path = _cache(cache_dir) / "text" / f"{key}.safetensors"
        z = None
        if path.is_file():
            try:
                z = load_file(str(path))["context"]
                z = z if len(z) == len(unique) else None
            except Exception:  # a damaged cache entry is recomputed
                z = None
        if z is None:
            z = self.encode(unique, progress=progress).contiguous()
            atomic_write_bytes(path, save({"context": z}))
        index = {p: i for i, p in enumerate(unique)}
        return z[torch.tensor([index[p] for p in prompts], dtype=torch.long)], key

    def to(self, device) -> "TextEncoder":
        self.text_encoder.to(device)
        return self


def _hash_state(h, module: nn.Module) -> None:
    for k, v in module.state_dict().items():
        v = v.detach().cpu().contiguous()
        h.update(k.encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")


__all__ = ["AUTOENCODER_CLASSES", "LatentCodec", "PIPELINES", "PipelineFamily", "TextEncoder", "assemble_pipeline",
           "load_text_encoder", "pipeline_family", "stock_pipeline"]


def stock_pipeline(loaded):
    """The stock diffusers pipeline for a :class:`diffprune.io.LoadedModel`, with its denoiser in place.

    A pipeline folder gives its own class (all components loaded as saved, safetensors only); a bare unconditional
    UNet2DModel gives a ``DDPMPipeline`` with its scheduler.
    """
    import diffusers

    if loaded.pipeline is not None:
        family = loaded.pipeline.family
        return diffusers.DiffusionPipeline.from_pretrained(
            loaded.pipeline.folder, **{family.denoiser: loaded.denoiser}, use_safetensors=True)
    from ..sampling import default_scheduler

    require(type(loaded.denoiser).__name__ == "UNet2DModel" and loaded.adapter.conditioning(loaded.denoiser) is None,
            f"no stock diffusers pipeline samples a bare {type(loaded.denoiser).__name__} with class labels; sample it "
            "with `diffprune sample --class-labels ...` (or diffprune.sample), or save it inside a pipeline folder")
    return diffusers.DDPMPipeline(unet=loaded.denoiser, scheduler=loaded.scheduler or default_scheduler())
