"""Adapter for diffusers ``UNet2DConditionModel``: the text-conditioned UNet of Stable Diffusion 1.x and 2.x.

Everything the ``UNet2DModel`` adapter does holds here too (``conv_out`` kept, GroupNorm groups kept valid,
Up/Downsample2D and ResnetBlock2D channel attributes written back from a forward pass, attention heads/widths/scale
written back with the trained scale folded into ``to_q``). What the text-conditioned UNet adds:

* **Cross-attention** (``attn2``): ``to_q`` reads the hidden states, ``to_k``/``to_v`` read the text context
  (``encoder_hidden_states``, ``cross_attention_dim`` wide). The context is an input of the UNet, made by no layer
  inside it, so the dependency graph never prunes it: ``to_k``/``to_v`` lose output channels (per head, in step with
  ``to_q``), never input ones, and the pruned UNet takes the same text encoder's output as the teacher.
* **GEGLU feed-forward** (``ff.net.0.proj`` -> ``value * gelu(gate)`` -> ``ff.net.2``): the projection's output is
  two halves, value and gate; Torch-Pruning follows the ``chunk`` and removes channel ``i`` of both halves together,
  so the kept value and gate channels stay paired (tested).
* ``Transformer2DModel``'s ``proj_in``/``proj_out`` (1x1 convolutions in SD 1.x, linear layers with SD 2.x's
  ``use_linear_projection``) and its LayerNorms follow its inner width.
* SD 2.x's ``attention_head_dim`` list only shapes the model when it is built; after pruning each attention's heads
  are recorded and written back at load, as for every family.
* Refused with a clear error: SDXL's added conditioning (``addition_embed_type``), class embeddings
  (``class_embed_type``/``num_class_embeds``), an encoder projection (``encoder_hid_dim``) and per-block
  ``cross_attention_dim`` lists: none of them is handled (nor tested) yet.

MACs and tracing use a context of ``context_length`` = 77 tokens (CLIP's, the length SD's pipelines pad to): the
cost of ``to_k``/``to_v`` and of the cross-attention product grows with it.
"""
from __future__ import annotations

from ..errors import DiffPruneError
from . import ADAPTERS, Conditioning
from .unet2d import UNet2DAdapter

CONTEXT_LENGTH = 77  # CLIP's max_position_embeddings: Stable Diffusion pads every prompt to it


class UNet2DConditionAdapter(UNet2DAdapter):
    name = "unet2d-cond"
    model_classes = ("UNet2DConditionModel",)
    context_arg = "encoder_hidden_states"

    def conditioning(self, model):
        cfg = model.config
        unsupported = {"addition_embed_type": cfg.addition_embed_type, "class_embed_type": cfg.class_embed_type,
                       "num_class_embeds": cfg.num_class_embeds, "encoder_hid_dim": cfg.encoder_hid_dim}
        for key, value in unsupported.items():
            if value is not None:
                raise DiffPruneError(
                    f"UNet2DConditionModel with {key}={value!r} is not supported (SDXL's added conditioning, class "
                    "embeddings and encoder projections are not handled yet); diffprune prunes the Stable Diffusion "
                    "1.x/2.x UNet, whose config leaves it None")
        dim = cfg.cross_attention_dim
        if not isinstance(dim, int):
            raise DiffPruneError(f"UNet2DConditionModel cross_attention_dim={dim!r} varies by block, which is not "
                                 "supported; Stable Diffusion 1.x/2.x use one width (768 or 1024)")
        return Conditioning("text", context_dim=int(dim), context_length=CONTEXT_LENGTH)

    def model_kwargs(self, model, cond):
        return {self.context_arg: cond}


ADAPTERS.register("unet2d-cond")(UNet2DConditionAdapter())
