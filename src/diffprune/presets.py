"""Named denoiser architectures (``diffprune train --preset NAME``). Shapes live here, never in paths."""
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


# The shipped latent DiT (mnist-dit): class-conditional over the 8x8x4 latents of its AutoencoderKL; patch 2 gives 16
# tokens of width 128 (4 heads of 32), 6 blocks. The label table has 1,001 rows like DiT-XL/2's so that diffusers'
# stock DiTPipeline, which uses class 1000 as the null class for guidance, works unchanged; labels 0-9 are the digits.
PRESETS.register("mnist-dit")(dict(
    _class_name="DiTTransformer2DModel", sample_size=8, in_channels=4, out_channels=4, patch_size=2, num_layers=6,
    num_attention_heads=4, attention_head_dim=32, num_embeds_ada_norm=1000,
))


def build_model(preset: str | dict):
    """A freshly initialised denoiser from a preset name or a config dict (``_class_name`` picks the class, default
    ``UNet2DModel``; any class with a diffprune adapter)."""
    import diffusers

    from .adapters import adapter_for_class_name
    from .errors import DiffPruneError, require

    cfg = dict(PRESETS.get(preset) if isinstance(preset, str) else preset)
    class_name = cfg.pop("_class_name", "UNet2DModel")
    adapter_for_class_name(class_name)  # a class diffprune can prune, or a clear error
    if "block_out_channels" in cfg:
        groups = cfg.get("norm_num_groups", 32)
        bad = [c for c in cfg.get("block_out_channels", ()) if not isinstance(c, int) or c % groups]
        require(not bad, f"block_out_channels {list(cfg.get('block_out_channels', ()))} must all be divisible by "
                         f"norm_num_groups={groups} (GroupNorm), e.g. channels (32, 64) with 8 groups")
    try:
        return getattr(diffusers, class_name)(**cfg)
    except (TypeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DiffPruneError(f"cannot build a {class_name} from this config ({first}); see the {class_name} "
                             "arguments in diffusers' documentation") from None
