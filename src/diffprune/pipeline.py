"""``diffprune run CONFIG.yaml``: prune -> finetune -> eval, each stage in its own subfolder of the run folder.

A stage folder holds ``stage.json`` (its resolved settings, the hash of those and of every upstream stage, and
how long it took), written last: a stage is complete when ``stage.json`` exists and its hash matches. Re-running
skips complete stages, redoes a stage whose settings (or an upstream stage) changed, and resumes an interrupted
fine-tuning run from its last checkpoint. ``force=["finetune"]`` redoes that stage and everything after it.

Config file (YAML), every key validated up front::

    model: mnist-teacher       # the model to prune: a folder, a shipped name or a hub id
    data: mnist                # calibration, fine-tuning and FID reference data
    seed: 0
    device: null               # null: cuda when available, else cpu
    prune:    {...}            # PruneConfig fields (method, thr, target_macs | ratio, ...)
    finetune: {...}            # TrainConfig fields (steps, batch_size, lr, kd_weight, ...)
    eval:     {...}            # EvalConfig fields (n, steps, latency_batches, ...)
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._config import config_from_dict
from ._fs import atomic_write_bytes, atomic_write_json, mark_output, read_json, swap_in
from ._hashing import file_sha256, json_sha256
from .errors import DiffPruneError, require

STAGES = ("prune", "finetune", "eval")
SECTION_EXAMPLES = {"prune": "method: magnitude", "finetune": "steps: 100", "eval": "n: 100"}
TOP_KEYS = {"model": str, "data": str, "seed": int, "device": (str, type(None))}


def _section_classes() -> dict[str, type]:
    from .evaluate import EvalConfig
    from .prune import PruneConfig
    from .train import TrainConfig

    return {"prune": PruneConfig, "finetune": TrainConfig, "eval": EvalConfig}


def build_section(section: str, cls: type, values: dict | None, *, seed: int | None = None):
    """Validate one config section against ``cls``'s fields (names and types) and construct it."""
    require(values is None or isinstance(values, dict), f"config section {section!r} must be a mapping of settings")
    values = dict(values or {})
    if seed is not None and "seed" in {f.name for f in dataclasses.fields(cls)}:
        values.setdefault("seed", seed)
    return config_from_dict(cls, values, section)


@dataclass(frozen=True)
class RunConfig:
    model: str
    data: str
    prune: Any
    finetune: Any
    eval: Any
    seed: int = 0
    device: str | None = None

    def section(self, stage: str) -> dict:
        return getattr(self, stage).to_dict()


def load_run_config(source: str | os.PathLike | dict) -> RunConfig:
    """Read and validate a run config (a YAML path or a dict). Every problem is one line naming the key."""
    if isinstance(source, dict):
        raw = source
    else:
        import yaml

        from .assets import shipped_config_path, shipped_configs

        path = shipped_config_path(source) or Path(source)
        require(path.is_file(), f"config {str(path)!r} does not exist; pass a YAML file or a shipped config name "
                                f"({', '.join(shipped_configs())}; `diffprune config NAME` prints one to copy)")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise DiffPruneError(f"config {str(path)!r} is not valid YAML ({str(e).splitlines()[0]})") from None
    require(isinstance(raw, dict), "a run config must be a YAML mapping with keys model, data, prune, finetune, eval")
    allowed = sorted(set(TOP_KEYS) | set(STAGES))
    for key in raw:
        require(key in allowed, f"unknown key {key!r}; allowed: {allowed}")
    for key in ("model", "data", "prune", "finetune", "eval"):
        require(key in raw, f"config is missing {key!r}; required: model, data, prune, finetune, eval")
    for key, kind in TOP_KEYS.items():
        if key in raw:
            require(isinstance(raw[key], kind) and not isinstance(raw[key], bool),
                    f"{key}={raw[key]!r} has the wrong type; expected {kind}")
    seed = raw.get("seed", 0)
    require(seed >= 0, f"seed={seed} must be >= 0")
    classes = _section_classes()
    sections = {}
    for stage in STAGES:
        require(raw[stage] is None or isinstance(raw[stage], dict),
                f"config section {stage!r} is {raw[stage]!r}; it must be a mapping of settings, e.g. {stage}: "
                f"{{{SECTION_EXAMPLES[stage]}}}")
        values = dict(raw[stage] or {})
        if stage == "eval":
            values.setdefault("data", raw["data"])
        sections[stage] = build_section(stage, classes[stage], values, seed=seed)
    return RunConfig(model=raw["model"], data=raw["data"], seed=seed, device=raw.get("device"), **sections)


def _hash(obj) -> str:
    return json_sha256(obj, 16)


def input_fingerprint(cfg: RunConfig) -> dict:
    """The content behind the run's names: every shipped file (teacher, classifier, MNIST) through the assets
    manifest, and a local model folder through the sha256 of the files that define it: a changed teacher redoes
    every stage. Hub ids and data folders count by name only."""
    from . import assets
    from .layout import model_files

    key: dict = {"shipped": file_sha256(assets.bundled_path("manifest.json"))}
    folder = Path(cfg.model).expanduser()
    if folder.is_dir():
        key["model"] = {p.relative_to(folder).as_posix(): file_sha256(p) for p in model_files(folder)}
    return key


def stage_hashes(cfg: RunConfig) -> dict[str, str]:
    """Each stage's hash covers its own settings, the run's inputs (by content, see :func:`input_fingerprint`) and
    every upstream stage's hash; eval's also covers the device and the FID extractor's weights file."""

    out, upstream = {}, {"model": cfg.model, "data": cfg.data, "content": input_fingerprint(cfg)}
    weights = cfg.eval.extractor_weights
    for stage in STAGES:
        extra = {}
        if stage == "eval":
            extra = {"device": cfg.device,
                     "extractor_weights": file_sha256(weights) if weights and Path(weights).is_file() else None}
        out[stage] = _hash({"stage": stage, "settings": _hashed_settings(cfg, stage), "upstream": upstream, **extra})
        upstream = {"stage": out[stage]}
    return out


def _hashed_settings(cfg: RunConfig, stage: str) -> dict:
    """A stage's settings as its hash covers them: settings added after runs were recorded are left out while at
    the value those runs used (the allocation settings at the paper's global ranking), so the runs keep their
    hashes, and count as soon as they are set."""
    from .prune.config import LATER_DEFAULTS

    settings = cfg.section(stage)
    if stage == "prune":
        settings = {k: v for k, v in settings.items() if k not in LATER_DEFAULTS or v not in (None, LATER_DEFAULTS[k])}
    return settings


def stage_complete(folder: Path, digest: str, device: str | None = None) -> bool:
    """The stage finished with these settings (``digest``); with ``device``, also on that device when the stage
    recorded one (eval's latency is the device's: measured on the CPU, it is no answer for a GPU run)."""
    marker = folder / "stage.json"
    if not marker.is_file():
        return False
    done = read_json(marker)
    return done.get("hash") == digest and (device is None or done.get("device", device) == str(device))


def run_pipeline(config: RunConfig, run_dir: str | os.PathLike, *, force: tuple[str, ...] = (), device=None,
                 progress: bool = True, log=print) -> dict:
    """Run (or resume) every stage; returns the eval metrics. ``device``: where models run (CLI picks one).

    Everything is checked before any stage starts (settings, the model and data names, the device, the run folder);
    a finished stage is replaced only once its replacement has finished (each stage runs in ``.STAGE.next`` and is
    swapped in), so a bad config or an interrupted stage never loses a finished one."""
    from ._fs import check_output_dir, mark_output, output_lock
    from .train import check_training_device

    for name in force:
        require(name in STAGES, f"unknown stage {name!r} for --force; choose from {list(STAGES)}")
    check_training_device(device)  # before any stage starts, not after the pruning
    check_inputs(config)
    run = Path(run_dir).expanduser()
    # Stage folders of a stale run are replaced; never do that to a folder that is not a run folder.
    require(not run.exists() or (run.is_dir() and (not any(run.iterdir()) or (run / "run_config.json").is_file())),
            f"--out {str(run)!r} exists and is not a diffprune run folder (no run_config.json); choose a new or "
            "empty folder (an existing run folder is resumed)")
    check_output_dir(run, overwrite=True, inputs=(config.model, config.data))  # never a folder holding an input
    with output_lock(run):
        run.mkdir(parents=True, exist_ok=True)
        mark_output(run, "run")
        return _run_stages(config, run, force, device, progress, log)


def check_inputs(config: RunConfig) -> None:
    """The model and the data must name something that exists (a shipped name, a folder, a bundled dataset, a hub
    id) before any stage runs: a typo must not cost a finished stage."""
    from ._fs import is_hub_id, missing_path_message
    from .assets import SHIPPED_MODELS
    from .data import DATASETS

    for what, name, names in (("model", config.model, SHIPPED_MODELS), ("data", config.data, DATASETS)):
        known = name in names or (what, name) == ("data", "data-free")
        if known or Path(name).expanduser().exists() or is_hub_id(name):
            continue
        raise DiffPruneError(missing_path_message(what, name) if "/" in name or name.startswith((".", "~")) else
                             f"{what} {name!r} is not a folder here, nor one of {sorted(names)}, nor a hub id "
                             "(owner/name); fix the config's '" + what + "'")
    _check_text_model(config)


def _check_text_model(config: RunConfig) -> None:
    """A text-to-image pipeline (a local folder whose family has a text encoder) is evaluated on prompts: without
    ``eval.prompts`` the run would prune and fine-tune for hours and then fail at eval."""
    from .adapters.pipelines import PIPELINES
    from .layout import INDEX_NAME, read_index

    folder = Path(config.model).expanduser()
    if not (folder / INDEX_NAME).is_file():
        return
    name = read_index(folder).get("_class_name")
    family = PIPELINES.get(name) if isinstance(name, str) and name in PIPELINES else None
    require(family is None or family.text_encoder is None or config.eval.prompts is not None,
            f"model {config.model!r} is a text-to-image pipeline ({name}), evaluated on prompts: give eval.prompts "
            "(a list of prompts) in the config")


def _run_stages(config: RunConfig, run: Path, force, device, progress: bool, log) -> dict:
    hashes = stage_hashes(config)
    atomic_write_json(run / "run_config.json", {
        "model": config.model, "data": config.data, "seed": config.seed, "device": config.device,
        **{s: config.section(s) for s in STAGES}, "hashes": hashes,
    })
    forced_from = min((STAGES.index(s) for s in force), default=len(STAGES))  # --force: that stage and later ones
    for i, stage in enumerate(STAGES):
        folder = run / stage
        if i < forced_from and stage_complete(folder, hashes[stage], device if stage == "eval" else None):
            log(f"[{stage}] complete with the same settings; skipped ({folder})")
            continue
        t0 = time.time()
        log(f"[{stage}] running -> {folder}")
        staging = _STAGE_FUNCS[stage](config, run, hashes, device=device, progress=progress)
        atomic_write_json(staging / "stage.json", {"stage": stage, "hash": hashes[stage], "settings":
                                                   config.section(stage), "seconds": round(time.time() - t0, 1),
                                                   "device": None if device is None else str(device)})
        swap_in(staging, folder)  # the finished stage replaces the old one only now
    from .records import read_metrics

    return read_metrics(run / "eval" / "metrics.json")


def _staging_path(run: Path, stage: str) -> Path:
    return run / f".{stage}.next"


def _staging(run: Path, stage: str, key: str, *, resume_from: Path | None = None) -> Path:
    """The stage's work folder ``run/.STAGE.next``: kept when it was left by the same resume ``key`` (an
    interrupted resumable stage), else made anew, seeded with a copy of ``resume_from`` when that finished folder
    can be continued. Deleting it loses nothing finished."""
    staging = _staging_path(run, stage)
    marker = staging / ".hash"
    if staging.exists() and not (marker.is_file() and marker.read_text() == key):
        shutil.rmtree(staging)
    if not staging.exists() and resume_from is not None:
        shutil.copytree(resume_from, staging)
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "stage.json").unlink(missing_ok=True)  # complete only once the stage finishes again
    mark_output(staging, "stage")
    atomic_write_bytes(marker, key.encode())
    return staging


def finetune_resume_key(config: RunConfig, hashes: dict[str, str]) -> str:
    """What an interrupted or finished fine-tuning must share with this run to be continued rather than redone:
    everything but ``steps`` (more steps resume it, as ``diffprune finetune --resume --steps N`` does)."""
    settings = {k: v for k, v in config.section("finetune").items() if k != "steps"}
    return _hash({"stage": "finetune", "settings": settings, "upstream": hashes["prune"]})


def _run_prune(config: RunConfig, run: Path, hashes: dict, *, device, progress: bool) -> Path:
    from .io import save_pruned
    from .prune import prune_model

    folder = _staging(run, "prune", hashes["prune"])
    loaded, _ = prune_model(config.model, config.prune, config.data, device=device, progress=progress)
    save_pruned(loaded.denoiser.cpu(), folder / "model", loaded.pruning, scheduler=loaded.scheduler,
                overwrite=True, pipeline=loaded.pipeline)
    return folder


def _steps_done(model_dir: Path) -> int:
    from .train import list_checkpoints

    return max([int(p.name.split("-")[1]) for p in list_checkpoints(model_dir / "checkpoints")], default=0)


def _run_finetune(config: RunConfig, run: Path, hashes: dict, *, device, progress: bool) -> Path:
    from .finetune import finetune
    from .train import make_accelerator

    key = finetune_resume_key(config, hashes)
    done = run / "finetune"
    # a finished (or interrupted) fine-tuning with the same settings and no more steps than asked is continued
    can_continue = (done / ".hash").is_file() and (done / ".hash").read_text() == key \
        and _steps_done(done / "model") <= config.finetune.steps
    staging = _staging_path(run, "finetune")
    if (staging / "model").is_dir() and _steps_done(staging / "model") > config.finetune.steps:
        shutil.rmtree(staging)  # fewer steps than its last checkpoint: start over
    folder = _staging(run, "finetune", key, resume_from=done if can_continue else None)
    out = folder / "model"
    resume = (out / "train_config.json").is_file()  # train() writes it into its own output folder
    teacher = config.model if config.finetune.kd_weight > 0 else None
    finetune(run / "prune" / "model", config.data, config.finetune, out, teacher=teacher,
             resume=resume, overwrite=not resume, accelerator=make_accelerator(device),
             progress=progress, command=f"diffprune run (stage finetune, hash {hashes['finetune']})")
    return folder


def _run_eval(config: RunConfig, run: Path, hashes: dict, *, device, progress: bool) -> Path:
    from .evaluate import evaluate, load_for_eval

    folder = _staging(run, "eval", hashes["eval"])
    student, log = load_for_eval(run / "finetune" / "model")
    teacher, _ = load_for_eval(config.model)
    if device:
        for m in (student.denoiser, teacher.denoiser, student.codec, student.text_encoder):
            if m is not None:
                m.to(device)
    evaluate(student.denoiser, teacher.denoiser, config=config.eval, out_dir=folder, scheduler=student.scheduler,
             pruning=student.pruning, train_log=log, device=device, overwrite=True, progress=progress,
             names={"student": "pruned + fine-tuned", "teacher": str(config.model),
                    "teacher_revision": teacher.revision}, codec=student.codec,
             class_names=student.class_names, text_encoder=student.text_encoder)
    return folder


_STAGE_FUNCS = {"prune": _run_prune, "finetune": _run_finetune, "eval": _run_eval}
