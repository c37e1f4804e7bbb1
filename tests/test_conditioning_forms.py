"""Conditioning as a tensor or a dict of tensors (the text-to-image families), the flow-matching objective against
diffusers' own scheduler, and a calibration batch given in memory."""
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffprune import _cond
from diffprune.adapters import Conditioning
from diffprune.errors import DiffPruneError
from diffprune.objective import model_timesteps, noisy, prediction_target, prediction_type

SPEC = Conditioning("text", context_dim=8, context_length=5, pooled_dim=3, masked=True, time_ids=6)


def _dict(n):
    g = torch.Generator().manual_seed(n)
    return {"context": torch.randn(n, 5, 8, generator=g), "pooled": torch.randn(n, 3, generator=g),
            "mask": torch.ones(n, 5, dtype=torch.long), "time_ids": torch.randn(n, 6, generator=g)}


def test_batch_operations_act_on_every_tensor_of_a_dict_as_on_a_tensor():
    c, t = _dict(4), torch.arange(4)
    idx = torch.tensor([2, 0])
    taken = _cond.take(c, idx)
    assert all(torch.equal(taken[k], c[k][idx]) for k in c) and torch.equal(_cond.take(t, idx), t[idx])
    rep = _cond.repeat(c, 3)
    assert _cond.batch_size(rep) == 12 and torch.equal(rep["pooled"][4:8], c["pooled"])
    both = _cond.cat([c, _cond.expand(_cond.take(c, slice(0, 1)), 4)])
    assert _cond.batch_size(both) == 8 and torch.equal(both["context"][5], c["context"][0])
    half = _cond.to(c, dtype=torch.float16)
    assert half["context"].dtype == torch.float16 and half["mask"].dtype == torch.long  # a mask stays an integer
    drop = torch.tensor([True, False, True, False])
    null = {k: torch.zeros_like(v[:1]) for k, v in c.items()}
    mixed = _cond.where(drop, null, c)
    assert mixed["pooled"][0].abs().sum() == 0 and torch.equal(mixed["pooled"][1], c["pooled"][1])
    assert _cond.take(None, idx) is None and _cond.repeat(None, 2) is None
    with pytest.raises(DiffPruneError, match=r"disagree on the batch size: \[2, 4\]"):
        _cond.batch_size({"context": c["context"], "pooled": c["pooled"][:2]})


def test_a_dict_family_declares_its_keys_and_checks_shapes():
    assert SPEC.keys == ("context", "pooled", "mask", "time_ids")
    assert Conditioning("text", context_dim=8, context_length=5).keys is None  # SD 1.x/2.x: a bare context
    ex = SPEC.example(2)
    assert {k: tuple(v.shape) for k, v in ex.items()} == {"context": (2, 5, 8), "pooled": (2, 3), "mask": (2, 5),
                                                          "time_ids": (2, 6)}
    checked = SPEC.check_context(_dict(2))
    assert checked["context"].dtype == torch.float32 and checked["mask"].dtype == torch.long
    with pytest.raises(DiffPruneError, match=r"takes a dict with keys \['context', 'pooled', 'mask', 'time_ids'\], "
                                             r"got Tensor"):
        SPEC.check_context(torch.zeros(2, 5, 8))
    bad = _dict(2)
    bad["pooled"] = torch.zeros(2, 4)
    with pytest.raises(DiffPruneError, match=r"\['pooled'\] has shape \(2, 4\), but this model takes \('N', 3\)"):
        SPEC.check_context(bad)


@pytest.mark.parametrize("shift,dynamic", [(1.0, False), (3.0, False), (3.0, True)])
def test_flow_matching_noise_and_timesteps_are_the_schedulers_own(shift, dynamic):
    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=50, shift=shift, use_dynamic_shifting=dynamic)
    T = 50
    t = torch.tensor([0, 7, 49])
    assert prediction_type(s) == "flow"
    # diffusers' training sigmas run high noise first: integer t (low noise first) is index T - 1 - t
    expect = s.timesteps[T - 1 - t]
    assert torch.allclose(model_timesteps(s, t), expect, atol=1e-4)
    x0, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    sigma = (expect / T).view(-1, 1, 1, 1)
    assert torch.allclose(noisy(s, x0, eps, t), (1 - sigma) * x0 + sigma * eps, atol=1e-6)
    assert torch.equal(prediction_target(s, x0, eps, t), eps - x0)
    assert float(model_timesteps(s, torch.tensor([T - 1]))) == pytest.approx(T)  # the noisiest level is sigma 1


def _tiny_sd_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=8)


def test_a_calibration_batch_given_in_memory_is_used_as_given():
    from diffusers import DDPMScheduler

    from diffprune.prune import PruneConfig, calibration_batch, prune_

    unet, sched = _tiny_sd_unet(), DDPMScheduler(num_train_timesteps=50)
    x0, context = torch.randn(6, 4, 8, 8) * 3, torch.randn(6, 77, 16)  # latents range wider than [-1, 1]
    got, cond, desc = calibration_batch(unet, (x0, context), batch_size=4, seed=1)
    assert desc == {"source": "tensors", "subset_seed": 1, "batch": 4}
    idx = torch.randperm(6, generator=torch.Generator().manual_seed(1))[:4]
    assert torch.equal(got, x0[idx]) and torch.equal(cond, context[idx])
    report = prune_(unet, PruneConfig(method="diff-pruning", ratio=0.4, ratio_mode="uniform", global_ranking=True,
                                      calib_batch=4, max_timesteps=3),
                    calibration=(x0, context), scheduler=sched, progress=False)
    assert report.params < report.base_params and report.calibration["accumulated"] == [0, 1, 2]
    assert report.calibration["source"] == "tensors" and report.calibration["batch"] == 4
    with pytest.raises(DiffPruneError, match=r"calibration inputs x0 have shape \(6, 3, 8, 8\).*\[N, 4, 8, 8\]"):
        calibration_batch(unet, (x0[:, :3], context), batch_size=4)
    with pytest.raises(DiffPruneError, match="5 conditionings for 6 inputs"):
        calibration_batch(unet, (x0, context[:5]), batch_size=4)
