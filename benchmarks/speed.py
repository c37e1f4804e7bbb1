"""Measured speed of pruned denoisers: latency per call against the MAC cut, CPU or GPU, one command.

    python benchmarks/speed.py [--models mnist-teacher ddpm-cifar10-32 mnist-dit] [--targets 0.75 0.5 0.3]
        [--batches 1 16] [--round-to 1 8] [--device cpu] [--dtype float32] [--repeats 20] [--threads 2]

Each model (a shipped name, or a preset or full-size configuration of benchmarks/_models.py such as sd15-unet,
built with random weights) is pruned on --device with magnitude (no data needed; the architecture a MAC target
gives is what matters here) to each MAC target, once per --round-to setting (pruned widths multiples of N; the MAC
tolerance is 5% so that rounding can land), and teacher and student are timed per denoiser call at each batch
size, conditioning included, alternately in rounds (median of --repeats after warm-up, per round; the median over
rounds counts) so that drifts of a shared machine hit both. Reported: latency, speedup and speedup / MAC cut (1.0 =
the speedup the MACs promise). Writes benchmarks/results/speed-<device>.json and .md.
"""
import argparse
import copy
import json
import platform
import statistics
from pathlib import Path

import torch

from diffprune.latency import denoiser_latency
from diffprune.prune import PruneConfig, prune_

from _models import benchmark_model

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--models", nargs="+", default=["mnist-teacher", "ddpm-cifar10-32", "mnist-dit"])
p.add_argument("--targets", nargs="+", type=float, default=[0.75, 0.5, 0.3])
p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
p.add_argument("--round-to", nargs="+", type=int, default=[1, 8])
p.add_argument("--device", default="cpu")
p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
p.add_argument("--repeats", type=int, default=20)
p.add_argument("--rounds", type=int, default=3)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--results", default=None, help="default: benchmarks/results/speed-<device>")
args = p.parse_args()
torch.set_num_threads(args.threads)
dtype = getattr(torch, args.dtype)


def timed(model) -> dict[str, float]:
    rec = denoiser_latency(model, device=args.device, batch_sizes=tuple(args.batches), repeats=args.repeats)
    return {b: r["median_s"] for b, r in rec.items()}


rows = []
for name in args.models:
    teacher = benchmark_model(name).denoiser.to(args.device)  # pruned (in float32) where it runs
    a = teacher if dtype == torch.float32 else copy.deepcopy(teacher).to(dtype)  # the teacher as timed
    for target in args.targets:
        for round_to in args.round_to:
            student = copy.deepcopy(teacher)
            report = prune_(student, PruneConfig(method="magnitude", target_macs=target, macs_tolerance=0.05,
                                                 round_to=round_to), progress=False)
            b = student if dtype == torch.float32 else student.to(dtype)
            rounds = [(timed(a), timed(b)) for _ in range(args.rounds)]
            for batch in map(str, args.batches):
                t = statistics.median(r[0][batch] for r in rounds)
                s = statistics.median(r[1][batch] for r in rounds)
                cut = report.base_macs / report.macs
                rows.append({"model": name, "target": target, "round_to": round_to,
                             "macs_fraction": round(report.macs / report.base_macs, 4), "batch": int(batch),
                             "teacher_ms": round(t * 1e3, 3), "student_ms": round(s * 1e3, 3),
                             "speedup": round(t / s, 3), "speedup_over_mac_cut": round(t / s / cut, 3)})
                print(rows[-1], flush=True)
            del student, b
    del teacher, a

device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu"
command = (f"python benchmarks/speed.py --models {' '.join(args.models)} --targets {' '.join(map(str, args.targets))} "
           f"--batches {' '.join(map(str, args.batches))} --round-to {' '.join(map(str, args.round_to))} "
           f"--device {args.device} --dtype {args.dtype} "
           f"--repeats {args.repeats} --rounds {args.rounds} --threads {args.threads}")
res = Path(args.results or f"benchmarks/results/speed-{args.device.split(':')[0]}")
res.parent.mkdir(parents=True, exist_ok=True)
meta = {"command": command, "device": device_name, "threads": args.threads, "dtype": args.dtype,
        "torch": torch.__version__}
res.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
lines = [f"# Speed of pruned denoisers ({args.device}, {args.dtype}, {args.threads} threads)\n", f"`{command}`\n",
         f"Device: {device_name}; torch {torch.__version__}. Magnitude pruning to each MAC target; one denoiser call.\n",
         "| model | round to | MACs kept | batch | teacher | student | speedup | speedup / MAC cut |",
         "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
for r in rows:
    lines.append(f"| {r['model']} | {r['round_to']} | {r['macs_fraction']:.3f} | {r['batch']} | {r['teacher_ms']:.2f} ms | "
                 f"{r['student_ms']:.2f} ms | {r['speedup']:.2f}x | {r['speedup_over_mac_cut']:.2f} |")
res.with_suffix(".md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
