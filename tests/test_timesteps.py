"""Timestep strategies: the threshold rule on synthetic losses, plans, and the calibration loop that uses them."""
import types

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from diffprune.adapters import ModelAdapter
from diffprune.errors import DiffPruneError
from diffprune.prune import accumulate_gradients
from diffprune.timesteps import AllTimesteps, StridedTimesteps, ThresholdTimesteps, make_strategy

# L_max reaches 2.0 at t=1; 0.09 < 0.05 * 2.0 = 0.1 first at t=3.
LOSSES = [1.0, 2.0, 1.5, 0.09, 0.05, 0.5]
GO = (True, False)  # accumulate this step, walk on


def _decisions(strategy, losses):
    """``strategy.decide`` at each step of a walk over ``losses``: ``(accumulate, stop)`` per step."""
    return [strategy.decide(losses[: i + 1]) for i in range(len(losses))]


def test_threshold_stops_at_first_loss_below_thr_times_max_both_semantics():
    # accumulate-trigger keeps t = 0..3 (4 steps) and stops; exclude-trigger keeps t = 0..2 (3 steps) and stops
    assert _decisions(ThresholdTimesteps(thr=0.05), LOSSES[:4]) == [GO, GO, GO, (True, True)]
    assert _decisions(ThresholdTimesteps(thr=0.05, threshold_semantics="exclude-trigger"), LOSSES[:4]) == [
        GO, GO, GO, (False, True)]


def test_threshold_uses_running_max_not_first_loss():
    # Against L_0 = 1.0 the rule would wait for L < 0.1 (t=4); against L_max = 3.0 it fires at 0.2 < 0.3 (t=3),
    # so it keeps 4 steps.
    assert _decisions(ThresholdTimesteps(thr=0.1), [1.0, 3.0, 0.9, 0.2]) == [GO, GO, GO, (True, True)]


def test_thr_zero_and_flat_losses_never_stop():
    assert _decisions(ThresholdTimesteps(thr=0.0), LOSSES) == [GO] * 6
    flat = [1.0, 1.01, 0.99, 1.0]
    assert _decisions(ThresholdTimesteps(thr=0.05), flat) == [GO] * 4


def test_plans_and_caps():
    assert ThresholdTimesteps(max_timesteps=3).plan(1000) == [(0, 1.0), (1, 1.0), (2, 1.0)]
    assert len(AllTimesteps().plan(20)) == 20
    assert StridedTimesteps(stride=4).plan(10) == [(0, 4.0), (4, 4.0), (8, 4.0)]
    assert StridedTimesteps(stride=4, max_timesteps=2).plan(10) == [(0, 4.0), (4, 4.0)]
    assert ThresholdTimesteps(stride=4).plan(10) == [(0, 4.0), (4, 4.0), (8, 4.0)]
    assert make_strategy("threshold", thr=0.1, max_timesteps=None).to_dict() == {
        "name": "threshold", "thr": 0.1, "threshold_semantics": "accumulate-trigger", "stride": 1,
        "max_timesteps": None}


@pytest.mark.parametrize("bad", [dict(thr=1.0), dict(thr=-0.1), dict(threshold_semantics="both"), dict(max_timesteps=0),
                                 dict(stride=0), dict(stride=2.5)])
def test_invalid_threshold_settings_raise(bad):
    with pytest.raises(DiffPruneError):
        ThresholdTimesteps(**bad)


def test_unknown_strategy_lists_choices():
    with pytest.raises(DiffPruneError, match=r"choose from \['all', 'strided', 'threshold'\]"):
        make_strategy("every-other")
    with pytest.raises(DiffPruneError, match="takes no"):
        make_strategy("all", stride=3)


class _ScaledIdentity(torch.nn.Module):
    """eps-prediction w * x_t: its loss falls with t (x_t -> eps), so the threshold rule fires."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, x, t):
        return types.SimpleNamespace(sample=self.w * x)


class _Toy(ModelAdapter):
    """The denoiser contract for the toy model: an unconditional call."""

    def forward(self, model, x, t, cond=None):
        return model(x, t).sample


@pytest.mark.parametrize("semantics", ["accumulate-trigger", "exclude-trigger"])
def test_calibration_loop_accumulates_exactly_the_prefix_the_rule_keeps(semantics):
    sched = DDPMScheduler(num_train_timesteps=200)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 1, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(4, 1, 4, 4, generator=g)
    model = _ScaledIdentity()
    strategy = ThresholdTimesteps(thr=0.5, threshold_semantics=semantics)
    res = accumulate_gradients(model, sched, x0, noise, strategy, adapter=_Toy(), progress=False)
    losses = [v for _, v in res.losses]
    # the rule's own decisions on the recorded losses: walk on, then stop at the last one (accumulated or not)
    *walked, (accumulate_last, stopped) = _decisions(strategy, losses)
    assert walked == [GO] * (len(losses) - 1) and stopped
    k = len(walked) + accumulate_last  # the prefix the rule keeps
    assert res.stopped_by == "threshold"
    assert res.accumulated == list(range(k))
    assert res.cutoff_t == k - 1
    assert len(losses) == (k if semantics == "accumulate-trigger" else k + 1)
    # the accumulated gradient is the sum of the per-timestep gradients of the kept steps
    expected = torch.zeros(())
    for t in res.accumulated:
        w = torch.tensor(1.0, requires_grad=True)
        tt = torch.full((4,), t, dtype=torch.long)
        F.mse_loss(w * sched.add_noise(x0, noise, tt), noise).backward()
        expected += w.grad
    torch.testing.assert_close(model.w.grad, expected, rtol=1e-5, atol=1e-6)


def test_strided_weights_scale_the_gradient():
    sched = DDPMScheduler(num_train_timesteps=20)
    x0, noise = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    a, b = _ScaledIdentity(), _ScaledIdentity()
    res = accumulate_gradients(a, sched, x0, noise, StridedTimesteps(stride=5), adapter=_Toy(), progress=False)
    assert res.accumulated == [0, 5, 10, 15] and res.stopped_by == "end"
    res = accumulate_gradients(b, sched, x0, noise, make_strategy("all", max_timesteps=7), adapter=_Toy(),
                               progress=False)
    assert res.accumulated == list(range(7)) and res.stopped_by == "cap"
    # strided: gradient of 5 * sum of L_t over t in {0, 5, 10, 15}
    expected = torch.zeros(())
    for t in (0, 5, 10, 15):
        w = torch.tensor(1.0, requires_grad=True)
        (5.0 * F.mse_loss(w * sched.add_noise(x0, noise, torch.full((2,), t)), noise)).backward()
        expected += w.grad
    torch.testing.assert_close(a.w.grad, expected)


def test_threshold_rule_on_every_kth_timestep():
    """The approximate walk: t = 0, k, 2k, ... weighted by k, stopped by the same rule. With x0 = 0 the toy's loss
    falls with t (0.980, 0.843, 0.723, 0.613, 0.514 at t = 0, 3, 6, 9, 12): thr 0.6 fires at t = 12 (< 0.588)."""
    sched = DDPMScheduler(num_train_timesteps=20)
    x0, noise = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    model = _ScaledIdentity()
    res = accumulate_gradients(model, sched, x0, noise, ThresholdTimesteps(thr=0.6, stride=3), adapter=_Toy(),
                               progress=False)
    assert [t for t, _ in res.losses] == res.accumulated == [0, 3, 6, 9, 12]
    assert res.stopped_by == "threshold" and res.cutoff_t == 12
    expected = torch.zeros(())
    for t in (0, 3, 6, 9, 12):
        w = torch.tensor(1.0, requires_grad=True)
        (3.0 * F.mse_loss(w * sched.add_noise(x0, noise, torch.full((2,), t)), noise)).backward()
        expected += w.grad
    torch.testing.assert_close(model.w.grad, expected)
