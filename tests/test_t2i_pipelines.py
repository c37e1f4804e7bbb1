"""SDXL, PixArt-α/Σ, SD3 and Flux as pipelines: tiny random pipelines built here with the stock diffusers and
transformers classes (tiny CLIP and T5 encoders; a byte-level CLIP tokenizer and a T5 tokenizer over a tiny unigram
vocabulary, both written by the test, no download). For each family: prompts are encoded exactly as the stock
pipeline's ``encode_prompt`` encodes them (and SDXL's time ids as its ``_get_add_time_ids`` makes them), cached,
calibrated from captions with diff-pruning to 0.5x MACs, saved, reloaded as the stock pipeline with bitwise-equal
denoiser outputs and byte-identical other components, sampled 2 steps by the stock pipeline; unsupported variants are
refused and over-long prompts truncated and said."""
import json
import string

import pytest
import torch

transformers = pytest.importorskip("transformers")

import diffusers  # noqa: E402
from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler,  # noqa: E402
                       FlowMatchEulerDiscreteScheduler)

from diffprune.cli import main  # noqa: E402
from diffprune.errors import DiffPruneError  # noqa: E402
from diffprune.io import load_model, load_pipeline, save_pruned  # noqa: E402
from diffprune.prune import PruneConfig, prune_model  # noqa: E402
from test_family_pixart import build_pixart  # noqa: E402
from test_family_sdxl import build_sdxl_unet  # noqa: E402
from test_sd import write_captioned, write_tokenizer  # noqa: E402

PROMPTS = ["a red square", "a blue square", "A Blue  Square "]


def t5_tokenizer():
    """A T5 tokenizer (unigram over single characters and word-initial letters) built in memory."""
    chars = sorted(set(string.ascii_lowercase + string.digits + ".,!?'-"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(c, -3.0) for c in chars]
    vocab += [("▁" + c, -2.5) for c in string.ascii_lowercase]
    return transformers.T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def t5(width: int):
    torch.manual_seed(3)
    return transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(t5_tokenizer()), d_model=width, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def clip(root, name: str, width: int, projection: int | None = None, seed: int = 1):
    """A tiny CLIP text encoder (with a projection: CLIPTextModelWithProjection) and its 16-token tokenizer."""
    tokenizer, vocab = write_tokenizer(root / f"vocab-{name}")
    eos = vocab["<|endoftext|>"]
    config = transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=width, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos, pad_token_id=eos,
        projection_dim=projection or width)
    torch.manual_seed(seed)
    cls = transformers.CLIPTextModel if projection is None else transformers.CLIPTextModelWithProjection
    return cls(config), tokenizer


def vae():
    torch.manual_seed(2)
    return AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=16)  # scale factor 2: 8x8 latents are 16x16 images


def sdxl(root):
    te, tok = clip(root, "1", 32)
    te2, tok2 = clip(root, "2", 32, projection=32, seed=4)  # context 32 + 32 = 64, pooled 32
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    return diffusers.StableDiffusionXLPipeline(vae=vae(), text_encoder=te, text_encoder_2=te2, tokenizer=tok,
                                               tokenizer_2=tok2, unet=build_sdxl_unet(), scheduler=sched)


def pixart(root, cls="PixArtAlphaPipeline"):
    return getattr(diffusers, cls)(tokenizer=t5_tokenizer(), text_encoder=t5(24), vae=vae(),
                                   transformer=build_pixart(), scheduler=DPMSolverMultistepScheduler())


def sd3(root):
    te, tok = clip(root, "1", 32, projection=16)
    te2, tok2 = clip(root, "2", 32, projection=16, seed=4)  # pooled 16 + 16; CLIP context 64 padded to T5's 64
    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(
        num_layers=2, attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
        pooled_projection_dim=32, sample_size=8, patch_size=2, in_channels=4, out_channels=4, pos_embed_max_size=8)
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae(), text_encoder=te,
        tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2, text_encoder_3=t5(64), tokenizer_3=t5_tokenizer())


def flux(root):
    te, tok = clip(root, "1", 16)  # pooled 16 (pooler_output), T5 context 32
    torch.manual_seed(0)  # 8 heads and 3 single-stream blocks: whole-head steps fine enough for 0.5x +- 2%
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=3, attention_head_dim=8, num_attention_heads=8,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    transformer.register_to_config(sample_size=8)  # 8x8 latents, 16x16 images
    return diffusers.FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae(), text_encoder=te,
                                  tokenizer=tok, text_encoder_2=t5(32), tokenizer_2=t5_tokenizer(),
                                  transformer=transformer)


FAMILIES = {"StableDiffusionXLPipeline": (sdxl, "unet", "unet2d-cond"),
            "PixArtAlphaPipeline": (pixart, "transformer", "pixart"),
            "PixArtSigmaPipeline": (lambda root: pixart(root, "PixArtSigmaPipeline"), "transformer", "pixart"),
            "StableDiffusion3Pipeline": (sd3, "transformer", "sd3"),
            "FluxPipeline": (flux, "transformer", "flux")}


@torch.no_grad()  # as the stock __call__ runs it
def stock_encoding(pipe, prompts, null=False) -> dict:
    """The stock pipeline's own encode_prompt, called as its __call__ calls it (the negative branch for null)."""
    name = type(pipe).__name__
    if name == "StableDiffusionXLPipeline":
        pe, npe, ppe, nppe = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=null)
        out = {"context": npe, "pooled": nppe} if null else {"context": pe, "pooled": ppe}
        ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), torch.float32, text_encoder_projection_dim=32)
        return {**out, "time_ids": ids.repeat(len(out["context"]), 1)}
    if name.startswith("PixArt"):
        length = 120 if name == "PixArtAlphaPipeline" else 300
        pe, pm, npe, npm = pipe.encode_prompt(prompts, do_classifier_free_guidance=null, device="cpu",
                                              max_sequence_length=length)
        return {"context": npe, "mask": npm} if null else {"context": pe, "mask": pm}
    if name == "StableDiffusion3Pipeline":
        pe, npe, ppe, nppe = pipe.encode_prompt(prompts, None, None, device="cpu", do_classifier_free_guidance=null)
        return {"context": npe, "pooled": nppe} if null else {"context": pe, "pooled": ppe}
    pe, ppe, _ = pipe.encode_prompt(prompts, None, device="cpu")
    return {"context": pe, "pooled": ppe}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    name = request.param
    build, denoiser, adapter = FAMILIES[name]
    root = tmp_path_factory.mktemp(name)
    build(root).save_pretrained(root / "pipe", safe_serialization=True)
    write_captioned(root / "data")
    config = PruneConfig(method="diff-pruning", target_macs=0.5, calib_batch=4, max_timesteps=3)
    loaded, report = prune_model(root / "pipe", config, str(root / "data"), cache_dir=root / "cache", progress=False)
    save_pruned(loaded.denoiser, root / "pruned", loaded.pruning, pipeline=loaded.pipeline)
    return dict(name=name, root=root, loaded=loaded, report=report, denoiser=denoiser, adapter=adapter)


def test_prompts_are_encoded_as_the_stock_encode_prompt(family):
    text = load_model(family["root"] / "pipe").text_encoder
    stock = diffusers.DiffusionPipeline.from_pretrained(family["root"] / "pipe")
    assert type(stock).__name__ == family["name"]
    ours, theirs = text.encode(PROMPTS), stock_encoding(stock, PROMPTS)
    null, stock_null = text.null(), stock_encoding(stock, [""], null=True)
    assert set(ours) == set(theirs) and set(null) == set(stock_null)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
        assert torch.equal(null[k], stock_null[k]), k
    spec = family["loaded"].adapter.conditioning(family["loaded"].denoiser)
    assert tuple(ours) == spec.keys and spec.check_context(ours) is not None
    assert ours["context"].shape[-1] == spec.context_dim and len(ours["context"]) == 3
    if "pooled" in ours:
        assert ours["pooled"].shape == (3, spec.pooled_dim)
    if family["name"] == "StableDiffusionXLPipeline":  # force_zeros_for_empty_prompt: SDXL guides against zeros
        assert ours["time_ids"].tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 3
        assert not null["context"].any() and not null["pooled"].any()
    lengths = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300, "StableDiffusion3Pipeline": 16 + 256,
               "FluxPipeline": 512, "StableDiffusionXLPipeline": 16}
    assert ours["context"].shape[1] == lengths[family["name"]]


def test_encode_cached_computes_once(family, tmp_path, monkeypatch):
    text = family["loaded"].text_encoder
    calls = []
    encode = text.encode
    monkeypatch.setattr(text, "encode", lambda prompts, **kw: calls.append(len(prompts)) or encode(prompts, **kw))
    first, key = text.encode_cached(PROMPTS + PROMPTS[:1], cache_dir=tmp_path)
    again, key2 = text.encode_cached(PROMPTS + PROMPTS[:1], cache_dir=tmp_path)
    assert calls == [3] and key == key2 and len(list((tmp_path / "text").glob("*.safetensors"))) == 1
    unique = sorted(set(PROMPTS))  # encoded once each, in one batch
    direct = encode(unique)
    rows = torch.tensor([unique.index(p) for p in PROMPTS + PROMPTS[:1]])
    assert set(first) == set(again) == set(direct)
    for k in direct:
        assert torch.equal(first[k], direct[k][rows]) and torch.equal(again[k], direct[k][rows]), k


def test_caption_calibration_prunes_to_half_the_macs(family):
    report = family["report"]
    assert report.family == family["adapter"] and report.method == "diff-pruning"
    assert abs(report.macs / report.base_macs - 0.5) <= 0.02 * 0.5 and report.params < report.base_params
    assert report.calibration["batch"] == 4 and report.calibration["accumulated"] == [0, 1, 2]
    assert len(list((family["root"] / "cache" / "text").glob("*.safetensors"))) == 1  # captions encoded once


def test_saved_pipeline_loads_as_the_stock_one_bitwise(family):
    root, loaded = family["root"], family["loaded"]
    pipe = load_pipeline(root / "pruned")
    assert type(pipe).__name__ == family["name"]
    den = getattr(pipe, family["denoiser"])
    adapter = loaded.adapter
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *adapter.input_shape(den), generator=g)
    cond = loaded.text_encoder.encode(PROMPTS[:2])
    with torch.no_grad():
        a = adapter.forward(loaded.denoiser.eval(), x, torch.tensor([3, 40]), cond)
        b = adapter.forward(den.eval(), x, torch.tensor([3, 40]), cond)
    assert torch.equal(a, b)
    others = [c for c in json.loads((root / "pipe" / "model_index.json").read_text())
              if (root / "pipe" / c).is_dir() and c != family["denoiser"]]
    assert len(others) >= 4  # vae, scheduler, text encoders and tokenizers
    for comp in others:
        for f in (root / "pipe" / comp).iterdir():
            assert (root / "pruned" / comp / f.name).read_bytes() == f.read_bytes(), f
    kwargs = {"guidance_scale": 3.5 if family["name"] == "FluxPipeline" else 3.0}
    if family["name"].startswith("PixArt"):
        kwargs["use_resolution_binning"] = False  # its bins are for 256-1024 px models
    out = pipe(PROMPTS[:2], num_inference_steps=2, height=16, width=16, output_type="latent",
               generator=torch.Generator().manual_seed(0), **kwargs).images
    assert out.shape[0] == 2 and torch.isfinite(out).all()


def test_info_names_the_family_and_the_conditioning_keys(family, capsys):
    assert main(["info", str(family["root"] / "pruned")]) == 0
    text = capsys.readouterr().out
    assert f"(family {family['adapter']}) in a {family['name']}" in text
    keys = family["loaded"].adapter.conditioning(family["loaded"].denoiser).keys
    assert f"keys {', '.join(keys)}" in text


def test_a_too_long_prompt_is_truncated_and_said(family, capsys):
    text = family["loaded"].text_encoder
    long = " ".join(["red"] * 200)  # 3 T5 tokens a word: past CLIP's 16 and every T5 limit (120, 256, 300, 512)
    before = text.truncated
    capsys.readouterr()
    out = text.encode([long, "a red square"])
    err = capsys.readouterr().err
    assert text.truncated == before + 1 and err.count("\n") == 1
    assert "1 of 2 prompt(s) are longer than the text encoders take" in err and "were truncated" in err
    assert len(out["context"]) == 2


def test_data_free_calibration_from_prompts(family):
    """Every family samples its calibration inputs from prompts (a dict conditioning through the sampler: DDIM, or
    Euler for the flow-matching SD3 and Flux)."""
    config = PruneConfig(method="diff-pruning", ratio=0.3, calib_batch=2, max_timesteps=2, data_free_steps=2)
    _, report = prune_model(family["root"] / "pipe", config, "data-free", prompts=["a red square", "a blue square"],
                            progress=False)
    assert report.calibration["prompts"] == 2 and report.calibration["accumulated"] == [0, 1]
    assert report.calibration["batch"] == 2 and report.params < report.base_params


@pytest.mark.parametrize("variant", ["StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLControlNetPipeline",
                                     "FluxFillPipeline", "FluxKontextPipeline", "PixArtAlphaControlNetPipeline"])
def test_unsupported_variants_are_refused_naming_the_supported(variant, tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": variant, "unet": ["diffusers", "x"]}))
    with pytest.raises(DiffPruneError) as err:
        load_model(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and f"is a {variant!r}, which diffprune cannot prune; supported pipelines:" in msg
    for supported in FAMILIES:
        assert repr(supported) in msg


def test_sharded_text_encoder_and_transformer_load(tmp_path):
    """Large T5 encoders and transformers come in shards (model-0000x-of-0000n.safetensors + an index): they load,
    encode and predict as the unsharded pipeline, and a pruned copy keeps the shards byte for byte."""
    pipe = sd3(tmp_path)
    pipe.save_pretrained(tmp_path / "whole", safe_serialization=True)
    pipe.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="40KB")
    shards = sorted(p.name for p in (tmp_path / "sharded" / "text_encoder_3").glob("model-*.safetensors"))
    assert len(shards) > 1 and not (tmp_path / "sharded" / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    whole, sharded = load_model(tmp_path / "whole"), load_model(tmp_path / "sharded")
    a, b = whole.text_encoder.encode(PROMPTS), sharded.text_encoder.encode(PROMPTS)
    assert all(torch.equal(a[k], b[k]) for k in a)
    x, t, cond = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 40, 700]), a
    with torch.no_grad():
        assert torch.equal(whole.adapter.forward(whole.denoiser, x, t, cond),
                           sharded.adapter.forward(sharded.denoiser, x, t, cond))
    from diffprune.prune import prune_

    report = prune_(sharded.denoiser, PruneConfig(method="magnitude", ratio=0.3), progress=False)
    save_pruned(sharded.denoiser, tmp_path / "pruned", report.to_dict(), pipeline=sharded.pipeline)
    for name in shards:
        assert (tmp_path / "pruned" / "text_encoder_3" / name).read_bytes() == \
            (tmp_path / "sharded" / "text_encoder_3" / name).read_bytes()
    assert load_model(tmp_path / "pruned").text_encoder.encode(PROMPTS)["context"].equal(a["context"])


def test_eval_takes_each_pipelines_own_guidance_by_default(family, tmp_path):
    """`diffprune eval` without --guidance-scale: FLUX.1-dev samples with the guidance it takes as an input at
    FluxPipeline's 3.5; every other model with none (1); an explicit value is kept."""
    common = ["eval", "--model", str(family["root"] / "pruned"), "--data", "none", "--n", "2", "--steps", "1",
              "--latency-batches", "none", "--prompt", "a red square", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "default")]) == 0
    config = json.loads((tmp_path / "default" / "metrics.json").read_text())["config"]
    assert config["guidance_scale"] == (3.5 if family["name"] == "FluxPipeline" else 1.0)
    if family["name"] == "FluxPipeline":  # the one whose default differs from 1
        assert main([*common, "--guidance-scale", "2", "--out", str(tmp_path / "given")]) == 0
        assert json.loads((tmp_path / "given" / "metrics.json").read_text())["config"]["guidance_scale"] == 2.0
