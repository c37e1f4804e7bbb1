"""Diff-Pruning against its baselines on the shipped MNIST teacher, with the same budget for every method.

    python benchmarks/compare_methods.py [--methods diff-pruning taylor magnitude random reinit]
        [--steps 3000] [--n 500] [--kd 0.0] [--seed 0] [--out benchmarks/runs/methods]

Each method runs the demo pipeline (configs/demo.yaml: 0.5x MACs, same fine-tuning, same evaluation seeds) in
its own run folder; finished runs are skipped on a re-run. Writes benchmarks/results/methods.md and .json.
"""
import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from diffprune.cli.demo import config_path
from diffprune.importance import METHODS, setting_owners
from diffprune.pipeline import load_run_config, run_pipeline
from diffprune.records import read_metrics

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--methods", nargs="+", default=["diff-pruning", "taylor", "magnitude", "random", "reinit"])
p.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: the demo's)")
p.add_argument("--n", type=int, default=None, help="evaluation samples (default: the demo's)")
p.add_argument("--kd", type=float, default=None, help="distillation weight (default: the demo's)")
p.add_argument("--seed", type=int, default=None, help="the run seed: calibration batch, data order, noise (default: the demo's)")
p.add_argument("--out", default="benchmarks/runs/methods")
p.add_argument("--results", default="benchmarks/results/methods")
args = p.parse_args()

base = yaml.safe_load(config_path(False).read_text())
rows = []
for method in args.methods:
    raw = json.loads(json.dumps(base))
    raw["prune"]["method"] = method
    for key in [k for k in raw["prune"] if k in setting_owners() and k not in METHODS.get(method).settings]:
        raw["prune"].pop(key)  # a setting this method does not take (thr, calib_batch, ...)
    if args.steps is not None:
        raw["finetune"]["steps"] = args.steps
    if args.n is not None:
        raw["eval"]["n"] = args.n
    if args.kd is not None:
        raw["finetune"]["kd_weight"] = args.kd
    if args.seed is not None:
        raw["seed"] = args.seed
    t0 = time.time()
    m = read_metrics(run_pipeline(load_run_config(raw), Path(args.out) / method, device="cpu"))  # older runs too
    pruning = json.loads((Path(args.out) / method / "prune" / "model" / "pruning.json").read_text())
    rows.append({"method": method, "params": m["params"], "mac_ratio": m["macs"] / m["base_macs"],
                 "fid": m["fid"], "fid_teacher": m["fid_teacher"], "ssim": m["ssim"], "speedup": m["speedup"],
                 "cutoff_t": pruning.get("cutoff_t"), "seconds": round(time.time() - t0, 1)})
    print(rows[-1], flush=True)

out = Path(args.results)
out.parent.mkdir(parents=True, exist_ok=True)
command = "python benchmarks/compare_methods.py " + " ".join(
    f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items() if v is not None)
meta = {"command": command, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "finetune": {**base["finetune"], **({"steps": args.steps} if args.steps else {})}}
out.with_suffix(".json").write_text(json.dumps({"rows": rows, **meta}, indent=2) + "\n")
lines = ["# Methods at 0.5x MACs on mnist-teacher\n", f"`{command}` ({meta['threads']} threads, CPU)\n",
         "| method | params | MACs ratio | FID (teacher) | FID (student) | SSIM to teacher | speedup | cutoff t |",
         "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
for r in rows:
    lines.append(f"| {r['method']} | {r['params']:,} | {r['mac_ratio']:.3f} | {r['fid_teacher']:.2f} | {r['fid']:.2f} "
                 f"| {r['ssim']:.3f} | {r['speedup']:.2f}x | {r['cutoff_t'] if r['cutoff_t'] is not None else '-'} |")
out.with_suffix(".md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
