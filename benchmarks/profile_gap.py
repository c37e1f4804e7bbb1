"""Where does the gap between the MAC cut and the measured speedup go? A per-operator profile of teacher and student.

    python benchmarks/profile_gap.py [--models mnist-teacher ddpm-cifar10-32] [--target 0.5] [--batches 1 16]
        [--threads 2] [--calls 10]

Each model (a shipped name, or a preset built with random weights) is pruned with magnitude to --target of its MACs;
teacher and student run --calls denoiser calls under torch.profiler (after 3 warm-up calls). Operators are grouped
(convolution, attention, normalisation, activation, matmul/linear, elementwise and copies, other); the wall time per
call not spent inside any operator is Python and dispatch overhead, which does not shrink with the channels. Writes
benchmarks/results/profile-gap.json and .md.
"""
import argparse
import copy
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from diffprune.adapters import adapter_for
from diffprune.prune import PruneConfig, prune_

from _models import benchmark_model

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--models", nargs="+", default=["mnist-teacher", "ddpm-cifar10-32"])
p.add_argument("--target", type=float, default=0.5)
p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
p.add_argument("--threads", type=int, default=2)
p.add_argument("--calls", type=int, default=10)
p.add_argument("--results", default="benchmarks/results/profile-gap")
args = p.parse_args()
torch.set_num_threads(args.threads)

GROUPS = [  # (group, substrings of aten operator names), first match wins
    ("convolution", ("conv",)),
    ("attention", ("attention", "softmax", "bmm", "baddbmm")),
    ("normalisation", ("group_norm", "layer_norm", "batch_norm")),
    ("activation", ("silu", "gelu", "sigmoid", "tanh", "relu")),
    ("matmul/linear", ("mm", "addmm", "linear", "matmul")),
    ("elementwise/copies", ("add", "mul", "div", "sub", "copy", "cat", "clone", "contiguous", "upsample", "pad",
                            "exp", "sin", "cos", "pow", "neg", "where", "to", "_to_copy", "fill", "zero")),
]


def group_of(op: str) -> str:
    name = op.removeprefix("aten::")
    return next((g for g, keys in GROUPS if any(k in name for k in keys)), "other")


def profiled(model, adapter, batch: int) -> dict[str, float]:
    """Milliseconds per call: wall, per operator group (self time), and the overhead outside operators."""
    kwargs = adapter.example_inputs(model, batch)
    with torch.no_grad():
        for _ in range(3):
            model(**kwargs)
        start = time.perf_counter()  # wall time without the profiler's own per-operator cost
        for _ in range(args.calls):
            model(**kwargs)
        wall = (time.perf_counter() - start) / args.calls * 1e3
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.calls):
                model(**kwargs)
    out = {g: 0.0 for g, _ in GROUPS} | {"other": 0.0}
    for e in prof.key_averages():
        if e.key.startswith("aten::"):
            out[group_of(e.key)] += e.self_cpu_time_total / args.calls / 1e3
    out["overhead (outside operators)"] = max(0.0, wall - sum(out.values()))
    out["wall"] = wall
    return out


rows = []
for name in args.models:
    teacher = benchmark_model(name).denoiser
    student = copy.deepcopy(teacher)
    report = prune_(student, PruneConfig(method="magnitude", target_macs=args.target), progress=False)
    adapter = adapter_for(teacher)
    for batch in args.batches:
        a, b = profiled(teacher, adapter, batch), profiled(student, adapter, batch)
        rows.append({"model": name, "batch": batch, "macs_fraction": round(report.macs / report.base_macs, 4),
                     "teacher_ms": {k: round(v, 3) for k, v in a.items()},
                     "student_ms": {k: round(v, 3) for k, v in b.items()}})
        print(json.dumps(rows[-1]), flush=True)

command = (f"python benchmarks/profile_gap.py --models {' '.join(args.models)} --target {args.target} "
           f"--batches {' '.join(map(str, args.batches))} --threads {args.threads} --calls {args.calls}")
meta = {"command": command, "threads": args.threads, "torch": torch.__version__}
res = Path(args.results)
res.parent.mkdir(parents=True, exist_ok=True)
res.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
lines = [f"# Where the speedup goes: per-operator profile, teacher vs student at {args.target}x MACs\n",
         f"`{command}`\n", f"CPU, {args.threads} threads, torch {torch.__version__}. Milliseconds per denoiser call "
         "(operator self time under torch.profiler; overhead = wall time outside any operator). The share column "
         "is each group's part of the time the student saves short of the MAC cut: (student - teacher x MAC "
         "fraction) / total such excess.\n"]
for r in rows:
    t, s, f = r["teacher_ms"], r["student_ms"], r["macs_fraction"]
    excess = {k: s[k] - t[k] * f for k in t if k != "wall"}
    total = sum(v for v in excess.values() if v > 0) or 1.0
    lines += [f"\n## {r['model']}, batch {r['batch']} (MACs kept {f:.3f}; speedup {t['wall'] / s['wall']:.2f}x for a "
              f"{1 / f:.2f}x cut)\n", "| part | teacher ms | student ms | ratio | share of the gap |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for k in t:
        ratio = t[k] / s[k] if s[k] > 0 else float("nan")
        share = "" if k == "wall" else f"{max(excess[k], 0) / total:.0%}"
        lines.append(f"| {k} | {t[k]:.2f} | {s[k]:.2f} | {ratio:.2f}x | {share} |")
res.with_suffix(".md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
