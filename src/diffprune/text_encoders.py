"""The text encoders of the SDXL, PixArt-α/Σ, SD3 and Flux pipelines, encoding prompts through the stock pipeline's
own ``encode_prompt`` (depended on, never copied).

:class:`StockTextEncoder` builds the family's stock pipeline class with only its text components (tokenizers and text
encoders; every other component None) and calls its ``encode_prompt`` without classifier-free guidance, mapping the
outputs to the denoiser's conditioning dict (:class:`diffprune.adapters.Conditioning`):

* ``StableDiffusionXLPipeline``: ``prompt_embeds`` -> ``context``, ``pooled_prompt_embeds`` -> ``pooled``, and
  ``time_ids`` made by the pipeline's own ``_get_add_time_ids`` for the model's image size (original = target = the
  latent size times the autoencoder's scale factor, crop ``(0, 0)``; :meth:`StockTextEncoder.fit`), as its
  ``__call__`` makes them by default.
* ``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline``: ``prompt_embeds`` -> ``context``, ``prompt_attention_mask`` ->
  ``mask``, ``max_sequence_length`` 120 / 300 and ``clean_caption`` as their ``__call__`` defaults (True, which the
  pipeline itself turns off when ``bs4`` or ``ftfy`` is missing; passed as it would end up, so that it says nothing).
* ``StableDiffusion3Pipeline``: ``prompt_embeds`` / ``pooled_prompt_embeds`` (``max_sequence_length`` 256).
* ``FluxPipeline``: ``prompt_embeds`` / ``pooled_prompt_embeds`` (``max_sequence_length`` 512).

:meth:`StockTextEncoder.null` is the unconditional branch the stock pipeline guides against: the negative outputs of
``encode_prompt`` for the empty prompt with guidance on (SDXL: zeros when the pipeline's
``force_zeros_for_empty_prompt`` is set, as SDXL-base's is; PixArt, SD3: the empty prompt's encoding). Flux-dev has no
negative branch (its guidance is embedded in the transformer): its ``null()`` is the empty prompt's encoding, what
``FluxPipeline`` guides against with ``true_cfg_scale > 1`` and ``negative_prompt=""``, and what caption dropout trains.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import logging
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import torch

from . import _cond
from ._cache import cached
from ._hashing import Hasher, json_sha256
from .components import TEXT_FORMAT
from .errors import DiffPruneError, require


def _sdxl(pipe, prompts, device, null: bool) -> dict:
    pe, npe, ppe, nppe = pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=null)
    return {"context": npe, "pooled": nppe} if null else {"context": pe, "pooled": ppe}


def _clean_caption() -> bool:
    """PixArt's ``__call__`` default ``clean_caption=True`` as it ends up: off without ``bs4`` or ``ftfy``."""
    from diffusers.utils import is_bs4_available, is_ftfy_available

    return is_bs4_available() and is_ftfy_available()


def _pixart(pipe, prompts, device, null: bool, max_sequence_length: int) -> dict:
    pe, pm, npe, npm = pipe.encode_prompt(prompts, do_classifier_free_guidance=null, negative_prompt="", device=device,
                                          clean_caption=_clean_caption(), max_sequence_length=max_sequence_length)
    return {"context": npe, "mask": npm} if null else {"context": pe, "mask": pm}


def _sd3(pipe, prompts, device, null: bool, max_sequence_length: int) -> dict:
    pe, npe, ppe, nppe = pipe.encode_prompt(prompts, None, None, device=device, do_classifier_free_guidance=null,
                                            max_sequence_length=max_sequence_length)
    return {"context": npe, "pooled": nppe} if null else {"context": pe, "pooled": ppe}


def _flux(pipe, prompts, device, null: bool, max_sequence_length: int) -> dict:
    pe, ppe, _ = pipe.encode_prompt(prompts, None, device=device, max_sequence_length=max_sequence_length)
    return {"context": pe, "pooled": ppe}  # null: the empty prompt's (Flux-dev's embedded guidance has no negative)


@dataclass(frozen=True)
class PromptEncoding:
    """How one stock pipeline class encodes prompts: ``call(pipe, prompts, device, null, **options)`` -> the text
    tensors; ``limits``: each tokenizer's component name and token limit (None: its ``model_max_length``);
    ``keys``: the text tensors it gives; ``time_ids``: whether the conditioning also holds SDXL's micro-conditioning
    ids (added after the cache); ``options``: the ``encode_prompt`` options of the stock ``__call__``."""

    call: Callable
    limits: tuple[tuple[str, int | None], ...]
    keys: tuple[str, ...] = ("context", "pooled")
    options: dict = field(default_factory=dict)
    time_ids: bool = False


ENCODINGS = {
    "StableDiffusionXLPipeline": PromptEncoding(_sdxl, (("tokenizer", None), ("tokenizer_2", None)), time_ids=True),
    "PixArtAlphaPipeline": PromptEncoding(_pixart, (("tokenizer", 120),), ("context", "mask"),
                                          {"max_sequence_length": 120}),
    "PixArtSigmaPipeline": PromptEncoding(_pixart, (("tokenizer", 300),), ("context", "mask"),
                                          {"max_sequence_length": 300}),
    "StableDiffusion3Pipeline": PromptEncoding(_sd3, (("tokenizer", None), ("tokenizer_2", None), ("tokenizer_3", 256)),
                                               options={"max_sequence_length": 256}),
    "FluxPipeline": PromptEncoding(_flux, (("tokenizer", None), ("tokenizer_2", 512)),
                                   options={"max_sequence_length": 512}),
}


def text_pipeline(pipeline_class: str, modules: dict, config: dict | None = None):
    """The stock pipeline ``pipeline_class`` holding only ``modules`` (its tokenizers and text encoders; every other
    component None) and the pipeline options in ``config`` (``model_index.json``'s, e.g. SDXL's
    ``force_zeros_for_empty_prompt``). SDXL's invisible watermark is off: it only marks decoded images."""
    import diffusers

    cls = getattr(diffusers, pipeline_class)
    params = inspect.signature(cls.__init__).parameters
    kwargs = {n: None for n, p in params.items() if n != "self" and p.default is inspect.Parameter.empty
              and p.kind is p.POSITIONAL_OR_KEYWORD}
    kwargs.update({k: v for k, v in (config or {}).items() if k in params and not isinstance(v, list)})
    kwargs.update(modules)
    if "add_watermarker" in params:
        kwargs["add_watermarker"] = False
    return cls(**kwargs)


@contextlib.contextmanager
def _quiet(pipe):
    """The stock pipeline's own truncation warnings silenced (the encoder says it once, counted)."""
    logger = logging.getLogger(type(pipe).__module__)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class StockTextEncoder:
    """A text-to-image pipeline's tokenizers and text encoders as a map from prompts to the denoiser's conditioning
    dict, through the stock pipeline's ``encode_prompt`` (see the module docstring). Same interface as
    :class:`diffprune.components.TextEncoder`: :meth:`encode`, :meth:`null`, :meth:`encode_cached`,
    :meth:`sampling_inputs`, :meth:`identity`, :meth:`check_fits`, :meth:`to`. Outputs are float32 on the CPU (a
    mask stays int64). Prompts longer than a tokenizer takes are truncated as the stock pipeline truncates them, and
    every call that truncates says how many on stderr (:attr:`truncated` counts them)."""

    def __init__(self, pipeline_class: str, modules: dict, config: dict | None = None):
        require(pipeline_class in ENCODINGS, f"no stock prompt encoding for {pipeline_class!r}; supported: "
                                             f"{sorted(ENCODINGS)}")
        self.pipeline_class, self.encoding = pipeline_class, ENCODINGS[pipeline_class]
        self.config = {k: v for k, v in (config or {}).items() if not k.startswith("_") and not isinstance(v, list)}
        self.pipe = text_pipeline(pipeline_class, modules, self.config)
        self.encoders = {k: m.eval().requires_grad_(False) for k, m in modules.items()
                         if isinstance(m, torch.nn.Module)}
        self.tokenizers = {k: m for k, m in modules.items() if k not in self.encoders}
        self.time_ids: torch.Tensor | None = None
        self.truncated = 0
        self._null = None

    @property
    def device(self) -> torch.device:
        return next(next(iter(self.encoders.values())).parameters()).device

    def fit(self, denoiser, image_size: tuple[int, int]) -> None:
        """Bind what the conditioning needs from the denoiser and the image size ``(height, width)`` in pixels: SDXL's
        ``time_ids`` from ``StableDiffusionXLPipeline._get_add_time_ids`` (which checks them against the UNet's
        ``add_embedding``); nothing for the other families."""
        if not self.encoding.time_ids:
            return
        size = tuple(int(v) for v in image_size)
        proj = int(self.encoders["text_encoder_2"].config.projection_dim)
        try:
            self.time_ids = type(self.pipe)._get_add_time_ids(SimpleNamespace(unet=denoiser), size, (0, 0), size,
                                                              torch.float32, text_encoder_projection_dim=proj)
        except ValueError as e:
            raise DiffPruneError(f"the UNet does not fit the pipeline's text_encoder_2 ({e}); use the text encoders "
                                 "the UNet was trained with") from None

    def _call(self, prompts: list[str], null: bool) -> dict:
        with _quiet(self.pipe), torch.no_grad():
            out = self.encoding.call(self.pipe, prompts, self.device, null, **self.encoding.options)
        return {k: (v.float() if v.is_floating_point() else v).cpu() for k, v in out.items()}

    def _with_time_ids(self, out: dict) -> dict:
        if not self.encoding.time_ids:
            return out
        require(self.time_ids is not None, "SDXL's time_ids need the image size: call fit(unet, (height, width)) "
                                           "first (load_model does)")
        return {**out, "time_ids": self.time_ids.expand(len(out["context"]), -1).clone()}

    def _say_truncated(self, prompts: list[str]) -> None:
        texts = prompts  # as the pipeline tokenizes them: PixArt lower-cases and strips (or cleans) them first
        if hasattr(self.pipe, "_text_preprocessing"):
            texts = self.pipe._text_preprocessing(prompts, clean_caption=_clean_caption())
        limits = [(name, self.tokenizers[name], n or int(self.tokenizers[name].model_max_length))
                  for name, n in self.encoding.limits]
        lengths = [[len(ids) for ids in tok(texts).input_ids] for _, tok, _ in limits]
        cut = sum(any(lens[i] > n for lens, (_, _, n) in zip(lengths, limits)) for i in range(len(texts)))
        if cut:
            self.truncated += cut
            said = ", ".join(f"{name}: {n}" for name, _, n in limits)
            print(f"diffprune: {cut} of {len(prompts)} prompt(s) are longer than the text encoders take ({said} "
                  "tokens) and were truncated, as the stock pipeline truncates them", file=sys.stderr)

    def encode(self, prompts, batch_size: int = 64, progress: bool = False) -> dict:
        """The conditioning dict of ``prompts`` (one row each), as the stock pipeline's ``encode_prompt`` gives it."""
        from tqdm.auto import tqdm

        prompts = [str(p) for p in prompts]
        require(len(prompts) >= 1, "no prompts to encode")
        self._say_truncated(prompts)
        chunks = [self._call(prompts[i:i + batch_size], null=False) for i in
                  tqdm(range(0, len(prompts), batch_size), desc="encoding prompts", disable=not progress)]
        return self._with_time_ids(_cond.cat(chunks))

    def null(self) -> dict:
        """The unconditional conditioning ``[1, ...]`` the stock pipeline guides against (see the module docstring)."""
        if self._null is None:
            self._null = self._call([""], null=True)
        return self._with_time_ids(self._null)

    def sampling_inputs(self, prompts, guidance_scale: float) -> tuple[dict, dict | None]:
        """``(prompt_embeds, negative_prompt_embeds)``: one conditioning per prompt, and :meth:`null` when guiding."""
        return self.encode(prompts), (self.null() if guidance_scale != 1 else None)

    def check_fits(self, spec) -> None:
        """The encoders' outputs must have the keys and widths the denoiser takes (a one-line error otherwise)."""
        spec.check_context(self.null(), f"the {self.pipeline_class}'s text encoders' output")

    def identity(self) -> str:
        """sha256 of the pipeline class, its prompt options, the tokenizers and the text encoders (class, config,
        weights): part of every text cache key (SDXL's time_ids are added after the cache, not cached)."""
        h = Hasher(self.pipeline_class).text(json.dumps({"options": self.encoding.options, "config": self.config},
                                                        sort_keys=True, default=str))
        for name in sorted(self.tokenizers):
            tok = self.tokenizers[name]
            backend = getattr(tok, "backend_tokenizer", None)
            h.text(name).text(backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items())))
            h.text(str(tok.model_max_length))
        for name in sorted(self.encoders):
            enc = self.encoders[name]
            h.text(name).text(type(enc).__name__).text(repr(sorted(enc.config.to_dict().items()))).state(enc)
        return h.hexdigest()

    def encode_cached(self, prompts, *, cache_dir=None, progress: bool = False) -> tuple[dict, str]:
        """The conditioning of each prompt, encoded once (unique prompts) then read from the cache; ``(cond, key)``."""
        prompts = [str(p) for p in prompts]
        unique = sorted(set(prompts))
        key = json_sha256({"format": TEXT_FORMAT, "encoder": self.identity(), "prompts": unique}, 32)

        def compute() -> dict:
            out = self.encode(unique, progress=progress)
            return {k: out[k] for k in self.encoding.keys}

        def check(t: dict) -> str | None:
            ok = set(t) == set(self.encoding.keys) and all(len(v) == len(unique) for v in t.values())
            return None if ok else f"it holds no {list(self.encoding.keys)} for {len(unique)} prompts"

        tensors, _ = cached("text", key, compute, root=cache_dir, check=check)
        row = {p: i for i, p in enumerate(unique)}
        index = torch.tensor([row[p] for p in prompts], dtype=torch.long)
        return self._with_time_ids(_cond.take(tensors, index)), key

    def to(self, device, dtype=None) -> "StockTextEncoder":
        for m in self.encoders.values():
            m.to(device=device, dtype=dtype)
        return self


__all__ = ["ENCODINGS", "PromptEncoding", "StockTextEncoder", "text_pipeline"]
