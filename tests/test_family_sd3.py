"""SD3/SD3.5 MMDiT (``SD3Transformer2DModel``) through the sd3 adapter: a tiny random model (2 blocks, 4 heads of 8,
the last block context_pre_only; SD3.5's QK-norm and dual attention in block 0), calibrated in memory with a dict
conditioning and a flow-matching scheduler, pruned to half the MACs; whole heads go from both streams together."""
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from diffprune.adapters import adapter_for
from diffprune.errors import DiffPruneError
from diffprune.io import load_model, save_pruned
from diffprune.macs import count_macs
from diffprune.prune import PruneConfig, prune_

INNER, HEAD_DIM, CONTEXT = 32, 8, 333


def build(dual=(0,)):
    torch.manual_seed(0)
    return SD3Transformer2DModel(num_layers=2, attention_head_dim=HEAD_DIM, num_attention_heads=4,
                                 joint_attention_dim=32, caption_projection_dim=INNER, pooled_projection_dim=16,
                                 sample_size=8, patch_size=2, in_channels=4, out_channels=4, qk_norm="rms_norm",
                                 dual_attention_layers=dual, pos_embed_max_size=8)


def cond(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"context": torch.randn(n, CONTEXT, 32, generator=g), "pooled": torch.randn(n, 16, generator=g)}


def calibration(n=4):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(2)), cond(n, seed=3)


SCHEDULER = FlowMatchEulerDiscreteScheduler(num_train_timesteps=50, shift=3.0)


@pytest.fixture(scope="module", params=["magnitude", "diff-pruning"])
def pruned(request):
    model = build()
    config = PruneConfig(method=request.param, target_macs=0.5,
                         **({"calib_batch": 4, "max_timesteps": 3} if request.param == "diff-pruning" else {}))
    report = prune_(model, config, calibration() if request.param == "diff-pruning" else None, scheduler=SCHEDULER,
                    progress=False)
    return model, report


def test_adapter_and_forward_as_the_pipeline_calls_the_model():
    model = build().eval()
    adapter = adapter_for(model)
    assert adapter.name == "sd3" and adapter.conditioning(model).keys == ("context", "pooled")
    x, c, t = torch.randn(2, 4, 8, 8), cond(2), torch.tensor([980.0, 120.5])
    with torch.no_grad():
        ours = adapter.forward(model, x, t, c)
        stock = model(hidden_states=x, timestep=t, encoder_hidden_states=c["context"],
                      pooled_projections=c["pooled"]).sample
    assert ours.shape == (2, 4, 8, 8) and torch.equal(ours, stock)


def test_macs_count_the_text_stream_and_the_conditioning_paths():
    model = build()
    per_layer = count_macs(model).per_layer
    assert per_layer["context_embedder"] == CONTEXT * 32 * INNER  # 333 tokens (77 CLIP + 256 T5)
    assert per_layer["pos_embed.proj"] == 16 * 4 * 2 * 2 * INNER  # 16 patches of 2x2x4
    assert per_layer["time_text_embed.timestep_embedder.linear_1"] == 256 * INNER
    assert per_layer["time_text_embed.text_embedder.linear_1"] == 16 * INNER
    assert per_layer["transformer_blocks.0.norm1.linear"] == INNER * 9 * INNER  # SD3.5's dual-attention modulation


def test_prunes_to_half_the_macs_with_whole_heads_in_both_streams(pruned):
    model, report = pruned
    assert abs(report.macs / report.base_macs - 0.5) <= 0.02 * 0.5 and report.family == "sd3"
    if report.method == "diff-pruning":
        cal = report.calibration
        assert cal["batch"] == 4 and cal["accumulated"] == [0, 1, 2]
        assert all(math.isfinite(v) for v in cal["losses"]["loss"])
    for block in model.transformer_blocks:
        for attn in [block.attn] + ([block.attn2] if block.attn2 is not None else []):
            widths = {p.out_features for p in (attn.to_q, attn.to_k, attn.to_v)}
            if attn.add_q_proj is not None:
                widths |= {p.out_features for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)}
            assert len(widths) == 1 and widths.pop() == attn.heads * HEAD_DIM and 1 <= attn.heads <= 4
            assert attn.to_out[0].in_features == attn.heads * HEAD_DIM
            if getattr(attn, "to_add_out", None) is not None:
                assert attn.to_add_out.in_features == attn.heads * HEAD_DIM
            assert attn.norm_q.weight.shape == (HEAD_DIM,) and attn.scale == HEAD_DIM ** -0.5
        # the residual streams, the modulations and the outputs keep their widths
        assert block.norm1.linear.out_features == (9 if block.attn2 is not None else 6) * INNER
        assert block.attn.to_out[0].out_features == INNER and block.ff.net[2].out_features == INNER
    assert sum(a.heads for b in model.transformer_blocks for a in (b.attn, b.attn2) if a is not None) < 12
    assert model.pos_embed.proj.out_channels == INNER and model.context_embedder.out_features == INNER
    assert tuple(model.proj_out.weight.shape) == (16, INNER) and model.norm_out.linear.out_features == 2 * INNER
    with torch.no_grad():
        out = adapter_for(model).forward(model, torch.randn(2, 4, 8, 8), torch.tensor([500.0, 20.0]), cond(2))
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_save_then_load_is_bitwise_equal(pruned, tmp_path):
    model, report = pruned
    save_pruned(model, tmp_path / "m", report.to_dict(), scheduler=SCHEDULER)
    loaded = load_model(tmp_path / "m")
    assert loaded.adapter.name == "sd3" and type(loaded.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    x, c, t = torch.randn(2, 4, 8, 8), cond(2), torch.tensor([700.0, 3.0])
    with torch.no_grad():
        a = adapter_for(model).forward(model.eval(), x, t, c)
        b = loaded.adapter.forward(loaded.denoiser.eval(), x, t, c)
    assert torch.equal(a, b)
    assert [m.heads for m in loaded.denoiser.modules() if hasattr(m, "add_q_proj") or hasattr(m, "to_q")] == \
           [m.heads for m in model.modules() if hasattr(m, "add_q_proj") or hasattr(m, "to_q")]


def test_conditioning_floor_keeps_half_of_each_conditioning_path():
    model = build()
    before = {n: m.out_features for n, m in model.time_text_embed.named_modules() if isinstance(m, torch.nn.Linear)}
    report = prune_(model, PruneConfig(method="magnitude", target_macs=0.5, conditioning_floor=0.5), progress=False)
    assert abs(report.macs / report.base_macs - 0.5) <= 0.02 * 0.5
    after = {n: m.out_features for n, m in model.time_text_embed.named_modules() if isinstance(m, torch.nn.Linear)}
    assert before == {"timestep_embedder.linear_1": 32, "timestep_embedder.linear_2": 32,
                      "text_embedder.linear_1": 32, "text_embedder.linear_2": 32}
    assert all(after[n] >= before[n] / 2 for n in before)


def test_the_last_block_is_never_removed():
    model = build(dual=())
    adapter = adapter_for(model)
    assert adapter.fixed_blocks(model) == {1} and len(adapter.blocks(model)) == 2
    adapter.remove_blocks_(model, [0])
    assert len(model.transformer_blocks) == 1 and model.transformer_blocks[0].context_pre_only


def test_a_tensor_instead_of_the_dict_is_refused():
    model = build()
    with pytest.raises(DiffPruneError, match=r"takes its text conditioning as a dict with keys \['context', "
                                             r"'pooled'\] .* got a Tensor; encode the prompts"):
        adapter_for(model).forward(model, torch.randn(1, 4, 8, 8), torch.tensor([1.0]), torch.randn(1, CONTEXT, 32))
