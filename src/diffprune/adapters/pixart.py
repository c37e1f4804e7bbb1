"""Adapter for diffusers ``PixArtTransformer2DModel``: the text-to-image DiT of PixArt-α and PixArt-Σ (adaLN-single).

Which widths a PixArt transformer loses, and why:

* **Pruned**: each block's self-attention (``attn1``) and cross-attention (``attn2``) width: ``to_q``/``to_k``/``to_v``
  outputs per head (head dims shrink, or whole heads go with ``prune_heads``; ``heads``, ``inner_dim`` and the scale
  are written back as for every family, see :mod:`diffprune.adapters._attention`) and ``to_out.0``'s input; each
  block's MLP hidden width (``ff.net.0.proj`` out / ``ff.net.2`` in); and the hidden width of the two conditioning
  MLPs, the conditioning pathways (``PruneConfig.conditioning_floor`` keeps a share of them): the shared timestep
  embedder ``adaln_single.emb`` (``timestep_embedder.linear_1`` out, and at 1024 px the resolution and aspect-ratio
  embedders' ``linear_1``) and the caption projection ``caption_projection.linear_1`` (T5's 4096 -> its hidden width).
* **Kept**: the residual stream (``inner_dim``, 1152 in PixArt-α/Σ). It is shared by the patch embedding
  (``pos_embed.proj``), every block's output (``attn1.to_out.0``, ``attn2.to_out.0``, ``ff.net.2``), the per-block
  ``scale_shift_table`` parameters (``6 x inner_dim``: shift/scale/gate of attention and MLP, added to the shared
  modulation), the shared modulation itself (``adaln_single.linear``, whose ``6 * inner_dim`` output is reshaped into
  those six chunks), the timestep embedding (``timestep_embedder.linear_2``, also added to the final layer's
  ``scale_shift_table``), the final layer (``proj_out``) and the projected caption (``caption_projection.linear_2``,
  viewed as ``inner_dim`` and read by every block's ``attn2.to_k``/``to_v``): these never lose output channels, so
  cross-attention's key/value projections lose output channels only, never input ones. The caption's own width
  (``caption_channels``, T5's 4096) is an input and is never pruned.
* Conditioning: the dict ``{"context": [N, L, caption_channels], "mask": [N, L]}`` (the T5 hidden states and their
  attention mask, 1 keep / 0 padding: ``encoder_hidden_states`` and ``encoder_attention_mask``). MACs and tracing use
  ``context_length`` = 120 tokens, PixArt-α's ``max_sequence_length`` (PixArt-Σ's pipeline pads to 300; the cost of
  the caption projection, ``to_k``/``to_v`` and the cross-attention product grows with it). A model with
  ``use_additional_conditions`` (``sample_size`` 128, PixArt-α 1024 px) also takes the image's resolution and aspect
  ratio; as ``PixArtAlphaPipeline`` does, they are the pixel size of the latents (latent size x 8, the VAE's
  downsampling in every PixArt checkpoint), and None for every other model.
* A learned-sigma model (``out_channels = 2 * in_channels``) predicts noise in its first half: that is the
  prediction diffprune calibrates, trains and samples with (the variance half is left as it is).
* Depth pruning (``--method depth``) removes whole ``transformer_blocks``; none has to stay, because the final layer
  takes its modulation from the shared timestep embedding and the model's own ``scale_shift_table``, not a block's.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from . import ADAPTERS, Conditioning, ModelAdapter, _attention, _text, unwrap

CONTEXT_LENGTH = 120  # PixArtAlphaPipeline's max_sequence_length (T5 tokens); PixArt-Σ's pipeline uses 300
VAE_SCALE = 8  # pixels per latent of the SD VAE every PixArt checkpoint uses (the pipeline's vae_scale_factor)


class PixArtAdapter(ModelAdapter):
    name = "pixart"
    model_classes = ("PixArtTransformer2DModel",)
    sample_arg = "hidden_states"
    # patch embedding, the shared timestep and caption MLPs, the blocks, the final layer
    flow = ("pos_embed", "adaln_single", "caption_projection", "transformer_blocks", "norm_out", "proj_out")

    def conditioning(self, model):
        cfg = model.config
        return Conditioning("text", context_dim=int(cfg.caption_channels or cfg.cross_attention_dim),
                            context_length=CONTEXT_LENGTH, masked=True)

    def model_kwargs(self, model, cond):
        cond = _text.require_form(self.conditioning(unwrap(model)), cond)
        return {"encoder_hidden_states": cond["context"], "encoder_attention_mask": cond["mask"]}

    def forward(self, model, x, t, cond=None):
        """As :meth:`ModelAdapter.forward`, with the resolution conditioning the stock pipeline passes."""
        out = model(**{self.sample_arg: x, "timestep": t}, **self.model_kwargs(model, cond),
                    added_cond_kwargs=self._size_conditions(model, x)).sample
        return out[:, : x.shape[1]]  # learned sigma: the first C channels are the prediction

    def example_inputs(self, model, batch_size=1, device=None, trace=False):
        inputs = super().example_inputs(model, batch_size, device, trace)
        return {**inputs, "added_cond_kwargs": self._size_conditions(model, inputs[self.sample_arg])}

    def _size_conditions(self, model, x: torch.Tensor) -> dict:
        """``added_cond_kwargs``: the image's pixel size and aspect ratio when the model takes them, else None."""
        if not unwrap(model).use_additional_conditions:
            return {"resolution": None, "aspect_ratio": None}
        h, w = x.shape[-2] * VAE_SCALE, x.shape[-1] * VAE_SCALE
        size = torch.tensor([[float(h), float(w)]], device=x.device, dtype=x.dtype).repeat(len(x), 1)
        return {"resolution": size, "aspect_ratio": torch.full((len(x), 1), h / w, device=x.device, dtype=x.dtype)}

    @contextlib.contextmanager
    def tracing(self, model):
        """As :meth:`ModelAdapter.tracing`. Torch-Pruning warns that it would prune the ``scale_shift_table``
        parameters (held by no layer) along their last dimension: that dimension is the residual stream, whose group
        this adapter never prunes (its layers are ignored; tested), so the warning would only mislead."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected", category=UserWarning)
            with super().tracing(model) as traced:
                yield traced

    def ignored_layers(self, model):
        emb = model.adaln_single.emb
        keep = [model.pos_embed.proj, model.proj_out, model.adaln_single.linear, emb.timestep_embedder.linear_2]
        keep += [getattr(emb, n).linear_2 for n in ("resolution_embedder", "aspect_ratio_embedder") if hasattr(emb, n)]
        if model.caption_projection is not None:
            keep.append(model.caption_projection.linear_2)
        for block in model.transformer_blocks:
            keep += [block.attn1.to_out[0], block.ff.net[-1]]
            if block.attn2 is not None:
                keep.append(block.attn2.to_out[0])
        return keep

    def conditioning_paths(self, model):
        return ["adaln_single.emb"] + (["caption_projection"] if model.caption_projection is not None else [])

    def num_heads(self, model):
        return _attention.num_heads(model)

    def trace_side(self, model):
        return 2 * int(model.config.patch_size)  # 2x2 tokens

    def blocks(self, model):
        return list(model.transformer_blocks)

    block_counts = {"transformer_blocks": "num_layers"}

    def remove_blocks_(self, model, indices):
        gone = set(int(i) for i in indices)
        model.transformer_blocks = nn.ModuleList(b for i, b in enumerate(model.transformer_blocks) if i not in gone)

    def snapshot(self, model):
        return {"attention": _attention.snapshot(model)}

    def finalize_(self, model, snapshot, heads=None):
        with self.tracing(model):
            attention = _attention.finalize(model, snapshot["attention"], heads)
            self.check(model)
        return {"attention": attention}

    def restore_(self, model, meta):
        with self.tracing(model):
            if meta.get("removed_blocks"):  # depth pruning: the attention names below count the kept blocks
                self.remove_blocks_(model, meta["removed_blocks"])
            _attention.write(model, meta.get("attention", {}), fold=None)
            self.check(model)


ADAPTERS.register("pixart")(PixArtAdapter())
