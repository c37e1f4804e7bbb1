"""Allocation across layers under global ranking: the MAC cost of a position, cost-aware ranking, score
normalisation, the per-layer maximum and the conditioning floor."""
import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from diffprune.adapters import adapter_for
from diffprune.errors import DiffPruneError
from diffprune.importance import DIFF_PRUNING_FLOOR, METHODS
from diffprune.macs import count_macs
from diffprune.prune import PruneConfig, prune_
from diffprune.prune.costs import mac_costs
from diffprune.prune.selection import GlobalPruner
from diffprune.presets import build_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("tiny")


def _pruner(model, adapter, costs):
    imp = METHODS.get("magnitude").make(PruneConfig(method="magnitude", target_macs=0.5))
    p = GlobalPruner(model, adapter.example_inputs(model), importance=imp, pruning_ratio=0.01, global_pruning=True,
                     ignored_layers=adapter.ignored_layers(model), num_heads=dict(adapter.num_heads(model)))
    p.module_names, p.layer_costs = {id(m): n for n, m in model.named_modules()}, costs
    return p


def test_position_cost_is_the_mac_drop_of_removing_that_position(tiny):
    """For every group of the tiny UNet: prune one position (one channel per GroupNorm group or head) and count the
    MACs again; the estimate the cost-aware ranking uses equals the drop (conv, linear, attention products)."""
    adapter = adapter_for(tiny)
    base = count_macs(tiny, adapter=adapter)
    costs = mac_costs(tiny, base.per_layer)
    with adapter.tracing(tiny):
        p0 = _pruner(tiny, adapter, costs)
        roots = [(p0.module_names[id(g[0].dep.target.module)], g[0].dep.handler)
                 for g in p0.DG.get_all_groups(ignored_layers=p0.ignored_layers, root_module_types=p0.root_module_types)]
    ratios = {}
    for name, fn in roots:
        twin = copy.deepcopy(tiny)
        with adapter.tracing(twin):
            p = _pruner(twin, adapter, costs)
            module = dict(twin.named_modules())[name]
            k = p._get_channel_groups(p.DG.get_pruning_group(module, fn, [0]))
            width = (p.DG.get_out_channels if p.DG.is_out_channel_pruning_fn(fn) else p.DG.get_in_channels)(module)
            group = p.DG.get_pruning_group(module, fn, [g * (width // k) for g in range(k)])
            if not p.DG.check_pruning_group(group) or k > 1 and width // k < 2:
                continue
            estimate = p._position_cost(group, k)
            snapshot = adapter.snapshot(twin)
            group.prune()
            try:
                adapter.finalize_(twin, snapshot)  # the attributes that mirror shapes (resampling channels, heads)
            except (RuntimeError, AssertionError, DiffPruneError):  # a split that no real selection makes
                continue
        ratios[name] = estimate / (base.macs - count_macs(twin, adapter=adapter).macs)
    assert len(ratios) >= 15
    exact = [n for n, r in ratios.items() if abs(r - 1) < 1e-9]
    assert len(exact) >= 0.9 * len(ratios) and all(0.8 <= r <= 1.0 + 1e-9 for r in ratios.values()), ratios


def _kept(model, config):
    twin = copy.deepcopy(model)
    report = prune_(twin, config, progress=False)
    return report, {n: w[1] / report.base_widths[n][1] for n, w in report.widths.items()}


def test_cost_allocation_keeps_the_mac_cheap_conditioning_path(tiny):
    """Magnitude to 0.5x MACs: ranked by score alone the timestep MLP (almost no MACs) loses channels; ranked by
    score per MAC saved it keeps them and the MACs come from the convolutions; both land on the target."""
    score, kept_score = _kept(tiny, PruneConfig(method="magnitude", target_macs=0.5))
    cost, kept_cost = _kept(tiny, PruneConfig(method="magnitude", target_macs=0.5, allocation="cost"))
    for r in (score, cost):
        assert abs(r.macs / r.base_macs - 0.5) <= 0.02 * 0.5
    assert kept_cost["time_embedding.linear_1"] > kept_score["time_embedding.linear_1"]
    assert cost.config["allocation"] == "cost" and score.config["allocation"] == "score"


def _mac_timing(job, device, dtype, repeats):
    """A stand-in for the measured timings: each call's MACs (whole, half the outputs, half the inputs)."""
    kind, settings = job[0], job[1]
    if kind == "attn":
        (heads, dim), (b, lq), (_, lk) = settings, job[2], job[3]
        return [2.0 * b * heads * lq * lk * d for d in (dim, dim // 2, dim // 2)]
    out, inp = settings[:2]
    if kind == "linear":
        rows = math.prod(job[2][:-1])
        return [float(rows * o * i) for o, i in ((out, inp), (out // 2, inp), (out, inp // 2))]
    kh, kw, sh, sw, ph, pw, dh, dw = settings[2:]
    b, _, h, w = job[2]
    positions = b * ((h + 2 * ph - dh * (kh - 1) - 1) // sh + 1) * ((w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)
    return [float(positions * o * i * kh * kw) for o, i in ((out, inp), (out // 2, inp), (out, inp // 2))]


def test_latency_table_slopes_cache_and_shared_shapes(tiny, tmp_path, monkeypatch):
    """Per channel: (whole - half) / channels removed, from the timings of the layer alone at the shape it sees at
    the latency batch; layers of one shape are timed once; a second table reads every timing from the cache."""
    from diffprune.prune import costs as C

    calls = []
    monkeypatch.setattr(C, "_time_job", lambda job, *a: calls.append(job) or _mac_timing(job, *a))
    adapter = adapter_for(tiny)
    table = C.latency_costs(tiny, adapter, device="cpu", dtype=torch.float32, batch=4, repeats=10, cache_dir=tmp_path)
    # batch 4 of 8x8 images, 3x3 convolution of 1 input channel (nothing to save: it has one)
    assert table["conv_in"] == {"out": 4 * 8 * 8 * 1 * 9, "in": 0.0}
    assert table["time_embedding.linear_1"] == {"out": 4 * 8, "in": 4 * 32}  # 8 -> 32
    # the 4x4 self-attention: q·kᵀ and the weighted sum, 2 * batch * 16 * 16 per channel of the inner width
    assert table["down_blocks.1.attentions.0"] == {"attn": 2 * 4 * 16 * 16}
    assert len(calls) < len(table)  # e.g. the two up-block attentions' projections share their shapes
    assert len({json.dumps(c) for c in calls}) == len(calls)
    calls.clear()
    again = C.latency_costs(tiny, adapter, device="cpu", dtype=torch.float32, batch=4, repeats=10, cache_dir=tmp_path)
    assert again == table and calls == []
    C.latency_costs(tiny, adapter, device="cpu", dtype=torch.float32, batch=8, repeats=10, cache_dir=tmp_path)
    assert len(calls) > 0  # another batch is another table


def test_latency_allocation_with_mac_proportional_timings_is_the_mac_allocation(tiny, tmp_path, monkeypatch):
    """If every layer's time were its MACs, ranking per second saved would rank per MAC saved: the same channels."""
    from diffprune.prune import costs as C

    monkeypatch.setattr(C, "_time_job", _mac_timing)
    monkeypatch.setenv("DIFFPRUNE_CACHE", str(tmp_path))
    by_macs, _ = _kept(tiny, PruneConfig(method="magnitude", target_macs=0.5, allocation="cost"))
    by_time, _ = _kept(tiny, PruneConfig(method="magnitude", target_macs=0.5, allocation="latency", latency_batch=2))
    assert by_time.widths == by_macs.widths and by_time.config["allocation"] == "latency"
    assert by_time.config["latency_batch"] == 2


def test_per_layer_maximum_and_conditioning_floor(tiny):
    report, kept = _kept(tiny, PruneConfig(method="magnitude", ratio=0.6, ratio_mode="uniform", global_ranking=True,
                                            max_layer_ratio=0.5))
    pruned = {n: k for n, k in kept.items() if "norm" not in n and n != "conv_out"}
    assert min(pruned.values()) >= 0.5 - 1e-9 and report.params < report.base_params
    _, unfloored = _kept(tiny, PruneConfig(method="magnitude", ratio=0.6, ratio_mode="uniform", global_ranking=True))
    assert min(unfloored.values()) < 0.5  # without the maximum some layer loses more than half
    _, floored = _kept(tiny, PruneConfig(method="magnitude", ratio=0.6, ratio_mode="uniform", global_ranking=True,
                                         conditioning_floor=0.9))
    assert floored["time_embedding.linear_1"] >= 0.9 - 1e-9 and floored["time_embedding.linear_2"] >= 0.9 - 1e-9
    assert adapter_for(tiny).conditioning_paths(tiny) == ["time_embedding"]


def test_rank_keys_and_floors():
    """What positions are ranked by: the score; over its group's mean (normalize); per MAC saved (cost)."""
    positions = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])]
    stub = GlobalPruner.__new__(GlobalPruner)
    stub.costs = [1.0, 100.0]
    stub.conditioning = ["time_embedding"]
    stub.allocation = PruneConfig(method="magnitude", target_macs=0.5)
    assert [k.tolist() for k in stub._rank_keys(positions)] == [[1, 2, 3], [10, 20, 30]]
    stub.allocation = PruneConfig(method="magnitude", target_macs=0.5, normalize="mean")
    assert [k.tolist() for k in stub._rank_keys(positions)] == [[0.5, 1, 1.5], [0.5, 1, 1.5]]
    stub.allocation = PruneConfig(method="magnitude", target_macs=0.5, allocation="cost")
    assert [k.tolist() for k in stub._rank_keys(positions)] == [[1, 2, 3], [0.1, 0.2, 0.3]]
    stub.costs = [0.0, 100.0]  # removing it saves nothing: ranked last
    assert stub._rank_keys(positions)[0].tolist() == [float("inf")] * 3
    stub.allocation = PruneConfig(method="magnitude", target_macs=0.5, max_layer_ratio=0.75, conditioning_floor=0.5)
    assert stub._floor("up_blocks.0.conv", 10) == 3 and stub._floor("time_embedding.linear_1", 10) == 5
    assert stub._floor("up_blocks.0.conv", 1) == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(allocation="size"), "unknown allocation 'size'; choose from"),
    (dict(normalize="max"), "unknown normalize 'max'; choose from"),
    (dict(max_layer_ratio=1.5), r"max_layer_ratio=1.5 must be in \(0, 1\)"),
    (dict(ratio=0.3, target_macs=None, allocation="cost"), "needs global ranking"),
])
def test_allocation_settings_are_checked(kwargs, message):
    with pytest.raises(DiffPruneError, match=message):
        PruneConfig(**{"method": "magnitude", "target_macs": 0.5, **kwargs})


def test_paper_ranking_keeps_the_committed_benchmark_hashes():
    """Settings added later, at the value earlier runs used, leave the stage hashes as they were: the demo config at
    seed 0 and 3,000 steps with the paper's ranking (no conditioning floor) gives the eval hash recorded in
    benchmarks/results/unet-methods.json; the default (floor 0.5) and cost allocation give others."""
    from diffprune.cli.demo import config_path
    from diffprune.pipeline import load_run_config, stage_hashes

    raw = yaml.safe_load(config_path(False).read_text())
    raw["seed"], raw["finetune"]["steps"] = 0, 3000
    assert stage_hashes(load_run_config(raw))["eval"] != "1fcdffa21a608e9c"
    raw["prune"]["conditioning_floor"] = 0
    assert stage_hashes(load_run_config(raw))["eval"] == "1fcdffa21a608e9c"
    raw["prune"]["allocation"] = "cost"
    assert stage_hashes(load_run_config(raw))["eval"] != "1fcdffa21a608e9c"


def test_the_default_keeps_half_of_the_conditioning_paths_under_global_ranking_only():
    assert PruneConfig(target_macs=0.5).conditioning_floor == DIFF_PRUNING_FLOOR == 0.5
    assert PruneConfig(target_macs=0.5, conditioning_floor=0).conditioning_floor == 0  # the paper
    assert PruneConfig(method="magnitude", target_macs=0.5).conditioning_floor == 0  # baselines as published
    assert PruneConfig(method="taylor", target_macs=0.5).conditioning_floor == 0
    assert PruneConfig(ratio=0.3).conditioning_floor == 0  # the paper's per-layer ratio: no layers compete
    assert PruneConfig(target_macs=0.5, ratio_mode="uniform", global_ranking=False).conditioning_floor == 0
    with pytest.raises(DiffPruneError, match=r"conditioning_floor=-0.1 must be in \[0, 1\)"):
        PruneConfig(target_macs=0.5, conditioning_floor=-0.1)
    with pytest.raises(DiffPruneError, match="needs global ranking"):
        PruneConfig(ratio=0.3, conditioning_floor=0.5)


@pytest.mark.parametrize("family, config", [("unet", "demo"), ("dit", "demo-dit")])
def test_the_default_arm_of_the_committed_benchmark_is_what_prune_does_today(family, config):
    """Each 'default' row of benchmarks/results/default-vs-baselines.json carries the eval hash that the shipped demo
    config without any prune override gives now (the hash covers every stage's settings and the inputs)."""
    from diffprune.cli.demo import DEMOS, config_path
    from diffprune.pipeline import load_run_config, stage_hashes

    rows = json.loads((ROOT / "benchmarks/results/default-vs-baselines.json").read_text())
    mine = [r for r in rows if r["family"] == family and r["arm"] == "default"]
    assert len(mine) >= 4 and len({r["seed"] for r in mine}) == len(mine)
    raw = yaml.safe_load(config_path(False, next(k for k, v in DEMOS.items() if v == config)).read_text())
    for r in mine[:2]:
        raw["seed"], raw["finetune"]["steps"] = r["seed"], r["steps"]
        assert stage_hashes(load_run_config(raw))["eval"] == r["hash"]


def test_noise_draws_sum_the_walks_of_successive_draws_and_one_draw_is_the_paper():
    """noise_draws=k: the first draw is the single draw (the paper's path, bitwise); the gradient is the sum of the k
    walks, each with its own draw from the seed's generator."""
    from diffusers import DDPMScheduler, UNet2DModel

    from diffprune.prune import accumulate_gradients, calibration_noise
    from diffprune.prune.api import _calibrate

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    sched, x0 = DDPMScheduler(num_train_timesteps=20), torch.rand(3, 1, 8, 8) * 2 - 1
    three = calibration_noise(x0.shape, 5, draws=3)
    assert three.shape == (3, *x0.shape) and torch.equal(three[0], calibration_noise(x0.shape, 5))
    assert not torch.equal(three[1], three[0])
    config = PruneConfig(method="diff-pruning", ratio=0.3, seed=5, calib_batch=3, max_timesteps=4, noise_draws=3)
    record = _calibrate(unet, adapter_for(unet), config, x0, sched, torch.device("cpu"), False)
    assert record["noise_draws"] == 3 and len(record["accumulated_per_draw"]) == 3
    got = {n: p.grad.clone() for n, p in unet.named_parameters()}
    ref = copy.deepcopy(unet)
    for k in range(3):
        accumulate_gradients(ref, sched, x0, three[k], config.timestep_strategy(), progress=False, zero_grad=k == 0)
    for n, p in ref.named_parameters():
        assert torch.allclose(got[n], p.grad, rtol=1e-5, atol=1e-7), n
    with pytest.raises(DiffPruneError, match="noise_draws"):
        PruneConfig(method="diff-pruning", ratio=0.3, noise_draws=0)
    with pytest.raises(DiffPruneError, match="noise_draws=2 does not apply to method 'magnitude'"):
        PruneConfig(method="magnitude", ratio=0.3, noise_draws=2)
