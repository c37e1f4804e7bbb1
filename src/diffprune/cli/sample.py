"""``diffprune sample``: generate images from a model folder; image i always comes from seed s+i."""
from __future__ import annotations

from ._common import add_device_flag, device_of


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
    from ..io import load_model
    from ..sampling import default_scheduler, sample, save_samples

    loaded = load_model(args.model)
    device = device_of(args)
    unet = loaded.unet.to(device)
    scheduler = loaded.scheduler or default_scheduler()
    seeds = list(range(args.seed, args.seed + args.n))
    images = sample(unet, scheduler, seeds=seeds, num_inference_steps=args.steps, sampler=args.sampler,
                    skip=args.skip, batch_size=args.batch_size, device=device)
    meta = {"model": str(args.model), "steps": args.steps, "sampler": args.sampler, "skip": args.skip}
    with atomic_dir(args.out, overwrite=args.overwrite, kind="samples", inputs=(args.model,)) as tmp:
        save_samples(to_uint8(images), seeds, tmp, meta)
    print(f"wrote {args.n} images to {args.out} (grid: {args.out}/grid.png)")
    return 0
