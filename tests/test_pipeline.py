import pytest

from diffprune.cli.demo import config_path
from diffprune.errors import DiffPruneError
from diffprune.pipeline import load_run_config, stage_hashes

BASE = {
    "model": "mnist-teacher", "data": "mnist",
    "prune": {"method": "diff-pruning", "target_macs": 0.5},
    "finetune": {"steps": 10}, "eval": {"n": 8, "steps": 2},
}


def _with(section, **kv):
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    if section is None:
        cfg.update(kv)
    else:
        cfg[section].update(kv)
    return cfg


def test_shipped_configs_validate():
    demo, quick = load_run_config(config_path(False)), load_run_config(config_path(True))
    assert demo.prune.target_macs == quick.prune.target_macs == 0.5
    assert demo.finetune.steps == 3000 and demo.eval.n == 500
    assert quick.finetune.steps < demo.finetune.steps and quick.eval.n < demo.eval.n
    assert demo.eval.data == "mnist"  # FID reference defaults to the run's data


@pytest.mark.parametrize("cfg, message", [
    (_with(None, modle="x"), r"unknown key 'modle'; allowed: \['data', 'device', 'eval', 'finetune', 'model'"),
    (_with("prune", thrr=0.1), r"unknown key prune.thrr; allowed: \["),
    (_with("finetune", steps="ten"), r"finetune.steps='ten' has the wrong type; expected int"),
    (_with("finetune", lr=-1.0), r"finetune: lr=-1.0 must be a positive number"),
    (_with("prune", thr=1.5), r"prune: thr=1.5 must be in \[0, 1\)"),
    (_with("prune", method="magic"), r"unknown method 'magic'"),
    (_with("eval", latency_batches=[1, "x"]), r"eval.latency_batches=\[1, 'x'\] has the wrong type"),
    ({k: v for k, v in BASE.items() if k != "finetune"}, r"config is missing 'finetune'"),
])
def test_config_errors_name_the_key(cfg, message):
    with pytest.raises(DiffPruneError, match=message):
        load_run_config(cfg)


def test_stage_hashes_chain():
    h0 = stage_hashes(load_run_config(BASE))
    h1 = stage_hashes(load_run_config(_with("finetune", steps=11)))
    assert h1["prune"] == h0["prune"]
    assert h1["finetune"] != h0["finetune"] and h1["eval"] != h0["eval"]  # downstream of a change is redone
    h2 = stage_hashes(load_run_config(_with("eval", n=9)))
    assert (h2["prune"], h2["finetune"]) == (h0["prune"], h0["finetune"]) and h2["eval"] != h0["eval"]


def test_missing_config_file(tmp_path):
    with pytest.raises(DiffPruneError, match="does not exist"):
        load_run_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(DiffPruneError, match="is not valid YAML"):
        load_run_config(bad)


def test_interrupted_finetune_stage_resumes(tmp_path, monkeypatch):
    """The finetune stage works in .finetune.next: one left by the same settings resumes (train_config.json lives in
    its model/), a finished one is continued from a copy when only the steps grew (the finished folder untouched
    until the new one is done), fewer steps than the last checkpoint or other settings start over."""
    import diffprune.finetune
    from diffprune._fs import swap_in
    from diffprune.pipeline import _run_finetune

    calls = []
    monkeypatch.setattr(diffprune.finetune, "finetune", lambda *a, **k: calls.append(k))
    cfg = load_run_config(BASE)
    staging = _run_finetune(cfg, tmp_path, stage_hashes(cfg), device="cpu", progress=False)
    assert staging == tmp_path / ".finetune.next"
    assert (calls[-1]["resume"], calls[-1]["overwrite"]) == (False, True)  # fresh stage
    (staging / "model" / "checkpoints" / "step-0000010").mkdir(parents=True)
    (staging / "model" / "checkpoints" / "step-0000010" / "state.json").write_text("{}")
    (staging / "model" / "train_config.json").write_text("{}")  # what an interrupted (or finished) train() leaves
    assert _run_finetune(cfg, tmp_path, stage_hashes(cfg), device="cpu", progress=False) == staging
    assert (calls[-1]["resume"], calls[-1]["overwrite"]) == (True, False)
    swap_in(staging, tmp_path / "finetune")  # finished: what the run does after the stage returns
    more = load_run_config(_with("finetune", steps=20))  # only the steps grew: continue the run
    assert stage_hashes(more)["finetune"] != stage_hashes(cfg)["finetune"]  # (so the stage is not skipped)
    staging = _run_finetune(more, tmp_path, stage_hashes(more), device="cpu", progress=False)
    assert (calls[-1]["resume"], calls[-1]["overwrite"]) == (True, False)
    assert (staging / "model" / "train_config.json").is_file()
    assert (tmp_path / "finetune" / "model" / "train_config.json").is_file()  # the finished one stays
    fewer = load_run_config(_with("finetune", steps=5))  # below the last checkpoint: start over
    staging = _run_finetune(fewer, tmp_path, stage_hashes(fewer), device="cpu", progress=False)
    assert (calls[-1]["resume"], calls[-1]["overwrite"]) == (False, True)
    assert not (staging / "model").exists() and (tmp_path / "finetune" / "model" / "train_config.json").is_file()
    (staging / "model").mkdir()
    (staging / "model" / "train_config.json").write_text("{}")
    other = load_run_config(_with("finetune", steps=5, lr=1e-3))  # other settings: start over
    staging = _run_finetune(other, tmp_path, stage_hashes(other), device="cpu", progress=False)
    assert (calls[-1]["resume"], calls[-1]["overwrite"]) == (False, True)
    assert not (staging / "model").exists()


def test_bad_config_or_failed_stage_loses_no_finished_stage(tmp_path, monkeypatch):
    """A config whose model is a typo is refused before anything is written; a stage that fails leaves the finished
    stage it would have replaced (and every later one) in place, so the good config skips them all again."""
    import diffprune.pipeline as pipeline
    import diffprune.prune

    def stage(name):
        def run(config, run, hashes, *, device, progress):
            folder = run / f".{name}.next"
            folder.mkdir()
            (folder / "result").write_text(name)
            (folder / "metrics.json").write_text('{"fid": 1.0}')
            return folder
        return run

    monkeypatch.setattr(pipeline, "_STAGE_FUNCS", {s: stage(s) for s in pipeline.STAGES})
    good = load_run_config(BASE)
    pipeline.run_pipeline(good, tmp_path, progress=False, log=lambda m: None)
    saved = (tmp_path / "run_config.json").read_text()
    with pytest.raises(DiffPruneError, match="mnist-teachr"):
        pipeline.run_pipeline(load_run_config(_with(None, model="mnist-teachr")), tmp_path, progress=False)
    assert (tmp_path / "run_config.json").read_text() == saved
    monkeypatch.setattr(pipeline, "_STAGE_FUNCS", {**pipeline._STAGE_FUNCS, "prune": pipeline._run_prune})
    monkeypatch.setattr(diffprune.prune, "prune_model", lambda *a, **k: (_ for _ in ()).throw(
        DiffPruneError("calibration failed")))
    with pytest.raises(DiffPruneError, match="calibration failed"):
        pipeline.run_pipeline(load_run_config(_with("prune", thr=0.1)), tmp_path, progress=False)
    logs = []
    pipeline.run_pipeline(good, tmp_path, progress=False, log=logs.append)
    assert [m.split("]")[0] for m in logs if "skipped" in m] == ["[prune", "[finetune", "[eval"]
    assert all((tmp_path / s / "result").read_text() == s for s in pipeline.STAGES)


def test_run_refuses_a_folder_that_is_not_a_run_folder(tmp_path):
    from diffprune.pipeline import run_pipeline

    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "mine.txt").write_text("user data")
    with pytest.raises(DiffPruneError, match="not a diffprune run folder"):
        run_pipeline(load_run_config(BASE), tmp_path, progress=False)
    assert (tmp_path / "eval" / "mine.txt").read_text() == "user data"
    assert not (tmp_path / "run_config.json").exists()


def test_stage_hashes_follow_the_content_behind_the_names(tmp_path, monkeypatch):
    """A retrained model in the same folder, or new shipped files under the same name, redo every stage."""
    import shutil

    import torch

    import diffprune.assets as assets
    from diffprune.presets import build_model

    torch.manual_seed(0)
    build_model("tiny").save_pretrained(tmp_path / "m", safe_serialization=True)
    cfg = load_run_config(_with(None, model=str(tmp_path / "m")))
    h0 = stage_hashes(cfg)
    (tmp_path / "m" / "notes.txt").write_text("not a model file")
    assert stage_hashes(cfg) == h0
    torch.manual_seed(1)
    build_model("tiny").save_pretrained(tmp_path / "m", safe_serialization=True)
    h1 = stage_hashes(cfg)
    assert len({h0[s] for s in h0} & {h1[s] for s in h1}) == 0 and len(h1) == 3

    shipped = load_run_config(BASE)
    h0 = stage_hashes(shipped)
    root = tmp_path / "assets"
    shutil.copytree(assets.bundled_path(""), root)
    (root / "manifest.json").write_text((root / "manifest.json").read_text().replace("}", ', "new.bin": "00"}'))
    monkeypatch.setattr(assets, "bundled_path", lambda name: root / name)
    h1 = stage_hashes(shipped)
    assert len({h0[s] for s in h0} & {h1[s] for s in h1}) == 0


def test_yaml_quirks_in_a_run_config():
    """A section given as a string is a one-line error; YAML 1.1's string '1e-3' is taken as the number it means."""
    import yaml

    with pytest.raises(DiffPruneError, match="config section 'prune' is 'magnitude'; it must be a mapping"):
        load_run_config(_with(None, prune="magnitude"))
    cfg = yaml.safe_load("model: mnist-teacher\ndata: mnist\nprune: {method: magnitude, target_macs: 0.5}\n"
                         "finetune: {steps: 10, lr: 1e-3}\neval: {n: 8}\n")
    assert cfg["finetune"]["lr"] == "1e-3" and load_run_config(cfg).finetune.lr == 0.001
    cfg["finetune"]["lr"] = "fast"
    with pytest.raises(DiffPruneError, match=r"finetune.lr='fast' has the wrong type; expected a number"):
        load_run_config(cfg)


def test_config_lists_prints_and_copies_shipped_configs_and_run_takes_their_names(tmp_path, capsys, monkeypatch):
    from diffprune.assets import shipped_configs
    from diffprune.cli import main
    from diffprune.pipeline import load_run_config

    names = list(shipped_configs())
    assert {"demo", "demo-quick", "demo-dit", "demo-dit-quick"} <= set(names)
    assert main(["config"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == names
    assert main(["config", "demo"]) == 0
    assert capsys.readouterr().out == shipped_configs()["demo"].read_text(encoding="utf-8")
    out = tmp_path / "my.yaml"
    assert main(["config", "demo-quick", "--out", str(out)]) == 0
    assert out.read_bytes() == shipped_configs()["demo-quick"].read_bytes()
    assert main(["config", "demo", "--out", str(out)]) == 2  # never overwrites
    assert out.read_bytes() == shipped_configs()["demo-quick"].read_bytes()
    assert "my.yaml' exists; choose a new file name (nothing was written)" in capsys.readouterr().err
    assert main(["config", "nope"]) == 2
    assert "'nope' is not a shipped config; shipped: demo" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # outside a source checkout: a shipped name still resolves
    assert stage_hashes(load_run_config("demo-quick")) == stage_hashes(load_run_config(shipped_configs()["demo-quick"]))
    with pytest.raises(DiffPruneError, match="shipped config name .*diffprune config NAME"):
        load_run_config("missing.yaml")
