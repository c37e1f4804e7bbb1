"""The ``evaluate`` verb: does the pruned model keep the teacher's behaviour, and what did pruning save?

``evaluate(student, teacher, config=EvalConfig(...), out_dir=...)`` samples both models from the same seeds (image
i from seed ``config.seed + i``, DDIM η = 0) or reuses sample folders, then measures

* FID of each model against reference data (domain FID on the shipped digit classifier's features for bundled
  MNIST, Inception FID otherwise; reference statistics cached by :func:`diffprune.metrics.reference_statistics`),
  and the FID between the two sample sets;
* consistency: SSIM / MS-SSIM / MSE between teacher and student images paired by seed;
* cost: params, MACs per UNet call (torch's flop counter) and per generated image, measured latency per UNet call
  and per image of the full sampler, peak memory, speedup = latency_teacher / latency_student and its ratio to
  the MAC ratio;

and writes ``metrics.json``, the sample sets and the report (:mod:`diffprune.report`) into ``out_dir`` atomically.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import require, require_int, require_seed
from .records import eval_versions, read_log
from .samples import SampleSet, load_sample_folder, pair_by_seed, save_samples

__all__ = ["EvalConfig", "evaluate", "load_for_eval", "default_extractor"]


def default_extractor(data: str | None) -> str:
    """``mnist-classifier`` for the bundled ``mnist`` data set (fully offline), ``inception`` for anything else."""
    return "mnist-classifier" if data == "mnist" else "inception"


@dataclass(frozen=True)
class EvalConfig:
    """Settings of one evaluation. ``data=None`` skips FID (consistency and cost are still measured).

    ``extractor=None`` picks :func:`default_extractor`; ``extractor_weights`` is the extractor's weights file or
    folder (``inception``: the ``pt_inception-2015-12-05`` file). ``ref_split``/``ref_count``: which reference
    images (``None``: all of the split). ``latency_batches=()`` skips the latency measurement. ``guidance_scale``:
    classifier-free guidance of class-conditional models. ``classifier``: the classifier that checks a
    class-conditional model's samples show the requested class (default: ``mnist-classifier`` for ``mnist`` data;
    none otherwise).
    """

    n: int = 1000
    steps: int = 50
    seed: int = 0
    skip: str = "uniform"
    batch_size: int = 64
    data: str | None = None
    ref_split: str = "train"
    ref_count: int | None = None
    extractor: str | None = None
    extractor_weights: str | None = None
    cache_dir: str | None = None
    latency_batches: tuple[int, ...] = (1, 16, 64)
    latency_repeats: int = 10
    latency_warmup: int = 2
    sampler_latency_batch: int = 16
    grid_count: int = 32
    guidance_scale: float = 1.0
    classifier: str | None = None
    prompts: tuple[str, ...] | None = None
    clip_model: str | None = None

    def __post_init__(self):
        require_int("n", self.n, 2)
        require_int("steps", self.steps, 1)
        require_seed("seed", self.seed, self.n)
        require_int("batch_size", self.batch_size, 1)
        require_int("latency_repeats", self.latency_repeats, 10)
        require_int("latency_warmup", self.latency_warmup, 0)
        require_int("sampler_latency_batch", self.sampler_latency_batch, 1)
        require_int("grid_count", self.grid_count, 1)
        require(isinstance(self.guidance_scale, (int, float)) and self.guidance_scale >= 1,
                f"guidance_scale={self.guidance_scale!r} must be >= 1 (1 = no classifier-free guidance)")
        require(self.ref_count is None or (isinstance(self.ref_count, int) and self.ref_count >= 2),
                f"ref_count={self.ref_count!r} must be an integer >= 2 or None (the whole split)")
        from .sampling import SKIPS

        require(self.skip in SKIPS, f"unknown skip {self.skip!r}; choose from {list(SKIPS)}")
        object.__setattr__(self, "latency_batches", tuple(self.latency_batches))
        if self.prompts is not None:
            object.__setattr__(self, "prompts", tuple(str(p) for p in self.prompts))
            require(len(self.prompts) >= 1, "prompts=() is empty; give at least one prompt, or None")
        require(self.clip_model is None or self.prompts is not None,
                f"clip_model={self.clip_model!r} scores samples against their prompts: give prompts too")
        require(all(isinstance(b, int) and b >= 1 for b in self.latency_batches),
                f"latency_batches={self.latency_batches!r} must be positive integers, e.g. (1, 16, 64)")
        if self.extractor is not None:
            from .metrics import EXTRACTORS

            EXTRACTORS.get(self.extractor)  # unknown name -> error listing the choices

    @property
    def resolved_extractor(self) -> str:
        return self.extractor or default_extractor(self.data)

    @property
    def resolved_classifier(self) -> str | None:
        return self.classifier or ("mnist-classifier" if self.data == "mnist" else None)

    @property
    def seeds(self) -> list[int]:
        return list(range(self.seed, self.seed + self.n))

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "resolved_extractor": self.resolved_extractor,
                "resolved_classifier": self.resolved_classifier}


@dataclass
class _Model:
    role: str
    unet: Any
    samples: SampleSet | None = None
    cost: dict = field(default_factory=dict)


def load_for_eval(name_or_path: str | os.PathLike):
    """``(LoadedModel, train log columns)`` of a model folder, shipped name or hub id.

    The one place the evaluation loads models (through :func:`diffprune.io.load_model`).
    """
    from .io import load_model

    loaded = load_model(str(name_or_path))
    folder = Path(loaded.source)  # a hub id is no folder: read_log then finds no log
    return loaded, read_log(folder / "train_log.csv")


def _device_of(unet, device):
    if device is not None:
        return torch.device(device)
    require(unet is not None, "pass device= when no model is given")
    return next(unet.parameters()).device


def _as_sample_set(x) -> SampleSet | None:
    if x is None or isinstance(x, SampleSet):
        return x
    return load_sample_folder(x)


def _generate(model, scheduler, config: EvalConfig, device, progress: bool, codec=None, labels=None,
              context=None) -> SampleSet:
    from .data import to_uint8
    from .sampling import sample

    prompt, negative = context if context is not None else (None, None)
    images = sample(model, scheduler, seeds=config.seeds, num_inference_steps=config.steps, sampler="ddim", eta=0.0,
                    skip=config.skip, batch_size=config.batch_size, device=device, progress=progress, codec=codec,
                    guidance_scale=config.guidance_scale, class_labels=labels, prompt_embeds=prompt,
                    negative_prompt_embeds=negative)
    return SampleSet(seeds=config.seeds, images=to_uint8(images))


TEACHER_SAMPLES_FORMAT = 1


def _code_sha256() -> str:
    """sha256 of diffprune's own source files: cached samples never outlive a change to the code that made them."""
    import hashlib

    root = Path(__file__).parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _teacher_samples(model, scheduler, config: EvalConfig, device, progress: bool, codec=None, labels=None,
                     context=None) -> tuple[SampleSet, dict]:
    """The teacher's samples, read from or written to the cache (``config.cache_dir``, as the FID statistics):
    evaluating many students against one teacher samples it once. The key covers everything the images depend on:
    the weights (and the codec's), the model class, the scheduler's config, the seeds, steps, skip, guidance, batch
    size, labels and text context, the device type, diffprune's source files and the torch and diffusers versions;
    so a hit is bitwise what sampling would give. Returns ``(samples, info)``: the key, the file and whether it was
    a hit (``metrics.json``'s ``teacher_samples_cache``)."""
    import hashlib
    import json

    import diffusers
    from safetensors.torch import load_file, save

    from ._cache import cache_dir
    from ._fs import atomic_write_bytes

    h = hashlib.sha256()

    def add(name: str, t: torch.Tensor) -> None:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())

    for prefix, module in (("model", model), ("codec", getattr(codec, "autoencoder", None))):
        if module is not None:
            for name, t in module.state_dict().items():
                add(f"{prefix}.{name}", t)
    for name, t in (("labels", labels), *((f"context{i}", c) for i, c in enumerate(context or ()))):
        if isinstance(t, torch.Tensor):
            add(name, t)
    h.update(json.dumps({"format": TEACHER_SAMPLES_FORMAT, "code": _code_sha256(), "class": type(model).__name__,
                         "scheduler": {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")},
                         "seeds": config.seeds, "steps": config.steps, "skip": config.skip,
                         "guidance": config.guidance_scale, "batch": config.batch_size,
                         "codec_scale": getattr(codec, "scale", None), "device": torch.device(device).type,
                         "torch": torch.__version__,
                         "diffusers": diffusers.__version__}, sort_keys=True, default=str).encode())
    key = h.hexdigest()
    name = f"{type(model).__name__}-{config.n}-{key[:24]}.safetensors"
    path = cache_dir(config.cache_dir) / "teacher-samples" / name
    info = {"key": key, "path": str(path), "hit": path.is_file()}
    if info["hit"]:
        t = load_file(path)
        return SampleSet(seeds=t["seeds"].tolist(), images=t["images"]), info
    samples = _generate(model, scheduler, config, device, progress, codec, labels, context)
    atomic_write_bytes(path, save({"seeds": torch.tensor(samples.seeds), "images": samples.images.contiguous()},
                                  metadata={"key": key, "format": str(TEACHER_SAMPLES_FORMAT)}))
    return samples, info


def _calls_per_image(scheduler, config: EvalConfig) -> int:
    from .sampling import skip_timesteps

    return len(skip_timesteps(scheduler.config.num_train_timesteps, config.steps, config.skip))


def _cost(model, scheduler, config: EvalConfig, device, codec=None) -> dict:
    from .latency import denoiser_latency, sampler_latency
    from .macs import count_macs

    rep = count_macs(model)
    calls = _calls_per_image(scheduler, config) * (2 if config.guidance_scale != 1 else 1)
    out = {"params": rep.params, "macs": rep.macs, "macs_per_image": rep.macs * calls, "unet_calls_per_image": calls}
    if config.latency_batches:
        out["latency_unet"] = denoiser_latency(model, device=device, batch_sizes=config.latency_batches,
                                               repeats=config.latency_repeats, warmup=config.latency_warmup)
        out["latency_sampler"] = sampler_latency(model, scheduler, device=device, steps=config.steps,
                                                 batch_size=config.sampler_latency_batch,
                                                 repeats=config.latency_repeats, warmup=1, skip=config.skip,
                                                 codec=codec, guidance_scale=config.guidance_scale)
    return out


def _fid(config: EvalConfig, sets: dict[str, SampleSet], device, progress: bool) -> dict:
    """FID of each sample set against the reference data and between the sets; ``{}`` without data."""
    from .data import load_images
    from .metrics import compute_features, frechet_distance, feature_statistics, load_extractor, reference_statistics

    if config.data is None:
        return {"note": "no reference data given (pass --data); FID not computed"}
    some = next(iter(sets.values()))
    _, c, h, _ = some.images.shape
    ref = load_images(config.data, resolution=h, channels=c, split=config.ref_split, limit=config.ref_count)
    extractor = load_extractor(config.resolved_extractor, config.extractor_weights, cache=config.cache_dir)
    extractor.to(device)
    stats, info = reference_statistics(ref, extractor, dataset=str(config.data), split=config.ref_split,
                                       cache=config.cache_dir, batch_size=max(config.batch_size, 256), device=device)
    out: dict[str, Any] = {"extractor": extractor.identity(), "reference": {k: v for k, v in info.items()
                                                                            if k != "data_sha256"}}
    feats = {}
    for role, s in sets.items():
        feats[role] = compute_features(extractor, s.images, batch_size=max(config.batch_size, 256), device=device)
        st = feature_statistics(feats[role])
        out[role] = frechet_distance(st.mu, st.sigma, stats.mu, stats.sigma)
    if len(feats) == 2:
        a, b = (feature_statistics(f) for f in feats.values())
        out["student_vs_teacher"] = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    return out


def _class_accuracy(config: EvalConfig, sets: dict[str, SampleSet], labels, class_names) -> dict:
    """``class_accuracy`` (student), ``class_accuracy_teacher`` and their per-class detail, for a class-conditional
    model with a classifier for its domain; ``{}`` otherwise."""
    if labels is None or config.resolved_classifier is None:
        return {}
    from .classifier import load_classifier
    from .metrics import class_accuracy

    classifier = load_classifier(config.resolved_classifier)
    n = len(class_names) if class_names else int(labels.max()) + 1
    by_seed = dict(zip(config.seeds, labels.tolist()))
    detail = {role: class_accuracy(s.images, torch.tensor([by_seed[x] for x in s.seeds]), classifier, num_classes=n)
              for role, s in sets.items()}
    return {"class_accuracy": detail["student"].pop("accuracy"),
            "class_accuracy_teacher": detail["teacher"].pop("accuracy") if "teacher" in detail else None,
            "class_accuracy_detail": {**detail, "classifier": config.resolved_classifier, "class_names": class_names}}


def _clip_scores(config: EvalConfig, sets: dict[str, SampleSet], device) -> dict:
    """``clip_score`` (student) and ``clip_score_teacher`` of a text-to-image model's samples against their prompts,
    with ``config.clip_model``; ``{}`` without one."""
    if config.clip_model is None:
        return {}
    from .metrics import clip_score, load_clip
    from .sampling import prompts_for

    model, tokenizer = load_clip(config.clip_model)
    clip = (model.to(device), tokenizer)
    scores = {role: clip_score(s.images, prompts_for(s.seeds, config.prompts), clip, batch_size=config.batch_size)
              for role, s in sets.items()}
    return {"clip_score": scores["student"]["clip_score"],
            "clip_score_teacher": scores["teacher"]["clip_score"] if "teacher" in scores else None,
            "clip_setup": {"model": config.clip_model, "n": scores["student"]["n"],
                           "definition": "100 * max(cos(image, prompt), 0), mean over samples"}}


def _ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def evaluate(student, teacher=None, *, config: EvalConfig, out_dir: str | os.PathLike, scheduler=None,
             student_samples=None, teacher_samples=None, pruning: dict | None = None,
             train_log: dict | None = None, device=None, overwrite: bool = False, progress: bool = False,
             names: dict | None = None, inputs=(), codec=None, class_names: list[str] | None = None,
             text_encoder=None) -> dict:
    """Evaluate ``student`` (a UNet2DModel, or ``None`` with ``student_samples``) against ``teacher``.

    ``student_samples``/``teacher_samples``: a :class:`~diffprune.samples.SampleSet` or a folder written by
    ``diffprune sample``, used instead of sampling (paired with the other set by seed). ``scheduler``: the
    training noise schedule (default :func:`diffprune.sampling.default_scheduler`). ``pruning`` (the student's
    ``pruning.json``) and ``train_log`` (:func:`diffprune.train.read_log` columns) feed the report's plots.
    ``device``: where sampling, features and timing run; default the student's device (models are not moved).
    ``inputs``: paths ``out_dir`` must never be or contain (see :func:`diffprune._fs.check_output_dir`).
    ``codec``: a latent pipeline's autoencoder, shared by both models (samples are decoded with it; latency includes
    the decoding). A class-conditional model samples seed ``s`` with class ``s mod num_classes`` (``class_names``:
    the classes it was trained on, ``LoadedModel.class_names``), and ``class_accuracy`` checks its samples with
    ``config.resolved_classifier``. A text-to-image model samples seed ``s`` from ``config.prompts[s mod P]``,
    encoded with ``text_encoder`` (the pipeline's; guidance against the empty prompt).
    Returns the metrics dict also written to ``out_dir/metrics.json``.
    """
    from ._fs import atomic_dir, atomic_write_json, check_output_dir
    from .metrics import paired_consistency
    from .report import write_report
    from .sampling import default_scheduler

    require(isinstance(config, EvalConfig), f"config must be an EvalConfig, got {type(config).__name__}")
    require(student is not None or student_samples is not None, "evaluate needs a student model or student samples")
    check_output_dir(out_dir, overwrite, inputs)
    scheduler = scheduler if scheduler is not None else default_scheduler()
    device = _device_of(student if student is not None else teacher, device)
    from ._torch import require_finite_weights

    for role, m in (("student", student), ("teacher", teacher)):
        if m is not None:
            p = next(m.parameters())
            require(p.device.type == device.type, f"the {role} is on {p.device} but device={device}; move it first")
            require_finite_weights(m, role)

    models = {"student": _Model("student", student, _as_sample_set(student_samples))}
    if teacher is not None or teacher_samples is not None:
        models["teacher"] = _Model("teacher", teacher, _as_sample_set(teacher_samples))
    from .adapters import adapter_for
    from .sampling import labels_for, prompts_for

    conditional = next((m.unet for m in models.values() if m.unet is not None), None)
    spec = None if conditional is None else adapter_for(conditional).conditioning(conditional)
    labels = context = None
    if spec is not None and spec.kind == "text":
        require(text_encoder is not None and config.prompts,
                "a text-to-image model is evaluated on prompts: pass config.prompts and the pipeline's text_encoder "
                "(CLI: --prompt-file FILE)")
        context = text_encoder.sampling_inputs(prompts_for(config.seeds, config.prompts), config.guidance_scale)
    elif conditional is not None:
        labels = labels_for(conditional, config.seeds, num_classes=len(class_names) if class_names else None)
    cached = None
    for m in models.values():
        if m.samples is None and m.role == "teacher":
            m.samples, cached = _teacher_samples(m.unet, scheduler, config, device, progress, codec, labels, context)
        elif m.samples is None:
            m.samples = _generate(m.unet, scheduler, config, device, progress, codec, labels, context)
    sets = {role: m.samples for role, m in models.items()}

    metrics: dict[str, Any] = {"config": config.to_dict(), "device": str(device), "threads": torch.get_num_threads(),
                               "versions": eval_versions(), "seeds": {"first": config.seed, "n": config.n},
                               "sampler": {"name": "ddim", "eta": 0.0, "steps": config.steps, "skip": config.skip},
                               "names": names or {}, "teacher_samples_cache": cached}
    # One name per figure: the figures at the top level, the nested records hold only how they were measured.
    # Consistency, paired by seed.
    consistency: dict[str, Any] = {}
    if "teacher" in sets:
        common, t_img, s_img = pair_by_seed(sets["teacher"], sets["student"])
        consistency = paired_consistency(t_img, s_img)
        metrics["seeds"]["paired"] = len(common)
    else:
        common, t_img, s_img = sorted(sets["student"].seeds), None, None
    for key in ("ssim", "ms_ssim", "mse"):
        metrics[key] = consistency.pop(key, None)
    metrics["consistency"] = consistency
    fid = _fid(config, sets, device, progress)
    metrics["fid"] = fid.pop("student", None)
    metrics["fid_teacher"] = fid.pop("teacher", None)
    metrics["fid_student_vs_teacher"] = fid.pop("student_vs_teacher", None)
    metrics["fid_setup"] = fid
    metrics.update(_class_accuracy(config, sets, labels, class_names))
    metrics.update(_clip_scores(config, sets, device))

    # Cost.
    for m in models.values():
        if m.unet is not None:
            m.cost = _cost(m.unet, scheduler, config, device, codec)
    sc, tc = models["student"].cost, models.get("teacher", _Model("teacher", None)).cost
    metrics["latency"] = {role: {k: m.cost[k] for k in ("latency_unet", "latency_sampler", "unet_calls_per_image")
                                 if k in m.cost} for role, m in models.items() if m.cost}
    metrics["params"], metrics["teacher_params"] = sc.get("params"), tc.get("params")
    metrics["macs"], metrics["teacher_macs"] = sc.get("macs"), tc.get("macs")
    metrics["macs_per_image"], metrics["teacher_macs_per_image"] = sc.get("macs_per_image"), tc.get("macs_per_image")
    metrics["mac_ratio"] = _ratio(metrics["teacher_macs"], metrics["macs"])
    metrics["param_ratio"] = _ratio(metrics["teacher_params"], metrics["params"])
    if "latency_sampler" in sc and "latency_sampler" in tc:
        metrics["latency_per_image_s"] = sc["latency_sampler"]["per_image_s"]
        metrics["teacher_latency_per_image_s"] = tc["latency_sampler"]["per_image_s"]
        metrics["speedup"] = _ratio(metrics["teacher_latency_per_image_s"], metrics["latency_per_image_s"])
        metrics["speedup_unet"] = {b: _ratio(tc["latency_unet"][b]["median_s"], sc["latency_unet"][b]["median_s"])
                                   for b in sc["latency_unet"] if b in tc["latency_unet"]}
        metrics["speedup_over_mac_ratio"] = _ratio(metrics["speedup"], metrics["mac_ratio"])
    else:
        metrics["speedup"] = None
        metrics["speedup_note"] = "latency not measured (needs both models and latency_batches)"

    grid_labels = None if labels is None else dict(zip(config.seeds, labels.tolist()))
    grid_names = None
    if context is not None:  # a text model: one grid row per prompt
        grid_labels = {s: s % len(config.prompts) for s in config.seeds}
        grid_names = list(config.prompts)
    with atomic_dir(out_dir, overwrite=overwrite, kind="eval", inputs=inputs) as tmp:
        for role, s in sets.items():
            meta = {"role": role, "steps": config.steps, "sampler": "ddim", "eta": 0.0, "skip": config.skip}
            save_samples(s.images, s.seeds, tmp / "samples" / role, meta)
        metrics["report"] = write_report(tmp, metrics, teacher_images=t_img, student_images=s_img if s_img is not None
                                         else sets["student"].images, seeds=common, pruning=pruning,
                                         train_log=train_log, grid_count=config.grid_count,
                                         labels=grid_labels, label_names=grid_names)
        atomic_write_json(tmp / "metrics.json", _finite_or_none(metrics))
    return metrics


def _finite_or_none(x):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_none(v) for v in x]
    return x

