"""Pipeline families: which component of a diffusers pipeline is the denoiser, and which are its latent space, label
map and text encoders.

``PIPELINES`` names the supported pipeline classes. For each: the component folder that holds the denoiser (pruned
and trained), the autoencoder (kept as it was), where the class names live, the text encoders and their tokenizers
(component folders, in the order the pipeline's ``encode_prompt`` uses them), and the stock pipeline class that
:func:`diffprune.load_pipeline` returns. Loading and writing pipeline folders is :mod:`diffprune.io`'s job; this
module only knows the families. Variants that are not listed (ControlNet, IP-Adapter, image-to-image and
inpainting pipelines, SDXL's refiner, Flux Fill/Kontext) are refused by :func:`pipeline_family`, which names the
supported ones.
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
    text_encoders: tuple[str, ...] = ()  # component folders of the text encoders, for text-to-image pipelines
    tokenizers: tuple[str, ...] = ()  # and of their tokenizers, pairwise

    @property
    def text_encoder(self) -> str | None:
        """The first text encoder's component folder (None: not a text-to-image pipeline)."""
        return self.text_encoders[0] if self.text_encoders else None

    @property
    def tokenizer(self) -> str | None:
        return self.tokenizers[0] if self.tokenizers else None


PIPELINES: Registry[PipelineFamily] = Registry("pipeline")
_TEXT = ("text_encoder", "text_encoder_2", "text_encoder_3")
_TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
for _family in (PipelineFamily("DDPMPipeline", "unet2d", "unet"), PipelineFamily("DDIMPipeline", "unet2d", "unet"),
                PipelineFamily("LDMPipeline", "unet2d", "unet", "vqvae"),
                PipelineFamily("DiTPipeline", "dit", "transformer", "vae", "id2label"),
                PipelineFamily("StableDiffusionPipeline", "unet2d-cond", "unet", "vae", text_encoders=_TEXT[:1],
                               tokenizers=_TOKENIZERS[:1]),
                PipelineFamily("StableDiffusionXLPipeline", "unet2d-cond", "unet", "vae", text_encoders=_TEXT[:2],
                               tokenizers=_TOKENIZERS[:2]),
                PipelineFamily("PixArtAlphaPipeline", "pixart", "transformer", "vae", text_encoders=_TEXT[:1],
                               tokenizers=_TOKENIZERS[:1]),
                PipelineFamily("PixArtSigmaPipeline", "pixart", "transformer", "vae", text_encoders=_TEXT[:1],
                               tokenizers=_TOKENIZERS[:1]),
                PipelineFamily("StableDiffusion3Pipeline", "sd3", "transformer", "vae", text_encoders=_TEXT,
                               tokenizers=_TOKENIZERS),
                PipelineFamily("FluxPipeline", "flux", "transformer", "vae", text_encoders=_TEXT[:2],
                               tokenizers=_TOKENIZERS[:2])):
    PIPELINES.register(_family.pipeline_class)(_family)


def pipeline_family(class_name, where: str) -> PipelineFamily:
    """The family of a pipeline class name (``model_index.json``'s ``_class_name``); a clear error otherwise."""
    if not isinstance(class_name, str) or class_name not in PIPELINES:
        raise DiffPruneError(f"{where} is a {class_name!r}, which diffprune cannot prune; supported pipelines: "
                             f"{PIPELINES.names()} (their denoisers: {supported_classes()})")
    return PIPELINES.get(class_name)


def latent_family(adapter_name: str) -> PipelineFamily:
    """The one latent pipeline family without text encoders whose denoiser has adapter ``adapter_name`` (for
    assembling a new pipeline around an autoencoder)."""
    assembled = [f for f in map(PIPELINES.get, PIPELINES) if f.autoencoder and not f.text_encoders]
    families = [f for f in assembled if f.adapter == adapter_name]
    if len(families) != 1:
        raise DiffPruneError(f"no latent pipeline without text encoders holds a {adapter_name!r} denoiser; such "
                             f"pipelines: {[f.pipeline_class for f in assembled]}")
    return families[0]


__all__ = ["PIPELINES", "PipelineFamily", "latent_family", "pipeline_family"]
