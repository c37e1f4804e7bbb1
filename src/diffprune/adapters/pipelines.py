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
    denoiser: str  # component folder of the denoiser: "unet" or "transformer"
    autoencoder: str | None = None  # component folder of the autoencoder, for latent pipelines


PIPELINES: Registry[PipelineFamily] = Registry("pipeline")
for _family in (PipelineFamily("DDPMPipeline", "unet"), PipelineFamily("DDIMPipeline", "unet"),
                PipelineFamily("LDMPipeline", "unet", "vqvae"), PipelineFamily("DiTPipeline", "transformer", "vae")):
    PIPELINES.register(_family.pipeline_class)(_family)

AUTOENCODER_CLASSES = ("VQModel", "AutoencoderKL")


def pipeline_family(class_name: str | None, where: str) -> PipelineFamily:
    if class_name not in PIPELINES:
        raise DiffPruneError(f"{where} is a {class_name!r}, which diffprune cannot prune; supported pipelines: "
                             f"{PIPELINES.names()} (their denoisers: {_denoiser_classes()})")
    return PIPELINES.get(class_name)


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


__all__ = ["AUTOENCODER_CLASSES", "LatentCodec", "PIPELINES", "PipelineFamily", "pipeline_family", "stock_pipeline"]


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
