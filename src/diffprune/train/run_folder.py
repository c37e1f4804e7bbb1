"""The folder a run writes: new, overwritten or resumed; its record (train_config.json, train_summary.json) and its
log (train_log.csv).

A new run trains in ``out``. A run that replaces a non-empty ``out`` (``--overwrite``) trains in a staging folder
beside it, ``.OUT.overwrite``, and ``out`` stays whole and untouched until the new run has finished: then one
:func:`~diffprune._fs.swap_in` replaces it (:meth:`RunFolder.publish`). ``--resume`` continues such an interrupted
overwrite (its staging folder) when there is one, else the run in ``out``; a new ``--overwrite`` discards it.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .._fs import (atomic_write_bytes, atomic_write_json, check_output_dir, clean_stale_temporaries, mark_output,
                   read_json, swap_in)
from ..errors import DiffPruneError, require
from ..records import LOG_FIELDS
from .checkpoints import list_checkpoints
from .config import TrainConfig, TrainResult

FREE_ON_RESUME = ("steps", "lr_schedule", "lr_decay_start")  # may change when resuming (lr of done steps checked)
FREE_AFTER_DIVERGENCE = ("lr", "warmup_steps")  # may change too when resuming a run that diverged


def staging_dir(out: Path) -> Path:
    """Where a run that replaces ``out`` trains until it has finished (beside ``out``, so one rename publishes it;
    not named like a temporary, so cleaning up after dead processes leaves it to be resumed)."""
    return out.parent / f".{out.name}.overwrite"


@dataclass(frozen=True)
class RunFolder:
    """``out``: where the result goes; ``path``: where the run trains (``out``, or its staging folder)."""

    out: Path
    path: Path

    @property
    def staged(self) -> bool:
        return self.path != self.out

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def record(self) -> Path:
        return self.path / "train_config.json"

    @property
    def summary(self) -> Path:
        return self.path / "train_summary.json"

    @property
    def log(self) -> Path:
        return self.path / "train_log.csv"

    def publish(self) -> None:
        """Replace ``out`` by a finished staged run in one swap (the old folder is removed after it)."""
        if self.staged:
            swap_in(self.path, self.out)


def open_run(out: Path, config: TrainConfig, identity: dict, world: int, resume: bool, overwrite: bool,
             inputs) -> tuple[RunFolder, TrainConfig, dict | None]:
    """Choose and check the folder the run trains in (main process only, holding ``out``'s lock).

    Returns it, the config to use (on resume, the auto EMA decay resolved as the first run resolved it) and the
    saved record (None for a new run).
    """
    clean_stale_temporaries(out.parent)  # puts back an `out` whose replacement a kill interrupted
    staged = staging_dir(out)
    record = None
    if resume:
        if staged.is_dir() and not (staged / "train_config.json").is_file():
            _discard(staged)  # an overwrite killed before its first record: nothing in it to resume
        folder = RunFolder(out, staged if staged.is_dir() else out)
        if folder.staged:
            print(f"diffprune: resuming the interrupted --overwrite run in {str(staged)!r}; it replaces "
                  f"{str(out)!r} when it finishes", file=sys.stderr)
        config, record = _reconcile(folder.path, config, identity, world)
    else:
        check_output_dir(out, overwrite, inputs, resumable=True)
        if staged.exists():
            _discard(staged)  # an abandoned overwrite; this run starts anew
        replacing = out.is_dir() and any(out.iterdir())  # check_output_dir allowed it: a folder diffprune wrote
        folder = RunFolder(out, staged if replacing else out)
        if replacing:
            staged.mkdir()
            mark_output(staged, "train")
    clean_stale_temporaries(folder.path)  # a final save a kill interrupted
    clean_stale_temporaries(folder.checkpoints)  # a checkpoint a kill interrupted
    return folder, config, record


def follow_run(out: Path, config: TrainConfig, identity: dict, world: int,
               resume: bool) -> tuple[RunFolder, TrainConfig, dict | None]:
    """:func:`open_run` for the other processes, once the main one has prepared the folder: the same folder and,
    on resume, the config and record it checked."""
    staged = staging_dir(out)
    folder = RunFolder(out, staged if staged.is_dir() else out)
    if not resume:
        return folder, config, None
    config, record = _reconcile(folder.path, config, identity, world)
    return folder, config, record


def _discard(staged: Path) -> None:
    check_output_dir(staged, True)  # only a folder diffprune wrote
    shutil.rmtree(staged)


def _reconcile(path: Path, config: TrainConfig, identity: dict, world: int) -> tuple[TrainConfig, dict]:
    """Check the settings and inputs of a resumed run against the saved run's in ``path``."""
    saved_cfg_path = path / "train_config.json"
    require(saved_cfg_path.is_file(), f"--resume: {str(path)!r} holds no train_config.json; start without --resume")
    record = read_json(saved_cfg_path)
    saved = record["train"]
    before_world = record.get("world_size", 1)
    require(before_world == world,
            f"--resume: the run trained with {before_world} process(es), this one has {world}; the "
            f"data order and the global batch depend on it, so resume with {before_world} "
            f"(accelerate launch --num_processes {before_world} ...)")
    for key, flag in (("data", "--data"), ("model", "the same MODEL"), ("teacher", "--teacher")):
        was, now = record.get("identity", {}).get(key), identity[key]
        require(was == now, f"--resume: the {key} differs from the interrupted run's ({_short(was)} -> {_short(now)}, "
                            f"sha256); resume with {flag} as before, or start anew with --overwrite")
    was_acc = record.get("accelerate", {})
    for key, value in identity["accelerate"].items():
        require(was_acc.get(key, value) == value,
                f"--resume: accelerate's {key} was {was_acc.get(key)!r} and is now {value!r}; resume with the same "
                f"setting (accelerate launch --{key} {was_acc.get(key)} or the environment variable "
                f"ACCELERATE_{key.upper()}) or start anew with --overwrite")
    if config.ema_decay is None:  # "auto" was resolved from the first run's --steps; keep that horizon
        config = dataclasses.replace(config, ema_decay=saved.get("ema_decay"))
    mine = config.to_dict()
    mine["ema_decay"] = config.resolved_ema_decay
    free = FREE_ON_RESUME + (FREE_AFTER_DIVERGENCE if record.get("diverged_at") is not None else ())
    diff = sorted(k for k in mine if k not in free and saved.get(k) != mine[k])
    require(not diff, f"--resume: settings {diff} differ from the interrupted run's {str(saved_cfg_path)!r}; "
                      "resume with the same settings (only --steps and the lr schedule of later steps may change)")
    return config, record


def _short(digest) -> str:
    return "none" if digest is None else str(digest)[:12]


def check_schedule(before: TrainConfig, config: TrainConfig, start_step: int, diverged: bool) -> None:
    """Refuse a new schedule that would have given a step already taken another lr (unless the run diverged)."""
    if diverged:
        return
    changed = next((s for s in range(start_step) if not math.isclose(before.lr_at(s), config.lr_at(s),
                                                                     rel_tol=1e-9)), None)
    require(changed is None, f"--resume: the new schedule changes the lr of step {changed}, which checkpoint "
                             f"step {start_step} already took; keep --steps and the schedule, or pass "
                             f"--lr-decay-start {start_step} (or later)")


def finished_result(folder: RunFolder, config: TrainConfig, start_step: int) -> TrainResult | None:
    """The result of a run that already ended at ``config.steps`` (nothing to train, nothing to rewrite), else None."""
    if start_step != config.steps or not folder.summary.is_file():
        return None
    done = read_json(folder.summary)
    if done.get("steps") != config.steps:
        return None
    return TrainResult(folder.out, config.steps, float(done.get("final_loss", float("nan"))), 0.0)


def begin_segment(folder: RunFolder, config: TrainConfig, identity: dict, world: int, run_info: dict,
                  record: dict | None, start_step: int, skipped: list[str]) -> None:
    """Record the run (train_config.json) with the segment this call trains, and drop log rows past it."""
    folder.path.mkdir(parents=True, exist_ok=True)
    mark_output(folder.path, "train")
    segments = record.get("segments", []) if record else []
    if start_step < config.steps:  # (== : killed while saving the final model; only that is redone)
        segments.append({"command": run_info.get("command"), "from_step": start_step, "to_step": config.steps,
                         "world_size": world, "lr": config.lr,
                         **({"skipped_checkpoints": skipped} if skipped else {})})
    atomic_write_json(folder.record, {"train": config.to_dict() | {"ema_decay": config.resolved_ema_decay},
                                      "world_size": world,
                                      "identity": {k: v for k, v in identity.items() if k != "accelerate"},
                                      "accelerate": identity["accelerate"], **run_info, "segments": segments})
    truncate_log(folder.log, start_step)


def end_run(folder: RunFolder, config: TrainConfig, final_loss: float, world: int, started: float) -> None:
    """Close the record of a run that reached its end; train_summary.json last."""
    record = read_json(folder.record)
    if record["segments"] and record["segments"][-1]["to_step"] == config.steps:
        record["segments"][-1]["wall_minutes"] = round((time.time() - started) / 60, 1)
    record.pop("diverged_at", None)  # the run reached its end
    atomic_write_json(folder.record, record)
    # written last: a final model is complete when train_summary.json names its step count
    atomic_write_json(folder.summary, {"steps": config.steps, "final_loss": final_loss,
                                       "ema_decay": config.resolved_ema_decay, "world_size": world})


def diverged(what: str, step: int, config: TrainConfig, folder: RunFolder, main: bool,
             command: str | None) -> DiffPruneError:
    """Record the divergence and build the error, with a resume command that the next run accepts."""
    good = list_checkpoints(folder.checkpoints)
    where = f"the last good checkpoint is {str(good[-1])!r}" if good else "no checkpoint was written yet"
    if main and folder.record.is_file():
        record = read_json(folder.record)
        record["diverged_at"] = step
        atomic_write_json(folder.record, record)
    lower = f"{config.lr / 4:.3g}"
    how = (f"rerun `{command}` with --resume --lr {lower}" if command else
           f"call again with resume=True and TrainConfig(lr={lower}, ...)")
    if not good:
        how = how.replace("--resume ", "--overwrite ").replace("resume=True", "overwrite=True")
    return DiffPruneError(f"{what} at step {step}; {where}; to continue with a lower learning rate, {how}")


# --- train_log.csv -----------------------------------------------------------------------------------------------

def append_log(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        if new:
            w.writeheader()
        w.writerow(row)


def truncate_log(path: Path, step: int) -> None:
    """Drop log rows past ``step`` (a resumed run rewrites them) and a row torn by a kill; rewrite atomically."""
    if not path.exists():
        return
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if _whole_row(r) and int(r["step"]) <= step]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LOG_FIELDS, lineterminator="\r\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def _whole_row(row: dict) -> bool:
    try:
        return int(row["step"]) >= 0 and all(math.isfinite(float(row[k])) or row[k] == "nan" for k in LOG_FIELDS)
    except (TypeError, ValueError, KeyError):
        return False
