"""MACs of one UNet call at batch 1 (torch's flop counter, attention matmuls included) and parameter counts."""
import torch

from diffprune.macs import count_macs, count_params
from diffprune.presets import build_model


def test_tiny_unet_macs_per_layer_by_hand():
    unet = build_model("tiny")  # 8x8, 1 channel, widths (8, 16), attention at 4x4 with 16 channels, 2 heads of 8
    r = count_macs(unet)
    assert r.params == count_params(unet) == sum(p.numel() for p in unet.parameters()) == 44969
    # conv_in: 3x3, 1 -> 8 channels over 8x8 positions
    assert r.per_layer["conv_in"] == 8 * 8 * 8 * 1 * 9
    # to_q: 16 tokens x 16 -> 16
    assert r.per_layer["down_blocks.1.attentions.0.to_q"] == 16 * 16 * 16
    # attention core (SDPA, counted on CPU too): q k^T and attn v, each tokens^2 x channels
    assert r.per_layer["down_blocks.1.attentions.0"] == 2 * 16 * 16 * 16
    # conv_out: 3x3, 8 -> 1 over 8x8
    assert r.per_layer["conv_out"] == 8 * 8 * 1 * 8 * 9
    assert sum(r.per_layer.values()) == r.macs == 1042944


def test_macs_are_batch_one_and_ignore_training_mode():
    unet = build_model("tiny").train()
    a = count_macs(unet).macs
    assert unet.training  # restored
    x = {"sample": torch.zeros(3, 1, 8, 8), "timestep": torch.ones(3, dtype=torch.long)}
    assert count_macs(unet, x).macs == 3 * a


def test_a_meta_device_copy_counts_the_same_macs():
    """Target-MACs probes prune and count a shapes-only copy: it must count what the real model counts, attention
    included (the SDPA kernel differs between devices)."""
    from diffprune._torch import meta_copy as _meta_copy
    from diffprune.prune import PruneConfig, prune_

    for name in ("tiny", "mnist-dit"):
        torch.manual_seed(0)
        model = build_model(name)
        prune_(model, PruneConfig(method="magnitude", ratio=0.4, ratio_mode="uniform"), progress=False)
        twin = _meta_copy(model)
        assert all(p.is_meta for p in twin.parameters()) and not any(p.is_meta for p in model.parameters())
        real, meta = count_macs(model), count_macs(twin)
        assert meta.macs == real.macs > 0 and meta.per_layer == real.per_layer and meta.params == real.params
