"""`diffprune prune` / `diffprune info`: bad input gives a one-line error, exit status 2 and no output folder."""
import json
import re

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from diffprune.cli import main
from diffprune.presets import build_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    build_model("tiny").save_pretrained(root / "model", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=10).save_pretrained(root / "model" / "scheduler")
    np.save(root / "big.npy", np.zeros((2, 1, 16, 16), dtype=np.uint8))
    np.save(root / "rgb.npy", np.zeros((2, 3, 8, 8), dtype=np.uint8))
    np.save(root / "ok.npy", np.random.default_rng(0).integers(0, 256, (3, 1, 8, 8), dtype=np.uint8))
    torch.save(build_model("tiny").state_dict(), root / "unet.pth")
    return root


def _base(m, out, *extra):
    calib = ["--calib-batch", "2"] if "magnitude" not in extra else []  # a gradient method's setting
    return ["prune", "--model", str(m / "model"), "--out", str(out), *calib, "--device", "cpu", *extra]


BAD = {
    "ratio-above-1": (["--ratio", "1.5", "--method", "magnitude"], r"ratio=1.5 must be in \(0, 1\)"),
    "ratio-zero": (["--ratio", "0", "--method", "magnitude"], r"must be in \(0, 1\)"),
    "thr-1": (["--ratio", "0.3", "--thr", "1.0", "--data", "{m}/ok.npy"], r"thr=1.0 must be in \[0, 1\)"),
    "thr-negative": (["--ratio", "0.3", "--thr", "-0.5", "--data", "{m}/ok.npy"], r"must be in \[0, 1\)"),
    "unknown-method": (["--ratio", "0.3", "--method", "l1"],
                       r"unknown method 'l1'; choose from \['depth', 'diff-pruning', 'magnitude', 'random', 'reinit', 'taylor'\]"),
    "wrong-size": (["--ratio", "0.3", "--data", "{m}/big.npy"], r"shape \(2, 1, 16, 16\) but the model takes \[N, 1, 8, 8\]"),
    "wrong-channels": (["--ratio", "0.3", "--data", "{m}/rgb.npy"], r"shape \(2, 3, 8, 8\) but the model takes"),
    "taylor-without-gradients": (["--ratio", "0.3", "--method", "taylor"], "needs calibration images"),
    "no-amount": (["--method", "magnitude"], "exactly one of"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_error_no_output(case, model_dir, tmp_path, capsys):
    extra, match = BAD[case]
    out = tmp_path / "out"
    rc = main(_base(model_dir, out, *[a.format(m=model_dir) for a in extra]))
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("diffprune: error: ")
    assert re.search(match, err), err
    assert not out.exists()


def test_missing_model_and_pickle_model(model_dir, tmp_path, capsys):
    for model, match in ((tmp_path / "missing", "not found"), (model_dir / "unet.pth", "pickle checkpoint")):
        out = tmp_path / "out"
        rc = main(["prune", "--model", str(model), "--method", "magnitude", "--ratio", "0.3", "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and match in err
        assert not out.exists()


def test_existing_out_refused_unless_overwrite(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    args = _base(model_dir, out, "--method", "magnitude", "--ratio", "0.3")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # a folder diffprune did not write is never deleted, not even with --overwrite
    assert main(args + ["--overwrite"]) == 2
    assert "was not written by diffprune" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    out2 = tmp_path / "out2"
    assert main(_base(model_dir, out2, "--method", "magnitude", "--ratio", "0.3")) == 0
    (out2 / "notes.txt").write_text("x")  # a file of the user's in diffprune's folder: --overwrite keeps it
    assert main(_base(model_dir, out2, "--method", "magnitude", "--ratio", "0.5", "--overwrite")) == 2
    assert "holds 'notes.txt', which diffprune did not write" in capsys.readouterr().err
    assert (out2 / "notes.txt").read_text() == "x" and json.loads((out2 / "pruning.json").read_text())["ratio"] == 0.3
    (out2 / "notes.txt").unlink()
    assert main(_base(model_dir, out2, "--method", "magnitude", "--ratio", "0.5", "--overwrite")) == 0
    assert json.loads((out2 / "pruning.json").read_text())["ratio"] == 0.5


def test_prune_prints_numbers_and_info_reads_them(model_dir, tmp_path, capsys):
    out = tmp_path / "p"
    assert main(_base(model_dir, out, "--ratio", "0.5", "--data", str(model_dir / "ok.npy"), "--dry-run")) == 0
    text = capsys.readouterr().out
    assert "params: 45.0K -> " in text and "MACs:" in text and "conv_in" in text and "dry run" in text
    assert not out.exists()
    assert main(_base(model_dir, out, "--ratio", "0.5", "--data", str(model_dir / "ok.npy"))) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "diff-pruning" and info["base_params"] == 44969 and info["base_macs"] == 1042944
    assert info["params"] < 44969 and info["macs"] < 1042944 and info["cutoff_t"] == 9
    assert main(["info", str(model_dir / "model"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] is None and info["params"] == info["base_params"] == 44969


def test_flag_defaults_are_the_configs():
    """The flags that mirror a PruneConfig field default to that field's default (read from the dataclass)."""
    import dataclasses

    from diffprune.cli import build_parser
    from diffprune.prune import PruneConfig

    args = build_parser().parse_args(["prune", "--model", "m", "--ratio", "0.3"])
    defaults = {f.name: f.default for f in dataclasses.fields(PruneConfig)}
    for name in ("method", "macs_tolerance", "latency_batch", "latency_dtype", "latency_tolerance",
                 "latency_repeats", "round_to", "seed"):
        assert getattr(args, name) == defaults[name], name


def test_every_commands_help_shows_its_defaults(capsys):
    """Every flag with a default (not None/False) states it in --help, whatever the command."""
    from diffprune.cli import SUBCOMMANDS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(SUBCOMMANDS)
    missing = []
    for name, p in sub.choices.items():
        text = " ".join(p.format_help().split())
        for a in p._actions:
            shown = a.default is not None and a.default is not False and a.default not in ([], "==SUPPRESS==")
            if a.option_strings and shown and a.help:
                if "default" not in (a.help or "") and f"(default: {a.default})" not in text:
                    missing.append(f"{name} {a.option_strings[0]}")
    assert missing == []
    assert main(["prune", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--seed SEED seed of the calibration noise, image subset, random scores (default: 0)" in out
    assert "UNet or transformer" in out and "MACs of one denoiser call" in out
