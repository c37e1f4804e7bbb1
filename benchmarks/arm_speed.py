"""Speedup of each allocation arm's student, measured alone on an idle machine (issue 29).

    python benchmarks/arm_speed.py --runs /work/runs [--seed 0] [--batch 16] [--rounds 3] [--arms default ...]
        [--name arm-speed]

For each family (the shipped UNet and DiT) and arm of the allocation benchmarks (their run folders under --runs:
``unet-allocation/<arm>/seed-<s>``, ``dit-allocation/<arm>/seed-<s>``, as benchmarks/seeds.py lays them out), the
fine-tuned student of one seed and its teacher are timed per denoiser call at --batch (conditioning included),
alternating teacher and student, --rounds rounds (median of 20 calls after warm-up in each; the median over rounds
counts). Allocation changes where the time goes, so each arm's speedup ÷ MAC cut is reported. Arms are named as in
default-vs-baselines.json (--arms: some of them). Writes benchmarks/results/<--name>.json and .md.
"""
import argparse
import json
import statistics
from pathlib import Path

import torch

from diffprune._fs import atomic_write_bytes
from diffprune.io import load_model
from diffprune.latency import denoiser_latency
from diffprune.macs import count_macs

FAMILIES = {"unet": ("unet-allocation", "mnist-teacher"), "dit": ("dit-allocation", "mnist-dit")}
ARMS = {"default": "conditioning_floor-0.5", "paper": "diff-pruning", "magnitude": "magnitude", "taylor": "taylor",
        "cost-allocation": "allocation-cost", "latency-allocation": "allocation-latency",
        "latency-allocation-capped": "allocation-latency_max_layer_ratio-0.5", "capped": "max_layer_ratio-0.5"}


def timed(model, batch: int) -> float:
    return denoiser_latency(model, device="cpu", batch_sizes=(batch,), repeats=20)[str(batch)]["median_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--name", default="arm-speed")
    args = p.parse_args()
    rows = []
    for family, (bench, teacher_name) in FAMILIES.items():
        teacher = load_model(teacher_name).denoiser.eval()
        base_macs = count_macs(teacher).macs
        for arm in args.arms:
            folder = ARMS[arm]
            run = Path(args.runs) / bench / folder / f"seed-{args.seed}" / "finetune" / "model"
            if not run.is_dir():
                continue
            student = load_model(run).denoiser.eval()
            t_s, s_s = [], []
            for _ in range(args.rounds):  # alternating, so that a drift of the machine hits both
                t_s.append(timed(teacher, args.batch))
                s_s.append(timed(student, args.batch))
            macs = count_macs(student).macs / base_macs
            speedup = statistics.median(t_s) / statistics.median(s_s)
            rows.append({"family": family, "arm": arm, "seed": args.seed, "batch": args.batch, "macs_ratio": macs,
                         "teacher_ms": 1e3 * statistics.median(t_s), "student_ms": 1e3 * statistics.median(s_s),
                         "speedup": speedup, "speedup_over_mac_cut": speedup * macs,
                         "threads": torch.get_num_threads()})
            print(rows[-1])
    out = Path("benchmarks/results")
    atomic_write_bytes(out / f"{args.name}.json", (json.dumps(rows, indent=1) + "\n").encode())
    lines = ["# Speedup per allocation arm, idle machine", "",
             f"`python benchmarks/arm_speed.py --runs RUNS --seed {args.seed} --batch {args.batch} --rounds "
             f"{args.rounds} --arms {' '.join(args.arms)} --name {args.name}` "
             f"(CPU, {torch.get_num_threads()} threads; per denoiser call, teacher and student "
             "alternating).", "", "| family | arm | MACs ratio | teacher ms | student ms | speedup | speedup ÷ MAC cut |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['family']} | {r['arm']} | {r['macs_ratio']:.3f} | {r['teacher_ms']:.1f} | {r['student_ms']:.1f} | "
              f"{r['speedup']:.2f}× | {r['speedup_over_mac_cut']:.2f} |" for r in rows]
    atomic_write_bytes(out / f"{args.name}.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
