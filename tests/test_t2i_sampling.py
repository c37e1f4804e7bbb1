"""Sampling the text-to-image families (SDXL, PixArt-α, SD3, Flux) with dict conditioning: for each, a tiny random
stock pipeline (denoiser, tiny AutoencoderKL, scheduler; no text encoders: the pipelines take the embeddings
directly) run for a few steps from diffprune's per-seed start noise gives the latents diffprune's ``sample`` gives.
SDXL and PixArt are sampled by diffprune's DDIM built from their own scheduler's config (Euler, DPM-Solver): the
stock pipeline runs a ``DDIMScheduler`` from the same config with the DDIM paper's spacing (``leading``, offset 0).
SD3 and Flux are flow-matching models: Euler over their scheduler's sigmas (Flux: FluxPipeline's sigmas and its
resolution shift ``mu``), with classifier-free guidance for SD3 and Flux's embedded guidance."""
import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel, PixArtAlphaPipeline,
                       SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionXLPipeline)

from diffprune.components import LatentCodec
from diffprune.errors import DiffPruneError
from diffprune.sampling import FlowEuler, sample
from test_family_pixart import CAPTION, build_pixart
from test_family_sdxl import CONTEXT as SDXL_CONTEXT, POOLED as SDXL_POOLED, build_sdxl_unet

SEEDS = [3, 4]
TOL = dict(atol=1e-5, rtol=1e-5)


def tiny_vae():
    """16x16 RGB <-> 8x8x4 latents (vae_scale_factor 2)."""
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=16)


CODEC = LatentCodec(tiny_vae())  # a latent model: latents are returned as they are (decode=False), never clamped


def start_noise(shape=(4, 8, 8)):
    """diffprune's start noise: seed s's own generator (sampling._denoise)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in SEEDS])


def text(n, length, dim, pooled=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = {"context": torch.randn(n, length, dim, generator=g)}
    if pooled:
        out["pooled"] = torch.randn(n, pooled, generator=g)
    return out


def stock_ddim(scheduler):
    """The stock pipeline's DDIM from the model's scheduler config, spaced as diffprune's (the DDIM paper's)."""
    return DDIMScheduler.from_config(scheduler.config, timestep_spacing="leading", steps_offset=0, clip_sample=False)


# --- DDPM-family text models: diffprune's DDIM from their own scheduler config ------------------------------------

def test_sdxl_samples_like_the_stock_pipeline_with_guidance():
    unet, vae = build_sdxl_unet().eval(), tiny_vae()
    euler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                   timestep_spacing="leading")
    ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])  # the pipeline's: original size, crop, target (16 px)
    pos, neg = text(2, 12, SDXL_CONTEXT, SDXL_POOLED), text(1, 12, SDXL_CONTEXT, SDXL_POOLED, seed=2)
    ours = sample(unet, euler, seeds=SEEDS, prompt_embeds={**pos, "time_ids": ids.repeat(2, 1)},
                  negative_prompt_embeds={**neg, "time_ids": ids}, guidance_scale=4.0, num_inference_steps=3,
                  codec=LatentCodec(vae), decode=False, progress=False)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=stock_ddim(euler))
    with torch.no_grad():
        theirs = pipe(prompt_embeds=pos["context"], pooled_prompt_embeds=pos["pooled"],
                      negative_prompt_embeds=neg["context"].expand(2, -1, -1),
                      negative_pooled_prompt_embeds=neg["pooled"].expand(2, -1), guidance_scale=4.0, height=16,
                      width=16, num_inference_steps=3, latents=start_noise(), output_type="latent").images
    assert ours.shape == (2, 4, 8, 8)
    torch.testing.assert_close(ours, theirs, **TOL)
    one = {"context": pos["context"][:1], "pooled": pos["pooled"][:1], "time_ids": ids}
    images = sample(unet, euler, seeds=SEEDS[:1], prompt_embeds=one, num_inference_steps=2, codec=LatentCodec(vae),
                    progress=False)
    assert images.shape == (1, 3, 16, 16) and images.abs().max() <= 1  # decoded by the autoencoder


def pixart_cond(n, seed):
    c = text(n, 10, CAPTION, seed=seed)
    mask = torch.ones(n, 10, dtype=torch.long)
    mask[:, 7:] = 0
    return {**c, "mask": mask}


def test_pixart_samples_like_the_stock_pipeline_with_guidance():
    model, vae = build_pixart().eval(), tiny_vae()
    dpm = DPMSolverMultistepScheduler()  # PixArt ships DPM-Solver; diffprune runs DDIM from its config
    pos, neg = pixart_cond(2, 1), pixart_cond(1, 2)
    ours = sample(model, dpm, seeds=SEEDS, prompt_embeds=pos, negative_prompt_embeds=neg, guidance_scale=4.5,
                  num_inference_steps=3, codec=LatentCodec(vae), decode=False, progress=False)
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=model,
                               scheduler=stock_ddim(dpm))
    with torch.no_grad():
        theirs = pipe(prompt_embeds=pos["context"], prompt_attention_mask=pos["mask"],
                      negative_prompt_embeds=neg["context"].expand(2, -1, -1),
                      negative_prompt_attention_mask=neg["mask"].expand(2, -1), guidance_scale=4.5, height=16,
                      width=16, num_inference_steps=3, latents=start_noise(), output_type="latent",
                      use_resolution_binning=False, negative_prompt=None).images
    assert ours.shape == (2, 4, 8, 8)
    torch.testing.assert_close(ours, theirs, **TOL)


# --- flow matching: Euler over the scheduler's sigmas -----------------------------------------------------------

def build_sd3():
    torch.manual_seed(0)
    return SD3Transformer2DModel(num_layers=2, attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                                 caption_projection_dim=32, pooled_projection_dim=16, sample_size=8, patch_size=2,
                                 in_channels=4, out_channels=4, qk_norm="rms_norm", dual_attention_layers=(0,),
                                 pos_embed_max_size=8)


@pytest.mark.parametrize("dynamic", [False, True], ids=["shift3", "dynamic-shift"])
def test_sd3_samples_like_the_stock_pipeline_with_guidance(dynamic):
    model, vae = build_sd3().eval(), tiny_vae()
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=dynamic)
    pos, neg = text(2, 12, 32, 16), text(1, 12, 32, 16, seed=2)
    ours = sample(model, sched, seeds=SEEDS, prompt_embeds=pos, negative_prompt_embeds=neg, guidance_scale=5.0,
                  num_inference_steps=3, codec=LatentCodec(vae), decode=False, progress=False)
    pipe = StableDiffusion3Pipeline(transformer=model, scheduler=FlowMatchEulerDiscreteScheduler.from_config(
        sched.config), vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        text_encoder_3=None, tokenizer_3=None)
    with torch.no_grad():
        theirs = pipe(prompt_embeds=pos["context"], pooled_prompt_embeds=pos["pooled"],
                      negative_prompt_embeds=neg["context"].expand(2, -1, -1),
                      negative_pooled_prompt_embeds=neg["pooled"].expand(2, -1), guidance_scale=5.0, height=16,
                      width=16, num_inference_steps=3, latents=start_noise(), output_type="latent").images
    assert ours.shape == (2, 4, 8, 8) and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, theirs, **TOL)


def build_flux(guidance_embeds=True):
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                                   pooled_projection_dim=16, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4))
    model.register_to_config(sample_size=8)
    return model.eval()


def flux_scheduler():  # FLUX.1's scheduler config: resolution-dependent shift
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)


def flux_stock(model, cond, **kwargs):
    """FluxPipeline's latents, unpacked, from diffprune's start noise (packed as the pipeline packs it)."""
    pipe = FluxPipeline(scheduler=flux_scheduler(), vae=tiny_vae(), text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=model)
    packed = FluxPipeline._pack_latents(start_noise(), 2, 4, 8, 8)
    with torch.no_grad():
        out = pipe(prompt_embeds=cond["context"], pooled_prompt_embeds=cond["pooled"], height=16, width=16,
                   num_inference_steps=3, latents=packed, output_type="latent", **kwargs).images
    return FluxPipeline._unpack_latents(out, 16, 16, 2)


@pytest.mark.parametrize("guidance", [None, 1.5], ids=["default-3.5", "1.5"])
def test_flux_samples_like_the_stock_pipeline_with_embedded_guidance(guidance):
    model, cond = build_flux(), text(2, 12, 32, 16)
    ours = sample(model, flux_scheduler(), seeds=SEEDS, prompt_embeds=cond, guidance_scale=guidance,
                  num_inference_steps=3, codec=CODEC, decode=False, progress=False)
    theirs = flux_stock(model, cond, **({} if guidance is None else {"guidance_scale": guidance}))
    assert ours.shape == (2, 4, 8, 8) and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, theirs, **TOL)


def test_flux_guidance_is_an_input_not_a_second_call():
    """The guidance value reaches the model (different latents), each step calls it once on the batch, and a
    negative prompt is not used (no unconditional branch)."""
    model, cond = build_flux(), text(2, 12, 32, 16)
    calls = []
    hook = model.register_forward_hook(lambda m, a, kw, out: calls.append(kw["hidden_states"].shape[0]),
                                       with_kwargs=True)
    a = sample(model, flux_scheduler(), seeds=SEEDS, prompt_embeds=cond, num_inference_steps=2, codec=CODEC,
               decode=False, progress=False)
    hook.remove()
    b = sample(model, flux_scheduler(), seeds=SEEDS, prompt_embeds=cond, guidance_scale=7.0, num_inference_steps=2,
               codec=CODEC, decode=False, progress=False)
    c = sample(model, flux_scheduler(), seeds=SEEDS, prompt_embeds=cond, negative_prompt_embeds=text(1, 12, 32, 16),
               num_inference_steps=2, codec=CODEC, decode=False, progress=False)
    assert calls == [2, 2] and not torch.allclose(a, b, atol=1e-4) and torch.equal(a, c)


def test_flux_schnell_takes_classifier_free_guidance_with_a_negative():
    """Without guidance_embeds (FLUX.1-schnell) guidance_scale is classifier-free guidance, as for SD3: FluxPipeline's
    true_cfg_scale with a negative prompt."""
    model, cond, neg = build_flux(guidance_embeds=False), text(2, 12, 32, 16), text(1, 12, 32, 16, seed=2)
    ours = sample(model, flux_scheduler(), seeds=SEEDS, prompt_embeds=cond, negative_prompt_embeds=neg,
                  guidance_scale=2.0, num_inference_steps=3, codec=CODEC, decode=False, progress=False)
    theirs = flux_stock(model, cond, negative_prompt_embeds=neg["context"].expand(2, -1, -1),
                        negative_pooled_prompt_embeds=neg["pooled"].expand(2, -1), true_cfg_scale=2.0)
    torch.testing.assert_close(ours, theirs, **TOL)


def test_flux_schedule_is_flux_pipelines():
    """FluxPipeline's sigmas linspace(1, 1/n, n), shifted by mu = calculate_shift(16 packed tokens), then 0."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    euler = FlowEuler(flux_scheduler(), 4, image_tokens=16, sigmas=np.linspace(1.0, 0.25, 4))
    mu = calculate_shift(16, 256, 4096, 0.5, 1.15)
    s = np.linspace(1.0, 0.25, 4)
    expected = np.exp(mu) / (np.exp(mu) + (1 / s - 1))
    np.testing.assert_allclose(euler.sigmas.numpy(), np.append(expected, 0.0), rtol=1e-6)
    np.testing.assert_allclose(euler.timesteps.numpy(), expected * 1000, rtol=1e-6)


@pytest.mark.parametrize("bad, says", [(dict(skip="quad"), "skip='quad'"), (dict(sampler="ddpm"), "sampler='ddpm'"),
                                       (dict(eta=0.5), "eta=0.5")])
def test_ddim_options_are_refused_for_flow_models(bad, says):
    with pytest.raises(DiffPruneError, match=f"{says} cannot be used with a flow-matching model .* only "
                                             "num_inference_steps and guidance_scale apply") as err:
        sample(build_sd3(), FlowMatchEulerDiscreteScheduler(), seeds=[0], prompt_embeds=text(1, 4, 32, 16),
               num_inference_steps=2, progress=False, **bad)
    assert "\n" not in str(err.value)


def test_flux_guidance_must_be_a_non_negative_number():
    with pytest.raises(DiffPruneError, match=r"guidance_scale=-1.0 must be a number >= 0 .* default 3.5"):
        sample(build_flux(), flux_scheduler(), seeds=[0], prompt_embeds=text(1, 4, 32, 16), guidance_scale=-1.0,
               num_inference_steps=2, progress=False)
