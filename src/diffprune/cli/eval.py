"""``diffprune eval``: FID, teacher↔student consistency, MACs and measured latency, and a report to look at.

Teacher and student are sampled from the same seeds (image i from seed SEED+i, DDIM η = 0), or existing
``diffprune sample`` folders are reused and paired by seed. Writes metrics.json, report.html (self-contained),
report.md with its PNGs, and both sample sets into --out.
"""
from __future__ import annotations

import dataclasses

from ._common import add_device_flag, add_prompt_flags, device_of, read_prompts


def _int_list(text: str) -> tuple[int, ...]:
    import argparse

    if text.strip().lower() in ("", "none", "0"):
        return ()
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 1,16,64") from None


def add_parser(sub) -> None:
    from ..evaluate import EvalConfig

    d = EvalConfig()
    p = sub.add_parser("eval", help="evaluate a pruned model against its teacher and write a report",
                       description=__doc__)
    p.add_argument("--model", help="the model to evaluate (student): a model folder or shipped name; may be left out "
                                   "with --student-samples (then no cost is measured)")
    p.add_argument("--teacher", help="the unpruned model to compare against: a model folder or shipped name")
    p.add_argument("--data", help="reference images for FID: 'mnist', 'digits', a folder or a HF dataset id "
                                  "(default: the data recorded in the model folder's train_config.json; 'none' or "
                                  "nothing recorded: no FID)")
    p.add_argument("--ref-split", default=d.ref_split, help="split of --data used as the FID reference")
    p.add_argument("--ref-count", type=int, default=None, help="reference images used (default: the whole split)")
    p.add_argument("--n", type=int, default=d.n, help="images sampled from each model")
    p.add_argument("--steps", type=int, default=d.steps, help="DDIM steps (eta 0)")
    p.add_argument("--skip", choices=["uniform", "quad"], default=d.skip, help="DDIM timestep spacing")
    p.add_argument("--seed", type=int, default=d.seed, help="image i comes from seed SEED+i in both models")
    p.add_argument("--out", required=True, help="output folder (must be new or empty unless --overwrite)")
    p.add_argument("--student-samples", help="reuse this `diffprune sample` folder instead of sampling the student")
    p.add_argument("--teacher-samples", help="reuse this `diffprune sample` folder instead of sampling the teacher")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per sampling / feature batch")
    p.add_argument("--extractor", default=None,
                   help="FID features: 'mnist-classifier' (default for --data mnist, offline) or 'inception' "
                        "(pytorch-fid, needs diffprune[inception])")
    p.add_argument("--extractor-weights", default=None,
                   help="weights of the extractor: a classifier folder for mnist-classifier")
    p.add_argument("--inception-weights", default=None,
                   help="the pt_inception-2015-12-05-6726825d.pth file (or a .safetensors copy) for --extractor "
                        "inception; default: pytorch-fid's download cache")
    p.add_argument("--cache-dir", default=None, help="cache of reference statistics (default: $DIFFPRUNE_CACHE "
                                                     "or ~/.cache/diffprune)")
    p.add_argument("--latency-batches", type=_int_list, default=d.latency_batches,
                   help="batch sizes of the denoiser-call timing, comma-separated (default 1,16,64; 'none' skips timing)")
    p.add_argument("--latency-repeats", type=int, default=d.latency_repeats, help="timed runs per measurement (>= 10)")
    p.add_argument("--sampler-latency-batch", type=int, default=d.sampler_latency_batch,
                   help="batch of the full-sampler timing (per-image latency = median / batch)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance scale for class-conditional models with a null label and for "
                        "text-to-image models (1 = none); for FLUX.1-dev the guidance it takes as an input, as "
                        "FluxPipeline's guidance_scale (default: 3.5 for FLUX.1-dev, as FluxPipeline; 1 for every "
                        "other model)")
    add_prompt_flags(p, "that teacher and student are both sampled from")
    p.add_argument("--clip-model", default=None,
                   help="text-to-image models: a local CLIP model folder (transformers CLIPModel + tokenizer, e.g. a "
                        "copy of openai/clip-vit-large-patch14) for the CLIP score of the samples; never downloaded")
    p.add_argument("--classifier", default=None,
                   help="class-conditional models: the classifier that checks each sample shows the requested class "
                        "(default: mnist-classifier for --data mnist)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for sampling and timing (default: torch's); recorded with every timing")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    add_device_flag(p)
    p.set_defaults(func=run)


def _recorded_data(model: str | None) -> str | None:
    """The training data recorded in a model folder's train_config.json (``data``), if any."""
    from pathlib import Path

    from .._fs import read_json

    if model is None or not (Path(model) / "train_config.json").is_file():
        return None
    data = read_json(Path(model) / "train_config.json").get("data")
    return data if isinstance(data, str) else None


def run(args) -> int:
    from .._fs import check_output_dir, output_lock
    from ..errors import require

    require(args.model is not None or args.student_samples is not None,
            "pass --model DIR (or --student-samples DIR to evaluate existing samples)")
    require(args.extractor_weights is None or args.inception_weights is None,
            "pass either --extractor-weights or --inception-weights, not both")
    inputs = (args.model, args.teacher, args.data, args.student_samples, args.teacher_samples,
              args.extractor_weights, args.inception_weights, args.cache_dir, args.clip_model, args.prompt_file)
    check_output_dir(args.out, args.overwrite, inputs)
    with output_lock(args.out):
        return _eval(args, inputs)


def _eval(args, inputs) -> int:
    from ..errors import require
    from ..evaluate import EvalConfig, evaluate, load_for_eval

    if args.threads is not None:
        import torch

        require(args.threads >= 1, f"--threads {args.threads} must be >= 1")
        torch.set_num_threads(args.threads)
    data = None if args.data == "none" else args.data or _recorded_data(args.model) or _recorded_data(args.teacher)
    config = EvalConfig(
        n=args.n, steps=args.steps, seed=args.seed, skip=args.skip, batch_size=args.batch_size, data=data,
        ref_split=args.ref_split, ref_count=args.ref_count, extractor=args.extractor,
        extractor_weights=args.inception_weights or args.extractor_weights, cache_dir=args.cache_dir,
        latency_batches=args.latency_batches, latency_repeats=args.latency_repeats,
        sampler_latency_batch=args.sampler_latency_batch,
        guidance_scale=1.0 if args.guidance_scale is None else args.guidance_scale,
        classifier=args.classifier, prompts=read_prompts(args), clip_model=args.clip_model,
    )
    device = device_of(args)
    student = teacher = scheduler = pruning = codec = class_names = text = adapter = None
    revisions = {}
    log: dict = {}
    if args.model is not None:
        loaded, log = load_for_eval(args.model)
        student, scheduler, pruning, codec = loaded.denoiser.to(device), loaded.scheduler, loaded.pruning, loaded.codec
        class_names, text, adapter = loaded.class_names, loaded.text_encoder, loaded.adapter
        revisions["student_revision"] = loaded.revision
    if args.teacher is not None:
        loaded, _ = load_for_eval(args.teacher)
        teacher = loaded.denoiser.to(device)
        scheduler = loaded.scheduler if scheduler is None else scheduler
        codec = loaded.codec if codec is None else codec
        class_names = loaded.class_names if class_names is None else class_names
        text = loaded.text_encoder if text is None else text
        adapter = loaded.adapter if adapter is None else adapter
        revisions["teacher_revision"] = loaded.revision  # a hub id's commit: what was actually compared against
    for part in (codec, text):
        if part is not None:
            part.to(device)
    if data is None:
        print("no --data given or recorded: FID is skipped (consistency and cost are still measured)")
    model = student if student is not None else teacher
    if args.guidance_scale is None and model is not None:  # the model's own: FluxPipeline's 3.5 for FLUX.1-dev
        config = dataclasses.replace(config, guidance_scale=float(adapter.embedded_guidance(model) or 1.0))
    m = evaluate(student, teacher, config=config, out_dir=args.out, scheduler=scheduler,
                 student_samples=args.student_samples, teacher_samples=args.teacher_samples, pruning=pruning,
                 train_log=log, device=device, overwrite=args.overwrite, progress=True,
                 names={"student": args.model or args.student_samples, "teacher": args.teacher or args.teacher_samples,
                        **revisions},
                 inputs=inputs, codec=codec, class_names=class_names, text_encoder=text, adapter=adapter)

    def f(v, spec=".4g"):
        return "n/a" if v is None else format(v, spec)

    print(f"FID student {f(m['fid'])}  teacher {f(m['fid_teacher'])}  | SSIM teacher-student {f(m['ssim'])}"
          f"  | MACs {f(m['base_macs'], ',')} -> {f(m['macs'], ',')}  | speedup {f(m['speedup'], '.2f')}x")
    print(f"report: {args.out}/report.html (and report.md); metrics: {args.out}/metrics.json")
    return 0
