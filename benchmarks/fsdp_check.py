"""The GPU check of sharded fine-tuning (issue 31): `diffprune finetune` under accelerate's real FSDP2 launch.

    python benchmarks/fsdp_check.py [--gpus 1] [--steps 6]

accelerate enables FSDP only beside GPUs, so the test suite reaches its FSDP2 path on CPU through a test-only switch
(tests/test_fsdp.py). This script runs the real thing: the shipped DiT pipeline (mnist-dit) pruned with magnitude to
0.5x MACs, then fine-tuned with distillation from its teacher three ways on --gpus GPUs: data parallel
(`accelerate launch --multi_gpu`, or one plain process), FSDP2 (`--use_fsdp --fsdp_version 2`), and FSDP2 stopped
half-way and resumed. Checked: FSDP2's weights (EMA and raw) equal data parallel's within 1e-4 (max abs), the resumed
run equals the uninterrupted one bitwise, and the record says "sharding": "fsdp2" (peak memory is not measured: one
tiny model). `--device cpu` runs the same commands on CPU to check the script itself (accelerate then runs FSDP
flags as plain data parallelism, so the check reports no sharding). Writes benchmarks/results/fsdp-check.json, .md.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--gpus", type=int, default=1)
p.add_argument("--steps", type=int, default=6)
p.add_argument("--device", default="cuda")
p.add_argument("--work", default="benchmarks/runs/fsdp-check")
p.add_argument("--results", default="benchmarks/results/fsdp-check")
args = p.parse_args()
assert args.steps % 2 == 0, "--steps must be even (the resumed run stops half-way)"

work = Path(args.work)
shutil.rmtree(work, ignore_errors=True)
work.mkdir(parents=True)
env = {**os.environ, "PYTHONUNBUFFERED": "1"}
py = [sys.executable, "-m", "diffprune"]
subprocess.run([*py, "prune", "--model", "mnist-dit", "--method", "magnitude", "--target-macs", "0.5",
                "--out", str(work / "pruned"), "--device", args.device], check=True, env=env)
launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(args.gpus), "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no"]
ddp = ["--multi_gpu"] if args.gpus > 1 else []
fsdp = ["--use_fsdp", "--fsdp_version", "2"]


def finetune(name, flags, steps, resume=False):
    cmd = [*launch, *flags, "-m", "diffprune", "finetune", str(work / "pruned"), "--data", "mnist", "--teacher",
           "mnist-dit", "--kd-weight", "0.7", "--steps", str(steps), "--batch-size", "8", "--checkpoint-every",
           str(args.steps // 2), "--ema-decay", "0.5", "--out", str(work / name), "--device", args.device]
    t0 = time.time()
    subprocess.run(cmd + (["--resume"] if resume else []), check=True, env=env)
    return time.time() - t0


seconds = {"ddp": finetune("ddp", ddp, args.steps), "fsdp": finetune("fsdp", fsdp, args.steps)}
finetune("cut", fsdp, args.steps // 2)
seconds["cut+resume"] = finetune("cut", fsdp, args.steps, resume=True)


def weights(run, sub):
    folder = work / run / sub
    return load_file(next(folder.glob("*.safetensors")))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


rows = []
for sub in ("transformer", "raw"):
    f, d, c = weights("fsdp", sub), weights("ddp", sub), weights("cut", sub)
    rows.append({"weights": sub, "fsdp_vs_ddp": max_diff(f, d), "resumed_vs_uninterrupted": max_diff(f, c)})
record = json.loads((work / "fsdp" / "train_config.json").read_text())
result = {"gpus": args.gpus, "steps": args.steps, "rows": rows, "seconds": seconds,
          "sharding": record["accelerate"].get("sharding"),
          "pass": all(r["fsdp_vs_ddp"] < 1e-4 and r["resumed_vs_uninterrupted"] == 0 for r in rows)
          and record["accelerate"].get("sharding") == "fsdp2"}
Path(args.results).parent.mkdir(parents=True, exist_ok=True)
Path(args.results + ".json").write_text(json.dumps(result, indent=2) + "\n")
lines = [f"# Sharded fine-tuning ({args.gpus} process(es) on {args.device}, {args.steps} steps)", "",
         f"`python benchmarks/fsdp_check.py --gpus {args.gpus} --steps {args.steps} --device {args.device}`", "",
         "| weights | FSDP2 vs data parallel (max abs) | resumed vs uninterrupted |", "| --- | ---: | ---: |"]
lines += [f"| {r['weights']} | {r['fsdp_vs_ddp']:.2e} | {r['resumed_vs_uninterrupted']:.2e} |" for r in rows]
lines += ["", f"Record: sharding = {result['sharding']}; pass = {result['pass']}."]
Path(args.results + ".md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
sys.exit(0 if result["pass"] else 1)
