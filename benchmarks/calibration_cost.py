"""What does calibration cost, and what do the cheaper walks give up?

    python benchmarks/calibration_cost.py [--models mnist-teacher mnist-dit] [--presets ddpm-cifar10-32] [--threads 2]

For each trained model (a shipped name): Diff-Pruning's one-timestep walk (the reference), the same walk in
batched chunks of timesteps (``--timestep-batch``: exact), and approximate walks over every k-th timestep
(``--stride k``: under the threshold rule, or ``--timesteps strided`` over all of 0..T-1; each loss weighted by k).
Reported: calibration seconds, timesteps walked, and against the reference: Spearman rank correlation of all
channel scores and the share of kept channels in common after pruning to 0.5x MACs. Calibration data: 32 bundled
MNIST digits. A preset (random weights: its loss is flat, so only the cost of the exact walks is meaningful) walks
--preset-timesteps timesteps of 8 data-free inputs. Writes benchmarks/results/calibration_cost.json and .md.
"""
import argparse
import copy
import json
import time
from pathlib import Path

import torch

from diffprune.prune import PruneConfig, prune_
from diffprune.sampling import default_scheduler

from _models import benchmark_model

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--models", nargs="+", default=["mnist-teacher", "mnist-dit"])
p.add_argument("--presets", nargs="*", default=["ddpm-cifar10-32"])
p.add_argument("--preset-timesteps", type=int, default=32)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--results", default="benchmarks/results/calibration_cost")
args = p.parse_args()
torch.set_num_threads(args.threads)

VARIANTS = {  # name -> PruneConfig settings on top of diff-pruning's
    "one-timestep walk (reference)": {},
    "batched, 4 timesteps per pass (exact)": {"timestep_batch": 4},
    "batched, 8 timesteps per pass (exact)": {"timestep_batch": 8},
    "batched, 16 timesteps per pass (exact)": {"timestep_batch": 16},
    "threshold rule on every 5th timestep (approximate)": {"stride": 5},
    "threshold rule on every 10th timestep (approximate)": {"stride": 10},
    "strided, every 10th timestep": {"timesteps": "strided", "stride": 10},
    "strided, every 25th timestep": {"timesteps": "strided", "stride": 25},
}


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def kept(report) -> dict[str, set[int]]:
    """Channels kept per group root: all minus the pruned indices of its history entries."""
    out = {}
    for name, _, idxs in report.structure["history"]:
        out.setdefault(name, set()).update(idxs)
    return out


rows = []
for name in args.models + args.presets:
    loaded = benchmark_model(name)
    base, scheduler, codec = loaded.denoiser, loaded.scheduler or default_scheduler(), loaded.codec
    if name in args.presets:
        variants = {k: v for k, v in VARIANTS.items() if "stride" not in v}
        setting, data = {"calib_batch": 8, "max_timesteps": args.preset_timesteps, "data_free_steps": 2}, "data-free"
    else:
        variants, setting, data = VARIANTS, {"calib_batch": 32}, "mnist"
    ref = None
    for label, extra in variants.items():
        model = copy.deepcopy(base)
        cfg = PruneConfig(method="diff-pruning", target_macs=0.5, **setting, **extra)
        t0 = time.time()
        report = prune_(model, cfg, data, scheduler=scheduler, codec=codec, progress=False)
        total = time.time() - t0
        scores = torch.cat([report.scores[k].flatten() for k in sorted(report.scores)])
        row = {"model": name, "variant": label, "timesteps_walked": len(report.calibration["losses"]["t"]),
               "accumulated": len(report.calibration["accumulated"]),
               "calibration_seconds": report.calibration["seconds"], "prune_seconds": round(total, 1),
               "macs_fraction": round(report.macs / report.base_macs, 4)}
        if ref is None:
            ref = (report, scores, report.calibration["seconds"])
        else:
            pruned_ref, pruned = kept(ref[0]), kept(report)
            names = set(pruned_ref) | set(pruned)
            n_ref = sum(len(v) for v in pruned_ref.values())
            common = sum(len(pruned_ref.get(n, set()) & pruned.get(n, set())) for n in names)
            row.update(score_rank_correlation=round(spearman(scores, ref[1]), 4),
                       pruned_channels_in_common=round(common / max(n_ref, 1), 4),
                       cost_vs_reference=round(report.calibration["seconds"] / ref[2], 3))
        rows.append(row)
        print(row, flush=True)

command = (f"python benchmarks/calibration_cost.py --models {' '.join(args.models)} --presets {' '.join(args.presets)} "
           f"--preset-timesteps {args.preset_timesteps} --threads {args.threads}")
res = Path(args.results)
res.parent.mkdir(parents=True, exist_ok=True)
res.with_suffix(".json").write_text(json.dumps({"command": command, "torch": torch.__version__, "rows": rows},
                                               indent=2) + "\n")
lines = ["# Calibration cost: exact and approximate walks (Diff-Pruning, 0.5x MACs, 32 images)\n", f"`{command}`\n",
         "Calibration time is the gradient walk alone; prune time adds loading the images and the MAC-target search.\n",
         "| model | walk | timesteps walked | calibration | vs reference | prune time | score rank corr. | "
         "pruned channels in common |",
         "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
for r in rows:
    lines.append(f"| {r['model']} | {r['variant']} | {r['timesteps_walked']} | {r['calibration_seconds']:.1f} s | "
                 f"{r.get('cost_vs_reference', 1.0):.2f}x | {r['prune_seconds']} s | "
                 f"{r.get('score_rank_correlation', 1.0):.3f} | "
                 f"{r.get('pruned_channels_in_common', 1.0):.1%} |")
res.with_suffix(".md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
