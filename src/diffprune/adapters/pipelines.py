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


PIPELINES: Registry[PipelineFamily] = Registry("pipeline")
for _family in (PipelineFamily("DDPMPipeline", "unet2d", "unet"), PipelineFamily("DDIMPipeline", "unet2d", "unet"),
                PipelineFamily("LDMPipeline", "unet2d", "unet", "vqvae"),
                PipelineFamily("DiTPipeline", "dit", "transformer", "vae", "id2label")):
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
        for k, v in self.autoencoder.state_dict().items():
            v = v.detach().cpu().contiguous()
            h.update(k.encode())
            h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
        return h.hexdigest()

    def to(self, device) -> "LatentCodec":
        self.autoencoder.to(device)
        return self


__all__ = ["AUTOENCODER_CLASSES", "LatentCodec", "PIPELINES", "PipelineFamily", "assemble_pipeline", "pipeline_family",
           "stock_pipeline"]


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
