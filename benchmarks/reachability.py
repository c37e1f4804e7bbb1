"""Can every MAC target be reached? --target-macs from 0.9 down to 0.2 on random initialisations of the configurations.

    python benchmarks/reachability.py [--presets mnist-16 ddpm-cifar10-32 mnist-dit] [--seeds 0 1 2]

Magnitude pruning (no data) with the default global ranking, the default +-2% tolerance. For each preset, seed and
target: the MAC fraction reached (or the error), the number of probes and the time. Writes
benchmarks/results/reachability.json and .md.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from diffprune.errors import DiffPruneError
from diffprune.prune import PruneConfig, prune_

from _models import benchmark_model

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--presets", nargs="+", default=["mnist-16", "ddpm-cifar10-32", "mnist-dit"])
p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
p.add_argument("--targets", nargs="+", type=float, default=[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
p.add_argument("--threads", type=int, default=2)
p.add_argument("--results", default="benchmarks/results/reachability")
args = p.parse_args()
torch.set_num_threads(args.threads)

rows = []
for preset in args.presets:
    for seed in args.seeds:
        for target in args.targets:
            model = benchmark_model(preset, seed).denoiser
            t0 = time.time()
            try:
                r = prune_(model, PruneConfig(method="magnitude", target_macs=target), progress=False)
                row = {"reached": r.macs / r.base_macs, "probes": len(r.search), "error": None}
            except DiffPruneError as e:
                row = {"reached": None, "probes": None, "error": str(e)}
            rows.append({"preset": preset, "seed": seed, "target": target, **row,
                         "seconds": round(time.time() - t0, 1)})
            print(rows[-1], flush=True)

command = ("python benchmarks/reachability.py --presets " + " ".join(args.presets) + " --seeds "
           + " ".join(map(str, args.seeds)) + f" --threads {args.threads}")
res = Path(args.results)
res.parent.mkdir(parents=True, exist_ok=True)
res.with_suffix(".json").write_text(json.dumps({"command": command, "torch": torch.__version__, "rows": rows},
                                               indent=2) + "\n")
lines = ["# Reachability of --target-macs (magnitude, global ranking, +-2%)\n", f"`{command}`\n",
         "Each cell: the MAC fraction reached for seeds " + ", ".join(map(str, args.seeds))
         + " (x: refused; the error names the neighbouring achievable fractions).\n",
         "| preset | " + " | ".join(f"{t:g}" for t in args.targets) + " | mean time |",
         "| --- |" + " ---: |" * (len(args.targets) + 1)]
for preset in args.presets:
    cells = []
    for target in args.targets:
        got = [r for r in rows if r["preset"] == preset and r["target"] == target]
        cells.append(" / ".join("x" if r["reached"] is None else f"{r['reached']:.3f}" for r in got))
    times = [r["seconds"] for r in rows if r["preset"] == preset]
    lines.append(f"| {preset} | " + " | ".join(cells) + f" | {sum(times) / len(times):.1f} s |")
ok = sum(r["reached"] is not None for r in rows)
lines += ["", f"Reached: {ok} of {len(rows)}."]
refused = [r for r in rows if r["reached"] is None]
if refused:
    lines += ["", "Refused:"] + [f"- {r['preset']} seed {r['seed']} target {r['target']:g}: {r['error']}"
                                 for r in refused]
res.with_suffix(".md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
