"""Every model family through one shared suite (as diffusers' ModelTesterMixin): a family only says how to build a
tiny instance; the shared tests prune it with diff-pruning and conditional calibration to 0.5x MACs, check the pruned
model runs, save -> load_pipeline gives bitwise-equal denoiser outputs, the stock pipeline samples from the saved
folder, MACs include the conditioning paths, `info --json` reports the family, and fine-tuning keeps the format."""
import json

import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel, LDMPipeline, UNet2DModel,
                       VQModel)

from diffprune.cli import main
from diffprune.errors import DiffPruneError
from diffprune.io import load_model, load_pipeline, load_pruned, save_pruned
from diffprune.macs import count_macs
from diffprune.prune import PruneConfig, prune_model
from diffprune.sampling import labels_for, sample


def _autoencoder_kwargs():
    return dict(in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)


def build_dit(folder):
    """A class-conditional DiTPipeline: tiny DiT (learned variance, 1000 classes as DiT-XL/2) over a tiny
    AutoencoderKL (16x16x1 images -> 8x8x4 latents)."""
    vae = AutoencoderKL(latent_channels=4, **_autoencoder_kwargs())
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    DiTPipeline(transformer=dit, vae=vae, scheduler=DDIMScheduler(num_train_timesteps=50)).save_pretrained(
        folder, safe_serialization=True)


def build_ldm(folder):
    """An unconditional LDMPipeline: tiny UNet2DModel over a tiny VQModel's latents (16x16x1 -> 8x8x3)."""
    vq = VQModel(latent_channels=3, num_vq_embeddings=16, **_autoencoder_kwargs())
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), norm_num_groups=4, attention_head_dim=8,
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    LDMPipeline(vqvae=vq, unet=unet, scheduler=DDIMScheduler(num_train_timesteps=50)).save_pretrained(
        folder, safe_serialization=True)


def build_unet_class(folder):
    """A bare class-conditional pixel UNet2DModel (10 classes, 8x8 grey) with its scheduler."""
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), norm_num_groups=4, attention_head_dim=8,
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=10)
    unet.save_pretrained(folder, safe_serialization=True)
    DDIMScheduler(num_train_timesteps=50).save_pretrained(folder / "scheduler")


FAMILIES = {"dit": (build_dit, "dit", "DiTPipeline"), "ldm": (build_ldm, "unet2d", "LDMPipeline"),
            "unet-class": (build_unet_class, "unet2d", None)}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """The family's tiny model, pruned with diff-pruning (conditional calibration on labelled MNIST) to 0.5x MACs."""
    build, adapter, pipeline = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    build(root / "base")
    config = PruneConfig(method="diff-pruning", target_macs=0.5, calib_batch=4, max_timesteps=3)
    loaded, report = prune_model(root / "base", config, "mnist", cache_dir=root / "cache", progress=False)
    save_pruned(loaded.denoiser, root / "pruned", loaded.pruning, scheduler=loaded.scheduler,
                pipeline=loaded.pipeline)
    return dict(name=request.param, adapter=adapter, pipeline=pipeline, root=root, loaded=loaded, report=report)


def test_prunes_to_half_the_macs_with_conditional_calibration(family):
    report, loaded = family["report"], family["loaded"]
    assert abs(report.macs / report.base_macs - 0.5) <= 0.02 * 0.5
    assert report.params < report.base_params and report.family == family["adapter"]
    cal = report.calibration
    assert cal["batch"] == 4 and cal["accumulated"] == [0, 1, 2]
    model = loaded.denoiser
    spec = loaded.adapter.conditioning(model)
    x = torch.randn(2, *loaded.adapter.input_shape(model))
    cond = None if spec is None else torch.tensor([3, 7])
    with torch.no_grad():
        out = loaded.adapter.forward(model, x, torch.tensor([5, 9]), cond)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_save_then_load_pipeline_is_bitwise_equal_and_keeps_the_other_components(family):
    root, loaded = family["root"], family["loaded"]
    again = load_model(root / "pruned")
    assert again.pruning["family"] == family["adapter"] and again.adapter.name == family["adapter"]
    assert (again.pipeline is None) == (family["pipeline"] is None)
    a, b = loaded.denoiser.eval(), again.denoiser.eval()
    inputs = loaded.adapter.example_inputs(a, 2)
    inputs[loaded.adapter.sample_arg] = torch.randn(inputs[loaded.adapter.sample_arg].shape)
    with torch.no_grad():
        assert torch.equal(a(**inputs).sample, b(**inputs).sample)
    if family["pipeline"] is not None:  # every other component copied byte for byte
        index = json.loads((root / "base" / "model_index.json").read_text())
        assert json.loads((root / "pruned" / "model_index.json").read_text()) == index
        for comp in ("vae", "vqvae", "scheduler"):
            if (root / "base" / comp).is_dir():
                for f in (root / "base" / comp).iterdir():
                    assert (root / "pruned" / comp / f.name).read_bytes() == f.read_bytes()
        assert torch.equal(load_pruned(root / "pruned").state_dict()[next(iter(b.state_dict()))],
                           next(iter(b.state_dict().values())))


def test_the_stock_pipeline_samples_from_the_saved_folder(family):
    root = family["root"]
    if family["pipeline"] is None:  # diffusers has no pipeline for a class-conditional UNet2DModel
        with pytest.raises(DiffPruneError, match="no stock diffusers pipeline samples a bare UNet2DModel"):
            load_pipeline(root / "pruned")
        return
    pipe = load_pipeline(root / "pruned")
    assert type(pipe).__name__ == family["pipeline"]
    g = torch.Generator().manual_seed(0)
    if family["pipeline"] == "DiTPipeline":  # guidance through the null class (1000 in diffusers' DiTPipeline)
        images = pipe(class_labels=[1, 2], guidance_scale=3.0, num_inference_steps=2, generator=g,
                      output_type="np").images
    else:
        images = pipe(batch_size=2, num_inference_steps=2, generator=g, output_type="np").images
    assert images.shape == (2, 16, 16, 1) and 0 <= images.min() and images.max() <= 1


def test_diffprune_samples_with_labels_guidance_and_decoding(family):
    loaded = load_model(family["root"] / "pruned")
    spec = loaded.adapter.conditioning(loaded.denoiser)
    guidance = 2.0 if spec is not None and spec.null_label is not None else 1.0
    images = sample(loaded.denoiser, loaded.scheduler, seeds=[0, 11, 12], guidance_scale=guidance,
                    codec=loaded.codec, num_inference_steps=2, progress=False)
    assert images.shape == (3, 1, 16 if loaded.codec else 8, 16 if loaded.codec else 8)
    assert images.min() >= -1 and images.max() <= 1
    if spec is not None:  # a seed draws the same class whatever the batch: s mod num_classes
        assert labels_for(loaded.denoiser, [0, 11, 12]).tolist() == [0, 11 % spec.num_classes, 12 % spec.num_classes]
        one = sample(loaded.denoiser, loaded.scheduler, seeds=[11], guidance_scale=guidance, codec=loaded.codec,
                     num_inference_steps=2, progress=False)
        torch.testing.assert_close(one[0], images[1], atol=1e-5, rtol=0)


def test_macs_include_the_conditioning_paths(family):
    model = family["loaded"].denoiser
    per_layer = count_macs(model).per_layer
    if family["name"] == "dit":  # timestep MLP and adaLN modulation of every block, and the final modulation
        assert per_layer["transformer_blocks.0.norm1.emb.timestep_embedder.linear_1"] > 0
        assert per_layer["transformer_blocks.1.norm1.linear"] > 0 and per_layer["proj_out_1"] > 0
    else:
        assert per_layer["time_embedding.linear_1"] > 0
    assert family["report"].macs == count_macs(model).macs


def test_info_reports_family_and_counts(family, capsys):
    assert main(["info", str(family["root"] / "pruned"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    report = family["report"]
    assert (info["params"], info["macs"]) == (report.params, report.macs)
    assert (info["base_params"], info["base_macs"]) == (report.base_params, report.base_macs)
    assert info["method"] == "diff-pruning" and info["family"] == family["adapter"]
    assert info["pipeline"] == family["pipeline"]
    assert (info["conditioning"] is None) == (family["name"] == "ldm")


def test_finetune_with_labels_and_distillation_keeps_the_format(family, tmp_path):
    root = family["root"]
    args = ["finetune", str(root / "pruned"), "--data", "mnist", "--steps", "3", "--batch-size", "4",
            "--checkpoint-every", "3", "--out", str(tmp_path / "ft"), "--device", "cpu", "--teacher",
            str(root / "base"), "--kd-weight", "0.5", "--cache-dir", str(root / "cache")]
    assert main(args) == 0
    tuned = load_model(tmp_path / "ft")
    assert tuned.pruning is not None and tuned.adapter.name == family["adapter"]
    assert (tuned.pipeline is None) == (family["pipeline"] is None) and (tuned.codec is None) == (family["name"] ==
                                                                                                  "unet-class")
    record = json.loads((tmp_path / "ft" / "train_config.json").read_text())
    spec = tuned.adapter.conditioning(tuned.denoiser)
    assert record["train"]["label_dropout"] == (0.1 if spec is not None and spec.null_label is not None else 0.0)
    assert record["data_record"]["labelled"] is True


def test_conditional_model_needs_labelled_data(family, tmp_path, capsys):
    if family["name"] == "ldm":
        return
    from PIL import Image

    (tmp_path / "flat").mkdir()
    for i in range(3):
        Image.new("L", (16, 16), 40 * i).save(tmp_path / "flat" / f"{i}.png")
    rc = main(["prune", "--model", str(family["root"] / "base"), "--data", str(tmp_path / "flat"), "--ratio", "0.3",
               "--ratio-mode", "uniform", "--calib-batch", "2", "--max-timesteps", "2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "is class-conditional" in err and "one sub-folder per class" in err
    assert not (tmp_path / "o").exists()


# --- family-independent checks -----------------------------------------------------------------------------------

def test_class_ids_out_of_range_are_refused(tmp_path):
    torch.manual_seed(0)
    build_unet_class(tmp_path / "m")
    m = load_model(tmp_path / "m")
    with pytest.raises(DiffPruneError, match=r"class labels \[12\] are out of range: this model was trained on 10 "):
        sample(m.denoiser, m.scheduler, seeds=[0], class_labels=[12], num_inference_steps=1, progress=False)
    with pytest.raises(DiffPruneError, match="needs a conditional model with a null label"):
        sample(m.denoiser, m.scheduler, seeds=[0], guidance_scale=3.0, num_inference_steps=1, progress=False)
    from PIL import Image

    for c in ("0", "11"):
        (tmp_path / "data" / c).mkdir(parents=True)
        Image.new("L", (8, 8)).save(tmp_path / "data" / c / "a.png")
    # folder classes map to 0..k-1 in sorted order: ok; a labelled source beyond the table is refused
    from diffprune.inputs import denoiser_data
    from diffprune.data import ImageData

    bad = ImageData(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), torch.tensor([10]), None, {"source": "x", "sha256": "0"})
    with pytest.raises(DiffPruneError, match=r"class labels of 'x' \[10\] are out of range"):
        denoiser_data(m.denoiser, bad)


def test_unsupported_pipeline_and_mismatched_sizes_are_clear_errors(tmp_path):
    torch.manual_seed(0)
    build_ldm(tmp_path / "ldm")
    index = json.loads((tmp_path / "ldm" / "model_index.json").read_text())
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    with pytest.raises(DiffPruneError, match=r"'KandinskyPipeline', which diffprune cannot prune; supported "
                                             r"pipelines: \[.DDIMPipeline., .DDPMPipeline., .DiTPipeline., .FluxPipeline., "
                                             r".LDMPipeline., .PixArtAlphaPipeline., .PixArtSigmaPipeline., "
                                             r".StableDiffusion3Pipeline., .StableDiffusionPipeline., "
                                             r".StableDiffusionXLPipeline.\]"):
        load_model(tmp_path / "sd")
    from diffprune.prune import PruneConfig, prune_

    m = load_model(tmp_path / "ldm")
    wrong = torch.zeros(2, 1, 8, 8)  # the autoencoder takes 16x16 images
    with pytest.raises(DiffPruneError, match=r"shape \(2, 1, 8, 8\) but the model takes \[N, 1, 16, 16\]"):
        prune_(m.denoiser, PruneConfig(ratio=0.3, max_timesteps=1), wrong, scheduler=m.scheduler, codec=m.codec,
               progress=False)


def test_prediction_type_that_the_scheduler_contradicts_is_refused(tmp_path, capsys):
    torch.manual_seed(0)
    build_unet_class(tmp_path / "m")
    rc = main(["prune", "--model", str(tmp_path / "m"), "--method", "magnitude", "--ratio", "0.3",
               "--prediction-type", "v_prediction", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "--prediction-type v_prediction contradicts the model's scheduler, which says 'epsilon'" in err


def test_v_prediction_model_calibrates_against_v():
    """The calibration loss of a v-prediction model is mse(f, v), not mse(f, eps): gradients match a hand-made v loss
    and differ from an eps one."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from diffprune.prune import accumulate_gradients
    from diffprune.timesteps import make_strategy

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    sched = DDPMScheduler(num_train_timesteps=10, prediction_type="v_prediction")
    x0, noise = torch.rand(2, 1, 8, 8) * 2 - 1, torch.randn(2, 1, 8, 8)
    res = accumulate_gradients(unet, sched, x0, noise, make_strategy("all", max_timesteps=2), progress=False)
    got = unet.conv_in.weight.grad.clone()

    def grad(target_of):
        unet.zero_grad()
        for t in (0, 1):
            tt = torch.full((2,), t)
            F.mse_loss(unet(sched.add_noise(x0, noise, tt), tt).sample, target_of(tt)).backward()
        return unet.conv_in.weight.grad.clone()

    assert res.accumulated == [0, 1]
    torch.testing.assert_close(got, grad(lambda tt: sched.get_velocity(x0, noise, tt)))
    assert not torch.allclose(got, grad(lambda tt: noise))


def test_eval_checks_the_requested_classes(tmp_path):
    """A class-conditional model's eval reports class accuracy (overall and per class) and draws the per-class
    figures; an unconditional one has none."""
    from diffprune.evaluate import EvalConfig, evaluate

    torch.manual_seed(0)
    build_unet_class(tmp_path / "m")
    m = load_model(tmp_path / "m")
    config = EvalConfig(n=20, steps=2, latency_batches=(), classifier="mnist-classifier", grid_count=8)
    metrics = evaluate(m.denoiser, m.denoiser, config=config, out_dir=tmp_path / "ev", scheduler=m.scheduler)
    detail = metrics["class_accuracy_detail"]
    assert 0 <= metrics["class_accuracy"] <= 1 and metrics["class_accuracy"] == metrics["class_accuracy_teacher"]
    assert len(detail["student"]["per_class"]) == 10 and detail["student"]["n"] == 20
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved["class_accuracy"] == metrics["class_accuracy"]
    for name in ("class_accuracy.png", "class_grid.png"):
        assert (tmp_path / "ev" / name).stat().st_size > 1000, name
    build_ldm(tmp_path / "ldm")
    u = load_model(tmp_path / "ldm")
    plain = evaluate(u.denoiser, None, config=EvalConfig(n=2, steps=1, latency_batches=(), classifier="mnist-classifier"),
                     out_dir=tmp_path / "ev2", scheduler=u.scheduler, codec=u.codec)
    assert "class_accuracy" not in plain


def test_train_a_latent_dit_from_scratch_writes_a_dit_pipeline(tmp_path, capsys):
    """`train --config <DiT> --autoencoder <AutoencoderKL>`: latents of labelled data, a DiTPipeline folder out
    (autoencoder copied, the data's class names as id2label), which diffprune loads and samples by class."""
    torch.manual_seed(0)
    AutoencoderKL(latent_channels=4, **_autoencoder_kwargs()).save_pretrained(tmp_path / "vae")
    (tmp_path / "dit.json").write_text(json.dumps(dict(
        _class_name="DiTTransformer2DModel", num_attention_heads=2, attention_head_dim=8, in_channels=4,
        out_channels=4, num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)))
    args = ["train", "--config", str(tmp_path / "dit.json"), "--autoencoder", str(tmp_path / "vae"), "--data", "mnist",
            "--steps", "2", "--batch-size", "4", "--checkpoint-every", "2", "--out", str(tmp_path / "out"),
            "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    m = load_model(tmp_path / "out")
    assert m.pipeline.family.pipeline_class == "DiTPipeline" and m.class_names == [str(d) for d in range(10)]
    assert (tmp_path / "out" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        tmp_path / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert json.loads((tmp_path / "out" / "train_config.json").read_text())["train"]["label_dropout"] == 0.1
    # latents are not clipped to [-1, 1] while sampling, by the pipeline's scheduler nor by diffprune's sampler
    assert json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())["clip_sample"] is False
    latents = sample(m.denoiser, m.scheduler, seeds=range(4), codec=m.codec, decode=False, num_inference_steps=3,
                     progress=False)
    assert latents.abs().max() > 1.5
    # balanced labels cover the 10 trained digits, not the 1,000-row label table
    assert labels_for(m.denoiser, range(20), num_classes=len(m.class_names)).max() == 9
    assert load_pipeline(tmp_path / "out").get_label_ids(["3"]) == [3]
    assert main([*args[:-2], "--out", str(tmp_path / "o2"), "--autoencoder", str(tmp_path / "dit.json")]) == 2
    assert "is not a diffusers model folder" in capsys.readouterr().err


def test_depth_pruning_removes_whole_dit_blocks_and_replays(tmp_path):
    """--method depth: the lowest-scoring blocks (summed |w*g| of the calibration) go whole, never block 0; the
    saved folder replays bitwise; a second pruning of it and a family without blocks are refused."""
    torch.manual_seed(0)
    vae = AutoencoderKL(latent_channels=4, **_autoencoder_kwargs())
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    DiTPipeline(transformer=dit, vae=vae, scheduler=DDIMScheduler(num_train_timesteps=50)).save_pretrained(
        tmp_path / "dit", safe_serialization=True)
    cfg = PruneConfig(method="depth", target_macs=0.5, calib_batch=4, max_timesteps=3, macs_tolerance=0.15)
    loaded, report = prune_model(tmp_path / "dit", cfg, "mnist", cache_dir=tmp_path / "cache", progress=False)
    removed = report.structure["meta"]["removed_blocks"]
    scores = report.scores["blocks"]
    assert len(removed) == 2 and 0 not in removed and len(loaded.denoiser.transformer_blocks) == 2
    assert sorted(removed) == sorted(torch.argsort(scores[1:])[:2].add(1).tolist())  # lowest scores, block 0 kept
    assert [r["blocks_removed"] for r in report.search] == [0, 1, 2, 3] and report.structure["history"] == []
    save_pruned(loaded.denoiser, tmp_path / "p", loaded.pruning, scheduler=loaded.scheduler, pipeline=loaded.pipeline)
    again = load_model(tmp_path / "p")
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 9]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(loaded.denoiser.eval()(x, t, y).sample, again.denoiser(x, t, y).sample)
    with pytest.raises(DiffPruneError, match="was depth-pruned .* prune the original"):
        prune_model(tmp_path / "p", PruneConfig(method="magnitude", ratio=0.3), progress=False)
    build_ldm(tmp_path / "ldm")
    with pytest.raises(DiffPruneError, match="removes whole blocks, which the unet2d adapter does not define"):
        prune_model(tmp_path / "ldm", PruneConfig(method="depth", ratio=0.5, calib_batch=2, max_timesteps=1), "mnist",
                    cache_dir=tmp_path / "cache", progress=False)


def test_run_config_accepts_a_latent_pipeline(tmp_path):
    """`diffprune run` on a DiT pipeline: prune -> finetune (labels, distillation) -> eval (decoded samples)."""
    from diffprune.pipeline import load_run_config, run_pipeline

    torch.manual_seed(0)
    build_dit(tmp_path / "dit")
    cfg = load_run_config({
        "model": str(tmp_path / "dit"), "data": "mnist",
        "prune": {"method": "diff-pruning", "target_macs": 0.5, "calib_batch": 4, "max_timesteps": 2},
        "finetune": {"steps": 2, "batch_size": 4, "kd_weight": 0.5, "checkpoint_every": 2},
        "eval": {"n": 4, "steps": 2, "data": None, "latency_batches": [], "grid_count": 4},
    })
    m = run_pipeline(cfg, tmp_path / "run", device="cpu", progress=False, log=lambda *a: None)
    assert 0.49 <= m["macs"] / m["base_macs"] <= 0.51 and -1 <= m["ssim"] <= 1
    assert m["params"] < m["base_params"]
    assert (tmp_path / "run" / "finetune" / "model" / "model_index.json").is_file()
    assert type(load_pipeline(tmp_path / "run" / "finetune" / "model")).__name__ == "DiTPipeline"


@pytest.mark.parametrize("how", ["truncated", "other content", "unreadable"])
def test_latent_cache_damaged_is_recomputed_equal(tmp_path, how, capsys):
    """The latents of a latent pipeline's data, cached: a damaged entry is re-encoded, equal to a cold cache."""
    from safetensors.torch import save_file

    from diffprune.inputs import encode_cached

    torch.manual_seed(0)
    build_ldm(tmp_path / "ldm")
    codec = load_model(tmp_path / "ldm").codec
    images = (torch.rand(6, 1, 16, 16) * 255).to(torch.uint8)
    cold, key = encode_cached(codec, images, "data-sha", cache_dir=tmp_path / "cache")
    entry = tmp_path / "cache" / "latents" / f"{key}.safetensors"
    if how == "truncated":
        entry.write_bytes(entry.read_bytes()[:50])
    elif how == "other content":  # right shape, other values (e.g. another data set's latents copied in)
        save_file({"latents": cold.flip(0).contiguous()}, str(entry))
    else:
        entry.write_bytes(b"not safetensors")
    again, key2 = encode_cached(codec, images, "data-sha", cache_dir=tmp_path / "cache")
    assert key2 == key and torch.equal(again, cold) and "recomputing it" in capsys.readouterr().err


def test_odd_config_and_label_maps_are_one_line_errors(tmp_path, monkeypatch):
    """A `_class_name` that is not a string and a label map whose ids are not numbers are refused in one line; a
    model folder under ~ is found."""
    import json as _json

    torch.manual_seed(0)
    build_dit(tmp_path / "dit")
    index = _json.loads((tmp_path / "dit" / "model_index.json").read_text())
    (tmp_path / "dit" / "model_index.json").write_text(_json.dumps({**index, "id2label": {"a": "cat"}}))
    with pytest.raises(DiffPruneError, match="has id2label=.*it must map class ids 0, 1, ... to names"):
        load_model(tmp_path / "dit").class_names
    cfg = _json.loads((tmp_path / "dit" / "transformer" / "config.json").read_text())
    (tmp_path / "dit" / "transformer" / "config.json").write_text(_json.dumps({**cfg, "_class_name": ["x"]}))
    with pytest.raises(DiffPruneError, match=r"no '_class_name' string \(found \['x'\]\)"):
        load_model(tmp_path / "dit" / "transformer")
    with pytest.raises(DiffPruneError, match=r"transformer/config.json holds a \['x'\]"):
        load_model(tmp_path / "dit")
    build_unet_class(tmp_path / "home" / "m")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert load_model("~/m").adapter.name == "unet2d"
