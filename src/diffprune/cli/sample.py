"""``diffprune sample``: generate images from a model folder; image i always comes from seed s+i."""
from __future__ import annotations

from ._common import add_device_flag, add_prediction_type_flag, add_prompt_flags, device_of, read_prompts


def _labels(text: str) -> list[int]:
    import argparse

    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of class ids, e.g. 3 or 0,1,2") from None


def add_parser(sub) -> None:
    p = sub.add_parser("sample", help="generate images (PNG per index, samples.npz, grid.png)", description=__doc__)
    p.add_argument("model", help="a model folder, a pruned model folder, a shipped name (mnist-teacher) or a hub id")
    p.add_argument("--n", type=int, default=64, help="number of images")
    p.add_argument("--steps", type=int, default=50, help="sampler steps")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim", help="ddim (eta 0) or ddpm (eta 1)")
    p.add_argument("--skip", choices=["uniform", "quad"], default="uniform", help="timestep spacing")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed SEED+i")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (does not change images)")
    p.add_argument("--out", required=True, help="output folder (must be new or empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--class-labels", type=_labels, default=None,
                   help="class-conditional models: one class id for all images, or one per image (comma-separated); "
                        "default: image i gets class (SEED+i) mod num_classes")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance scale (class-conditional models with a null label, e.g. DiT, and "
                        "text-to-image models, against the empty prompt; DiT's pipeline uses 4, Stable Diffusion's "
                        "7.5); for FLUX.1-dev the guidance it takes as an input, as FluxPipeline's guidance_scale "
                        "(default: 3.5 for FLUX.1-dev, as FluxPipeline; 1 = no guidance for every other model)")
    add_prompt_flags(p, "to generate from")
    add_prediction_type_flag(p)
    add_device_flag(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from .._fs import check_output_dir, output_lock
    from ..errors import require, require_seed

    require(args.n >= 1, f"--n {args.n} must be >= 1")
    require_seed("--seed", args.seed, args.n)
    require(args.batch_size >= 1, f"--batch-size {args.batch_size} must be >= 1")
    check_output_dir(args.out, args.overwrite, inputs=(args.model,))
    with output_lock(args.out):
        return _sample(args)


def _sample(args) -> int:
    from .._fs import atomic_dir
    from ..data import to_uint8
    from ..errors import require
    from ..io import load_model
    from ..objective import resolve_scheduler
    from ..samples import save_samples
    from ..sampling import conditioning_for, prompts_for, sample

    prompts = read_prompts(args)
    loaded = load_model(args.model)
    scheduler = resolve_scheduler(loaded.scheduler, args.prediction_type)
    device = device_of(args)
    model = loaded.denoiser.to(device)
    adapter = loaded.adapter  # looked up once, handed down
    codec = loaded.codec.to(device) if loaded.codec is not None else None
    seeds = list(range(args.seed, args.seed + args.n))
    names = loaded.class_names
    text = loaded.text_encoder
    per_seed = context = negative = labels = None
    if prompts is not None:
        require(args.class_labels is None, "--class-labels and --prompt both given; a model takes one kind of "
                                           "conditioning: drop one")
        require(text is not None, f"{args.model!r} is not a text-to-image pipeline: it takes no prompt (drop "
                                  "--prompt/--prompt-file)")
        per_seed = prompts_for(seeds, prompts)
        context, negative = text.to(device).sampling_inputs(per_seed, 1.0 if args.guidance_scale is None
                                                            else args.guidance_scale)
    else:
        require(text is None, f"{args.model!r} is a text-to-image pipeline: pass --prompt TEXT or --prompt-file FILE")
        labels = conditioning_for(model, seeds, args.class_labels, None, len(names) if names else None,
                                  adapter=adapter)
    images = sample(model, scheduler, seeds=seeds, class_labels=labels, prompt_embeds=context,
                    negative_prompt_embeds=negative, guidance_scale=args.guidance_scale, codec=codec,
                    num_inference_steps=args.steps, sampler=args.sampler, skip=args.skip,
                    batch_size=args.batch_size, device=device, adapter=adapter)
    meta = {"model": str(args.model), "steps": args.steps, "sampler": args.sampler, "skip": args.skip,
            "guidance_scale": args.guidance_scale if args.guidance_scale is not None
            else (adapter.embedded_guidance(model) or 1.0), "class_labels": None if labels is None else labels.tolist(),
            "class_names": names, "prompts": per_seed}
    with atomic_dir(args.out, overwrite=args.overwrite, kind="samples", inputs=(args.model,)) as tmp:
        save_samples(to_uint8(images), seeds, tmp, meta)
    print(f"wrote {args.n} images to {args.out} (grid: {args.out}/grid.png)")
    return 0
