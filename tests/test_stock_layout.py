"""The stock layout: a depth-pruned transformer, or a UNet2DModel pruned to one width per level, saved so that plain
diffusers loads it, bitwise as diffprune does."""
import json
import subprocess
import sys

import pytest
import test_family_pixart
import test_family_sdxl
import torch
from diffusers import (DDPMScheduler, DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel,
                       SD3Transformer2DModel, UNet2DModel)
from diffusers.models.embeddings import Timesteps
from safetensors.torch import load_file, save_file
from test_family_flux import HEAD_DIM as FLUX_HEAD_DIM, cond as flux_cond
from test_family_sd3 import calibration as sd3_calibration
from text_family_suite import CALIB

from diffprune.adapters import adapter_for
from diffprune.cli import main
from diffprune.errors import DiffPruneError
from diffprune.io import load_model, save_pruned
from diffprune.presets import PRESETS
from diffprune.prune import PruneConfig, prune_

# Loads every folder with plain diffusers (the class its config.json names), runs the saved inputs and saves the
# outputs; fails if anything imported diffprune.
PLAIN = r"""
import json, sys
import diffusers, torch
from safetensors.torch import load_file, save_file
torch.set_num_threads(1)  # as the tests run: the same kernels and summation order
outs = {}
for name, spec in json.load(open(sys.argv[1])).items():
    cls = getattr(diffusers, json.load(open(spec["folder"] + "/config.json"))["_class_name"])
    model = cls.from_pretrained(spec["folder"]).eval()
    # fresh memory as in the test: mmap-loaded inputs can take other kernels (Flux rounded differently)
    flat = {k: v.clone() for k, v in load_file(spec["inputs"]).items()}
    kwargs = {}
    for key in spec["keys"]:
        outer, _, inner = key.partition(".")
        value = flat.get(key)
        if inner:
            kwargs.setdefault(outer, {})[inner] = value
        else:
            kwargs[outer] = value
    with torch.no_grad():
        outs[name] = model(**kwargs).sample.contiguous()
save_file(outs, sys.argv[2])
assert not any(m.split(".")[0] == "diffprune" for m in sys.modules), "diffprune was imported"
"""


def _dit():
    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                 num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)


def _dit_calibration(model):
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 4, 8, 8, generator=g).clamp(-1, 1), torch.tensor([1, 2, 3, 4])


def _sd3():
    torch.manual_seed(0)
    return SD3Transformer2DModel(num_layers=4, attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                                 caption_projection_dim=32, pooled_projection_dim=16, sample_size=8, patch_size=2,
                                 in_channels=4, out_channels=4, qk_norm="rms_norm", dual_attention_layers=(0, 2),
                                 pos_embed_max_size=8)


def _flux():
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                   attention_head_dim=FLUX_HEAD_DIM, num_attention_heads=4, joint_attention_dim=32,
                                   pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    model.register_to_config(sample_size=8)
    return model


PIXART = test_family_pixart.TestPixArt()
FLOW = FlowMatchEulerDiscreteScheduler(num_train_timesteps=50, shift=3.0)
FAMILIES = {  # name: (build, calibration, scheduler)
    "dit": (_dit, _dit_calibration, DDPMScheduler(num_train_timesteps=50)),
    "pixart": (lambda: test_family_pixart.build_pixart(layers=4), PIXART.calibration,
               DDPMScheduler(num_train_timesteps=50)),
    "sd3": (_sd3, lambda m: sd3_calibration(), FLOW),
    "flux": (_flux, lambda m: (torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2)), flux_cond(4)),
             FLOW),
}


def _inputs(model) -> dict:
    """The stock forward's keyword inputs at batch 2, random where they are floating point, flattened one level."""
    g = torch.Generator().manual_seed(3)
    flat, keys = {}, []
    for key, value in adapter_for(model).example_inputs(model, 2).items():
        for sub, v in (value.items() if isinstance(value, dict) else [(None, value)]):
            name = key if sub is None else f"{key}.{sub}"
            keys.append(name)
            if isinstance(v, torch.Tensor):
                flat[name] = (torch.randn(v.shape, generator=g) if v.is_floating_point() and "ids" not in name
                              else v).contiguous()
    return {"flat": flat, "keys": keys}


def _call(model, inputs) -> torch.Tensor:
    kwargs = {}
    for key in inputs["keys"]:
        outer, _, inner = key.partition(".")
        if inner:
            kwargs.setdefault(outer, {})[inner] = inputs["flat"].get(key)
        else:
            kwargs[outer] = inputs["flat"].get(key)
    with torch.no_grad():
        return model.eval()(**kwargs).sample


def test_depth_pruned_transformers_load_in_plain_diffusers_bitwise(tmp_path, capsys):
    """DiT, PixArt, SD3.5 (dual attention in kept and removed blocks) and Flux (double and single blocks): depth
    pruning to half the blocks, saved in the stock layout; a process that never imports diffprune loads each folder
    with the stock class's from_pretrained and gives bitwise the outputs of diffprune.load_model."""
    spec, expected = {}, {}
    for name, (build, calibration, scheduler) in FAMILIES.items():
        model = build()
        blocks = len(adapter_for(model).blocks(model))
        report = prune_(model, PruneConfig(method="depth", ratio=0.5, **CALIB), calibration(model),
                        scheduler=scheduler, progress=False)
        assert len(adapter_for(model).blocks(model)) == blocks - blocks // 2
        save_pruned(model, tmp_path / name, report.to_dict(), layout="stock")
        config = json.loads((tmp_path / name / "config.json").read_text())
        record = json.loads((tmp_path / name / "pruning.json").read_text())
        counts = adapter_for(model).block_counts.values()  # num_layers (and Flux's num_single_layers)
        assert record["layout"] == "stock" and sum(record["base_config"][k] for k in counts) == blocks
        assert sum(config[k] for k in counts) == len(adapter_for(model).blocks(model)) < blocks
        assert config["num_layers"] == len(model.transformer_blocks)
        if name == "sd3":  # the dual-attention blocks renumbered among the kept ones
            assert config["dual_attention_layers"] == [i for i, b in enumerate(model.transformer_blocks)
                                                       if b.attn2 is not None]
        if name == "flux":
            assert config["num_single_layers"] == len(model.single_transformer_blocks)
        card = (tmp_path / name / "README.md").read_text()
        assert f"{type(model).__name__}.from_pretrained(" in card and "needs diffprune" not in card
        assert "Pruning removed whole blocks" in card
        again = load_model(tmp_path / name)
        assert again.pruning["layout"] == "stock"
        inputs = _inputs(model)
        save_file(inputs["flat"], str(tmp_path / f"{name}-in.safetensors"))
        expected[name] = _call(again.denoiser, inputs)
        assert torch.equal(expected[name], _call(model, inputs))
        spec[name] = {"folder": str(tmp_path / name), "inputs": str(tmp_path / f"{name}-in.safetensors"),
                      "keys": inputs["keys"]}
    assert main(["info", str(tmp_path / "dit")]) == 0
    assert "layout: stock (plain diffusers from_pretrained loads it)" in capsys.readouterr().out
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    run = subprocess.run([sys.executable, "-c", PLAIN, str(tmp_path / "spec.json"), str(tmp_path / "out.safetensors")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    got = load_file(str(tmp_path / "out.safetensors"))
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].shape == expected[name].shape and torch.equal(got[name], expected[name]), name


def test_what_the_stock_layout_cannot_express_is_refused_before_anything_is_written(tmp_path, capsys):
    dit = _dit()
    dit.save_pretrained(tmp_path / "dit-in", safe_serialization=True)
    code = main(["prune", "--model", str(tmp_path / "dit-in"), "--method", "magnitude", "--ratio", "0.3",
                 "--layout", "stock", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "--layout stock needs --method depth for dit models" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
    sdxl = test_family_sdxl.TestSDXL().build()
    with pytest.raises(DiffPruneError, match="unet2d-cond models have no blocks to remove"):
        prune_(sdxl, PruneConfig(method="depth", ratio=0.3, layout="stock"), progress=False)
    report = prune_(sdxl, PruneConfig(method="magnitude", ratio=0.3, ratio_mode="uniform"), progress=False)
    with pytest.raises(DiffPruneError, match=r"its diffusers config builds other shapes \(e.g. .*--layout stock"):
        save_pruned(sdxl, tmp_path / "sdxl", report.to_dict(), layout="stock")  # free widths
    report = prune_(dit, PruneConfig(method="magnitude", ratio=0.3, ratio_mode="uniform"), progress=False)
    with pytest.raises(DiffPruneError, match=r"its diffusers config builds other shapes \(e.g. .*--method depth"):
        save_pruned(dit, tmp_path / "dit", report.to_dict(), layout="stock")
    with pytest.raises(DiffPruneError, match=r"unknown layout 'stok'; choose from \['free', 'stock'\]"):
        PruneConfig(method="magnitude", ratio=0.3, layout="stok")
    unet = _tiny_unet()
    with pytest.raises(DiffPruneError, match="--prune-heads"):  # Torch-Pruning's own pruner keeps no width ties
        prune_(unet, PruneConfig(method="magnitude", ratio=0.3, ratio_mode="uniform", prune_heads=True,
                                 layout="stock"), progress=False)
    report = prune_(unet, PruneConfig(method="magnitude", ratio=0.5, ratio_mode="uniform"), progress=False)
    with pytest.raises(DiffPruneError, match=r"its diffusers config builds other shapes \(e.g. .*--layout stock"):
        save_pruned(unet, tmp_path / "unet", report.to_dict(), layout="stock")  # free widths: not one per level
    assert not any((tmp_path / n).exists() for n in ("sdxl", "dit", "unet"))


def _tiny_unet(**overrides):
    torch.manual_seed(0)
    return UNet2DModel(**{**PRESETS.get("tiny"), **overrides})


def _tiny_sd():
    """The UNet of tests/test_sd.py's tiny StableDiffusionPipeline (32/64, 8 heads, GEGLU, 32-wide context)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)


def _stock_widths(model) -> list[int]:
    return [int(b.resnets[0].conv2.out_channels) for b in model.down_blocks]


def test_narrower_timestep_features_are_every_mth_frequency_of_the_wider_ones():
    """What lets a stock UNet's first level shrink: Timesteps(W / m) with freq_shift 0 is exactly every m-th
    frequency of Timesteps(W), in both halves (m = 2 bitwise, other factors to float rounding)."""
    t = torch.arange(1000)
    for flip in (True, False):
        wide = Timesteps(32, flip, 0)(t)
        for width in (16, 8, 4):
            m = 32 // width
            kept = [m * i for i in range(width // 2)] + [16 + m * i for i in range(width // 2)]
            narrow = Timesteps(width, flip, 0)(t)
            assert narrow.shape == (1000, width)
            assert torch.equal(narrow, wide[:, kept]) if m == 2 else torch.allclose(narrow, wide[:, kept], atol=1e-6)
    assert not torch.allclose(Timesteps(16, True, 1)(t), Timesteps(32, True, 1)(t)[:, ::2][:, :16], atol=1e-3)


def test_unet_stock_layout_loads_in_plain_diffusers_bitwise(tmp_path):
    """UNet2DModel, SD's and SDXL's UNet2DConditionModel in the stock layout: one width per level (levels of one width share it), whole heads, the
    first level narrowed with its timestep features; the saved config.json builds it, plain diffusers loads it
    (no diffprune in the process) and gives bitwise the outputs of the pruned model and of diffprune.load_model.
    The shipped teacher (32/64/64, 8 GroupNorm groups, heads of 32) reaches 0.257x MACs as 16/32/32; a class-
    conditional UNet with freq_shift 1 keeps its first level whole (its narrower timestep features are others). SD
    and SDXL keep their heads (narrower), feed-forwards at 4x and SDXL's added embedding at the timestep width; a UNet
    with scale-and-shift ResNets keeps its time projections at twice their level's width."""
    teacher = load_model("mnist-teacher").denoiser
    cond = _tiny_unet(block_out_channels=(8, 32), num_class_embeds=4, freq_shift=1)
    one_head = _tiny_unet(block_out_channels=(8, 24), attention_head_dim=None)  # one head as wide as its level
    cases = {"teacher": (teacher, PruneConfig(method="magnitude", ratio=0.5, layout="stock")),
             "cond": (cond, PruneConfig(method="random", ratio=0.5, ratio_mode="uniform", global_ranking=True,
                                        layout="stock")),
             "one-head": (one_head, PruneConfig(method="magnitude", ratio=0.5, layout="stock")),
             "scale-shift": (_tiny_unet(resnet_time_scale_shift="scale_shift"),  # time projections 2x a level
                             PruneConfig(method="magnitude", ratio=0.5, layout="stock")),
             "sd": (_tiny_sd(), PruneConfig(method="magnitude", ratio=0.3, layout="stock")),
             "sdxl": (test_family_sdxl.TestSDXL().build(), PruneConfig(method="magnitude", ratio=0.3, layout="stock"))}
    spec, expected = {}, {}
    for name, (model, config) in cases.items():
        base = dict(model.config)
        heads = [m.heads for m in model.modules() if type(m).__name__ == "Attention"]
        report = prune_(model, config, progress=False)
        save_pruned(model, tmp_path / name, report.to_dict())  # the layout its pruning config asked for
        saved = json.loads((tmp_path / name / "config.json").read_text())
        assert json.loads((tmp_path / name / "pruning.json").read_text())["base_config"]["block_out_channels"] == \
            list(base["block_out_channels"])
        assert saved["block_out_channels"] == _stock_widths(model) == [model.conv_in.out_channels,
                                                                       *_stock_widths(model)[1:]]
        assert saved["time_embedding_dim"] == model.time_embedding.linear_1.out_features
        card = (tmp_path / name / "README.md").read_text()
        assert f"{type(model).__name__}.from_pretrained(" in card and "needs diffprune" not in card
        assert "kept one width per value of the stock config" in card and "whole blocks" not in card
        assert saved["attention_head_dim"] == json.loads(json.dumps(base["attention_head_dim"]))
        for attn in (m for m in model.modules() if type(m).__name__ == "Attention") if name not in ("sd", "sdxl") else ():
            # UNet2DModel: whole heads of the config's head dim went (or its one head narrowed)
            assert attn.to_q.out_features == attn.heads * (base["attention_head_dim"] or attn.to_q.out_features)
        for block in (b for n, b in model.named_modules() if type(b).__name__ == "BasicTransformerBlock"):
            # SD, SDXL: the config's number of heads, narrower; the feed-forward 4x its transformer's width
            assert block.ff.net[2].in_features == 4 * block.attn1.to_q.out_features
        if name in ("sd", "sdxl"):
            assert [m.heads for m in model.modules() if type(m).__name__ == "Attention"] == heads
        inputs = _inputs(model)
        save_file(inputs["flat"], str(tmp_path / f"{name}-in.safetensors"))
        expected[name] = _call(model, inputs)
        assert torch.equal(_call(load_model(tmp_path / name).denoiser, inputs), expected[name])
        spec[name] = {"folder": str(tmp_path / name), "inputs": str(tmp_path / f"{name}-in.safetensors"),
                      "keys": inputs["keys"]}
    assert _stock_widths(teacher) == [16, 32, 32] and abs(report_macs(teacher) - 0.257) < 0.005
    assert teacher.time_proj.num_channels == teacher.time_embedding.linear_1.in_features == 16
    assert _stock_widths(cond)[0] == 8 and _stock_widths(cond)[1] < 32 and cond.time_proj.num_channels == 8
    assert _stock_widths(sd_unet := cases["sd"][0]) == [16, 48] and sd_unet.time_proj.num_channels == 16
    shifted = cases["scale-shift"][0]
    assert _stock_widths(shifted) == [4, 8] and all(r.time_emb_proj.out_features == 2 * r.conv1.out_channels
                                                    for r in shifted.modules() if type(r).__name__ == "ResnetBlock2D")
    assert _stock_widths(one_head)[1] < 24 and {a.heads for a in one_head.modules() if hasattr(a, "heads")} == {1}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    run = subprocess.run([sys.executable, "-c", PLAIN, str(tmp_path / "spec.json"), str(tmp_path / "out.safetensors")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    got = load_file(str(tmp_path / "out.safetensors"))
    for name in expected:
        assert got[name].shape == expected[name].shape and torch.equal(got[name], expected[name]), name


def report_macs(model) -> float:
    from diffprune.macs import count_macs

    return count_macs(model).macs / count_macs(load_model("mnist-teacher").denoiser).macs


def test_unet_stock_layout_targets_and_the_steps_it_cannot_reach(tmp_path, capsys):
    """--target-macs lands within its tolerance on the widths a stock config can express, and a target between
    them is refused before anything is written, naming the reachable fractions; neighbouring levels of different
    widths never become equal (the stock config would drop the deeper one's conv_shortcut)."""
    unet = _tiny_unet(block_out_channels=(8, 16, 32), down_block_types=("DownBlock2D",) * 3,
                      up_block_types=("UpBlock2D",) * 3)
    unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
    code = main(["prune", "--model", str(tmp_path / "unet"), "--method", "magnitude", "--target-macs", "0.5",
                 "--layout", "stock", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "in the stock layout each level keeps one width its config allows" in err
    assert "with --ratio-mode uniform --ranking global)" in err  # the ratio it names is global ranking's
    assert not (tmp_path / "o").exists()
    steps = [float(x) for x in err.split("ask for one of ")[1].split(",")[0].split(" and ")]
    assert steps[1] < 0.5 < steps[0]
    assert main(["prune", "--model", str(tmp_path / "unet"), "--method", "magnitude", "--target-macs",
                 f"{steps[1]:.4f}", "--layout", "stock", "--out", str(tmp_path / "o")]) == 0
    record = json.loads((tmp_path / "o" / "pruning.json").read_text())
    assert abs(record["macs"] / record["base_macs"] / steps[1] - 1) <= 0.02 and record["layout"] == "stock"
    widths = json.loads((tmp_path / "o" / "config.json").read_text())["block_out_channels"]
    assert widths != [8, 16, 32] and all(a != b for a, b in zip(widths, widths[1:]))
    assert all(w % 4 == 0 for w in widths)  # whole GroupNorm groups (4)


def test_a_stock_layout_pipeline_folder_loads_as_the_stock_pipeline(tmp_path, capsys):
    """CLI: `prune --method depth --layout stock` on a DiTPipeline folder, then `finetune`; plain
    DiffusionPipeline.from_pretrained (no diffprune in the process) loads both with the pruned transformer and
    samples with it."""
    from test_families import build_dit

    torch.manual_seed(0)
    build_dit(tmp_path / "dit")
    assert main(["prune", "--model", str(tmp_path / "dit"), "--method", "depth", "--ratio", "0.5", "--data", "mnist",
                 "--calib-batch", "4", "--max-timesteps", "2", "--layout", "stock", "--cache-dir",
                 str(tmp_path / "cache"), "--out", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    script = ("import sys, diffusers, torch\n"
              "pipe = diffusers.DiffusionPipeline.from_pretrained(sys.argv[1])\n"
              "image = pipe(class_labels=[3], num_inference_steps=2, output_type='np').images\n"
              "print(type(pipe).__name__, len(pipe.transformer.transformer_blocks), image.shape)\n"
              "assert not any(m.split('.')[0] == 'diffprune' for m in sys.modules)\n")
    assert main(["finetune", str(tmp_path / "out"), "--data", "mnist", "--steps", "2", "--batch-size", "4",
                 "--checkpoint-every", "2", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "ft"),
                 "--device", "cpu"]) == 0  # fine-tuning keeps the layout
    capsys.readouterr()
    for folder in ("out", "ft"):
        run = subprocess.run([sys.executable, "-c", script, str(tmp_path / folder)], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.split()[:2] == ["DiTPipeline", "1"] and "(1, 16, 16, 1)" in run.stdout
        assert json.loads((tmp_path / folder / "transformer" / "pruning.json").read_text())["layout"] == "stock"
        assert len(load_model(tmp_path / folder).denoiser.transformer_blocks) == 1


def test_a_stock_target_between_two_levels_that_move_together_lands_on_their_mix():
    """Where the ratio narrows two levels at once (random scores, seed 5: the teacher's levels go 32/64 -> 16/32
    together, 0.9993 -> 0.2568 of the MACs), the target search probes the mixes of the two nearest probes' widths
    and lands on the one the config can build (16/64; 32/32 would make neighbouring levels equal), forced."""
    unet = load_model("mnist-teacher").denoiser
    report = prune_(unet, PruneConfig(method="random", seed=5, target_macs=0.73, layout="stock"), progress=False)
    by_ratio = [t["macs_fraction"] for t in report.search if not t.get("forced")]
    assert max(f for f in by_ratio if f < 0.73) < 0.73 * 0.98 and min(f for f in by_ratio if f > 0.73) > 0.73 * 1.02
    forced = [t for t in report.search if t.get("forced")]
    assert [t["widths"]["level 0"] for t in forced] == [16] and forced[0]["widths"]["level 1"] == 64
    assert _stock_widths(unet) == [16, 64, 64] and report.macs / report.base_macs == pytest.approx(
        forced[0]["macs_fraction"], abs=1e-6) and abs(report.macs / report.base_macs / 0.73 - 1) <= 0.02
