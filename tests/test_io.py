"""Safe format: save -> load is bitwise equal, pipelines sample from the loaded UNet, loaders refuse pickles."""
import json

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from diffprune.errors import DiffPruneError
from diffprune.io import load_model, load_pruned, save_pruned
from diffprune.presets import build_model
from diffprune.prune import PruneConfig, prune_


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    torch.manual_seed(0)
    unet = build_model("tiny")
    sched = DDPMScheduler(num_train_timesteps=10)
    report = prune_(unet, PruneConfig(ratio=0.5, calib_batch=2, max_timesteps=3),
                    torch.rand(2, 1, 8, 8) * 2 - 1, scheduler=sched, progress=False)
    out = tmp_path_factory.mktemp("io") / "pruned"
    save_pruned(unet, out, report.to_dict(), scheduler=sched)
    return unet, report, out


def test_round_trip_is_bitwise_equal(pruned):
    unet, report, out = pruned
    assert sorted(p.name for p in out.iterdir()) == [".diffprune", "README.md",  # the model card
        "config.json", "diffusion_pytorch_model.safetensors", "pruning.json", "scheduler"]
    loaded = load_pruned(out)
    assert not loaded.training  # loaded for inference, as diffusers' from_pretrained
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 4, 9])
    # Same mode on both sides: diffusers' ResnetBlock2D makes its shortcut input contiguous only in training mode
    # (attention outputs are channels-last views), so train vs eval take different conv kernels (last-bit differences).
    for mode in (False, True):
        unet.train(mode), loaded.train(mode)
        with torch.no_grad():
            assert torch.equal(unet(x, t).sample, loaded(x, t).sample), mode
    unet.train()
    for a, b in zip(unet.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    attn, attn2 = unet.down_blocks[1].attentions[0], loaded.down_blocks[1].attentions[0]
    assert (attn.heads, attn.scale) == (attn2.heads, attn2.scale)


def test_pruned_tensors_are_laid_out_as_a_fresh_model(pruned):
    """Pruning must leave every parameter contiguous with a freshly built tensor's strides (else slower kernels)."""
    unet, _, _ = pruned
    for name, p in unet.named_parameters():
        assert p.is_contiguous() and p.stride() == torch.empty(p.shape).stride(), name


def test_pruning_json_records_everything(pruned):
    _, report, out = pruned
    rec = json.loads((out / "pruning.json").read_text())
    assert rec["method"] == "diff-pruning" and rec["config"]["seed"] == 0 and rec["diffprune_version"]
    assert rec["family"] == "unet2d"
    assert (rec["base_params"], rec["params"]) == (44969, report.params) and rec["params"] < 44969
    assert rec["macs"] == report.macs < rec["base_macs"] == 1042944
    assert rec["calibration"]["losses"]["t"] == [0, 1, 2] and rec["calibration"]["cutoff_t"] == 2
    # one name per figure: no second copy of a number under another key
    assert not {"params_before", "params_after", "widths_before", "timestep_losses", "cutoff_t", "seed"} & set(rec)
    assert rec["widths"]["conv_in"] == [1, report.widths["conv_in"][1]] and rec["base_widths"]["conv_in"] == [1, 8]
    assert rec["structure"]["history"] and rec["config"]["ratio"] == 0.5
    assert json.loads((out / "config.json").read_text())["block_out_channels"] == [8, 16]  # the base config


def test_pipelines_sample_from_the_loaded_unet(pruned):
    _, _, out = pruned
    m = load_model(out)
    assert isinstance(m.scheduler, DDPMScheduler) and m.pruning["method"] == "diff-pruning"
    g = torch.Generator().manual_seed(0)
    images = DDPMPipeline(unet=m.denoiser, scheduler=m.scheduler)(batch_size=2, generator=g, num_inference_steps=10,
                                                                  output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()
    ddim = DDIMPipeline(unet=m.denoiser, scheduler=DDIMScheduler.from_config(m.scheduler.config))
    images = ddim(batch_size=2, num_inference_steps=3, generator=g, output_type="np").images
    assert images.shape == (2, 8, 8, 1) and 0 <= images.min() and images.max() <= 1


def test_save_refuses_non_empty_folder_and_mismatched_record(pruned, tmp_path):
    unet, report, out = pruned
    with pytest.raises(DiffPruneError, match="not empty"):
        save_pruned(unet, out, report.to_dict())
    with pytest.raises(DiffPruneError, match="differ from the pruning record"):
        save_pruned(build_model("tiny"), tmp_path / "x", report.to_dict())
    assert not (tmp_path / "x").exists()


def test_plain_diffusers_and_pipeline_folders_load_unpruned(tmp_path):
    unet = build_model("tiny")
    unet.save_pretrained(tmp_path / "model", safe_serialization=True)
    m = load_model(tmp_path / "model")
    assert m.pruning is None and m.scheduler is None
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), m.denoiser.state_dict().values()))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=10)).save_pretrained(tmp_path / "pipe")
    m = load_model(tmp_path / "pipe")
    assert m.pruning is None and isinstance(m.scheduler, DDPMScheduler)
    assert m.scheduler.config.num_train_timesteps == 10


def test_pickles_and_missing_paths_are_refused(tmp_path):
    ckpt = tmp_path / "unet.pth"
    torch.save({"w": torch.zeros(1)}, ckpt)
    with pytest.raises(DiffPruneError, match="pickle checkpoint.*convert it to safetensors"):
        load_model(ckpt)
    folder = tmp_path / "binonly"
    build_model("tiny").save_pretrained(folder, safe_serialization=False)
    assert [p.suffix for p in folder.iterdir() if p.name.startswith("diffusion")] == [".bin"]
    with pytest.raises(DiffPruneError, match="pickle"):
        load_model(folder)
    with pytest.raises(DiffPruneError, match="not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(DiffPruneError, match="no pruning.json"):
        load_pruned(tmp_path / "binonly")


def test_recorded_torch_pruning_version_is_the_installed_distribution(pruned):
    from importlib.metadata import version

    _, _, out = pruned
    rec = json.loads((out / "pruning.json").read_text())
    assert rec["torch_pruning_version"] == rec["structure"]["torch_pruning"] == version("torch-pruning") == "1.6.1"


def test_hub_ids_load_pruned_models_and_fetch_no_pickles(pruned, tmp_path, monkeypatch):
    """A pruned folder pushed to the hub loads pruned; only the UNet/scheduler files are fetched, never pickles."""
    import fnmatch
    import shutil

    import huggingface_hub

    unet, _, out = pruned
    repo = tmp_path / "repo"
    shutil.copytree(out, repo)
    torch.save({}, repo / "diffusion_pytorch_model.bin")
    (repo / "vae").mkdir()
    (repo / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    fetched = []

    def fake_snapshot(repo_id, allow_patterns):  # the hub's filter, on a local "repo"
        cache = tmp_path / "cache" / repo_id.replace("/", "--")
        for f in repo.rglob("*"):
            rel = f.relative_to(repo).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (cache / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, cache / rel)
                fetched.append(rel)
        return str(cache)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    m = load_model("someone/pruned-unet")
    assert sorted(fetched) == ["config.json", "diffusion_pytorch_model.safetensors", "pruning.json",
                               "scheduler/scheduler_config.json", "vae/diffusion_pytorch_model.safetensors"]
    assert m.source == "someone/pruned-unet" and m.pruning["method"] == "diff-pruning"
    assert isinstance(m.scheduler, DDPMScheduler)
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), m.denoiser.state_dict().values()))

    def offline(repo_id, allow_patterns):
        raise OSError("We have no connection")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(DiffPruneError, match=r"could not fetch 'someone/x' from the Hugging Face hub \(OSError: We "
                                             r"have no connection\); check the id"):
        load_model("someone/x")


def test_scale_and_shift_resnets_lose_the_same_channels_in_both_halves(tmp_path):
    """resnet_time_scale_shift="scale_shift": each ResNet's time projection is 2c wide (scale and shift of a c-wide
    level); Torch-Pruning roots that group at the projection, so each half's channel was a position of its own and
    the halves lost different channels (GroupNorm broke). Rooted at the c-wide layer, both halves lose the level's
    channels; diff-pruning at 0.5, saved and loaded bitwise."""
    torch.manual_seed(0)
    from diffprune.presets import PRESETS

    unet = UNet2DModel(**{**PRESETS.get("tiny"), "resnet_time_scale_shift": "scale_shift"})
    sched = DDPMScheduler(num_train_timesteps=10)
    report = prune_(unet, PruneConfig(ratio=0.5, calib_batch=2, max_timesteps=3), torch.rand(2, 1, 8, 8) * 2 - 1,
                    scheduler=sched, progress=False)
    resnets = [m for m in unet.modules() if type(m).__name__ == "ResnetBlock2D"]
    assert len(resnets) == 8 and report.params < 0.5 * report.base_params
    for r in resnets:
        c = r.conv1.out_channels
        assert r.time_emb_proj.out_features == 2 * c and r.norm2.num_channels == c and c % r.norm2.num_groups == 0
    save_pruned(unet.eval(), tmp_path / "p", report.to_dict(), scheduler=sched)
    loaded = load_pruned(tmp_path / "p")
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 4, 9])
    with torch.no_grad():
        assert torch.equal(unet(x, t).sample, loaded(x, t).sample)
