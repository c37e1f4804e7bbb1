"""Adapter for diffusers ``FluxTransformer2DModel``: the denoiser of FLUX.1 (dev, schnell).

Which widths a Flux transformer loses, and why:

* **Pruned**: whole attention heads (never the head dim), the MLP hidden widths and the conditioning MLPs. A
  double-stream block's joint attention loses a head from the image projections (``to_q``/``to_k``/``to_v``), the
  text projections (``add_q_proj``/``add_k_proj``/``add_v_proj``) and both output projections' inputs (``to_out.0``,
  ``to_add_out``) together; its MLPs ``ff`` (image) and ``ff_context`` (text) lose hidden channels. A single-stream
  block runs attention and MLP side by side on the joint sequence and ``proj_out`` reads both: it loses whole heads
  (``to_q``/``to_k``/``to_v`` and the matching ``proj_out`` columns) and MLP channels (``proj_mlp`` and the matching
  ``proj_out`` columns). The conditioning MLPs are ``time_text_embed``'s timestep, guidance (``guidance_embeds``)
  and pooled-text embedders, and the width of their sum, the vector every modulation reads. Only whole heads go:
  the rotary embedding (``axes_dims_rope``, which sum to the head dim) and the QK-norm are laid out over the head
  dim, so both stay as trained; ``heads`` is written back, the scale is unchanged.
* **Kept**: the residual width (``inner_dim``) shared by every block of both streams: ``x_embedder`` and
  ``context_embedder`` outputs, each block's modulation linears (``norm1.linear``, ``norm1_context.linear``,
  ``norm.linear``: outputs chunked into shift/scale/gate), the attention and MLP outputs (``to_out.0``,
  ``to_add_out``, ``ff.net.2``, ``ff_context.net.2``, the single blocks' ``proj_out``), ``norm_out`` and
  ``proj_out``; the rotary axes and the QK-norm weights.
* Inputs: ``x_t`` is the *unpacked* latent ``[N, in_channels / 4, H, W]``; :meth:`FluxAdapter.forward` packs it into
  2x2 patches, builds ``img_ids``/``txt_ids`` and unpacks the output as ``FluxPipeline`` does
  (``_pack_latents``, ``_prepare_latent_image_ids``, ``_unpack_latents``). The model is called with ``timestep /
  1000`` (the objective's ``σ·T``, divided as ``FluxPipeline`` divides its scheduler's timesteps) and, for a
  guidance-distilled model (``guidance_embeds``, FLUX.1-dev), ``guidance`` = :attr:`FluxAdapter.guidance_scale`
  (3.5, ``FluxPipeline``'s default) for every training and calibration call (sampling sets it with
  :func:`diffprune.sampling.sample`'s ``guidance_scale``, as ``FluxPipeline``'s); a model without it gets None.
  Flux's config has no sample size: MACs and tracing use ``FluxPipeline``'s default 1024x1024 image (128x128
  latents) unless the config holds a
  ``sample_size`` (the latent side, e.g. ``model.register_to_config(sample_size=64)`` for 512x512; it is saved with
  the config and read back).
* Conditioning: ``{"context": [N, 512, joint_attention_dim], "pooled": [N, pooled_projection_dim]}``, the T5
  ``prompt_embeds`` (``FluxPipeline``'s default ``max_sequence_length`` 512, the length MACs and tracing use) and
  CLIP's ``pooled_prompt_embeds`` of ``FluxPipeline.encode_prompt``.
* Depth pruning (``--method depth``) removes whole double- and single-stream blocks (:meth:`FluxAdapter.blocks`
  lists the double blocks first).
* Tracing: Torch-Pruning reads a ``cat`` or split along dim 1 as one along channels, but Flux concatenates its two
  streams along the sequence there. While tracing (:meth:`FluxAdapter.tracing`), the attention processor and the
  single-stream block run a layout-only rewrite of the same computation (:mod:`diffprune.adapters._flux_trace`).
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from ..errors import DiffPruneError
from . import ADAPTERS, Conditioning, ModelAdapter, _flux_trace, _joint, unwrap

CONTEXT_LENGTH = 512  # FluxPipeline's default max_sequence_length (T5 tokens)
DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline: default_sample_size 128 x vae_scale_factor 8 = 1024 px; latents 128x128


def attentions(model) -> dict[str, nn.Module]:
    """Every attention of the double- and single-stream blocks, by name."""
    return {f"{kind}.{i}.attn": block.attn for kind in ("transformer_blocks", "single_transformer_blocks")
            for i, block in enumerate(getattr(model, kind))}


class FluxAdapter(ModelAdapter):
    name = "flux"
    model_classes = ("FluxTransformer2DModel",)
    sample_arg = "hidden_states"
    flow = ("x_embedder", "time_text_embed", "context_embedder", "transformer_blocks", "single_transformer_blocks",
            "norm_out", "proj_out")
    guidance_scale = 3.5  # FluxPipeline's default, for a guidance-distilled model (config.guidance_embeds)

    def input_shape(self, model):
        cfg = model.config
        if int(cfg.in_channels) % 4 or int(cfg.patch_size) != 1:
            raise DiffPruneError(f"FluxTransformer2DModel with in_channels={cfg.in_channels}, patch_size="
                                 f"{cfg.patch_size} does not take FluxPipeline's packed 2x2 latents; diffprune prunes "
                                 "the FLUX.1 layout (in_channels a multiple of 4, patch_size 1)")
        side = int(cfg.get("sample_size", None) or DEFAULT_SAMPLE_SIZE)
        return int(cfg.in_channels) // 4, side, side

    def conditioning(self, model):
        cfg = model.config
        return Conditioning("text", context_dim=int(cfg.joint_attention_dim), context_length=CONTEXT_LENGTH,
                            pooled_dim=int(cfg.pooled_projection_dim))

    def embedded_guidance(self, model):
        return self.guidance_scale if model.config.guidance_embeds else None

    def image_tokens(self, model):
        _, h, w = self.input_shape(model)
        return (h // 2) * (w // 2)  # packed 2x2: FluxPipeline's image_seq_len

    def sampling_sigmas(self, model, num_inference_steps):
        return np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)  # FluxPipeline's default sigmas

    def packed_inputs(self, model, x: torch.Tensor, t: torch.Tensor, cond, guidance: float | None = None) -> dict:
        """The keyword inputs of one model call for unpacked latents ``x`` ``[N, C, H, W]``, as FluxPipeline makes
        them: packed latents, ``timestep / 1000``, the position ids, the guidance scale when the model takes one
        (``guidance``, default :attr:`guidance_scale`)."""
        context, pooled = _joint.text_inputs(self.conditioning(model), cond)
        n, c, h, w = x.shape
        packed = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)
        img_ids = torch.zeros(h // 2, w // 2, 3, device=x.device, dtype=x.dtype)
        img_ids[..., 1] += torch.arange(h // 2, device=x.device, dtype=x.dtype)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=x.device, dtype=x.dtype)[None, :]
        scale = self.guidance_scale if guidance is None else float(guidance)
        guidance = (torch.full([n], scale, device=x.device, dtype=torch.float32) if model.config.guidance_embeds
                    else None)
        return {"hidden_states": packed, "timestep": torch.as_tensor(t, device=x.device).to(x.dtype).expand(n) / 1000,
                "encoder_hidden_states": context, "pooled_projections": pooled, "guidance": guidance,
                "img_ids": img_ids.reshape(-1, 3), "txt_ids": torch.zeros(context.shape[1], 3, device=x.device,
                                                                          dtype=x.dtype)}

    def forward(self, model, x, t, cond=None, guidance: float | None = None):
        """As :meth:`ModelAdapter.forward`; ``guidance``: a guidance-distilled model's guidance (default
        :attr:`guidance_scale`, what training and calibration use)."""
        if cond is None:
            raise DiffPruneError("this model is conditional: pass text embeddings (a prompt)")
        out = model(**self.packed_inputs(unwrap(model), x, t, cond, guidance)).sample
        n, c, h, w = x.shape
        out = out.view(n, h // 2, w // 2, out.shape[-1] // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(n, out.shape[1], h, w)[:, :c]

    def example_inputs(self, model, batch_size=1, device=None, trace=False):
        p = next(model.parameters())
        device = p.device if device is None else device
        shape = self.trace_shape(model) if trace else self.input_shape(model)
        x = torch.zeros(batch_size, *shape, device=device, dtype=p.dtype)
        return self.packed_inputs(model, x, torch.ones(batch_size, device=device),
                                  self.example_cond(model, batch_size, device, trace))

    def trace_side(self, model):
        return 4  # 2x2 packed tokens

    def check(self, model, device=None):
        inputs = self.trace_inputs(model, device)
        x = inputs["hidden_states"]
        if not x.is_meta:
            x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(0)))
        with torch.no_grad():
            out = model(**inputs).sample
        expected = (*x.shape[:2], int(model.config.out_channels or model.config.in_channels))
        if tuple(out.shape) != expected:
            raise DiffPruneError(f"pruned model outputs shape {tuple(out.shape)}, expected {expected}")
        if not out.is_meta and not torch.isfinite(out).all():
            raise DiffPruneError("pruned model outputs non-finite values (NaN/inf) on a random input")

    @contextlib.contextmanager
    def tracing(self, model):
        with super().tracing(model) as traced, _flux_trace.traceable(model):
            yield traced

    def ignored_layers(self, model):
        keep = [model.x_embedder, model.context_embedder, model.norm_out.linear, model.proj_out]
        for block in model.transformer_blocks:
            keep += [block.norm1.linear, block.norm1_context.linear, block.attn.to_out[0], block.attn.to_add_out,
                     block.ff.net[-1], block.ff_context.net[-1]]
        for block in model.single_transformer_blocks:
            keep += [block.norm.linear, block.proj_out]
        return keep + _joint.qk_norm_parameters(attentions(model).values())

    def conditioning_paths(self, model):
        return ["time_text_embed"]

    def num_heads(self, model):
        return {p: int(a.heads) for a in attentions(model).values() for p in _joint.projections(a)}

    def whole_heads(self, model):
        return list(self.num_heads(model))

    def blocks(self, model):
        return list(model.transformer_blocks) + list(model.single_transformer_blocks)

    block_counts = {"transformer_blocks": "num_layers", "single_transformer_blocks": "num_single_layers"}

    def remove_blocks_(self, model, indices):
        gone, n = set(int(i) for i in indices), len(model.transformer_blocks)
        model.transformer_blocks = nn.ModuleList(b for i, b in enumerate(model.transformer_blocks) if i not in gone)
        model.single_transformer_blocks = nn.ModuleList(b for i, b in enumerate(model.single_transformer_blocks)
                                                        if i + n not in gone)

    def snapshot(self, model):
        return {"attention": {n: {"heads": int(a.heads), "dim_head": int(a.head_dim)}
                              for n, a in attentions(model).items()}}

    def finalize_(self, model, snapshot, heads=None):
        record = {n: {"heads": _joint.heads_left(n, a, snapshot["attention"][n]["dim_head"]),
                      "dim_head": snapshot["attention"][n]["dim_head"]} for n, a in attentions(model).items()}
        self.restore_(model, {"attention": record})
        return {"attention": record}

    def restore_(self, model, meta):
        with self.tracing(model):
            if meta.get("removed_blocks"):  # depth pruning: the attention names below count the kept blocks
                self.remove_blocks_(model, meta["removed_blocks"])
            _write(model, meta.get("attention", {}))
            self.check(model)


def _write(model, record: dict) -> None:
    """Heads and widths of every attention (and each single block's MLP width) written back after pruning."""
    found = attentions(model)
    for name, meta in record.items():
        if name not in found:
            raise DiffPruneError(f"pruning record names attention {name!r}, which this model does not have")
        attn, dim_head = found[name], int(meta["dim_head"])
        if int(attn.head_dim) != dim_head or _joint.heads_left(name, attn, dim_head) != int(meta["heads"]):
            raise DiffPruneError(f"attention {name!r}: the record says {meta['heads']} heads of {dim_head}, the "
                                 f"weights have {attn.to_q.out_features} channels in heads of {attn.head_dim}")
        attn.heads, attn.inner_dim = int(meta["heads"]), attn.to_q.out_features
    for block in model.single_transformer_blocks:  # proj_out reads [attention, MLP]
        block.mlp_hidden_dim = block.proj_mlp.out_features
        block.attn.out_dim = block.attn.inner_dim
        if hasattr(block.proj_out, "_tp_packed_row_blocks"):  # diffusers' tensor-parallel plan reads it
            block.proj_out._tp_packed_row_blocks = [block.attn.inner_dim, block.mlp_hidden_dim]


ADAPTERS.register("flux")(FluxAdapter())
