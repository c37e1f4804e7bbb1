"""``diffprune demo``: the shipped demo config on the embedded default (MNIST teacher), offline.

Diff-Pruning to <= 0.5x MACs, fine-tuning for 15% of the teacher's training steps, evaluation on 500 samples per
model, and a report. ``--quick`` runs a 3-minute smoke version (what CI runs).
"""
from __future__ import annotations

from ._common import add_device_flag


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="prune, fine-tune and evaluate the shipped MNIST teacher", description=__doc__)
    p.add_argument("--out", default=None, help="run folder (default: runs/demo, or runs/demo-quick with --quick)")
    p.add_argument("--quick", action="store_true", help="a ~3-minute smoke run (8 calibration images, short fine-tuning, 100 samples)")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="redo STAGE (prune, finetune or eval) and every stage after it")
    add_device_flag(p)
    p.set_defaults(func=run)


def config_path(quick: bool):
    from ..data import bundled_path

    return bundled_path("").parent / "configs" / ("demo-quick.yaml" if quick else "demo.yaml")


def run(args) -> int:
    from ..pipeline import load_run_config
    from .run import execute

    out = args.out or ("runs/demo-quick" if args.quick else "runs/demo")
    path = config_path(args.quick)
    print(f"config: {path}\nrun folder: {out}")
    return execute(load_run_config(path), out, force=tuple(args.force), device=args.device)
