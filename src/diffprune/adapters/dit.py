"""Adapter for diffusers ``DiTTransformer2DModel`` (class-conditional latent DiT, adaLN-Zero).

Which widths a DiT loses, and why:

* **Pruned**: each block's attention width (head dims shrink, or whole heads go with ``prune_heads``; ``heads``,
  ``inner_dim`` and the scale are written back as for the UNet, see :mod:`diffprune.adapters._attention`), each
  block's MLP hidden width (``ff.net.0.proj`` out / ``ff.net.2`` in), and each block's conditioning width (the
  timestep MLP, the label embedding and the adaLN input). Together they hold nearly all of a DiT's MACs.
* **Kept**: the residual stream (``inner_dim``). It is shared by the patch embedding, the fixed sin-cos position
  embedding (a buffer, not a parameter), every block's adaLN-Zero modulation (one linear layer whose output is six
  ``inner_dim`` chunks: shift/scale/gate for attention and MLP) and the final layer; pruning it would cut every
  block at once. So ``pos_embed.proj``, each ``norm1.linear`` (the modulation), ``attn1.to_out.0``, ``ff.net.2``,
  ``proj_out_1`` and ``proj_out_2`` never lose output channels, and what they modulate stays consistent.
* Labels ``0 .. num_embeds_ada_norm - 1``; the label table has one more row, the null class ``num_embeds_ada_norm``
  (diffusers' ``DiTPipeline`` uses it for classifier-free guidance). In training mode diffusers drops labels at
  random inside the model; diffprune turns that off and drops labels itself, from its seeded generator
  (``TrainConfig.label_dropout``), so a run is reproducible and the teacher sees the same labels as the student.
* A learned-variance model (``out_channels = 2 * in_channels``, DiT-XL/2) predicts noise in its first half: that is
  the prediction diffprune calibrates, trains and samples with (the variance half is left as it is).
* Depth pruning (``--method depth``) removes whole blocks instead; block 0 always stays, because diffusers' DiT
  feeds the final layer's modulation from block 0's timestep/label embedder.
"""
from __future__ import annotations

from torch import nn

from . import ADAPTERS, Conditioning, ModelAdapter, _attention


def _label_embeddings(model):
    from diffusers.models.embeddings import LabelEmbedding

    return [m for m in model.modules() if isinstance(m, LabelEmbedding)]


class DiTAdapter(ModelAdapter):
    name = "dit"
    model_classes = ("DiTTransformer2DModel",)
    sample_arg = "hidden_states"
    # patch embedding, the blocks (each opens with its timestep/label embedders, norm1.emb), the final layer
    flow = ("pos_embed", "transformer_blocks", "norm_out", "proj_out_1", "proj_out_2")

    def conditioning(self, model):
        n = int(model.config.num_embeds_ada_norm)
        has_null = any(e.embedding_table.num_embeddings > n for e in _label_embeddings(model))
        return Conditioning("class", n, n if has_null else None)

    def prepare_for_training(self, model):
        for emb in _label_embeddings(model):
            emb.dropout_prob = 0.0  # diffprune drops labels itself, from its seeded generator

    def ignored_layers(self, model):
        keep = [model.pos_embed.proj, model.proj_out_1, model.proj_out_2]
        for block in model.transformer_blocks:
            keep += [block.norm1.linear, block.attn1.to_out[0], block.ff.net[-1]]
        return keep

    def conditioning_paths(self, model):
        return [f"transformer_blocks.{i}.norm1.emb" for i in range(len(model.transformer_blocks))]

    def num_heads(self, model):
        return _attention.num_heads(model)

    def trace_side(self, model):
        return 2 * int(model.config.patch_size)  # 2x2 tokens

    def blocks(self, model):
        return list(model.transformer_blocks)

    def fixed_blocks(self, model):
        return {0}  # the final layer's adaLN reads block 0's timestep/label embedder

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


ADAPTERS.register("dit")(DiTAdapter())
