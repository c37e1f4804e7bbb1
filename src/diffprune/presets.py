"""Named UNet2DModel architectures (``diffprune train --preset NAME``). Shapes live here, never in paths."""
from __future__ import annotations

from .registry import Registry

PRESETS: Registry[dict] = Registry("preset")

# The shipped MNIST teacher: 16x16 grey, 1.11M params, self-attention at 8x8.
PRESETS.register("mnist-16")(dict(
    sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8, attention_head_dim=32,
))
# google/ddpm-cifar10-32 (35,746,307 params).
PRESETS.register("ddpm-cifar10-32")(dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=32, attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
))
# A few-thousand-parameter UNet for tests.
PRESETS.register("tiny")(dict(
    sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=4, attention_head_dim=8,
))


def build_unet(preset: str | dict):
    """A freshly initialised UNet2DModel from a preset name or a config dict."""
    from diffusers import UNet2DModel

    from .errors import DiffPruneError, require

    cfg = PRESETS.get(preset) if isinstance(preset, str) else preset
    groups = cfg.get("norm_num_groups", 32)
    bad = [c for c in cfg.get("block_out_channels", ()) if not isinstance(c, int) or c % groups]
    require(not bad, f"block_out_channels {list(cfg.get('block_out_channels', ()))} must all be divisible by "
                     f"norm_num_groups={groups} (GroupNorm), e.g. channels (32, 64) with 8 groups")
    try:
        return UNet2DModel(**cfg)
    except (TypeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DiffPruneError(f"cannot build a UNet2DModel from this config ({first}); see the UNet2DModel "
                             "arguments in diffusers' documentation") from None
