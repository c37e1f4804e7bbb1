"""Flux's attention and single-stream block, rewritten for Torch-Pruning's tracer: the same computation, laid out
so that the tracer couples the right channels.

Torch-Pruning 1.6.1 reads a ``cat`` along dim 1 as a concatenation of channels and ignores one along any other dim.
Flux concatenates its text and image tokens along dim 1 (the sequence) of ``[N, L, heads, dim]`` and ``[N, L, C]``
tensors, and its single-stream block concatenates the attention and MLP *channels* along dim 2 of ``[N, L, C]``:
traced as written, the first would be taken for channels (the graph fails to build) and the second for nothing
(``proj_out``'s columns would not follow ``proj_mlp``). Here the sequence concatenations run along dim 2 of
``[N, heads, L, dim]`` (as SD3's processor does) or of an ``[N, 1, L, C]`` view, and the channel one along dim 1 of
``[N, C, L]``. The arithmetic is unchanged (the same projections, norms, rotary embedding and attention on the same
numbers); :func:`traceable` installs the rewrite for the duration of tracing and puts the stock code back.
"""
from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F

from ..errors import DiffPruneError


class TraceableFluxProcessor:
    """``FluxAttnProcessor`` with its concatenations along dims the tracer reads correctly."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        def heads(x, norm=None):  # [N, L, heads * dim] -> [N, heads, L, dim]
            x = x.view(x.shape[0], x.shape[1], -1, attn.head_dim)
            return (x if norm is None else norm(x)).transpose(1, 2)

        q = heads(attn.to_q(hidden_states), attn.norm_q)
        k = heads(attn.to_k(hidden_states), attn.norm_k)
        v = heads(attn.to_v(hidden_states))
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            q = torch.cat([heads(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q), q], dim=2)
            k = torch.cat([heads(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k), k], dim=2)
            v = torch.cat([heads(attn.add_v_proj(encoder_hidden_states)), v], dim=2)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=2)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        out = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1).to(q.dtype)
        if not joint:
            return out
        n = encoder_hidden_states.shape[1]
        text, image = out[:, :n], out[:, n:]
        return attn.to_out[1](attn.to_out[0](image.contiguous())), attn.to_add_out(text.contiguous())


def _sequence_cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.cat([a, b], dim=1)`` of ``[N, L, C]`` tokens, along dim 2 of an ``[N, 1, L, C]`` view."""
    return torch.cat([a.unsqueeze(1), b.unsqueeze(1)], dim=2).squeeze(1)


def _channel_cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.cat([a, b], dim=2)`` of ``[N, L, C]`` tokens, along dim 1 of ``[N, C, L]``."""
    return torch.cat([a.transpose(1, 2), b.transpose(1, 2)], dim=1).transpose(1, 2)


def single_block_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                         joint_attention_kwargs=None):
    """``FluxSingleTransformerBlock.forward`` with the tracer-friendly concatenations."""
    text_seq_len = encoder_hidden_states.shape[1]
    hidden_states = _sequence_cat(encoder_hidden_states, hidden_states)
    residual = hidden_states
    norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
    mlp_hidden_states = self.act_mlp(self.proj_mlp(norm_hidden_states))
    attn_output = self.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb,
                            **(joint_attention_kwargs or {}))
    hidden_states = residual + gate.unsqueeze(1) * self.proj_out(_channel_cat(attn_output, mlp_hidden_states))
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


@contextlib.contextmanager
def traceable(model):
    """Within: every attention of ``model`` runs :class:`TraceableFluxProcessor` and every single-stream block
    :func:`single_block_forward`; afterwards what was there before (nested uses restore in order)."""
    attentions = [b.attn for b in list(model.transformer_blocks) + list(model.single_transformer_blocks)]
    for attn in attentions:
        name = type(attn.processor).__name__
        if name not in ("FluxAttnProcessor", "TraceableFluxProcessor") or getattr(attn, "fused_projections", False):
            raise DiffPruneError(f"Flux attention runs {name}{' with fused projections' if attn.fused_projections else ''}"
                                 "; diffprune traces the stock FluxAttnProcessor: unfuse the projections "
                                 "(unfuse_qkv_projections) and unload IP-adapters before pruning")
    processors = [attn.processor for attn in attentions]
    singles = list(model.single_transformer_blocks)
    forwards = [b.__dict__.get("forward") for b in singles]
    try:
        for attn in attentions:
            attn.processor = TraceableFluxProcessor()
        for block in singles:
            block.forward = types.MethodType(single_block_forward, block)
        yield model
    finally:
        for attn, proc in zip(attentions, processors):
            attn.processor = proc
        for block, fwd in zip(singles, forwards):
            if fwd is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = fwd
