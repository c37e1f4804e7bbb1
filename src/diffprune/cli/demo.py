"""``diffprune demo``: a shipped demo config on an embedded default model, offline.

``--model mnist-teacher`` (default): Diff-Pruning of the MNIST UNet to <= 0.5x MACs, fine-tuning with distillation for
10% of the teacher's training steps, evaluation on 500 samples per model, and a report. ``--model mnist-dit``: the same
for the class-conditional latent DiT (class accuracy and guidance included). ``--quick`` runs a short smoke version
of either (what CI runs).
"""
from __future__ import annotations

from ._common import add_device_flag

DEMOS = {"mnist-teacher": "demo", "mnist-dit": "demo-dit"}  # shipped model -> its demo config (configs/NAME.yaml)


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="prune, fine-tune and evaluate a shipped model (MNIST UNet or DiT)",
                       description=__doc__)
    p.add_argument("--model", default="mnist-teacher", choices=sorted(DEMOS),
                   help="the shipped model to demonstrate on (default: mnist-teacher)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<demo>, or runs/<demo>-quick with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="a short smoke run (few calibration images, short fine-tuning, few samples)")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="redo STAGE (prune, finetune or eval) and every stage after it")
    add_device_flag(p)
    p.set_defaults(func=run)


def config_path(quick: bool, model: str = "mnist-teacher"):
    from ..assets import bundled_path

    return bundled_path("").parent / "configs" / (DEMOS[model] + ("-quick" if quick else "") + ".yaml")


def run(args) -> int:
    from ..pipeline import load_run_config
    from .run import execute

    name = DEMOS[args.model] + ("-quick" if args.quick else "")
    out = args.out or f"runs/{name}"
    path = config_path(args.quick, args.model)
    print(f"config: {path}\nrun folder: {out}")
    return execute(load_run_config(path), out, force=tuple(args.force), device=args.device)
