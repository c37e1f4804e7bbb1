"""Half-precision models: pruned and saved in their dtype (``--dtype``), scored in float32."""
import json

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors import safe_open

from diffprune.cli import main
from diffprune.io import load_model
from diffprune.layout import WEIGHTS_NAME
from diffprune.presets import build_model
from diffprune.prune import DATA_FREE, PruneConfig, prune_


def _stored(path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


@pytest.mark.parametrize("method", ["magnitude", "diff-pruning"])
def test_a_bfloat16_model_prunes_exactly_as_its_float32_twin_and_stays_bfloat16(method):
    """The kept channels, their weights and the scores equal the float32 twin's: the scores are computed in float32
    (summed in bfloat16 they would differ), and the weights are the twin's in bfloat16 (kept ones unchanged, the
    attention queries that keep the softmax scale after head dims shrink rounded once)."""
    extra = dict(calib_batch=3, max_timesteps=3, data_free_steps=2) if method == "diff-pruning" else {}
    cfg = PruneConfig(method=method, ratio=0.4, ratio_mode="uniform", global_ranking=True, **extra)
    torch.manual_seed(0)
    half = build_model("mnist-16").to(torch.bfloat16)
    twin = build_model("mnist-16")
    twin.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    calib = DATA_FREE if method == "diff-pruning" else None
    kw = dict(scheduler=DDPMScheduler(num_train_timesteps=20), progress=False)
    r_half, r_twin = prune_(half, cfg, calib, **kw), prune_(twin, cfg, calib, **kw)
    assert (r_half.dtype, r_twin.dtype) == ("bfloat16", "float32")
    assert r_half.widths == r_twin.widths and r_half.macs == r_twin.macs < 0.75 * r_half.base_macs
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert all(p.grad is None for p in half.parameters())
    twin_state = twin.state_dict()
    for name, t in half.state_dict().items():
        assert torch.equal(t, twin_state[name].to(torch.bfloat16)), name
    assert r_half.scores.keys() == r_twin.scores.keys() and len(r_half.scores) > 10
    for key, s in r_half.scores.items():
        assert s.dtype == torch.float32 and torch.equal(s, r_twin.scores[key]), key


def test_summed_in_bfloat16_the_scores_would_differ():
    """The check above can fail: the same group's magnitude scores summed in bfloat16 are not the float32 ones."""
    torch.manual_seed(0)
    w = build_model("mnist-16").to(torch.bfloat16).down_blocks[0].resnets[0].conv1.weight.detach()
    in_bf16 = w.pow(2).sum(dim=(1, 2, 3))
    in_fp32 = w.float().pow(2).sum(dim=(1, 2, 3))
    assert not torch.equal(in_bf16.float(), in_fp32)


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    torch.manual_seed(0)
    build_model("tiny").to(torch.bfloat16).save_pretrained(root / "model", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=10).save_pretrained(root / "model" / "scheduler")
    return root


@pytest.mark.parametrize("flag,stored,loaded", [([], "BF16", torch.bfloat16), (["--dtype", "float32"], "F32",
                                                                                  torch.float32)])
def test_the_cli_keeps_the_stored_dtype_unless_told(bf16_folder, flag, stored, loaded, capsys):
    out = bf16_folder / f"out-{stored}"
    assert main(["prune", "--model", str(bf16_folder / "model"), "--method", "magnitude", "--ratio", "0.3",
                 "--out", str(out), *flag]) == 0
    assert f"dtype:  {loaded}".replace("torch.", "") in capsys.readouterr().out
    assert _stored(out / WEIGHTS_NAME) == {stored}
    assert json.loads((out / "pruning.json").read_text())["dtype"] == str(loaded).replace("torch.", "")
    assert main(["info", str(out)]) == 0
    shown = capsys.readouterr().out
    assert f"weights: {str(loaded).replace('torch.', '')}" in shown and "layout: free" in shown
    auto, default = load_model(out, dtype="auto").denoiser, load_model(out).denoiser
    assert {p.dtype for p in auto.parameters()} == {loaded}
    assert {p.dtype for p in default.parameters()} == {torch.float32}  # load_model's default: float32, as diffusers
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 7])
    with torch.no_grad():
        a = auto(x.to(loaded), t).sample.float()
        b = default(x, t).sample
    assert a.shape == b.shape == (2, 1, 8, 8)
    if loaded == torch.float32:
        assert torch.equal(a, b)


def test_an_unknown_dtype_is_refused(bf16_folder, capsys):
    code = main(["prune", "--model", str(bf16_folder / "model"), "--method", "magnitude", "--ratio", "0.3",
                 "--dry-run", "--dtype", "int8"])
    assert code == 2 and "argument --dtype: invalid choice: 'int8'" in capsys.readouterr().err
