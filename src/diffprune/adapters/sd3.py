"""Adapter for diffusers ``SD3Transformer2DModel``: the MMDiT denoiser of Stable Diffusion 3 and 3.5.

Which widths an SD3 transformer loses, and why:

* **Pruned**: whole attention heads (never the head dim), the MLP hidden width of each stream (``ff`` for the image
  tokens, ``ff_context`` for the text tokens) and the conditioning MLPs (``time_text_embed``: the timestep MLP's
  hidden width, the pooled-text MLP's hidden width, and the width of their sum, the vector every block's
  modulation reads). Each block's joint attention projects both streams into the same heads and attends over their
  concatenation, so a head goes from ``to_q``/``to_k``/``to_v``, ``add_q_proj``/``add_k_proj``/``add_v_proj`` and
  from the inputs of both output projections (``to_out.0``, ``to_add_out``) at once (Torch-Pruning couples the two
  streams through the concatenation; the selection removes whole heads, scored by their mean). SD3.5's second,
  image-only attention (``attn2``, the blocks in ``dual_attention_layers``) loses whole heads the same way. Only
  whole heads go because SD3.5's QK-norm (``qk_norm="rms_norm"``) is an RMSNorm over the head dim, and because the
  text queries (``add_q_proj``) are scaled like the image ones; ``heads`` is written back and the scale is unchanged.
* **Kept**: the residual width (``inner_dim``), shared by every block of both streams: the patch embedding
  (``pos_embed.proj``; the sin-cos position table is a buffer), ``context_embedder``'s output, each block's
  AdaLayerNormZero modulation linears (``norm1.linear``, ``norm1_context.linear``, outputs chunked into
  shift/scale/gate), the attention outputs (``to_out.0``, ``to_add_out``), the MLP outputs, ``norm_out`` and
  ``proj_out``; and the QK-norm weights (over the head dim).
* Conditioning: ``{"context": [N, 333, joint_attention_dim], "pooled": [N, pooled_projection_dim]}``, the
  ``prompt_embeds`` and ``pooled_prompt_embeds`` of ``StableDiffusion3Pipeline.encode_prompt``: 77 CLIP tokens
  followed by 256 T5 tokens (the pipeline's default ``max_sequence_length``), the length MACs and tracing use. The
  model is called with ``timestep`` = ``σ·T`` (:func:`diffprune.objective.model_timesteps`), as the pipeline passes
  its flow-matching scheduler's timesteps.
* Depth pruning (``--method depth``) removes whole blocks; the last block (``context_pre_only``: it has no text
  output) always stays.
"""
from __future__ import annotations

from torch import nn

from . import ADAPTERS, Conditioning, ModelAdapter, _attention, _joint

CONTEXT_LENGTH = 77 + 256  # StableDiffusion3Pipeline: CLIP's 77 tokens, then T5's max_sequence_length (256)


class SD3Adapter(ModelAdapter):
    name = "sd3"
    model_classes = ("SD3Transformer2DModel",)
    sample_arg = "hidden_states"
    flow = ("pos_embed", "time_text_embed", "context_embedder", "transformer_blocks", "norm_out", "proj_out")

    def conditioning(self, model):
        cfg = model.config
        return Conditioning("text", context_dim=int(cfg.joint_attention_dim), context_length=CONTEXT_LENGTH,
                            pooled_dim=int(cfg.pooled_projection_dim))

    def model_kwargs(self, model, cond):
        context, pooled = _joint.text_inputs(self.conditioning(model), cond)
        return {"encoder_hidden_states": context, "pooled_projections": pooled}

    def ignored_layers(self, model):
        keep = [model.pos_embed.proj, model.context_embedder, model.norm_out.linear, model.proj_out]
        for block in model.transformer_blocks:
            keep += [block.norm1.linear, block.norm1_context.linear, block.attn.to_out[0], block.ff.net[-1]]
            keep += [m for m in (getattr(block.attn, "to_add_out", None), block.ff_context and block.ff_context.net[-1],
                                 block.attn2 and block.attn2.to_out[0]) if m is not None]
        return keep + _joint.qk_norm_parameters(_attention.attention_modules(model).values())

    def conditioning_paths(self, model):
        return ["time_text_embed"]

    def num_heads(self, model):
        return {p: int(a.heads) for a in _attention.attention_modules(model).values() for p in _joint.projections(a)}

    def whole_heads(self, model):
        return list(self.num_heads(model))

    def trace_side(self, model):
        return 2 * int(model.config.patch_size)  # 2x2 tokens

    def blocks(self, model):
        return list(model.transformer_blocks)

    def fixed_blocks(self, model):
        return {len(model.transformer_blocks) - 1}  # context_pre_only: the text stream ends there

    block_counts = {"transformer_blocks": "num_layers"}

    def remove_blocks_(self, model, indices):
        gone = set(int(i) for i in indices)
        model.transformer_blocks = nn.ModuleList(b for i, b in enumerate(model.transformer_blocks) if i not in gone)

    def stock_config(self, model, config):  # SD3.5's dual-attention blocks, renumbered among the kept ones
        dual = [i for i, b in enumerate(model.transformer_blocks) if getattr(b, "use_dual_attention", False)]
        return {**super().stock_config(model, config), "dual_attention_layers": dual}

    def snapshot(self, model):
        return {"attention": _attention.snapshot(model)}

    def finalize_(self, model, snapshot, heads=None):
        before = snapshot["attention"]
        heads = {n: _joint.heads_left(n, a, before[n]["dim_head"])
                 for n, a in _attention.attention_modules(model).items()}
        with self.tracing(model):
            attention = _attention.finalize(model, before, heads)
            self.check(model)
        return {"attention": attention}

    def restore_(self, model, meta):
        with self.tracing(model):
            if meta.get("removed_blocks"):  # depth pruning: the attention names below count the kept blocks
                self.remove_blocks_(model, meta["removed_blocks"])
            _attention.write(model, meta.get("attention", {}), fold=None)
            self.check(model)


ADAPTERS.register("sd3")(SD3Adapter())
