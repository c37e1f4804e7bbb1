"""Adapter for diffusers ``UNet2DConditionModel``: the text-conditioned UNet of Stable Diffusion 1.x, 2.x and XL.

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
* ``Transformer2DModel``'s ``proj_in``/``proj_out`` (1x1 convolutions in SD 1.x, linear layers with SD 2.x's and
  SDXL's ``use_linear_projection``) and its LayerNorms follow its inner width; SDXL's several transformer layers per
  block (``transformer_layers_per_block``) each lose width on their own.
* ``attention_head_dim`` lists (SD 2.x, SDXL) only shape the model when it is built; after pruning each attention's
  heads are recorded and written back at load, as for every family.
* **SDXL** (``addition_embed_type="text_time"``): besides the context (two CLIP encoders' hidden states side by
  side, ``cross_attention_dim`` = 2048) the UNet takes the second encoder's pooled embedding (``text_embeds``,
  ``pooled_dim`` = ``projection_class_embeddings_input_dim - 6 * addition_time_embed_dim``, 1280) and six
  micro-conditioning ``time_ids`` (original size, crop top-left, target size: the ``_get_add_time_ids`` of diffusers'
  ``StableDiffusionXLPipeline``), as the dict ``{"context", "pooled", "time_ids"}``. The ids go through a
  parameter-free sinusoidal projection (``add_time_proj``), are concatenated with the pooled embedding and fed to
  ``add_embedding`` (``linear_1`` -> SiLU -> ``linear_2``), whose output is added to the timestep embedding. So
  ``add_embedding`` is a conditioning pathway like ``time_embedding``: its hidden width is pruned (and kept at
  least at ``conditioning_floor``), its output follows the timestep embedding's width, and ``linear_1``'s input
  (pooled + time-id embeddings, an input of the UNet) is never pruned (tested). The refiner's five ids (aesthetic
  score instead of the target size) are not handled: its pipeline, not its UNet config, says so (phase 2).
* Refused with a clear error: other added conditionings (``addition_embed_type`` "text", "text_image", "image",
  "image_hint"), class embeddings (``class_embed_type``/``num_class_embeds``), an encoder projection
  (``encoder_hid_dim``) and per-block ``cross_attention_dim`` lists that differ: none of them is handled (nor
  tested) yet.

Stock layout (``prune --layout stock``), as for ``UNet2DModel`` (one width per level, the first narrowed with its
timestep features, ``time_embedding_dim``), with what the config ties to a level's width ``c``: every transformer's
inner width (``c``, in the config's number of heads, so head dims shrink), its feed-forward's hidden width (``4c``;
the GEGLU projection ``8c``), and SDXL's ``add_embedding`` (the timestep embedding's width).

MACs and tracing use a context of ``context_length`` = 77 tokens (CLIP's, the length SD's pipelines pad to): the
cost of ``to_k``/``to_v`` and of the cross-attention product grows with it.
"""
from __future__ import annotations

from ..errors import DiffPruneError
from . import ADAPTERS, Conditioning, _text, unwrap
from .unet2d import UNet2DAdapter

CONTEXT_LENGTH = 77  # CLIP's max_position_embeddings: Stable Diffusion pads every prompt to it
SDXL_TIME_IDS = 6  # StableDiffusionXLPipeline._get_add_time_ids: original size (2), crop top-left (2), target size (2)


def _context_dim(value) -> int:
    """``cross_attention_dim``: one int, or a per-block list that repeats one width."""
    dims = {int(v) for v in value} if isinstance(value, (list, tuple)) else {value}
    if len(dims) != 1 or not isinstance(next(iter(dims)), int):
        raise DiffPruneError(f"UNet2DConditionModel cross_attention_dim={value!r} varies by block, which is not "
                             "supported; Stable Diffusion 1.x/2.x/XL use one width (768, 1024 or 2048)")
    return dims.pop()


def _sdxl_pooled_dim(cfg) -> int:
    pooled = int(cfg.projection_class_embeddings_input_dim or 0) - SDXL_TIME_IDS * int(cfg.addition_time_embed_dim or 0)
    if pooled < 1:
        raise DiffPruneError(
            f"UNet2DConditionModel projection_class_embeddings_input_dim={cfg.projection_class_embeddings_input_dim!r} "
            f"leaves no room for a pooled text embedding beside {SDXL_TIME_IDS} time ids of addition_time_embed_dim="
            f"{cfg.addition_time_embed_dim!r}; SDXL's config has 2816 = 1280 + 6 * 256")
    return pooled


class UNet2DConditionAdapter(UNet2DAdapter):
    name = "unet2d-cond"
    model_classes = ("UNet2DConditionModel",)

    def whole_heads(self, model):
        return []  # its config fixes the heads (attention_head_dim counts them); the stock layout narrows head dims

    def tie_chunks(self, model, name):
        parent, _, leaf = name.rpartition(".")
        gated = leaf == "proj" and type(model.get_submodule(parent)).__name__ in ("GEGLU", "SwiGLU")
        return 2 if gated else 1
    context_arg = "encoder_hidden_states"
    # SDXL's add_embedding joins the timestep embedding before the down blocks
    flow = ("conv_in", "time_embedding", "add_embedding", "down_blocks", "mid_block", "up_blocks", "conv_norm_out",
            "conv_out")

    def conditioning(self, model):
        cfg = model.config
        unsupported = {"class_embed_type": cfg.class_embed_type, "num_class_embeds": cfg.num_class_embeds,
                       "encoder_hid_dim": cfg.encoder_hid_dim}
        if cfg.addition_embed_type != "text_time":
            unsupported = {"addition_embed_type": cfg.addition_embed_type, **unsupported}
        for key, value in unsupported.items():
            if value is not None:
                raise DiffPruneError(
                    f"UNet2DConditionModel with {key}={value!r} is not supported (class embeddings, encoder "
                    "projections and added conditionings other than SDXL's are not handled yet); diffprune prunes the "
                    "Stable Diffusion 1.x/2.x UNet, whose config leaves it None, and SDXL's (addition_embed_type="
                    "'text_time')")
        dim = _context_dim(cfg.cross_attention_dim)
        if cfg.addition_embed_type is None:
            return Conditioning("text", context_dim=dim, context_length=CONTEXT_LENGTH)
        return Conditioning("text", context_dim=dim, context_length=CONTEXT_LENGTH, pooled_dim=_sdxl_pooled_dim(cfg),
                            time_ids=SDXL_TIME_IDS)

    def model_kwargs(self, model, cond):
        spec = self.conditioning(unwrap(model))
        if spec.keys is None:
            return {self.context_arg: cond}
        cond = _text.require_form(spec, cond)
        return {self.context_arg: cond["context"],
                "added_cond_kwargs": {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}}


ADAPTERS.register("unet2d-cond")(UNet2DConditionAdapter())
