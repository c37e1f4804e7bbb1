"""Model adapters: everything model-specific lives here, one adapter per model family.

An adapter owns the *denoiser contract* that the rest of diffprune calls, and never names a model class outside this
package:

* **calling the model**: :meth:`ModelAdapter.forward` turns ``(x_t, t, cond)`` into the model's prediction, shaped
  like ``x_t`` (a learned-variance head's extra channels are dropped); ``cond`` is the conditioning tensor (class
  labels ``[N]``, or text-encoder hidden states ``[N, L, D]``) or None. :meth:`ModelAdapter.conditioning` says what
  the model takes (:class:`Conditioning`), :meth:`ModelAdapter.input_shape` the shape of ``x_t``, and
  :meth:`ModelAdapter.example_inputs` one call's keyword inputs, conditioning included, for tracing and MAC
  counting. What the prediction *is* (``epsilon``, ``v_prediction``, ``sample``) is the scheduler's
  ``prediction_type``; :mod:`diffprune.objective` turns it into the training and calibration target.
* **surgery**: which layers are never pruned, how attention projections group into heads, and how to put a pruned
  model back in a consistent state (attributes that mirror shapes, attention heads and scale), replayed at load.

``ADAPTERS`` is a named registry; :func:`adapter_for` picks the adapter by the model's class. Pipelines (which
component is the denoiser, the autoencoder, the stock pipeline class) are in :mod:`diffprune.adapters.pipelines`.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .._torch import eval_mode
from ..errors import DiffPruneError
from ..registry import Registry

# imported on first use; each registers its adapter
FAMILY_MODULES = ("unet2d", "unet2d_condition", "dit", "pixart", "sd3", "flux")
TRACE_TOKENS = 8  # the context length of tracing inputs (ModelAdapter.trace_inputs)


@dataclass(frozen=True)
class Conditioning:
    """What a conditional denoiser takes besides ``(x_t, t)``: its ``cond``, whose first dimension is the batch.

    ``kind="class"``: integer labels ``[N]``, valid ``0 .. num_classes - 1``; ``null_label``: the label of the
    unconditional branch (classifier-free guidance, label dropout), or None when the model has none.
    ``kind="text"``: text-encoder hidden states ``[N, L, context_dim]`` (``encoder_hidden_states``); the
    unconditional branch is the empty prompt's, which the pipeline's text encoder makes (not the denoiser);
    ``context_length``: the ``L`` that MACs are counted and tracing runs with. A text family that takes more than
    the context (SDXL, SD3, Flux: a pooled text embedding ``[N, pooled_dim]``; PixArt: the context's attention mask
    ``[N, L]``, 1 keep / 0 padding; SDXL: also its ``time_ids`` micro-conditioning ``[N, time_ids]``, original size,
    crop and target size, made by the pipeline side, which knows the image size) takes a dict ``{"context": ...,
    "pooled": ..., "mask": ..., "time_ids": ...}`` holding exactly the keys it declares (:attr:`keys`); batch
    operations on either form are in :mod:`diffprune._cond`.
    """

    kind: str
    num_classes: int = 0
    null_label: int | None = None
    context_dim: int | None = None
    context_length: int | None = None
    pooled_dim: int | None = None
    masked: bool = False
    time_ids: int = 0

    @property
    def keys(self) -> tuple[str, ...] | None:
        """The dict keys a text family takes (None: a bare context tensor)."""
        if self.kind != "text" or (self.pooled_dim is None and not self.masked and not self.time_ids):
            return None
        return (("context",) + (("pooled",) if self.pooled_dim is not None else ()) + (("mask",) if self.masked else ())
                + (("time_ids",) if self.time_ids else ()))

    def check_labels(self, labels: torch.Tensor, what: str = "class labels") -> torch.Tensor:
        labels = torch.as_tensor(labels, dtype=torch.long)
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if len(bad):
            raise DiffPruneError(f"{what} {sorted(set(bad.tolist()))[:5]} are out of range: this model has "
                                 f"{self.num_classes} classes (0..{self.num_classes - 1})")
        return labels

    def check_context(self, context, what: str = "text embeddings"):
        """``context`` checked against what the model takes, features as float32 (a mask stays as given)."""
        keys = self.keys
        if keys is None:
            context = torch.as_tensor(context).float()
            if context.ndim != 3 or context.shape[-1] != self.context_dim:
                raise DiffPruneError(f"{what} have shape {tuple(context.shape)}, but this model's cross-attention "
                                     f"takes [N, tokens, {self.context_dim}]; use the text encoder its pipeline was "
                                     "trained with")
            return context
        if not isinstance(context, dict) or set(context) != set(keys):
            got = sorted(context) if isinstance(context, dict) else type(context).__name__
            raise DiffPruneError(f"{what}: this model takes a dict with keys {list(keys)}, got {got}; encode the "
                                 "prompts with its pipeline's text encoders")
        out = {k: torch.as_tensor(v) for k, v in context.items()}
        n = len(out["context"])
        expected = {"context": (n, None, self.context_dim), "pooled": (n, self.pooled_dim), "mask": (n, None),
                    "time_ids": (n, self.time_ids)}
        for k, v in out.items():
            shape = expected[k]
            if v.ndim != len(shape) or any(e is not None and e != d for e, d in zip(shape, v.shape)):
                raise DiffPruneError(f"{what}[{k!r}] has shape {tuple(v.shape)}, but this model takes "
                                     f"{tuple('N' if i == 0 else ('any' if e is None else e) for i, e in enumerate(shape))}"
                                     "; use the text encoders its pipeline was trained with")
        return {k: v if k == "mask" else v.float() for k, v in out.items()}

    def example(self, batch_size: int, device=None, dtype=torch.float32, length: int | None = None):
        """A valid conditioning for ``batch_size`` inputs: labels 0, 1, 2, ... or an all-zero context of ``length``
        tokens (default :attr:`context_length`; a dict with an all-zero pooled embedding and an all-ones mask for the
        families that take them)."""
        if self.kind != "text":
            return (torch.arange(batch_size) % self.num_classes).to(device)
        length = self.context_length if length is None else length
        context = torch.zeros(batch_size, length, self.context_dim, device=device, dtype=dtype)
        if self.keys is None:
            return context
        out = {"context": context}
        if self.pooled_dim is not None:
            out["pooled"] = torch.zeros(batch_size, self.pooled_dim, device=device, dtype=dtype)
        if self.masked:
            out["mask"] = torch.ones(batch_size, length, device=device, dtype=torch.long)
        if self.time_ids:
            out["time_ids"] = torch.zeros(batch_size, self.time_ids, device=device, dtype=dtype)
        return out

    def null(self) -> torch.Tensor | None:
        """The unconditional ``cond`` of one input (``[1, ...]``) when the denoiser itself defines it, else None."""
        return None if self.kind != "class" or self.null_label is None else torch.tensor([self.null_label])

    @property
    def what(self) -> str:
        return "text embeddings (a prompt)" if self.kind == "text" else "class labels"


class ModelAdapter:
    """The denoiser contract and the surgery of one model family (see the module docstring)."""

    name: str = ""
    model_classes: tuple[str, ...] = ()
    sample_arg: str = "sample"  # the name of x_t in the model's forward()
    label_arg: str = "class_labels"
    flow: tuple[str, ...] = ()  # top-level module names from input to output (see layer_order)

    # --- the denoiser contract ------------------------------------------------------------------------------------
    def input_shape(self, model: nn.Module) -> tuple[int, int, int]:
        """``(channels, height, width)`` of ``x_t`` (latents for latent models), from the model config."""
        cfg = model.config
        s = cfg.sample_size
        h, w = (s, s) if isinstance(s, int) else tuple(s)
        return int(cfg.in_channels), int(h), int(w)

    def conditioning(self, model: nn.Module) -> Conditioning | None:
        """What the model is conditioned on (None: unconditional)."""
        return None

    def model_kwargs(self, model: nn.Module, cond) -> dict:
        return {} if cond is None else {self.label_arg: cond}

    def forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        """The prediction for ``x`` at timesteps ``t`` (``[N]``), shaped like ``x``. ``model`` may be wrapped for
        data-parallel training (DDP) or compiled; it is called as it is."""
        spec = self.conditioning(unwrap(model))
        if (spec is None) != (cond is None):
            raise DiffPruneError(f"this model is conditional: pass {spec.what}" if spec is not None else
                                 "this model is unconditional: it takes no conditioning")
        out = model(**{self.sample_arg: x, "timestep": t}, **self.model_kwargs(model, cond)).sample
        return out[:, : x.shape[1]]  # a learned-variance head (e.g. DiT's) outputs 2C channels: the prediction is C

    def example_cond(self, model: nn.Module, batch_size: int = 1, device=None, trace: bool = False):
        """A valid conditioning tensor for ``batch_size`` inputs (:meth:`Conditioning.example`; ``trace``: a context
        of :data:`TRACE_TOKENS` tokens at most), or None."""
        spec = self.conditioning(model)
        if spec is None:
            return None
        length = min(spec.context_length, TRACE_TOKENS) if trace and spec.context_length else None
        return spec.example(batch_size, device, next(model.parameters()).dtype, length)

    def example_inputs(self, model: nn.Module, batch_size: int = 1, device=None, trace: bool = False) -> dict:
        """Keyword inputs of one forward call, conditioning included (shapes from the model config); ``trace``:
        the small inputs of :meth:`trace_inputs`."""
        p = next(model.parameters())
        device = p.device if device is None else device
        shape = self.trace_shape(model) if trace else self.input_shape(model)
        x = torch.zeros(batch_size, *shape, device=device, dtype=p.dtype)
        t = torch.ones(batch_size, dtype=torch.long, device=device)
        return {self.sample_arg: x, "timestep": t,
                **self.model_kwargs(model, self.example_cond(model, batch_size, device, trace))}

    def trace_inputs(self, model: nn.Module, device=None) -> dict:
        """Inputs of the one call Torch-Pruning traces (with autograd on) to build the dependency graph, and of the
        shape checks after pruning: the smallest image the family takes and a short context. The graph does not
        depend on the number of pixels or tokens, but the traced call's memory does: at 1024 px (4,096 tokens)
        PixArt-Σ's trace held 7× its bfloat16 weights."""
        return self.example_inputs(model, 1, device, trace=True)

    def trace_side(self, model: nn.Module) -> int:
        """The side of :meth:`trace_shape`: twice the model's total downsampling (a UNet's resamplers)."""
        return 2 * 2 ** (len(model.config.block_out_channels) - 1)

    def trace_shape(self, model: nn.Module) -> tuple[int, int, int]:
        """``(channels, height, width)`` of the tracing input: :meth:`input_shape` with each side at most
        :meth:`trace_side`."""
        c, h, w = self.input_shape(model)
        side = self.trace_side(model)
        return c, min(h, side), min(w, side)

    # --- how the stock pipeline samples (read by diffprune.sampling) -------------------------------------------------
    def embedded_guidance(self, model: nn.Module) -> float | None:
        """The default guidance of a guidance-distilled model, which takes it as an input (:meth:`forward`'s
        ``guidance``) instead of classifier-free guidance; None for every other model."""
        return None

    def image_tokens(self, model: nn.Module) -> int:
        """How many image tokens the denoiser sees (``x_t``'s positions per patch): the sequence length from which a
        flow-matching pipeline's resolution-dependent shift is computed."""
        _, h, w = self.input_shape(model)
        p = int(model.config.get("patch_size", None) or 1)
        return (h // p) * (w // p)

    def sampling_sigmas(self, model: nn.Module, num_inference_steps: int):
        """The flow-matching sigmas the family's stock pipeline passes its scheduler (None: the scheduler's own)."""
        return None

    def layer_order(self, name: str) -> tuple:
        """A sort key putting layer ``name`` in input-to-output order, for per-layer plots: its top-level module's
        place in :attr:`flow`, then its block number (``down_blocks.2...`` -> 2); a stable sort keeps the recorded
        order within a block. A family that declares no flow keeps the recorded order (every key ``()``)."""
        if not self.flow:
            return ()
        parts = name.split(".")
        head = self.flow.index(parts[0]) if parts[0] in self.flow else len(self.flow)
        block = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1
        return head, block

    def prepare_for_training(self, model: nn.Module) -> None:
        """Make the model's training-mode forward deterministic given diffprune's own random draws."""

    # --- what to keep and how widths group ------------------------------------------------------------------------
    def ignored_layers(self, model: nn.Module) -> list[nn.Module]:
        """Layers whose output channels must never be pruned (e.g. the output convolution)."""
        raise NotImplementedError

    def conditioning_paths(self, model: nn.Module) -> list[str]:
        """Module names (prefixes) of the conditioning pathways (timestep and class embedders, adaLN inputs): computed
        once per sample, parameter-heavy and MAC-cheap; ``PruneConfig.conditioning_floor`` keeps a share of them."""
        return []

    def num_heads(self, model: nn.Module) -> dict[nn.Module, int]:
        """Projection layer -> number of attention heads, for per-head-consistent pruning."""
        return {}

    def whole_heads(self, model: nn.Module) -> list[nn.Module]:
        """Projection layers of the attentions whose head dim is fixed (rotary embeddings, a QK-norm over the head
        dim): the channel selection removes whole heads from them, never the same positions in every head."""
        return []

    def blocks(self, model: nn.Module) -> list[nn.Module] | None:
        """The blocks that depth pruning may remove whole (None: this family has none)."""
        return None

    def fixed_blocks(self, model: nn.Module) -> set[int]:
        """Indices into :meth:`blocks` that must stay (e.g. a block whose layers others use)."""
        return set()

    def remove_blocks_(self, model: nn.Module, indices) -> None:
        """Remove the blocks ``indices`` (into :meth:`blocks`) from ``model`` in place."""
        raise NotImplementedError

    # the block lists depth pruning shortens, each with the config key that counts it (the stock layout)
    block_counts: dict[str, str] = {}
    # whether the stock config can express pruned widths (a channel method in the stock layout: width_tie)
    stock_widths: bool = False
    stock: bool = False  # the channel selection keeps what the stock config can express (stock_layout)

    def stock_layout(self) -> "ModelAdapter":
        """This adapter as the channel selection of the stock layout sees it: a copy with :attr:`stock` set, whose
        :meth:`width_tie` groups and :meth:`whole_heads` keep what the stock config can express."""
        twin = copy.copy(self)
        twin.stock = True
        return twin

    def width_tie(self, model: nn.Module, name: str) -> str | None:
        """Stock layout (:attr:`stock_widths`): the config width that sets the width of the channel group rooted at
        layer ``name`` (e.g. ``"level 1"``: every group of one key keeps the same width); None: not expressible."""
        return None

    def tie_widths(self, model: nn.Module, key: str, width: int) -> list[int] | None:
        """The widths the stock config allows for tie ``key`` (``width`` unpruned), or None: any multiple of what its
        groups' GroupNorm groups and heads need."""
        return None

    def tie_chunks(self, model: nn.Module, name: str) -> int:
        """Stock layout: into how many equal chunks the outputs of layer ``name`` fall that lose the same positions
        (2 for a gated feed-forward's projection, value and gate), beyond its GroupNorm groups and heads."""
        return 1

    def choose_widths(self, model: nn.Module, options: dict[str, tuple[list[int], float]]) -> dict[str, int]:
        """Stock layout: the width of each tie key, given ``(allowed widths, the mean width its groups kept under the
        selection)``: the nearest allowed one (a family whose config ties keys to each other overrides this)."""
        return {key: min(allowed, key=lambda w: (abs(w - kept), -w)) for key, (allowed, kept) in options.items()}

    def stock_config(self, model: nn.Module, config: dict) -> dict | None:
        """The stock diffusers config that builds ``model`` as it is now (pruned from ``config``), or None where this
        family's stock config cannot express what pruning did. What it can: removed whole blocks (the counts in
        :attr:`block_counts`). The caller checks the result builds ``model``'s exact shapes."""
        if not self.block_counts:
            return None
        return {**config, **{key: len(getattr(model, attr)) for attr, key in self.block_counts.items()}}

    # --- consistency after pruning and at load ------------------------------------------------------------------
    def snapshot(self, model: nn.Module) -> dict:
        """State needed by :meth:`finalize_`, taken before pruning."""
        return {}

    def finalize_(self, model: nn.Module, snapshot: dict, heads: dict[str, int] | None = None) -> dict:
        """Make a just-pruned model consistent; return the replayable metadata (JSON-able)."""
        raise NotImplementedError

    def restore_(self, model: nn.Module, meta: dict) -> None:
        """Apply metadata from :meth:`finalize_` to a model whose shapes were replayed (at load time)."""
        raise NotImplementedError

    def check(self, model: nn.Module, device=None) -> None:
        """Run one forward pass on a random input; raise DiffPruneError if its shape is wrong or it is not finite
        (a model on the meta device, a MAC probe's shapes-only copy, is checked for shapes only)."""
        inputs = self.trace_inputs(model, device)
        x = inputs[self.sample_arg]
        if not x.is_meta:
            x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(0)))
        with torch.no_grad():
            out = model(**inputs).sample
        expected = (1, int(model.config.out_channels or x.shape[1]), *x.shape[2:])
        if tuple(out.shape) != expected:
            raise DiffPruneError(f"pruned model outputs shape {tuple(out.shape)}, expected {expected}")
        if not out.is_meta and not torch.isfinite(out).all():
            raise DiffPruneError("pruned model outputs non-finite values (NaN/inf) on a random input")

    @contextlib.contextmanager
    def tracing(self, model: nn.Module) -> Iterator[nn.Module]:
        """Context in which the model can be traced by Torch-Pruning: eval mode, gradient checkpointing off
        (a checkpoint wrapper hides the layers inside it from the tracer), every parameter requiring gradients
        (the tracer follows autograd's graph: a frozen model would look like one with no coupled layers). Frozen
        parameters are frozen again afterwards, by name (pruning replaces the tensors)."""
        ckpt = bool(getattr(model, "is_gradient_checkpointing", False))
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        if ckpt:
            model.disable_gradient_checkpointing()
        try:
            model.requires_grad_(True)
            with eval_mode(model):
                yield model
        finally:
            for n, p in model.named_parameters():
                p.requires_grad_(n not in frozen)
            if ckpt:
                model.enable_gradient_checkpointing()


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / torch.compile wrappers (the one with the diffusers ``config``)."""
    while not hasattr(model, "config"):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            break
        model = inner
    return model


ADAPTERS: Registry[ModelAdapter] = Registry("model adapter")


def _load_families() -> None:
    for name in FAMILY_MODULES:
        importlib.import_module(f"{__name__}.{name}")


def supported_classes() -> list[str]:
    _load_families()
    return sorted(c for key in ADAPTERS for c in ADAPTERS.get(key).model_classes)


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The registered adapter for ``type(model)`` (matched by class name along its MRO)."""
    _load_families()
    names = [c.__name__ for c in type(unwrap(model)).__mro__]
    for key in ADAPTERS:
        adapter = ADAPTERS.get(key)
        if any(n in adapter.model_classes for n in names):
            return adapter
    raise DiffPruneError(f"no pruning adapter for model class {type(model).__name__!r}; supported: "
                         f"{supported_classes()}")


def resolve_adapter(model: nn.Module, adapter: ModelAdapter | None = None) -> ModelAdapter:
    """``adapter`` when the caller resolved it already (once per command, handed down), else the model's own: what
    a public function that takes a bare model calls."""
    return adapter if adapter is not None else adapter_for(model)


def adapter_named(name: str | None) -> ModelAdapter | None:
    """The adapter registered as ``name`` (a ``pruning.json``'s ``family``), or None when none is."""
    _load_families()
    return ADAPTERS.get(name) if name in ADAPTERS else None


def adapter_for_class_name(class_name: str) -> ModelAdapter:
    """The adapter for a model class name as written in a diffusers ``config.json`` (``_class_name``)."""
    _load_families()
    for key in ADAPTERS:
        adapter = ADAPTERS.get(key)
        if class_name in adapter.model_classes:
            return adapter
    raise DiffPruneError(f"no pruning adapter for model class {class_name!r}; supported: {supported_classes()}")


__all__ = ["ADAPTERS", "Conditioning", "ModelAdapter", "adapter_for", "adapter_for_class_name", "adapter_named",
           "resolve_adapter", "supported_classes"]
