"""The engine's channel scores equal a plain re-computation of the Diff-Pruning / Taylor rules, and the channels
kept after pruning are exactly those the paper's selection rule picks from the re-computed scores."""
import copy

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from diffusers import DDPMScheduler, UNet2DModel

from diffprune.errors import DiffPruneError
from diffprune.importance import METHODS
from diffprune.prune import PruneConfig, prune_

CFG = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
           down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
           norm_num_groups=4, attention_head_dim=8)
B, T, SEED, RATIO = 4, 6, 3, 0.5


def _reference_grads(unet, sched, x0):
    """Plain Diff-Pruning calibration: fixed seeded noise, t = 0..T-1, backward without zeroing (thr never fires
    on an untrained model, so all T timesteps are kept)."""
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(SEED))
    unet.eval()
    lmax = 0.0
    for t in range(T):
        tt = torch.full((B,), t, dtype=torch.long)
        loss = F.mse_loss(unet(sched.add_noise(x0, noise, tt), tt).sample, noise)
        loss.backward()
        lmax = max(lmax, loss.item())
        if loss.item() < 0.05 * lmax:
            break
    assert t == T - 1


def _score(rows, method):
    """rows: list of (weight, grad) with channel on dim 0; per-layer score, mean over layers, / mean."""
    per_layer = []
    for w, g in rows:
        wg = (w * g).flatten(1)
        if method == "diff-pruning":
            per_layer.append(wg.abs().sum(1))
        elif method == "squared":
            per_layer.append((wg ** 2).sum(1))
        else:  # taylor
            per_layer.append(wg.sum(1).abs())
    s = torch.stack(per_layer).mean(0)
    return s / s.mean()


def _groups(ref):
    """Three hand-written dependency groups: root name, coupled (weight, grad) rows, chunks of the paper rule."""
    def out(m):
        return m.weight.detach(), m.weight.grad

    def inp(m):
        return m.weight.detach().transpose(0, 1), m.weight.grad.transpose(0, 1)

    r0 = ref.down_blocks[0].resnets[0]
    attn = ref.down_blocks[1].attentions[0]
    te = ref.time_embedding
    return {
        # ResNet inner channels: conv1 out, time_emb_proj out, conv2 in (norm2 has no weight score); GroupNorm 4
        "down_blocks.0.resnets.0.conv1": ([out(r0.conv1), out(r0.time_emb_proj), inp(r0.conv2)], 4,
                                           lambda m: m.down_blocks[0].resnets[0].conv1.bias),
        # attention: q, k, v out and to_out in, 4 heads of 8; rooted by Torch-Pruning at to_out.0
        "down_blocks.1.attentions.0.to_out.0": ([out(attn.to_q), out(attn.to_k), out(attn.to_v), inp(attn.to_out[0])],
                                                 4, lambda m: m.down_blocks[1].attentions[0].to_v.bias),
        # time embedding hidden units: no channel groups
        "time_embedding.linear_1": ([out(te.linear_1), inp(te.linear_2)], 1,
                                    lambda m: m.time_embedding.linear_1.bias),
    }


def _paper_keep(scores, chunks):
    n = len(scores)
    n_pruned = n - int(n * (1 - RATIO))
    size, per = n // chunks, n_pruned // chunks
    drop = torch.cat([torch.argsort(scores[c * size:(c + 1) * size])[:per] + c * size for c in range(chunks)])
    return sorted(set(range(n)) - set(drop.tolist()))


def _kept(before_bias, after_bias):
    return sorted(int((before_bias == b).nonzero()) for b in after_bias)


@pytest.mark.parametrize("method,form", [("diff-pruning", "abs"), ("diff-pruning", "squared"), ("taylor", "abs")])
def test_engine_scores_and_kept_channels_match_plain_recomputation(method, form):
    torch.manual_seed(0)
    unet = UNet2DModel(**CFG)
    ref = copy.deepcopy(unet)
    sched = DDPMScheduler(num_train_timesteps=T)
    x0 = torch.rand(B, 1, 8, 8, generator=torch.Generator().manual_seed(7)) * 2 - 1

    form_setting = form if method == "diff-pruning" else None  # taylor_form is diff-pruning's setting
    report = prune_(unet, PruneConfig(method=method, taylor_form=form_setting, ratio=RATIO, calib_batch=B, seed=SEED),
                    x0, scheduler=sched, progress=False)
    assert report.calibration["accumulated"] == list(range(T))

    _reference_grads(ref, sched, x0)
    for root, (rows, chunks, bias_of) in _groups(ref).items():
        expected = _score(rows, "squared" if form == "squared" else method)
        torch.testing.assert_close(report.scores[root], expected, rtol=1e-4, atol=1e-6)
        assert _kept(bias_of(ref).detach(), bias_of(unet).detach()) == _paper_keep(expected, chunks), root


def test_taylor_without_gradients_fails_clearly():
    unet = UNet2DModel(**CFG)
    dg = tp.DependencyGraph().build_dependency(
        unet, example_inputs={"sample": torch.zeros(1, 1, 8, 8), "timestep": torch.ones(1, dtype=torch.long)})
    group = dg.get_pruning_group(unet.conv_in, tp.prune_conv_out_channels, idxs=[0, 1])
    for name in ("diff-pruning", "taylor"):
        with pytest.raises(DiffPruneError, match="needs gradients"):
            METHODS.get(name).make(PruneConfig(method=name, ratio=0.3))(group)
    assert METHODS.get("magnitude").make(PruneConfig(method="magnitude", ratio=0.3))(group).shape == (2,)


def test_a_method_owns_its_settings():
    """Defaults come from the method (and its timestep strategy); a setting of another method is refused."""
    cfg = PruneConfig(ratio=0.3)
    assert (cfg.timesteps, cfg.thr, cfg.threshold_semantics, cfg.taylor_form, cfg.calib_batch) == (
        "threshold", 0.05, "accumulate-trigger", "abs", 64)
    assert PruneConfig(method="taylor", ratio=0.3).timesteps == "all"
    assert PruneConfig(method="taylor", ratio=0.3).thr is None  # the "all" strategy has no threshold
    assert PruneConfig(method="magnitude", ratio=0.3).calib_batch is None
    with pytest.raises(DiffPruneError, match=r"thr=0.1 does not apply to method 'magnitude'; it is a setting of "
                                             r"\['depth', 'diff-pruning', 'taylor'\]"):
        PruneConfig(method="magnitude", ratio=0.3, thr=0.1)
    with pytest.raises(DiffPruneError, match=r"taylor_form='squared' does not apply to method 'taylor'"):
        PruneConfig(method="taylor", ratio=0.3, taylor_form="squared")
    with pytest.raises(DiffPruneError, match=r"timestep strategy 'all' takes no \['thr'\]"):
        PruneConfig(method="taylor", ratio=0.3, thr=0.1)


def test_gradient_methods_need_calibration_data():
    with pytest.raises(DiffPruneError, match="needs calibration images"):
        prune_(UNet2DModel(**CFG), PruneConfig(method="taylor", ratio=0.3), None, scheduler=DDPMScheduler())


def test_registry_names_and_unknown_method():
    assert METHODS.names() == ["depth", "diff-pruning", "magnitude", "random", "reinit", "taylor"]
    with pytest.raises(DiffPruneError, match=r"unknown method 'l1'; choose from \['depth', 'diff-pruning'"):
        PruneConfig(method="l1", ratio=0.3)
