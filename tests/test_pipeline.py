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
    """A finetune stage folder left by the same settings resumes (train_config.json lives in finetune/model); one
    left with fewer steps is continued (more steps), not deleted; other settings or fewer steps start over."""
    import diffprune.finetune
    from diffprune.pipeline import _run_finetune

    calls = []
    monkeypatch.setattr(diffprune.finetune, "finetune", lambda *a, **k: calls.append(k))
    cfg = load_run_config(BASE)
    folder = tmp_path / "finetune"
    _run_finetune(cfg, tmp_path, folder, stage_hashes(cfg), device="cpu", progress=False)
    assert (calls[-1]["resume"], calls[-1]["overwrite"]) == (False, True)  # fresh stage
    (folder / "model" / "checkpoints" / "step-0000010").mkdir(parents=True)
    (folder / "model" / "checkpoints" / "step-0000010" / "state.json").write_text("{}")
    (folder / "model" / "train_config.json").write_text("{}")  # what an interrupted (or finished) train() leaves
    _run_finetune(cfg, tmp_path, folder, stage_hashes(cfg), device="cpu", progress=False)
    assert (calls[-1]["resume"], calls[-1]["overwrite"]) == (True, False)
    more = load_run_config(_with("finetune", steps=20))  # only the steps grew: continue the run
    assert stage_hashes(more)["finetune"] != stage_hashes(cfg)["finetune"]  # (so the stage is not skipped)
    _run_finetune(more, tmp_path, folder, stage_hashes(more), device="cpu", progress=False)
    assert (calls[-1]["resume"], calls[-1]["overwrite"]) == (True, False) and (folder / "model").is_dir()
    fewer = load_run_config(_with("finetune", steps=5))  # below the last checkpoint: start over
    _run_finetune(fewer, tmp_path, folder, stage_hashes(fewer), device="cpu", progress=False)
    assert (calls[-1]["resume"], calls[-1]["overwrite"]) == (False, True)
    assert not (folder / "model").exists()
    (folder / "model").mkdir()
    (folder / "model" / "train_config.json").write_text("{}")
    other = load_run_config(_with("finetune", steps=5, lr=1e-3))  # other settings: start over
    _run_finetune(other, tmp_path, folder, stage_hashes(other), device="cpu", progress=False)
    assert (calls[-1]["resume"], calls[-1]["overwrite"]) == (False, True)
    assert not (folder / "model").exists()


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
