"""A pipeline's components other than the denoiser, as maps the verbs call: the latent codec (autoencoder) and the
text encoder (tokenizer + encoder). Neither is ever pruned; both are part of every cache key that depends on them.

:class:`LatentCodec` wraps the autoencoder: images in ``[-1, 1]`` -> latents ``(encode(x) - shift_factor) *
scaling_factor`` (the shift is SD3's and Flux's, 0 elsewhere) and
back, as the stock pipelines do (``LDMPipeline`` with a ``VQModel``, ``DiTPipeline`` with an ``AutoencoderKL``,
whose deterministic latent, the posterior mean, is used). :class:`TextEncoder` encodes prompts exactly as
``StableDiffusionPipeline.encode_prompt`` does (the pipelines with several text encoders, SDXL, PixArt, SD3 and Flux,
encode through their stock ``encode_prompt``: :mod:`diffprune.text_encoders`). Loading them from a pipeline folder is
:mod:`diffprune.io`'s job.
"""
from __future__ import annotations

import torch
from torch import nn

from ._cache import cached
from ._hashing import Hasher, json_sha256
from .errors import DiffPruneError, require

AUTOENCODER_CLASSES = ("VQModel", "AutoencoderKL")
TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast", "T5Tokenizer", "T5TokenizerFast")
TEXT_FORMAT = 2  # bump when the way prompt embeddings are computed or cached changes


def require_transformers():
    """The transformers package, or the install hint."""
    try:
        import transformers
    except ImportError:
        raise DiffPruneError("a text-to-image pipeline needs the transformers package (its text encoder and "
                             "tokenizer); pip install 'diffprune[sd]'") from None
    return transformers


class LatentCodec:
    """The pipeline's autoencoder as a map between images in [-1, 1] and the denoiser's latents."""

    def __init__(self, autoencoder: nn.Module):
        name = type(autoencoder).__name__
        require(name in AUTOENCODER_CLASSES, f"autoencoder {name!r} is not supported; supported: "
                                             f"{list(AUTOENCODER_CLASSES)}")
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.scale = float(getattr(autoencoder.config, "scaling_factor", 1.0) or 1.0)
        self.shift = float(getattr(autoencoder.config, "shift_factor", None) or 0.0)  # SD3's and Flux's VAEs

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
        return ((z - self.shift) * self.scale).float()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] (float32, clamped)."""
        p = next(self.autoencoder.parameters())
        return self.autoencoder.decode(z.to(p.device, p.dtype) / self.scale + self.shift).sample.float().clamp(-1, 1)

    def identity(self) -> str:
        """sha256 of the autoencoder's class, config and weights: part of every latent cache key."""
        return (Hasher(type(self.autoencoder).__name__).text(repr(sorted(dict(self.autoencoder.config).items())))
                .state(self.autoencoder).hexdigest())

    def to(self, device) -> "LatentCodec":
        self.autoencoder.to(device)
        return self




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
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        vocab = backend.to_str() if backend is not None else repr(sorted(self.tokenizer.get_vocab().items()))
        return (Hasher(type(self.text_encoder).__name__).text(repr(sorted(self.text_encoder.config.to_dict().items())))
                .text(vocab).text(str(self.max_length)).state(self.text_encoder).hexdigest())

    def encode_cached(self, prompts, *, cache_dir=None, progress: bool = False) -> tuple[torch.Tensor, str]:
        """The context of each prompt, encoded once (unique prompts) then read from the cache; ``(context, key)``."""
        prompts = [str(p) for p in prompts]
        unique = sorted(set(prompts))
        key = json_sha256({"format": TEXT_FORMAT, "encoder": self.identity(), "prompts": unique}, 32)

        def check(t: dict) -> str | None:
            z = t.get("context")
            ok = z is not None and z.ndim == 3 and len(z) == len(unique) and z.shape[1:] == (self.max_length, self.width)
            return None if ok else f"it holds no [{len(unique)}, {self.max_length}, {self.width}] context"

        tensors, _ = cached("text", key, lambda: {"context": self.encode(unique, progress=progress)}, root=cache_dir,
                            check=check)
        index = {p: i for i, p in enumerate(unique)}
        return tensors["context"][torch.tensor([index[p] for p in prompts], dtype=torch.long)], key

    def to(self, device, dtype=None) -> "TextEncoder":
        self.text_encoder.to(device=device, dtype=dtype)
        return self


__all__ = ["AUTOENCODER_CLASSES", "LatentCodec", "TextEncoder", "require_transformers"]
