"""Reliability of output folders and names: foreign files survive --overwrite, file systems without locks get a
clear error, shipped names never hide (or get overwritten by) a local folder."""
import errno
from pathlib import Path

import pytest

import diffprune._fs as fs
from diffprune.cli import main
from diffprune.errors import DiffPruneError
from diffprune.presets import build_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("m") / "tiny"
    build_model("tiny").save_pretrained(d, safe_serialization=True)
    return d


def test_overwrite_refuses_a_folder_holding_a_users_file(model_dir, tmp_path, capsys):
    out = tmp_path / "exp"
    args = ["sample", str(model_dir), "--n", "2", "--steps", "2", "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    (out / "mine").mkdir()
    (out / "mine" / "chapter1.tex").write_text("my thesis")
    capsys.readouterr()
    assert main(args + ["--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "mine/chapter1.tex" in err and "did not write" in err and len(err.strip().splitlines()) == 1
    assert (out / "mine" / "chapter1.tex").read_text() == "my thesis"
    (out / "mine" / "chapter1.tex").unlink()
    (out / "mine").rmdir()
    assert main(args + ["--overwrite"]) == 0  # only diffprune's own files: replaced


def test_a_file_system_without_locks_says_what_to_do(tmp_path, monkeypatch):
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(DiffPruneError, match=r"cannot lock '.*\.out\.lock': this file system has no file locks.*"
                                             "DIFFPRUNE_NO_LOCK=1"):
        with fs.output_lock(tmp_path / "out"):
            raise AssertionError("the block must not run without a lock")
    assert list(tmp_path.iterdir()) == []  # no lock file left behind
    monkeypatch.setenv("DIFFPRUNE_NO_LOCK", "1")
    ran = []
    with fs.output_lock(tmp_path / "out"):
        ran.append(1)
    assert ran == [1] and list(tmp_path.iterdir()) == []  # unlocked: the block runs, no lock file


def test_shipped_names_neither_hide_nor_get_overwritten(tmp_path, monkeypatch, capsys):
    from diffprune.assets import shipped_model_path

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DiffPruneError, match="is the name of a shipped model.*write ./mnist-teacher"):
        fs.check_output_dir("mnist-teacher", overwrite=False)
    assert fs.check_output_dir("./mnist-teacher", overwrite=False).name == "mnist-teacher"
    assert shipped_model_path("mnist-teacher") is not None  # no local folder: the shipped one
    (tmp_path / "mnist-teacher").mkdir()
    capsys.readouterr()
    assert shipped_model_path("mnist-teacher") is None  # a local folder wins, with a notice
    assert "using the local folder 'mnist-teacher'" in capsys.readouterr().err


def test_prompt_files_utf8_with_or_without_bom(tmp_path):
    from types import SimpleNamespace

    from diffprune.cli._common import read_prompts

    f = tmp_path / "p.txt"
    f.write_bytes("\ufeffa café — at dusk\n\nsecond\n".encode("utf-8"))
    assert read_prompts(SimpleNamespace(prompt=None, prompt_file=str(f))) == ["a café — at dusk", "second"]
    f.write_bytes("a café\n".encode("latin-1"))
    with pytest.raises(DiffPruneError, match=r"--prompt-file '.*p.txt' is not UTF-8 .*save it as UTF-8"):
        read_prompts(SimpleNamespace(prompt=None, prompt_file=str(f)))


@pytest.fixture()
def ddpm_pipeline(model_dir, tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    folder = tmp_path / "pipe"
    DDPMPipeline(unet=UNet2DModel.from_pretrained(model_dir), scheduler=DDPMScheduler(num_train_timesteps=50)) \
        .save_pretrained(folder, safe_serialization=True)
    return folder


def test_component_names_must_stay_inside_the_pipeline(ddpm_pipeline, tmp_path, capsys):
    import json

    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "key.json").write_text("{}")
    index = json.loads((ddpm_pipeline / "model_index.json").read_text())
    (ddpm_pipeline / "model_index.json").write_text(json.dumps({**index, "../secret": ["diffusers", "x"]}))
    outs = tmp_path / "outs"
    code = main(["prune", "--model", str(ddpm_pipeline), "--method", "magnitude", "--ratio", "0.3",
                 "--out", str(outs / "pruned"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "'../secret', which is not a plain folder name" in err
    assert not outs.exists() or list(outs.iterdir()) == []  # nothing written, nothing copied out of the pipeline


def test_pipeline_outputs_copy_only_safe_files(ddpm_pipeline, tmp_path, capsys):
    (ddpm_pipeline / "scheduler" / "evil.py").write_text("import os")
    (ddpm_pipeline / "scheduler" / "extra.bin").write_bytes(b"\x80pickle")
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(ddpm_pipeline), "--method", "magnitude", "--ratio", "0.3",
                 "--out", str(out), "--device", "cpu"]) == 0
    assert "left out of the output pipeline" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "scheduler").iterdir()) == ["scheduler_config.json"]


def test_damaged_weights_and_mismatched_pipelines_are_one_line_errors(model_dir, ddpm_pipeline, tmp_path, capsys):
    import json
    import shutil

    bad = tmp_path / "truncated"
    shutil.copytree(model_dir, bad)
    w = bad / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    capsys.readouterr()
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "cannot load the weights in" in err and "restore the folder" in err and len(err.strip().splitlines()) == 1
    index = json.loads((ddpm_pipeline / "model_index.json").read_text())
    (ddpm_pipeline / "model_index.json").write_text(json.dumps({**index, "unet": ["diffusers", "UNet2DConditionModel"]}))
    assert main(["info", str(ddpm_pipeline)]) == 2
    assert "model_index.json names unet=['diffusers', 'UNet2DConditionModel'] but unet/config.json holds a " \
           "'UNet2DModel'" in capsys.readouterr().err


@pytest.mark.parametrize("device, message", [("foo", "is not a torch device"), ("cuda:7", "CUDA")])
def test_bad_device_is_refused_before_anything_is_written(model_dir, tmp_path, capsys, device, message):
    import torch

    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    out = tmp_path / "s"
    assert main(["sample", str(model_dir), "--n", "2", "--out", str(out), "--device", device]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_class_folders_map_to_the_models_classes_by_name():
    import torch
    from diffusers import UNet2DModel

    from diffprune.data import ImageData
    from diffprune.inputs import denoiser_data

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 8),
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=4,
                       num_class_embeds=4)
    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)

    def data(names, labels):
        return ImageData(images, torch.tensor(labels), names, {"source": "folder", "sha256": "x"})

    trained = ["zero", "one", "two"]  # the model's id2label; its label table has a fourth, untrained row
    got = denoiser_data(unet, data(["one", "two", "zero"], [0, 1, 2, 0]), class_names=trained)
    assert got.cond.tolist() == [1, 2, 0, 1] and got.class_names == trained
    with pytest.raises(DiffPruneError, match=r"classes \['three'\] that the model was not trained on"):
        denoiser_data(unet, data(["one", "three", "two", "zero"], [0, 1, 2, 3]), class_names=trained)
    with pytest.raises(DiffPruneError, match=r"class labels \[3\] .* trained on 3 classes"):
        denoiser_data(unet, data(None, [0, 1, 2, 3]), class_names=trained)
    assert denoiser_data(unet, data(None, [0, 1, 2, 3])).cond.tolist() == [0, 1, 2, 3]  # no names: the table rules


def test_a_hub_repo_with_only_pickles_names_the_repo(model_dir, tmp_path, monkeypatch):
    import huggingface_hub

    def snapshot(repo_id, allow_patterns):  # the hub fetched what the patterns allow: the config, not the .bin
        cache = tmp_path / "hub" / "snapshots" / "abc123"
        cache.mkdir(parents=True)
        (cache / "config.json").write_text((model_dir / "config.json").read_text())
        return str(cache)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    with pytest.raises(DiffPruneError) as e:
        from diffprune.io import load_model

        load_model("someone/bin-only")
    assert "hub repo 'someone/bin-only' has no diffusion_pytorch_model.safetensors" in str(e.value)
    assert "never pickles" in str(e.value) and str(tmp_path) not in str(e.value)


def test_distillation_teacher_of_another_input_shape_is_refused_before_writing(model_dir, tmp_path):
    import torch
    from diffusers import UNet2DModel

    from diffprune.finetune import finetune
    from diffprune.train import TrainConfig

    other = UNet2DModel.from_pretrained(model_dir)
    other.register_to_config(sample_size=other.config.sample_size * 2)
    other.save_pretrained(tmp_path / "big", safe_serialization=True)
    out = tmp_path / "ft"
    with pytest.raises(DiffPruneError, match=r"teacher .*big' takes inputs of shape \(1, 16, 16\) but the student "
                                             r"takes \(1, 8, 8\)"):
        finetune(str(model_dir), "mnist", TrainConfig(steps=1, batch_size=2, kd_weight=0.5), out,
                 teacher=str(tmp_path / "big"), progress=False)
    assert not out.exists()
    assert torch.equal(UNet2DModel.from_pretrained(tmp_path / "big").conv_in.weight, other.conv_in.weight)


def test_eval_stage_is_redone_on_another_device(tmp_path):
    import json

    from diffprune.pipeline import stage_complete

    (tmp_path / "stage.json").write_text(json.dumps({"hash": "h", "device": "cpu"}))
    assert stage_complete(tmp_path, "h", "cpu") and stage_complete(tmp_path, "h")
    assert not stage_complete(tmp_path, "h", "cuda") and not stage_complete(tmp_path, "other", "cpu")
    (tmp_path / "stage.json").write_text(json.dumps({"hash": "h"}))  # written before devices were recorded
    assert stage_complete(tmp_path, "h", "cuda")


def test_labels_and_eval_settings_that_do_not_fit_are_refused():
    from diffusers import UNet2DModel

    from diffprune.evaluate import EvalConfig
    from diffprune.sampling import labels_for

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 8),
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=4,
                       num_class_embeds=1000)
    with pytest.raises(DiffPruneError, match=r"class labels \[1.5\] are not whole numbers"):
        labels_for(unet, [0, 1], [1.5, 2.0])
    assert labels_for(unet, [0, 1], [1.0, 2.0]).tolist() == [1, 2]
    with pytest.raises(DiffPruneError, match=r"class labels \[500\] are out of range: this model was trained on 10"):
        labels_for(unet, [0, 1], 500, num_classes=10)  # a 10-class model with a 1,000-row label table
    assert labels_for(unet, [0, 1], 500).tolist() == [500, 500]  # no trained classes known: the table decides
    with pytest.raises(DiffPruneError, match="data=None computes no FID"):
        EvalConfig(data=None, extractor="inception")
    with pytest.raises(DiffPruneError, match="not text-to-image: it is evaluated without prompts"):
        from diffprune.evaluate import evaluate

        evaluate(unet, None, config=EvalConfig(n=2, steps=1, prompts=("a cat",), latency_batches=()), out_dir=Path("never-written"),
                 device="cpu")


def test_clip_model_that_is_not_clip_or_lacks_its_tokenizer(model_dir, tmp_path):
    import shutil

    pytest.importorskip("transformers")
    from diffprune.metrics import load_clip

    folder = tmp_path / "notclip"
    shutil.copytree(model_dir, folder)
    (folder / "model.safetensors").write_bytes((folder / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(DiffPruneError, match="does not hold a CLIP model"):
        load_clip(folder)


def test_captions_read_with_a_byte_order_mark(tmp_path):
    from PIL import Image

    from diffprune.data import load_data

    for i in range(2):
        Image.new("L", (8, 8), i * 100).save(tmp_path / f"{i}.png")
    (tmp_path / "metadata.jsonl").write_bytes(
        '\ufeff{"file_name": "0.png", "text": "café"}\n{"file_name": "1.png", "text": "—"}\n'.encode("utf-8"))
    assert load_data(tmp_path, resolution=8, channels=1).captions == ("café", "—")
    (tmp_path / "metadata.jsonl").write_bytes('{"file_name": "0.png", "text": "café"}\n'.encode("latin-1"))
    with pytest.raises(DiffPruneError, match="is not UTF-8"):
        load_data(tmp_path, resolution=8, channels=1)


def test_counts_print_in_the_unit_that_fits():
    from diffprune._units import si

    assert [si(65.7e6), si(32.3e6, like=65.7e6), si(1_112_800), si(558_000, like=1_112_800)] == \
        ["65.7M", "32.3M", "1.11M", "0.558M"]
    assert [si(512), si(45_000), si(2.6e9), si(999.6e6), si(1.5e12, sep=" ")] == ["512", "45.0K", "2.60G", "1.00G",
                                                                                     "1.50 T"]


def test_safetensors_files_are_written_atomically_with_the_mode_of_any_new_file(tmp_path):
    import os
    import stat

    import torch
    from safetensors.torch import load_file

    from diffprune._fs import write_safetensors

    old = os.umask(0o022)
    try:
        write_safetensors(tmp_path / "w.safetensors", {"a": torch.arange(6.0)}, metadata={"format": "pt"})
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.json").stat().st_mode) == 0o644
    assert torch.equal(load_file(tmp_path / "w.safetensors")["a"], torch.arange(6.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.json", "w.safetensors"]  # no temporary left
    with pytest.raises(Exception):
        write_safetensors(tmp_path / "bad.safetensors", {"a": "not a tensor"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.json", "w.safetensors"]
