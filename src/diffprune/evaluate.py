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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._cache import cached
from .adapters import resolve_adapter, unwrap
from .errors import require, require_int, require_seed
from .eval_cache import samples_check, teacher_key
from .records import finite_or_none, eval_versions, read_log
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
        require(self.data is not None or (self.extractor, self.extractor_weights) == (None, None),
                "extractor and extractor_weights set how FID is computed, but data=None computes no FID; give the "
                "reference data (--data) or drop them")

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


@dataclass(frozen=True)
class _Sampling:
    """How both models are sampled: the one set-up that the student, the teacher and the teacher-sample cache key
    share. ``labels``: each seed's class (class-conditional models); ``context``: the prompt embeddings and the
    empty prompt's (text-to-image models)."""

    config: EvalConfig
    scheduler: Any
    device: torch.device
    progress: bool = False
    codec: Any = None
    adapter: Any = None
    labels: torch.Tensor | None = None
    context: tuple | None = None


def load_for_eval(name_or_path: str | os.PathLike):
    """``(LoadedModel, train log columns)`` of a model folder, shipped name or hub id: the one place the evaluation
    loads models (through :func:`diffprune.io.load_model`)."""
    from .io import load_model

    loaded = load_model(str(name_or_path))
    folder = Path(loaded.source)  # a hub id is no folder: read_log then finds no log
    return loaded, read_log(folder / "train_log.csv")


# --- checking the inputs and resolving the conditioning ----------------------------------------------------------

def _check_models(student, teacher, device) -> torch.device:
    """The device (default: the first model's); both models on it, with finite weights, and of one class: one
    adapter samples and measures both."""
    from ._torch import require_finite_weights

    if device is None:
        require(student is not None or teacher is not None, "pass device= when no model is given")
        device = next((student if student is not None else teacher).parameters()).device
    device = torch.device(device)
    for role, m in (("student", student), ("teacher", teacher)):
        if m is not None:
            p = next(m.parameters())
            require(p.device.type == device.type, f"the {role} is on {p.device} but device={device}; move it first")
            require_finite_weights(m, role)
    if student is not None and teacher is not None:
        s, t = type(unwrap(student)).__name__, type(unwrap(teacher)).__name__
        require(s == t, f"the student is a {s} but the teacher a {t}; evaluate compares a pruned model with the "
                        "model it was pruned from (one model family)")
    return device


def _as_sample_set(x) -> SampleSet | None:
    return x if x is None or isinstance(x, SampleSet) else load_sample_folder(x)


def _sampling_setup(models: dict[str, _Model], config: EvalConfig, scheduler, device, progress: bool, codec,
                    adapter, class_names, text_encoder) -> _Sampling:
    """Resolve the adapter once (from the first model given) and each seed's conditioning: a class label for a
    class-conditional model, prompt embeddings for a text-to-image one."""
    from .sampling import default_scheduler, labels_for, prompts_for

    model = next((m.unet for m in models.values() if m.unet is not None), None)
    adapter = None if model is None else resolve_adapter(model, adapter)
    spec = None if model is None else adapter.conditioning(model)
    labels = context = None
    if spec is not None and spec.kind == "text":
        require(text_encoder is not None and config.prompts,
                "a text-to-image model is evaluated on prompts: pass config.prompts and the pipeline's text_encoder "
                "(CLI: --prompt-file FILE)")
        context = text_encoder.sampling_inputs(prompts_for(config.seeds, config.prompts), config.guidance_scale)
    elif model is not None:
        require(config.prompts is None and config.clip_model is None, "this model is not text-to-image: it is "
                "evaluated without prompts; drop --prompt/--prompt-file and --clip-model (eval.prompts, eval.clip_model)")
        labels = labels_for(model, config.seeds, num_classes=len(class_names) if class_names else None,
                            adapter=adapter)
    return _Sampling(config, scheduler if scheduler is not None else default_scheduler(), device, progress, codec,
                     adapter, labels, context)


# --- sampling both models ----------------------------------------------------------------------------------------

def _generate(model, run: _Sampling) -> SampleSet:
    from .data import to_uint8
    from .sampling import sample

    c = run.config
    prompt, negative = run.context if run.context is not None else (None, None)
    images = sample(model, run.scheduler, seeds=c.seeds, num_inference_steps=c.steps, sampler="ddim", eta=0.0,
                    skip=c.skip, batch_size=c.batch_size, device=run.device, progress=run.progress, codec=run.codec,
                    guidance_scale=c.guidance_scale, class_labels=run.labels, prompt_embeds=prompt,
                    negative_prompt_embeds=negative, adapter=run.adapter)
    return SampleSet(seeds=c.seeds, images=to_uint8(images))


def _teacher_samples(model, run: _Sampling) -> tuple[SampleSet, dict]:
    """The teacher's samples, read from or written to the cache (``config.cache_dir``, as the FID statistics):
    evaluating many students against one teacher samples it once. Returns ``(samples, info)``: the key, the file,
    whether it was a hit and why a damaged entry was replaced (``metrics.json``'s ``teacher_samples_cache``)."""
    key = teacher_key(model, run)

    def compute() -> dict:
        s = _generate(model, run)
        return {"seeds": torch.tensor(s.seeds), "images": s.images}

    t, info = cached("teacher-samples", key, compute, root=run.config.cache_dir,
                     name=f"{type(model).__name__}-{run.config.n}-{key[:24]}", check=samples_check(run.config))
    return SampleSet(seeds=t["seeds"].tolist(), images=t["images"]), info


def _sample_models(models: dict[str, _Model], run: _Sampling) -> tuple[dict[str, SampleSet], dict | None]:
    """Each model's samples (sampled where none were given; the teacher's through the cache) and the teacher
    cache's info."""
    info = None
    for m in models.values():
        if m.samples is None and m.role == "teacher":
            m.samples, info = _teacher_samples(m.unet, run)
        elif m.samples is None:
            m.samples = _generate(m.unet, run)
    return {role: m.samples for role, m in models.items()}, info


# --- consistency, FID, class and CLIP metrics ----------------------------------------------------------------

def _consistency(sets: dict[str, SampleSet]) -> tuple[dict, tuple]:
    """``ssim``, ``ms_ssim``, ``mse`` between teacher and student paired by seed (None without a teacher) and how
    they were measured (``consistency``); with ``(seeds, teacher images, student images)`` in that order."""
    from .metrics import paired_consistency

    if "teacher" not in sets:
        return {"ssim": None, "ms_ssim": None, "mse": None, "consistency": {}}, (sorted(sets["student"].seeds),
                                                                                 None, None)
    common, t_img, s_img = pair_by_seed(sets["teacher"], sets["student"])
    detail = paired_consistency(t_img, s_img)
    figures = {key: detail.pop(key, None) for key in ("ssim", "ms_ssim", "mse")}
    return {**figures, "consistency": detail}, (common, t_img, s_img)


def _fid(config: EvalConfig, sets: dict[str, SampleSet], device) -> dict:
    """``fid`` (student) and ``fid_teacher`` against the reference data, ``fid_student_vs_teacher`` between the
    sets, and ``fid_setup`` (extractor and reference statistics); no figures without data."""
    from .data import load_images
    from .metrics import compute_features, frechet_distance, feature_statistics, load_extractor, reference_statistics

    if config.data is None:
        return {"fid": None, "fid_teacher": None, "fid_student_vs_teacher": None,
                "fid_setup": {"note": "no reference data given (pass --data); FID not computed"}}
    _, c, h, _ = next(iter(sets.values())).images.shape
    ref = load_images(config.data, resolution=h, channels=c, split=config.ref_split, limit=config.ref_count)
    extractor = load_extractor(config.resolved_extractor, config.extractor_weights, cache=config.cache_dir)
    extractor.to(device)
    batch = max(config.batch_size, 256)
    ref_stats, info = reference_statistics(ref, extractor, dataset=str(config.data), split=config.ref_split,
                                           cache=config.cache_dir, batch_size=batch, device=device)
    stats = {role: feature_statistics(compute_features(extractor, s.images, batch_size=batch, device=device))
             for role, s in sets.items()}
    fid = {role: frechet_distance(st.mu, st.sigma, ref_stats.mu, ref_stats.sigma) for role, st in stats.items()}
    between = None
    if len(stats) == 2:
        a, b = stats.values()  # student, then teacher
        between = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    return {"fid": fid.get("student"), "fid_teacher": fid.get("teacher"), "fid_student_vs_teacher": between,
            "fid_setup": {"extractor": extractor.identity(),
                          "reference": {k: v for k, v in info.items() if k != "data_sha256"}}}


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


# --- cost and speed ----------------------------------------------------------------------------------------------

def _cost(model, run: _Sampling) -> dict:
    from .latency import denoiser_latency, sampler_latency
    from .macs import count_macs
    from .sampling import skip_timesteps

    config = run.config
    rep = count_macs(model, adapter=run.adapter)
    steps = len(skip_timesteps(run.scheduler.config.num_train_timesteps, config.steps, config.skip))
    cfg_guided = config.guidance_scale != 1 and run.adapter.embedded_guidance(model) is None  # not Flux-dev's
    calls = steps * (2 if cfg_guided else 1)  # classifier-free guidance calls the denoiser twice per step
    out = {"params": rep.params, "macs": rep.macs, "macs_per_image": rep.macs * calls, "unet_calls_per_image": calls}
    if config.latency_batches:
        out["latency_unet"] = denoiser_latency(model, device=run.device, batch_sizes=config.latency_batches,
                                               repeats=config.latency_repeats, warmup=config.latency_warmup,
                                               adapter=run.adapter, progress=run.progress)
        out["latency_sampler"] = sampler_latency(model, run.scheduler, device=run.device, steps=config.steps,
                                                 batch_size=config.sampler_latency_batch,
                                                 repeats=config.latency_repeats, warmup=1, skip=config.skip,
                                                 codec=run.codec, guidance_scale=config.guidance_scale,
                                                 adapter=run.adapter, progress=run.progress)
    return out


def _ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def _cost_figures(models: dict[str, _Model], run: _Sampling) -> dict:
    """Params, MACs per call and per image of the student (``params``, ...) and of the unpruned model (``base_*``,
    as in ``pruning.json``), their ratios, the latency records and the measured speedup."""
    costs = {role: _cost(m.unet, run) for role, m in models.items() if m.unet is not None}
    sc, tc = costs.get("student", {}), costs.get("teacher", {})
    out: dict[str, Any] = {"latency": {role: {k: c[k] for k in ("latency_unet", "latency_sampler",
                                                                "unet_calls_per_image") if k in c}
                                       for role, c in costs.items()}}
    for key in ("params", "macs", "macs_per_image"):
        out[key], out[f"base_{key}"] = sc.get(key), tc.get(key)
    out["mac_ratio"] = _ratio(out["base_macs"], out["macs"])
    out["param_ratio"] = _ratio(out["base_params"], out["params"])
    if "latency_sampler" not in sc or "latency_sampler" not in tc:
        return {**out, "speedup": None, "speedup_note": "latency not measured (needs both models and latency_batches)"}
    # the per-image latency itself is recorded once, in latency.{student,teacher}.latency_sampler.per_image_s
    out["speedup"] = _ratio(tc["latency_sampler"]["per_image_s"], sc["latency_sampler"]["per_image_s"])
    out["speedup_unet"] = {b: _ratio(tc["latency_unet"][b]["median_s"], sc["latency_unet"][b]["median_s"])
                           for b in sc["latency_unet"] if b in tc["latency_unet"]}
    out["speedup_over_mac_ratio"] = _ratio(out["speedup"], out["mac_ratio"])
    return out


def evaluate(student, teacher=None, *, config: EvalConfig, out_dir: str | os.PathLike, scheduler=None,
             student_samples=None, teacher_samples=None, pruning: dict | None = None,
             train_log: dict | None = None, device=None, overwrite: bool = False, progress: bool = True,
             names: dict | None = None, inputs=(), codec=None, class_names: list[str] | None = None,
             text_encoder=None, adapter=None) -> dict:
    """Evaluate ``student`` (a denoiser, or ``None`` with ``student_samples``) against ``teacher``.

    ``student_samples``/``teacher_samples``: a :class:`~diffprune.samples.SampleSet` or a folder written by
    ``diffprune sample``, used instead of sampling (paired with the other set by seed). ``scheduler``: the
    training noise schedule (default :func:`diffprune.sampling.default_scheduler`). ``pruning`` (the student's
    ``pruning.json``) and ``train_log`` (:func:`diffprune.records.read_log` columns) feed the report's plots.
    ``device``: where sampling, features and timing run; default the student's device (models are not moved).
    ``inputs``: paths ``out_dir`` must never be or contain (see :func:`diffprune._fs.check_output_dir`).
    ``codec``: a latent pipeline's autoencoder, shared by both models (samples are decoded with it; latency includes
    the decoding). A class-conditional model samples seed ``s`` with class ``s mod num_classes`` (``class_names``:
    the classes it was trained on, ``LoadedModel.class_names``), and ``class_accuracy`` checks its samples with
    ``config.resolved_classifier``. A text-to-image model samples seed ``s`` from ``config.prompts[s mod P]``,
    encoded with ``text_encoder`` (the pipeline's; guidance against the empty prompt). ``adapter``: the models'
    :class:`~diffprune.adapters.ModelAdapter` when the caller has it (default: the student's own, looked up once).
    ``progress``: bars for sampling, features and latency timing (on stderr; ``False`` for none).
    Returns the metrics dict also written to ``out_dir/metrics.json``.
    """
    from ._fs import check_output_dir

    require(isinstance(config, EvalConfig), f"config must be an EvalConfig, got {type(config).__name__}")
    require(student is not None or student_samples is not None, "evaluate needs a student model or student samples")
    check_output_dir(out_dir, overwrite, inputs)
    device = _check_models(student, teacher, device)
    models = {"student": _Model("student", student, _as_sample_set(student_samples))}
    if teacher is not None or teacher_samples is not None:
        models["teacher"] = _Model("teacher", teacher, _as_sample_set(teacher_samples))
    run = _sampling_setup(models, config, scheduler, device, progress, codec, adapter, class_names, text_encoder)
    sets, cache_info = _sample_models(models, run)

    # One name per figure: the figures at the top level, the nested records hold only how they were measured.
    metrics: dict[str, Any] = {"config": config.to_dict(), "device": str(device), "threads": torch.get_num_threads(),
                               "versions": eval_versions(), "seeds": {"first": config.seed, "n": config.n},
                               "sampler": {"name": "ddim", "eta": 0.0, "steps": config.steps, "skip": config.skip},
                               "names": names or {}, "teacher_samples_cache": cache_info}
    consistency, pairs = _consistency(sets)
    metrics.update(consistency)
    if pairs[1] is not None:
        metrics["seeds"]["paired"] = len(pairs[0])
    metrics.update(_fid(config, sets, device))
    metrics.update(_class_accuracy(config, sets, run.labels, class_names))
    metrics.update(_clip_scores(config, sets, device))
    metrics.update(_cost_figures(models, run))
    _write_outputs(out_dir, metrics, sets, pairs, run, pruning=pruning, train_log=train_log, overwrite=overwrite,
                   inputs=inputs)
    return metrics


def _write_outputs(out_dir, metrics: dict, sets: dict[str, SampleSet], pairs: tuple, run: _Sampling, *, pruning,
                   train_log, overwrite: bool, inputs) -> None:
    """Both sample sets, the report and ``metrics.json``, into ``out_dir`` at once (an atomic folder swap)."""
    from ._fs import atomic_dir, atomic_write_json
    from .report import write_report

    config = run.config
    common, t_img, s_img = pairs
    labels = None if run.labels is None else dict(zip(config.seeds, run.labels.tolist()))
    label_names = None
    if run.context is not None:  # a text model: one grid row per prompt
        labels, label_names = {s: s % len(config.prompts) for s in config.seeds}, list(config.prompts)
    with atomic_dir(out_dir, overwrite=overwrite, kind="eval", inputs=inputs) as tmp:
        for role, s in sets.items():
            meta = {"role": role, "steps": config.steps, "sampler": "ddim", "eta": 0.0, "skip": config.skip}
            save_samples(s.images, s.seeds, tmp / "samples" / role, meta)
        metrics["report"] = write_report(tmp, metrics, teacher_images=t_img, student_images=s_img if s_img is not None
                                         else sets["student"].images, seeds=common, pruning=pruning,
                                         train_log=train_log, grid_count=config.grid_count,
                                         labels=labels, label_names=label_names)
        atomic_write_json(tmp / "metrics.json", finite_or_none(metrics))
