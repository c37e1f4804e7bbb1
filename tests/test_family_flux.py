"""Flux (``FluxTransformer2DModel``) through the flux adapter: a tiny random guidance-distilled model (1 double- and
1 single-stream block, 4 heads of 8, rotary axes 2+2+4), called on unpacked latents as FluxPipeline calls it, calibrated
in memory with a dict conditioning and a flow-matching scheduler, pruned to half the MACs with whole heads."""
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from diffprune.adapters import adapter_for
from diffprune.errors import DiffPruneError
from diffprune.io import load_model, save_pruned
from diffprune.macs import count_macs
from diffprune.prune import PruneConfig, prune_

INNER, HEAD_DIM, CONTEXT = 32, 8, 512


def build():
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=HEAD_DIM, num_attention_heads=4, joint_attention_dim=32,
                                   pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    model.register_to_config(sample_size=8)  # 8x8 latents (4x4 packed tokens) instead of FluxPipeline's 128x128
    return model


def cond(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"context": torch.randn(n, CONTEXT, 32, generator=g), "pooled": torch.randn(n, 16, generator=g)}


SCHEDULER = FlowMatchEulerDiscreteScheduler(num_train_timesteps=50, shift=3.0)


@pytest.fixture(scope="module", params=["magnitude", "diff-pruning"])
def pruned(request):
    model = build()
    gradient = request.param == "diff-pruning"
    config = PruneConfig(method=request.param, target_macs=0.5, **({"calib_batch": 4, "max_timesteps": 3}
                                                                     if gradient else {}))
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    report = prune_(model, config, (x0, cond(4, seed=3)) if gradient else None, scheduler=SCHEDULER, progress=False)
    return model, report


def test_adapter_and_forward_as_flux_pipeline_calls_the_model():
    model = build().eval()
    adapter = adapter_for(model)
    assert adapter.name == "flux" and adapter.input_shape(model) == (4, 8, 8)
    x, c, t = torch.randn(2, 4, 8, 8), cond(2), torch.tensor([980.0, 120.5])
    with torch.no_grad():
        ours = adapter.forward(model, x, t, c)
        packed = FluxPipeline._pack_latents(x, 2, 4, 8, 8)
        stock = model(hidden_states=packed, timestep=t / 1000, guidance=torch.full([2], 3.5),
                      pooled_projections=c["pooled"], encoder_hidden_states=c["context"],
                      txt_ids=torch.zeros(CONTEXT, 3), img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu",
                                                                                                     torch.float32),
                      return_dict=False)[0]
        stock = FluxPipeline._unpack_latents(stock, 8 * 8, 8 * 8, 8)  # 64 px, vae_scale_factor 8 -> 8x8 latents
        with adapter.tracing(model):  # the tracer's rewrite computes the same numbers
            traced = adapter.forward(model, x, t, c)
    assert ours.shape == (2, 4, 8, 8) and torch.equal(ours, stock) and torch.equal(traced, ours)


def test_macs_count_the_packed_tokens_the_text_stream_and_the_conditioning_paths():
    model = build()
    per_layer = count_macs(model).per_layer
    assert per_layer["x_embedder"] == 16 * 16 * INNER  # 16 packed tokens of 4x(2x2) channels
    assert per_layer["context_embedder"] == CONTEXT * 32 * INNER  # FluxPipeline's 512 T5 tokens
    for path in ("timestep_embedder", "guidance_embedder"):
        assert per_layer[f"time_text_embed.{path}.linear_1"] == 256 * INNER
    assert per_layer["time_text_embed.text_embedder.linear_1"] == 16 * INNER
    assert per_layer["single_transformer_blocks.0.proj_out"] == (CONTEXT + 16) * (INNER + 4 * INNER) * INNER


def test_prunes_to_half_the_macs_with_whole_heads(pruned):
    model, report = pruned
    assert abs(report.macs / report.base_macs - 0.5) <= 0.02 * 0.5 and report.family == "flux"
    if report.method == "diff-pruning":
        cal = report.calibration
        assert cal["batch"] == 4 and cal["accumulated"] == [0, 1, 2]
        assert all(math.isfinite(v) for v in cal["losses"]["loss"])
    double, single = model.transformer_blocks[0], model.single_transformer_blocks[0]
    for attn in (double.attn, single.attn):
        widths = {p.out_features for p in (attn.to_q, attn.to_k, attn.to_v)}
        if attn.added_kv_proj_dim is not None:
            widths |= {p.out_features for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)}
            assert attn.to_add_out.in_features == attn.to_out[0].in_features == attn.heads * HEAD_DIM
        assert len(widths) == 1 and widths.pop() == attn.heads * HEAD_DIM == attn.inner_dim and 1 <= attn.heads <= 4
        assert attn.head_dim == HEAD_DIM and attn.norm_q.weight.shape == (HEAD_DIM,)
    assert double.attn.heads + single.attn.heads < 8
    assert single.proj_out.in_features == single.attn.heads * HEAD_DIM + single.proj_mlp.out_features
    assert single.mlp_hidden_dim == single.proj_mlp.out_features < 4 * INNER
    assert model.pos_embed.axes_dim == (2, 2, 4)
    # the residual streams, the modulations and the outputs keep their widths
    assert model.x_embedder.out_features == model.context_embedder.out_features == INNER
    assert double.norm1.linear.out_features == double.norm1_context.linear.out_features == 6 * INNER
    assert single.norm.linear.out_features == 3 * INNER and single.proj_out.out_features == INNER
    assert double.ff.net[2].out_features == double.ff_context.net[2].out_features == INNER
    assert tuple(model.proj_out.weight.shape) == (16, INNER) and model.norm_out.linear.out_features == 2 * INNER
    with torch.no_grad():
        out = adapter_for(model).forward(model, torch.randn(2, 4, 8, 8), torch.tensor([500.0, 20.0]), cond(2))
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_save_then_load_is_bitwise_equal(pruned, tmp_path):
    model, report = pruned
    save_pruned(model, tmp_path / "m", report.to_dict(), scheduler=SCHEDULER)
    loaded = load_model(tmp_path / "m")
    assert loaded.adapter.name == "flux" and loaded.adapter.input_shape(loaded.denoiser) == (4, 8, 8)
    x, c, t = torch.randn(2, 4, 8, 8), cond(2), torch.tensor([700.0, 3.0])
    with torch.no_grad():
        a = adapter_for(model).forward(model.eval(), x, t, c)
        b = loaded.adapter.forward(loaded.denoiser.eval(), x, t, c)
    assert torch.equal(a, b)
    assert [b.attn.heads for b in loaded.denoiser.transformer_blocks] == [b.attn.heads for b in model.transformer_blocks]
    assert type(loaded.denoiser.single_transformer_blocks[0].attn.processor).__name__ == "FluxAttnProcessor"


def test_conditioning_floor_keeps_half_of_each_conditioning_path():
    model = build()
    before = {n: m.out_features for n, m in model.time_text_embed.named_modules() if isinstance(m, torch.nn.Linear)}
    report = prune_(model, PruneConfig(method="magnitude", target_macs=0.5, conditioning_floor=0.5), progress=False)
    assert abs(report.macs / report.base_macs - 0.5) <= 0.02 * 0.5
    after = {n: m.out_features for n, m in model.time_text_embed.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(before) == 6 and set(before.values()) == {INNER}  # timestep, guidance, text: linear_1 and linear_2
    assert all(after[n] >= before[n] / 2 for n in before)


def test_depth_pruning_removes_double_and_single_blocks():
    model = build()
    adapter = adapter_for(model)
    assert len(adapter.blocks(model)) == 2 and adapter.fixed_blocks(model) == set()
    adapter.remove_blocks_(model, [1])
    assert len(model.transformer_blocks) == 1 and len(model.single_transformer_blocks) == 0


def test_a_tensor_instead_of_the_dict_is_refused():
    model = build()
    with pytest.raises(DiffPruneError, match=r"takes its text conditioning as a dict with keys \['context', "
                                             r"'pooled'\] .* got a Tensor; encode the prompts"):
        adapter_for(model).forward(model, torch.randn(1, 4, 8, 8), torch.tensor([1.0]), torch.randn(1, CONTEXT, 32))
