"""``diffprune train``: train a denoiser from scratch (a teacher, or the 'scratch' baseline).

A pixel model is written as a model folder; with ``--autoencoder`` the denoiser learns the autoencoder's latents
and the result is a pipeline folder (``DiTPipeline`` for a DiT, ``LDMPipeline`` for a UNet2DModel over a VQModel)
holding the autoencoder, the scheduler and, for labelled data, the class names (``id2label``).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path


def add_training_flags(p) -> None:
    """Flags shared by ``train`` and ``finetune`` (defaults: the paper's recipe)."""
    from ..train import LR_SCHEDULES, TrainConfig

    d = TrainConfig(steps=1)
    p.add_argument("--data", required=True, help="training images: 'mnist', 'digits', a folder, or a HF dataset id")
    p.add_argument("--steps", type=int, required=True, help="optimisation steps")
    p.add_argument("--out", required=True, help="output folder (the final model; checkpoints, logs, samples)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step per process")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (peak, after warm-up)")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear learning-rate warm-up steps")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule,
                   help="after warm-up: constant (the paper's), or linear/cosine decay to 0 at --steps")
    p.add_argument("--lr-decay-start", type=int, default=d.lr_decay_start,
                   help="step where the decay begins (default: end of warm-up); lets a resumed run anneal")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="gradient-norm clip (0: off)")
    p.add_argument("--ema-decay", type=float, default=None,
                   help="constant EMA decay; default: min(0.9999, 1 - 10/steps), an EMA over the last ~10%% of steps")
    p.add_argument("--no-antithetic", action="store_true", help="sample timesteps independently (default: t, T-1-t pairs)")
    p.add_argument("--dropout", type=float, default=None, help="set every dropout layer's p (default: the model's)")
    p.add_argument("--label-dropout", type=float, default=None,
                   help="conditional models with an unconditional input (a DiT's null label, a text model's empty "
                        "prompt): share of labels or captions dropped for classifier-free guidance (default 0.1; 0 "
                        "for other models)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass: less memory, more time, same gradients "
                        "(mixed precision: accelerate launch --mixed_precision fp16)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="checkpoints kept (newest)")
    p.add_argument("--sample-every", type=int, default=d.sample_every, help="steps between sample grids (0: none)")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between log rows")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the data order, noise and timesteps")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--device", default=None, help="cpu forces the CPU; default: accelerate's choice (GPU when present; all GPUs under `accelerate launch`)")
    p.add_argument("--cache-dir", default=None,
                   help="cache of encoded latents for latent pipelines (default: $DIFFPRUNE_CACHE or ~/.cache/diffprune)")


def train_config_from_args(args, **extra):
    from ..train import TrainConfig

    return TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
        lr_schedule=args.lr_schedule, lr_decay_start=args.lr_decay_start,
        grad_clip=args.grad_clip, ema_decay=args.ema_decay, antithetic=not args.no_antithetic,
        dropout=args.dropout, label_dropout=args.label_dropout, gradient_checkpointing=args.gradient_checkpointing,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        sample_every=args.sample_every, log_every=args.log_every, seed=args.seed, **extra,
    )


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a denoiser from scratch (teacher or scratch baseline)",
                       description=__doc__)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--preset", help="a named architecture (see diffprune.presets), e.g. mnist-16 or mnist-dit")
    group.add_argument("--config", help="a JSON file of model config values (_class_name picks the class, default "
                                        "UNet2DModel)")
    p.add_argument("--autoencoder", default=None,
                   help="a diffusers AutoencoderKL or VQModel folder: train on its latents and write a pipeline")
    add_training_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import DiffPruneError, require
    from ..inputs import load_denoiser_data
    from ..presets import PRESETS, build_model
    from ..sampling import default_scheduler
    from ..seed import seed_everything
    from ..train import make_accelerator, run_info, train

    config = train_config_from_args(args)
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise DiffPruneError(f"--config {args.config!r} does not exist; pass a JSON file of UNet2DModel settings")
        try:
            arch = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DiffPruneError(f"--config {args.config!r} is not valid JSON ({e}); pass a JSON object of "
                                 "UNet2DModel settings, e.g. {\"block_out_channels\": [32, 64]}") from None
        require(isinstance(arch, dict), f"--config {args.config!r} holds a {type(arch).__name__}, not a JSON object "
                                        "of UNet2DModel settings")
    else:
        arch = PRESETS.get(args.preset)
    seed_everything(config.seed)
    model = build_model(dict(arch))
    scheduler = default_scheduler(clip_sample=args.autoencoder is None)  # latents are not clipped to [-1, 1]
    with tempfile.TemporaryDirectory(prefix="diffprune-pipeline-") as staging:
        from ..adapters import adapter_for
        from ..io import assemble_pipeline, load_codec

        adapter = adapter_for(model)
        codec = load_codec(args.autoencoder) if args.autoencoder is not None else None
        images = load_denoiser_data(model, args.data, codec=codec, cache_dir=args.cache_dir, progress=True,
                                    adapter=adapter)
        pipeline = None if codec is None else assemble_pipeline(Path(staging) / "pipeline", model, args.autoencoder,
                                                                scheduler, images.class_names, adapter=adapter)
        info = run_info(command=" ".join(["diffprune"] + sys.argv[1:]), data=args.data, data_record=images.record,
                        architecture=arch, autoencoder=args.autoencoder, num_images=len(images))
        res = train(model, scheduler, images, config, args.out, resume=args.resume, overwrite=args.overwrite,
                    run_info=info, accelerator=make_accelerator(args.device),
                    inputs=(args.data, args.config, args.autoencoder), pipeline=pipeline, codec=codec)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"trained {res.steps} steps, final loss {res.final_loss:.4f} -> {res.out_dir}")
    return 0

