"""SDXL's UNet (UNet2DConditionModel with addition_embed_type="text_time"): a tiny one with SDXL's config features
(transformer_layers_per_block and attention_head_dim lists, linear projections, one cross_attention_dim) through the
shared text-family suite, plus the numbers of SDXL's added conditioning checked against diffusers' own pipeline."""
from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

from diffprune.adapters import adapter_for
from diffprune.errors import DiffPruneError
from text_family_suite import TextFamilySuite

CONTEXT, POOLED, TIME_EMBED = 64, 32, 8  # projection_class_embeddings_input_dim = 32 + 6 * 8 = 80


def build_sdxl_unet(**overrides):
    torch.manual_seed(0)
    kwargs = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                  transformer_layers_per_block=(1, 2), use_linear_projection=True, cross_attention_dim=CONTEXT,
                  addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED,
                  projection_class_embeddings_input_dim=POOLED + 6 * TIME_EMBED, norm_num_groups=8)
    return UNet2DConditionModel(**{**kwargs, **overrides})


def _attn2(model):
    return [n for n, m in model.named_modules() if n.endswith(".attn2")]


class TestSDXL(TextFamilySuite):
    adapter_name = "unet2d-cond"
    keys = ("context", "pooled", "time_ids")

    def build(self):
        return build_sdxl_unet()

    @pytest.fixture(scope="class", params=["diff-pruning"])  # the suite's magnitude run too costs 20 s on SDXL
    def pruned(self, request):
        return self.pruned_by(request.param)

    def make_cond(self, n, length, generator):
        size = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])  # original size, crop top-left, target size
        return {"context": torch.randn(n, length, CONTEXT, generator=generator),
                "pooled": torch.randn(n, POOLED, generator=generator), "time_ids": size.repeat(n, 1)}

    def stock_call(self, model, x, t, cond):  # StableDiffusionXLPipeline.__call__'s denoising step
        added = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}
        return model(x, t, encoder_hidden_states=cond["context"], timestep_cond=None, cross_attention_kwargs=None,
                     added_cond_kwargs=added, return_dict=False)[0]

    def kept(self, model):
        mods = dict(model.named_modules())
        out = {"conv_in": tuple(model.conv_in.weight.shape[1:2]), "conv_out": model.conv_out.out_channels,
               "add_embedding.linear_1.in": model.add_embedding.linear_1.in_features,
               "time_embedding.linear_1.in": model.time_embedding.linear_1.in_features}
        out.update({f"{n}.kv_in": (mods[n].to_k.in_features, mods[n].to_v.in_features) for n in _attn2(model)})
        return out

    expected_kept = {"conv_in": (4,), "conv_out": 4, "add_embedding.linear_1.in": 80, "time_embedding.linear_1.in": 32,
                     **{f"{b}.transformer_blocks.{i}.attn2.kv_in": (64, 64) for b in
                        ("down_blocks.1.attentions.0", "mid_block.attentions.0", "up_blocks.0.attentions.0",
                         "up_blocks.0.attentions.1") for i in (0, 1)}}

    def test_added_conditioning_numbers_are_the_stock_pipelines(self, base):
        """pooled_dim and the six time ids fit StableDiffusionXLPipeline._get_add_time_ids (which checks them against
        add_embedding.linear_1), and SDXL-base's own config gives a 2048-wide context and a 1280-wide pooled embedding
        (text_encoder_2's projection_dim)."""
        spec = adapter_for(base).conditioning(base)
        assert (spec.context_dim, spec.context_length, spec.pooled_dim, spec.time_ids) == (64, 77, 32, 6)
        ids = StableDiffusionXLPipeline._get_add_time_ids(SimpleNamespace(unet=base), (16, 16), (0, 0), (16, 16),
                                                          torch.float32, text_encoder_projection_dim=spec.pooled_dim)
        assert ids.shape == (1, spec.time_ids)
        xl = SimpleNamespace(config=SimpleNamespace(
            class_embed_type=None, num_class_embeds=None, encoder_hid_dim=None, addition_embed_type="text_time",
            cross_attention_dim=2048, projection_class_embeddings_input_dim=2816, addition_time_embed_dim=256))
        spec = adapter_for(base).conditioning(xl)
        assert (spec.context_dim, spec.context_length, spec.pooled_dim, spec.time_ids) == (2048, 77, 1280, 6)

    def test_add_embedding_is_a_conditioning_path(self, base):
        assert adapter_for(base).conditioning_paths(base) == ["time_embedding", "add_embedding"]

    def test_other_added_conditionings_are_refused(self):
        other = build_sdxl_unet(addition_embed_type="text", addition_embed_type_num_heads=4)
        with pytest.raises(DiffPruneError, match="addition_embed_type='text' is not supported .* SDXL's "
                                                 r"\(addition_embed_type='text_time'\)"):
            adapter_for(other).conditioning(other)
