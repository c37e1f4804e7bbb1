"""Pipeline families: which component of a diffusers pipeline is the denoiser, and which are its latent space, label
map and text encoder.

``PIPELINES`` names the supported pipeline classes. For each: the component folder that holds the denoiser (pruned
and trained), the autoencoder (kept as it was), where the class names live, the text encoder and tokenizer, and the
stock pipeline class that :func:`diffprune.load_pipeline` returns. Loading and writing pipeline folders is
:mod:`diffprune.io`'s job; this module only knows the families.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import DiffPruneError
from ..registry import Registry
from . import supported_classes


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


def pipeline_family(class_name, where: str) -> PipelineFamily:
    """The family of a pipeline class name (``model_index.json``'s ``_class_name``); a clear error otherwise."""
    if not isinstance(class_name, str) or class_name not in PIPELINES:
        raise DiffPruneError(f"{where} is a {class_name!r}, which diffprune cannot prune; supported pipelines: "
                             f"{PIPELINES.names()} (their denoisers: {supported_classes()})")
    return PIPELINES.get(class_name)


def latent_family(adapter_name: str) -> PipelineFamily:
    """The one latent pipeline family whose denoiser has adapter ``adapter_name`` (for assembling a new pipeline)."""
    families = [PIPELINES.get(n) for n in PIPELINES if PIPELINES.get(n).adapter == adapter_name
                and PIPELINES.get(n).autoencoder is not None]
    if len(families) != 1:
        raise DiffPruneError(f"no latent pipeline holds a {adapter_name!r} denoiser; latent pipelines: "
                             f"{[n for n in PIPELINES if PIPELINES.get(n).autoencoder]}")
    return families[0]


__all__ = ["PIPELINES", "PipelineFamily", "latent_family", "pipeline_family"]
