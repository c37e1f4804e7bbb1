"""The benchmarks' one way to name a model: a preset name (``diffprune.presets``) or a full-size configuration below
builds that architecture with random weights; anything else is loaded as diffprune loads a model (a shipped name, a
folder or a hub id)."""
import torch

from diffprune.io import LoadedModel, load_model
from diffprune.presets import PRESETS, build_model

# Full-size configurations, from their public config values (nothing is downloaded); see benchmarks/full_size.py.
CONFIGS = {
    "dit-xl-2-256": ("DiTTransformer2DModel", dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28, sample_size=32,
        patch_size=2, num_embeds_ada_norm=1000, activation_fn="gelu-approximate", norm_type="ada_norm_zero")),
    "ldm4-imagenet-256": ("UNet2DModel", dict(
        sample_size=64, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(192, 384, 576, 960),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=32,
        norm_num_groups=32, num_class_embeds=1000)),
    "sd15-unet": ("UNet2DConditionModel", dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
        norm_num_groups=32)),
    "sd21-base-unet": ("UNet2DConditionModel", dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=1024,
        attention_head_dim=[5, 10, 20, 20], use_linear_projection=True, norm_num_groups=32)),
    # issue 31's text-to-image denoisers (timed on their own conditioning dicts, adapters' example_cond)
    "sdxl-unet": ("UNet2DConditionModel", dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=[5, 10, 20],
        transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        norm_num_groups=32)),
    "pixart-alpha-512": ("PixArtTransformer2DModel", dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28, sample_size=64,
        patch_size=2, cross_attention_dim=1152, caption_channels=4096, norm_type="ada_norm_single",
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000)),
    # PixArt-Sigma-XL-2-1024-MS's transformer config: 1024 px (128x128 latents), 300 T5 tokens
    "pixart-sigma-1024": ("PixArtTransformer2DModel", dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28, sample_size=128,
        patch_size=2, cross_attention_dim=1152, caption_channels=4096, norm_type="ada_norm_single",
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, interpolation_scale=2,
        use_additional_conditions=False, norm_elementwise_affine=False, norm_eps=1e-6, attention_bias=True)),
    # stable-diffusion-3.5-medium's transformer config: MMDiT-X, QK-norm, dual attention in blocks 0-12
    "sd35-medium": ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))),
    "sd3-medium": ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=192)),
    # FLUX.1-dev's widths (1024 px, 512 T5 tokens) with 2 of its 19 double and 4 of its 38 single blocks: the full
    # 12B model in float32, teacher and pruned copy, does not fit one GPU beside pruning's bookkeeping
    "flux-dev-6-blocks": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))),
    # FLUX.1-dev's transformer config whole (11.9B parameters): only for benchmarks/prune_memory.py --stream, which
    # writes its random bfloat16 weights shard by shard (built whole in float32 it would need 48 GB)
    "flux-dev": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))),
}


def benchmark_model(name: str, seed: int = 0) -> LoadedModel:
    """``name``'s denoiser in eval mode (a preset's or configuration's weights from ``torch.manual_seed(seed)``; no
    scheduler)."""
    if name in PRESETS or name in CONFIGS:
        torch.manual_seed(seed)
        arch = name if name in PRESETS else {"_class_name": CONFIGS[name][0], **CONFIGS[name][1]}
        return LoadedModel(denoiser=build_model(arch).eval(), scheduler=None, pruning=None, source=name)
    loaded = load_model(name)
    loaded.denoiser.eval()
    return loaded
