"""``diffprune finetune``: recover a pruned model by brief training (optionally distilled from its teacher).

Runs as is on one device, or data-parallel under ``accelerate launch --num_processes N -m diffprune finetune ...``.
"""
from __future__ import annotations

import sys

from ._common import add_prediction_type_flag
from .train import add_training_flags, train_config_from_args


def add_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a (pruned) model: EMA, distillation, resume, multi-process",
                       description=__doc__)
    p.add_argument("model", help="the model to fine-tune: a pruned folder, a model folder or a shipped name")
    add_training_flags(p)
    p.add_argument("--teacher", default=None, help="teacher model for output distillation (needs --kd-weight)")
    p.add_argument("--kd-weight", type=float, default=0.0, help="distillation weight a in [0, 1] (paper: 0.7)")
    add_prediction_type_flag(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..finetune import finetune
    from ..train import make_accelerator

    config = train_config_from_args(args, kd_weight=args.kd_weight)
    res = finetune(args.model, args.data, config, args.out, teacher=args.teacher, resume=args.resume,
                   overwrite=args.overwrite, accelerator=make_accelerator(args.device),
                   command=" ".join(["diffprune"] + sys.argv[1:]), cache_dir=args.cache_dir,
                   prediction_type=args.prediction_type)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"fine-tuned {res.steps} steps, final loss {res.final_loss:.4f} -> {res.out_dir}")
    return 0
