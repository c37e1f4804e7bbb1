"""ONNX export: ONNX Runtime's outputs equal PyTorch's (diffprune.load_model) within a stated tolerance, for a pruned
model and for tiny models of each family; dynamic batch; nothing written when an export cannot be checked."""
import json

import numpy as np
import pytest
import torch
from diffusers import (DiTTransformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel,
                       SD3Transformer2DModel, UNet2DConditionModel)

from diffprune.cli import main
from diffprune.errors import DiffPruneError
from diffprune.export import export_model, flat_inputs
from diffprune.io import load_model

ort = pytest.importorskip("onnxruntime")
ATOL = 1e-4


def _ort_vs_torch(folder, onnx_dir, batch: int) -> float:
    """Max |ONNX Runtime - PyTorch| at ``batch`` for the model diffprune loads from ``folder``."""
    loaded = load_model(folder)
    model, adapter = loaded.denoiser.eval(), loaded.adapter
    flat = flat_inputs(adapter, model, batch, seed=7)
    session = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    out = session.run(["out_sample"], {k: flat[k].numpy() for k in names})[0]
    kwargs = {k: v for k, v in adapter.example_inputs(model, batch).items()}
    for k, v in list(kwargs.items()):
        if isinstance(v, dict):
            kwargs[k] = {kk: flat.get(kk) for kk in v}
        elif k in flat:
            kwargs[k] = flat[k]
    with torch.no_grad():
        ref = model(**kwargs).sample
    assert out.shape == tuple(ref.shape) and out.shape[0] == batch
    return float(np.abs(out - ref.numpy()).max())


def test_pruned_unet_round_trip_through_the_cli(tmp_path, capsys):
    from diffusers import UNet2DModel

    from diffprune.io import save_pruned
    from diffprune.prune import PruneConfig, prune_

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), norm_num_groups=4, attention_head_dim=8,
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    report = prune_(unet, PruneConfig(method="magnitude", ratio=0.5), progress=False)  # no search: export is tested
    save_pruned(unet, tmp_path / "pruned", report.to_dict())
    assert main(["export", str(tmp_path / "pruned"), "--out", str(tmp_path / "onnx")]) == 0
    printed = capsys.readouterr().out
    rec = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert rec["exporter"] == "dynamo" and rec["pruned"] is True and rec["family"] == "unet2d"
    assert rec["inputs"] == {"sample": {"shape": ["batch", 1, 8, 8], "dtype": "float32"},
                             "timestep": {"shape": ["batch"], "dtype": "int64"}}
    assert rec["check"]["batch"] == 5 and rec["check"]["max_abs_diff"] <= ATOL == rec["check"]["atol"]
    assert f"max |diff| {rec['check']['max_abs_diff']:.2g} at batch 5" in printed
    for batch in (1, 7):  # the batch is dynamic
        assert _ort_vs_torch(tmp_path / "pruned", tmp_path / "onnx", batch) <= ATOL
    assert main(["export", str(tmp_path / "pruned"), "--out", str(tmp_path / "onnx")]) == 2  # not overwritten
    assert "--overwrite" in capsys.readouterr().err


def _sd():
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=8)


def _sdxl():
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=8, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 12,
                                use_linear_projection=True)


def _dit():
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)


def _sd3():
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                                 pooled_projection_dim=16, out_channels=4, qk_norm="rms_norm")


def _flux():
    m = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                               guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    m.register_to_config(sample_size=8)
    return m


FAMILIES = {"sd": (_sd, "torchscript", ["sample", "timestep", "encoder_hidden_states"]),
            "sdxl": (_sdxl, "torchscript", ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]),
            "dit": (_dit, "torchscript", ["hidden_states", "timestep", "class_labels"]),
            "sd3": (_sd3, "torchscript", ["hidden_states", "timestep", "encoder_hidden_states", "pooled_projections"]),
            "flux": (_flux, "dynamo", ["hidden_states", "timestep", "encoder_hidden_states", "pooled_projections",
                                       "guidance", "img_ids", "txt_ids"])}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_family_exports_and_onnx_runtime_matches(name, tmp_path):
    build, exporter, inputs = FAMILIES[name]
    torch.manual_seed(0)
    build().save_pretrained(tmp_path / "model", safe_serialization=True)
    rec = export_model(tmp_path / "model", tmp_path / "onnx", exporter=exporter)
    assert list(rec["inputs"]) == inputs and rec["inputs"][inputs[0]]["shape"][0] == "batch"
    assert rec["check"]["max_abs_diff"] <= ATOL
    assert _ort_vs_torch(tmp_path / "model", tmp_path / "onnx", 2) <= ATOL


def test_an_export_that_fails_its_check_writes_nothing(tmp_path):
    torch.manual_seed(0)
    PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                             num_layers=1, sample_size=8, patch_size=2, caption_channels=24,
                             cross_attention_dim=16).save_pretrained(tmp_path / "pixart", safe_serialization=True)
    with pytest.raises(DiffPruneError, match=r"ONNX export of this pixart model failed, nothing was written \("
                                             r"dynamo: .*; torchscript: .*\)") as err:
        export_model(tmp_path / "pixart", tmp_path / "onnx")
    assert "\n" not in str(err.value) and not (tmp_path / "onnx").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["pixart"]  # no temporary left
    with pytest.raises(DiffPruneError, match=r"format 'tflite' is not supported; choose from \['onnx'\]"):
        export_model(tmp_path / "pixart", tmp_path / "onnx", fmt="tflite")
