"""Data and crash safety: nothing of the user's deleted, one writer per folder, durable checkpoints, honest resume."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import save_tiny_model

from diffprune._fs import MARKER, output_lock
from diffprune.cli import main
from diffprune.data import load_data
from diffprune.errors import DiffPruneError
from diffprune.io import save_pruned
from diffprune.presets import build_model
from diffprune.prune import PruneConfig, prune_
from diffprune.sampling import default_scheduler, sample
from diffprune.train import TrainConfig, list_checkpoints, train, verify_checkpoint


@pytest.fixture(scope="module")
def images():
    return load_data("mnist", resolution=8, channels=1, limit=64)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    save_tiny_model(root / "model")
    return root


def _unet():
    torch.manual_seed(0)
    return build_model("tiny")


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _cfg(**kv):
    return TrainConfig(**{"steps": 6, "batch_size": 4, "checkpoint_every": 2, "log_every": 2, **kv})


# --- 1. --overwrite deletes only what diffprune wrote, never an input --------------------------------------------

def test_overwrite_never_deletes_inputs_user_folders_or_the_cwd(model_dir, tmp_path, monkeypatch, capsys):
    data = tmp_path / "imgs"
    data.mkdir()
    for i in range(4):
        torch.manual_seed(i)
        from PIL import Image

        Image.fromarray((torch.rand(8, 8) * 255).byte().numpy()).save(data / f"{i}.png")
    before_model, before_data = _tree(model_dir / "model"), _tree(data)
    common = ["--steps", "2", "--batch-size", "2", "--device", "cpu", "--overwrite"]
    cases = [
        ["train", "--preset", "tiny", "--data", str(data), "--out", str(data), *common],            # the data folder
        ["train", "--preset", "tiny", "--data", str(data), "--out", str(tmp_path), *common],        # holds the data
        ["finetune", str(model_dir / "model"), "--data", "mnist", "--out", str(model_dir / "model"), *common],
        ["prune", "--model", str(model_dir / "model"), "--method", "magnitude", "--ratio", "0.3",
         "--out", str(model_dir / "model"), "--overwrite"],                                         # the input model
        ["sample", str(model_dir / "model"), "--n", "1", "--steps", "1", "--out", str(model_dir), "--overwrite"],
    ]
    for args in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is or contains the input" in err, (args, err)
    monkeypatch.chdir(tmp_path / "imgs")
    assert main(["train", "--preset", "tiny", "--data", "mnist", "--out", ".", *common]) == 2
    assert "current directory" in capsys.readouterr().err
    assert _tree(model_dir / "model") == before_model and _tree(data) == before_data
    # a user's own non-empty folder is never deleted, a diffprune output is
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert main(["train", "--preset", "tiny", "--data", "mnist", "--out", str(mine), *common]) == 2
    assert "was not written by diffprune" in capsys.readouterr().err and (mine / "thesis.tex").is_file()
    ours = tmp_path / "ours"
    assert main(["train", "--preset", "tiny", "--data", "mnist", "--out", str(ours), *common[:-1]]) == 0
    assert json.loads((ours / MARKER).read_text())["written_by"] == "diffprune"
    (ours / "stale.txt").write_text("x")
    assert main(["train", "--preset", "tiny", "--data", "mnist", "--out", str(ours), *common]) == 0
    assert not (ours / "stale.txt").exists()


def test_an_interrupted_overwrite_leaves_the_old_result_whole(images, tmp_path, capsys):
    """--overwrite trains beside the old folder, which stays untouched until the new run has finished; --resume
    continues the interrupted overwrite, a new --overwrite starts it anew."""
    out = tmp_path / "out"
    train(_unet(), default_scheduler(), images, _cfg(steps=2), out, progress=False)
    before = _tree(out)
    assert "diffusion_pytorch_model.safetensors" in before and "raw/diffusion_pytorch_model.safetensors" in before

    def interrupt(step, loss):
        if step == 3:  # after the new run's checkpoint of step 2
            raise KeyboardInterrupt

    new = _cfg(steps=4, lr=1e-3)
    with pytest.raises(KeyboardInterrupt):
        train(_unet(), default_scheduler(), images, new, out, progress=False, overwrite=True, on_step=interrupt)
    assert _tree(out) == before  # every file of the old result, bitwise
    capsys.readouterr()
    train(_unet(), default_scheduler(), images, new, out, progress=False, resume=True)
    assert "resuming the interrupted --overwrite run" in capsys.readouterr().err
    train(_unet(), default_scheduler(), images, new, tmp_path / "ref", progress=False)
    for name in ("diffusion_pytorch_model.safetensors", "raw/diffusion_pytorch_model.safetensors"):
        a, b = load_file(tmp_path / "ref" / name), load_file(out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    segments = json.loads((out / "train_config.json").read_text())["segments"]
    assert [(s["from_step"], s["to_step"]) for s in segments] == [(0, 4), (2, 4)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ref"]  # no staging folder or lock left
    with pytest.raises(KeyboardInterrupt):
        train(_unet(), default_scheduler(), images, _cfg(steps=4), out, progress=False, overwrite=True,
              on_step=interrupt)
    train(_unet(), default_scheduler(), images, _cfg(steps=4), out, progress=False, overwrite=True)
    segments = json.loads((out / "train_config.json").read_text())["segments"]
    assert [(s["from_step"], s["to_step"]) for s in segments] == [(0, 4)]  # started anew, not resumed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ref"]


# --- 2. a local-looking path never becomes a hub call ------------------------------------------------------------

def test_local_looking_paths_never_reach_the_hub(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    import diffprune.data as data_mod

    def no_network(*a, **k):
        raise AssertionError("a local path was sent to the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.setattr(data_mod, "_hf_dataset", no_network)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name in ("runs/typo", "./a/b", "/no/such/place", "a/b/c", "~/x/y"):
        with pytest.raises(DiffPruneError, match="no such file or folder"):
            load_data(name, resolution=8, channels=1)
        assert main(["info", name]) == 2
        assert "no such file or folder" in capsys.readouterr().err


def test_hub_loads_pin_the_revision_and_run_no_remote_code(monkeypatch, tmp_path):
    import types

    import huggingface_hub
    from PIL import Image

    seen = {}

    class FakeDS:
        column_names = ["image", "label"]
        features = {"label": types.SimpleNamespace(names=["a", "b"])}

        def __init__(self, images):
            self.rows = {"image": images, "label": [0, 1]}

        def __len__(self):
            return 2

        def __getitem__(self, key):
            return self.rows[key]

    def load_dataset(name, split, revision, trust_remote_code):
        seen.update(name=name, revision=revision, trust_remote_code=trust_remote_code)
        sizes = seen.get("sizes", [(8, 8), (8, 8)])
        return FakeDS([Image.new("L", s) for s in sizes])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda self, name: types.SimpleNamespace(sha="c0ffee"))
    d = load_data("someone/digits", resolution=8, channels=1)
    assert seen == {"name": "someone/digits", "revision": "c0ffee", "trust_remote_code": False}
    assert d.record["revision"] == "c0ffee" and d.labels.tolist() == [0, 1] and d.class_names == ["a", "b"]
    seen["sizes"] = [(8, 8), (9, 7)]
    with pytest.raises(DiffPruneError, match=r"someone/digits\[1\] has shape \(7, 9, 1\).*one size"):
        load_data("someone/digits", resolution=8, channels=1)


# --- 4. a damaged newest checkpoint falls back to the previous one ------------------------------------------------

def test_damaged_newest_checkpoint_falls_back_and_says_so(images, tmp_path, capsys):
    cfg = _cfg(steps=6, keep_checkpoints=3)
    train(_unet(), default_scheduler(), images, cfg, tmp_path / "ref", progress=False)

    class Stop(Exception):
        """Stops the run after step 4, as a crash would."""

    def stop_at(step, loss):
        if step == 4:
            raise Stop

    with pytest.raises(Stop):
        train(_unet(), default_scheduler(), images, cfg, tmp_path / "run", progress=False, on_step=stop_at)
    newest = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert newest.name == "step-0000004" and verify_checkpoint(newest) is None
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    assert "does not match its recorded sha256" in verify_checkpoint(newest)
    capsys.readouterr()
    train(_unet(), default_scheduler(), images, cfg, tmp_path / "run", progress=False, resume=True)
    assert "skipped damaged checkpoint(s) ['step-0000004" in capsys.readouterr().err
    record = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert record["segments"][-1]["from_step"] == 2 and "skipped_checkpoints" in record["segments"][-1]
    a, b = load_file(tmp_path / "ref" / "diffusion_pytorch_model.safetensors"), load_file(
        tmp_path / "run" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- 5. resume: a finished run is left alone; other inputs or settings are refused --------------------------------

def test_resume_of_a_finished_run_changes_nothing(images, tmp_path):
    res = train(_unet(), default_scheduler(), images, _cfg(), tmp_path, progress=False)
    before = _tree(tmp_path)
    again = train(_unet(), default_scheduler(), images, _cfg(), tmp_path, progress=False, resume=True)
    assert again.final_loss == res.final_loss and again.steps == 6
    assert _tree(tmp_path) == before  # no NaN loss, no empty segment, nothing rewritten


def test_resume_refuses_other_data_model_teacher_and_accelerate_settings(images, tmp_path, monkeypatch):
    train(_unet(), default_scheduler(), images, _cfg(), tmp_path, progress=False)
    other = load_data("mnist", resolution=8, channels=1, limit=64, split="test")
    with pytest.raises(DiffPruneError, match="--resume: the data differs .* resume with --data as before"):
        train(_unet(), default_scheduler(), other, _cfg(steps=8), tmp_path, progress=False, resume=True)
    torch.manual_seed(5)
    with pytest.raises(DiffPruneError, match="--resume: the model differs"):
        train(build_model("tiny"), default_scheduler(), images, _cfg(steps=8), tmp_path, progress=False, resume=True)
    with pytest.raises(DiffPruneError, match="--resume: the teacher differs"):
        train(_unet(), default_scheduler(), images, _cfg(steps=8, kd_weight=0.5), tmp_path, progress=False,
              resume=True, teacher=_unet())
    record = json.loads((tmp_path / "train_config.json").read_text())
    assert record["accelerate"] == {"mixed_precision": "no", "gradient_accumulation_steps": 1, "dynamo_backend": "no"}
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    from diffprune.train import make_accelerator

    with pytest.raises(DiffPruneError, match="accelerate's mixed_precision was 'no' and is now 'bf16'"):
        train(_unet(), default_scheduler(), images, _cfg(steps=8), tmp_path, progress=False, resume=True,
              accelerator=make_accelerator("cpu"))
    AcceleratorState._reset_state()
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    with pytest.raises(DiffPruneError, match="gradient accumulation .4 steps.* is not supported"):
        train(_unet(), default_scheduler(), images, _cfg(steps=8), tmp_path, progress=False, resume=True,
              accelerator=make_accelerator("cpu"))
    AcceleratorState._reset_state()


# --- 6. divergence: no diverged checkpoint; the advice is a command that works; NaN is never silent ----------------

def test_divergence_keeps_good_checkpoints_and_its_advice_resumes(images, tmp_path, monkeypatch):
    unet = _unet()
    real_step, calls = torch.optim.Adam.step, []

    def step(self, *a, **k):  # the 4th update blows the weights up (its loss was finite): caught before checkpoint 4
        out = real_step(self, *a, **k)
        calls.append(1)
        if len(calls) == 4:
            with torch.no_grad():
                unet.conv_in.weight.fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    cmd = "diffprune train --preset tiny --data mnist --out X"
    with pytest.raises(DiffPruneError, match=r"the weights became non-finite at step 4; the last good "
                                             r"checkpoint is .*step-0000002.*rerun `diffprune train .*` with "
                                             r"--resume --lr 5e-05") as e:
        train(unet, default_scheduler(), images, _cfg(), tmp_path, progress=False, run_info={"command": cmd})
    monkeypatch.setattr(torch.optim.Adam, "step", real_step)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-0000002"]
    assert json.loads((tmp_path / "train_config.json").read_text())["diverged_at"] == 4, str(e.value)
    # the advised resume (a lower lr) is accepted; without a divergence the same change is refused
    res = train(_unet(), default_scheduler(), images, _cfg(lr=5e-5), tmp_path, progress=False, resume=True)
    record = json.loads((tmp_path / "train_config.json").read_text())
    assert res.steps == 6 and "diverged_at" not in record and [s["lr"] for s in record["segments"]] == [2e-4, 5e-5]
    with pytest.raises(DiffPruneError, match=r"settings \['lr'\] differ"):
        train(_unet(), default_scheduler(), images, _cfg(steps=8, lr=1e-5), tmp_path, progress=False, resume=True)


def test_non_finite_weights_samples_and_calibration_are_errors(model_dir, tmp_path, capsys):
    bad = _unet()
    with torch.no_grad():
        bad.conv_out.bias.fill_(float("nan"))
    with pytest.raises(DiffPruneError, match=r"sampling gave non-finite values \(NaN/inf\) for seed\(s\) \[0, 1\]"):
        sample(bad, default_scheduler(), seeds=[0, 1], num_inference_steps=2, progress=False)
    with pytest.raises(DiffPruneError, match="the model to prune has non-finite values .* 'conv_out.bias'"):
        prune_(bad, PruneConfig(method="magnitude", ratio=0.3), progress=False)
    report = prune_(_unet(), PruneConfig(method="magnitude", ratio=0.3), progress=False)
    student = _unet()
    prune_(student, PruneConfig(method="magnitude", ratio=0.3), progress=False)
    with torch.no_grad():
        next(student.parameters()).fill_(float("nan"))
    save_pruned(student, tmp_path / "nan-student", report.to_dict(), scheduler=default_scheduler())
    rc = main(["eval", "--model", str(tmp_path / "nan-student"), "--teacher", str(model_dir / "model"), "--n", "4",
               "--steps", "2", "--latency-batches", "none", "--out", str(tmp_path / "ev"), "--device", "cpu"])
    assert rc == 2 and "the student has non-finite values" in capsys.readouterr().err
    assert not (tmp_path / "ev").exists()
    from diffprune.prune import accumulate_gradients
    from diffprune.timesteps import make_strategy

    x0 = torch.zeros(2, 1, 8, 8)
    x0[0, 0, 0, 0] = float("nan")
    with pytest.raises(DiffPruneError, match=r"calibration loss at t=0 is nan"):
        accumulate_gradients(_unet(), default_scheduler(), x0, torch.zeros_like(x0), make_strategy("all", max_timesteps=2))


# --- 7. one writer per output folder ------------------------------------------------------------------------------

def test_a_second_writer_gets_the_holders_pid(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from diffprune._fs import output_lock\n"
        f"with output_lock({str(out)!r}):\n    print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc = main(["prune", "--model", str(model_dir / "model"), "--method", "magnitude", "--ratio", "0.3",
                   "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and f"being written by another diffprune process (pid {holder.pid}" in err
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    from diffprune._fs import lock_path

    with output_lock(out):  # the kernel released the dead holder's lock: no stale lock to clean up
        with output_lock(out):  # re-entrant within one process
            assert lock_path(out).read_text() == str(os.getpid())
    assert not lock_path(out).exists()  # released and removed


# --- 8. durability: every file of a checkpoint is fsynced before the rename that publishes it ------------------------

def test_checkpoint_files_are_fsynced_before_they_are_published(images, tmp_path, monkeypatch):
    import diffprune._fs as fs
    import diffprune.train as tr

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    names = {}

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(a), str(b)))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    train(_unet(), default_scheduler(), images, _cfg(steps=2), tmp_path, progress=False)
    publish = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2].endswith("step-0000002"))
    synced = {e[1] for e in events[:publish] if e[0] == "fsync"}
    tmp = events[publish][1]
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json"):
        assert f"{tmp}/{name}" in synced, name
    assert tmp in synced  # the folder itself
    assert any(e == ("fsync", str(tmp_path / "checkpoints")) for e in events[publish:])  # and its parent after
    del names, fs, tr


# --- kill -9 anywhere, resume: bitwise the uninterrupted result, no corrupt checkpoint, <= one interval lost --------

KILLER = r'''
import os, signal, sys
import torch
torch.set_num_threads(1)
import diffprune.train.checkpoints as C
import diffprune.train.outputs as F
where, n = sys.argv[1], int(sys.argv[2])
calls = {"n": 0}
def hit():
    calls["n"] += 1
    return calls["n"] == n
def die():
    os.kill(os.getpid(), signal.SIGKILL)
if where == "step":  # inside the n-th training step, before its loss
    import diffprune.objective as O
    real_loss = O.loss_at
    def loss(*a, **k):
        if hit(): die()
        return real_loss(*a, **k)
    O.loss_at = loss
elif where == "torn-file":  # half-way through writing the n-th tensor file of a checkpoint
    import safetensors.torch as st  # _fs.write_safetensors calls st.save_file into its temporary
    real_save = st.save_file
    def save(tensors, path, metadata=None):
        if hit():
            data = st.save(tensors, metadata)
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno())
            die()
        return real_save(tensors, path, metadata)
    st.save_file = save
elif where == "final":  # between writing the raw and the EMA final model
    real_copy = F.ema_copy
    def ema_copy(*a, **k):
        if hit(): die()
        return real_copy(*a, **k)
    F.ema_copy = ema_copy
from diffprune.cli import main
sys.exit(main(sys.argv[3:]))
'''


def test_kill_9_anywhere_then_resume_gives_the_uninterrupted_weights(tmp_path):
    args = ["train", "--preset", "tiny", "--data", "mnist", "--steps", "9", "--batch-size", "4",
            "--checkpoint-every", "3", "--log-every", "1", "--device", "cpu"]
    torch.set_num_threads(1)
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    out = str(tmp_path / "run")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # (kill point, n-th occurrence, steps the run had completed when killed)
    plan = [("step", 5, 4), ("torn-file", 2, 6), ("final", 1, 9)]
    for i, (where, n, done) in enumerate(plan):
        run_args = [*args, "--out", out] + (["--resume"] if i else [])
        proc = subprocess.run([sys.executable, "-c", KILLER, where, str(n), *run_args], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, (where, proc.stderr[-1000:])
        ckpts = list_checkpoints(tmp_path / "run" / "checkpoints")
        assert ckpts and all(verify_checkpoint(c) is None for c in ckpts), where  # no corrupt checkpoint
        assert done - int(ckpts[-1].name.split("-")[1]) <= 3, where  # at most one checkpoint interval lost
    assert main([*args, "--out", out, "--resume"]) == 0
    segments = json.loads((tmp_path / "run" / "train_config.json").read_text())["segments"]
    # killed in step 5 (newest checkpoint 3); torn checkpoint 6 never published (back to 3); killed while saving
    # the final model after step 9 (checkpoint 9 whole: only the final save is redone, no training segment)
    assert [(s["from_step"], s["to_step"]) for s in segments] == [(0, 9), (3, 9), (3, 9)]
    for name in ("diffusion_pytorch_model.safetensors", "raw/diffusion_pytorch_model.safetensors"):
        a, b = load_file(tmp_path / "ref" / name), load_file(tmp_path / "run" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
