"""PixArt-α/Σ's transformer (PixArtTransformer2DModel, adaLN-single, T5 cross-attention with an attention mask,
learned sigma): tiny ones through the shared text-family suite, without and with the resolution conditioning of
PixArt-α 1024 px, plus the mask, depth pruning and what the adapter keeps."""
import warnings

import torch
from diffusers import PixArtTransformer2DModel

from diffprune.adapters import adapter_for
from diffprune.io import load_model, save_pruned
from diffprune.prune import PruneConfig, prune_
from text_family_suite import CALIB, TextFamilySuite, scheduler

CAPTION = 24  # stands in for T5's 4096


def build_pixart(heads: int = 4, head_dim: int = 8, layers: int = 2, **overrides):
    torch.manual_seed(0)
    return PixArtTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                                    out_channels=8, num_layers=layers, sample_size=8, patch_size=2,
                                    cross_attention_dim=heads * head_dim, caption_channels=CAPTION, **overrides)


def pixart_kept(model) -> dict:
    """Every width the adapter keeps: the residual stream and what shares it, the shared modulation, the caption's."""
    emb = model.adaln_single.emb
    out = {"pos_embed.proj": tuple(model.pos_embed.proj.weight.shape), "proj_out": tuple(model.proj_out.weight.shape),
           "scale_shift_table": tuple(model.scale_shift_table.shape),
           "adaln_single.linear": tuple(model.adaln_single.linear.weight.shape),
           "timestep_embedder.in/out": (emb.timestep_embedder.linear_1.in_features,
                                        emb.timestep_embedder.linear_2.out_features),
           "caption_projection.in/out": (model.caption_projection.linear_1.in_features,
                                         model.caption_projection.linear_2.out_features)}
    for i, b in enumerate(model.transformer_blocks):
        out[f"{i}.scale_shift_table"] = tuple(b.scale_shift_table.shape)
        out[f"{i}.residual"] = (b.attn1.to_q.in_features, b.attn1.to_out[0].out_features, b.attn2.to_q.in_features,
                                b.attn2.to_k.in_features, b.attn2.to_v.in_features, b.attn2.to_out[0].out_features,
                                b.ff.net[0].proj.in_features, b.ff.net[2].out_features)
    return out


def expected_kept(inner: int, layers: int) -> dict:
    return {"pos_embed.proj": (inner, 4, 2, 2), "proj_out": (2 * 2 * 8, inner), "scale_shift_table": (2, inner),
            "adaln_single.linear": (6 * inner, inner), "timestep_embedder.in/out": (256, inner),
            "caption_projection.in/out": (CAPTION, inner),
            **{f"{i}.scale_shift_table": (6, inner) for i in range(layers)},
            **{f"{i}.residual": (inner,) * 8 for i in range(layers)}}


class TestPixArt(TextFamilySuite):
    adapter_name = "pixart"
    keys = ("context", "mask")
    expected_kept = expected_kept(32, 2)

    def build(self):
        return build_pixart()

    def make_cond(self, n, length, generator):
        mask = torch.ones(n, length, dtype=torch.long)
        mask[:, length * 2 // 3:] = 0  # padding, as T5's tokenizer marks it
        return {"context": torch.randn(n, length, CAPTION, generator=generator), "mask": mask}

    def added_cond_kwargs(self, x):
        return {"resolution": None, "aspect_ratio": None}

    def stock_call(self, model, x, t, cond):  # PixArtAlphaPipeline.__call__'s denoising step, learned sigma dropped
        out = model(x, encoder_hidden_states=cond["context"], encoder_attention_mask=cond["mask"], timestep=t,
                    added_cond_kwargs=self.added_cond_kwargs(x), return_dict=False)[0]
        return out.chunk(2, dim=1)[0]

    def kept(self, model):
        return pixart_kept(model)

    def test_conditioning_and_paths(self, base):
        adapter = adapter_for(base)
        spec = adapter.conditioning(base)
        assert (spec.kind, spec.context_dim, spec.context_length, spec.masked, spec.pooled_dim) == (
            "text", CAPTION, 120, True, None)
        assert adapter.conditioning_paths(base) == ["adaln_single.emb", "caption_projection"]

    def test_the_mask_reaches_cross_attention(self, base):
        """Padded tokens do not change the prediction; unmasking them does."""
        adapter = adapter_for(base)
        x, t, cond = self.inputs(base)
        pad = cond["mask"] == 0
        noisy = {**cond, "context": torch.where(pad[..., None], torch.randn_like(cond["context"]), cond["context"])}
        with torch.no_grad():
            out = adapter.forward(base, x, t, cond)
            torch.testing.assert_close(adapter.forward(base, x, t, noisy), out, atol=1e-6, rtol=0)
            assert not torch.allclose(adapter.forward(base, x, t, {**cond, "mask": torch.ones_like(cond["mask"])}),
                                      out, atol=1e-4)


    def test_pruning_says_nothing_about_the_scale_shift_tables(self):
        """Torch-Pruning's warning that it would prune them is silenced: they follow the kept residual stream."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prune_(self.build(), PruneConfig(method="magnitude", ratio=0.3, ratio_mode="uniform"), progress=False)
        assert not [w for w in caught if "Unwrapped parameters" in str(w.message)]


class TestPixArtWithResolutionConditioning(TestPixArt):
    """PixArt-α 1024 px's use_additional_conditions: the resolution and aspect ratio embedders (inner_dim a multiple
    of 3, as PixArt's 1152), fed the latents' pixel size as the pipeline does."""

    expected_kept = {**expected_kept(48, 2), "size_embedders.out": (16, 16)}

    def build(self):
        return build_pixart(heads=3, head_dim=16, use_additional_conditions=True)

    def added_cond_kwargs(self, x):
        h, w = 8 * x.shape[-2], 8 * x.shape[-1]  # height/width in pixels: the VAE's 8x
        return {"resolution": torch.tensor([h, w]).repeat(len(x), 1).float(),
                "aspect_ratio": torch.tensor([float(h / w)]).repeat(len(x), 1)}

    def kept(self, model):
        emb = model.adaln_single.emb
        return {**pixart_kept(model), "size_embedders.out": (emb.resolution_embedder.linear_2.out_features,
                                                              emb.aspect_ratio_embedder.linear_2.out_features)}


def test_depth_pruning_removes_whole_blocks_and_reloads_bitwise(tmp_path):
    model = build_pixart(layers=4)
    suite = TestPixArt()
    report = prune_(model, PruneConfig(method="depth", target_macs=0.55, **CALIB),
                    suite.calibration(model), scheduler=scheduler(), progress=False)
    removed = report.structure["meta"]["removed_blocks"]
    assert len(removed) == 2 and len(model.transformer_blocks) == 2  # each block is ~23% of the MACs
    assert abs(report.macs / report.base_macs - 0.55) <= 0.02 * 0.55
    save_pruned(model, tmp_path / "p", report.to_dict(), scheduler=scheduler())
    again = load_model(tmp_path / "p")
    x, t, cond = suite.inputs(model)
    with torch.no_grad():
        assert torch.equal(again.adapter.forward(again.denoiser.eval(), x, t, cond),
                           adapter_for(model).forward(model.eval(), x, t, cond))
    assert len(again.denoiser.transformer_blocks) == len(model.transformer_blocks)
