"""kill -9 at random moments of a `diffprune finetune`, resume each time, compare with an uninterrupted run.

    python benchmarks/crash_resume.py [--kills 12] [--steps 80] [--every 2] [--seed 0]

The pruned student of the shipped MNIST teacher (magnitude, ratio 0.5) is fine-tuned with a checkpoint every 2
steps. Each (resumed) run is killed with SIGKILL 1 to 6 steps past the one it resumed from: odd kills a random
fraction of a step after that step was logged, even kills while a checkpoint is being written; after it every published checkpoint is
verified (sha256 of its files) and the work lost is measured (steps logged before the kill minus the step the next
resume starts from). Finally the interrupted-and-resumed run's weights are compared bit for bit with an
uninterrupted run of the same settings. Writes benchmarks/results/crash_resume.json and .md.
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from diffprune.train import list_checkpoints, read_log, verify_checkpoint

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--kills", type=int, default=12)
p.add_argument("--steps", type=int, default=80)
p.add_argument("--every", type=int, default=2, help="checkpoint every N steps")
p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
p.add_argument("--work", default="benchmarks/runs/crash")
p.add_argument("--results", default="benchmarks/results/crash_resume")
args = p.parse_args()

work = Path(args.work)
shutil.rmtree(work, ignore_errors=True)
work.mkdir(parents=True)
env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
py = [sys.executable, "-m", "diffprune"]
subprocess.run([*py, "prune", "--model", "mnist-teacher", "--method", "magnitude", "--ratio", "0.5",
                "--out", str(work / "pruned"), "--device", "cpu"], check=True, env=env, capture_output=True)
ft = [*py, "finetune", str(work / "pruned"), "--data", "mnist", "--steps", str(args.steps), "--batch-size", "16",
      "--checkpoint-every", str(args.every), "--keep-checkpoints", "2", "--log-every", "1", "--device", "cpu"]

t0 = time.time()
subprocess.run([*ft, "--out", str(work / "ref")], check=True, env=env, capture_output=True)
duration = time.time() - t0
print(f"uninterrupted run: {duration:.1f} s", flush=True)

rng = random.Random(args.seed)
out = work / "run"
kills = []


def steps_logged() -> int:
    logged = read_log(out / "train_log.csv").get("step") if (out / "train_log.csv").is_file() else None
    return int(logged[-1]) if logged is not None and len(logged) else 0


def segments() -> int:
    try:
        return len(json.loads((out / "train_config.json").read_text())["segments"])
    except (OSError, ValueError, KeyError):
        return 0


def writing(target: int, since: float) -> bool:
    """A checkpoint of step >= target is being written by this run (its temporary folder exists)."""
    tmps = (out / "checkpoints").glob(".step-*.tmp") if (out / "checkpoints").is_dir() else []
    return any(int(t.name[6:13]) >= target and t.stat().st_mtime >= since for t in tmps)


for k in range(args.kills):
    resume = (out / "train_config.json").is_file()
    ckpts = list_checkpoints(out / "checkpoints")
    start = int(ckpts[-1].name.split("-")[1]) if ckpts else 0
    # odd kills: a random fraction of a step after a random step; even kills: while a checkpoint is being written
    target, mid_write = min(args.steps - 1, start + rng.randint(1, 3 * args.every)), k % 2 == 0
    before = segments()
    log = open(work / f"kill-{k}.log", "w")
    proc = subprocess.Popen([*ft, "--out", str(out)] + (["--resume"] if resume else []), env=env,
                            stdout=log, stderr=log)
    t_start = time.time()
    while proc.poll() is None and segments() <= before:  # start-up: until this run has written its segment
        time.sleep(0.002)
    while proc.poll() is None:
        if mid_write and steps_logged() >= target and writing(target, t_start):
            break
        if not mid_write and steps_logged() >= target:
            time.sleep(rng.uniform(0, 0.3))
            break
        time.sleep(0.001)
    finished = proc.poll() is not None
    if not finished:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    log.close()
    if finished and proc.returncode != 0:
        sys.exit(f"the resumed run failed (exit {proc.returncode}); see {work / f'kill-{k}.log'}")
    ckpt_dir = out / "checkpoints"
    in_write = bool(list(ckpt_dir.glob(".step-*.tmp"))) if ckpt_dir.is_dir() else False
    ckpts = list_checkpoints(ckpt_dir)
    corrupt = [c.name for c in ckpts if verify_checkpoint(c) is not None]
    done = steps_logged()
    newest = int(ckpts[-1].name.split("-")[1]) if ckpts else 0
    kills.append({"kill": k, "after_s": round(time.time() - t_start, 2), "finished_before_kill": finished,
                  "steps_done": done, "newest_checkpoint": newest, "steps_lost": max(0, done - newest),
                  "tmp_checkpoint_present": in_write, "corrupt_checkpoints": corrupt})
    print(kills[-1], flush=True)
    if finished:  # the run got to its end before the kill: start it over so every kill interrupts something
        shutil.rmtree(out)

subprocess.run([*ft, "--out", str(out)] + (["--resume"] if (out / "train_config.json").is_file() else []),
               check=True, env=env, capture_output=True)
equal = {}
for name in ("diffusion_pytorch_model.safetensors", "raw/diffusion_pytorch_model.safetensors"):
    a, b = load_file(work / "ref" / name), load_file(out / name)
    equal[name] = a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
segments = json.loads((out / "train_config.json").read_text())["segments"]

interrupted = [r for r in kills if not r["finished_before_kill"]]
summary = {
    "command": "python benchmarks/crash_resume.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
    "kills": len(interrupted), "kills_with_a_checkpoint_being_written": sum(r["tmp_checkpoint_present"] for r in kills),
    "corrupt_checkpoints": sum(len(r["corrupt_checkpoints"]) for r in kills),
    "max_steps_lost": max((r["steps_lost"] for r in interrupted), default=0), "checkpoint_every": args.every,
    "final_weights_bitwise_equal": all(equal.values()), "resume_segments": len(segments),
    "uninterrupted_seconds": round(duration, 1), "torch": torch.__version__, "threads": 1, "rows": kills,
}
res = Path(args.results)
res.parent.mkdir(parents=True, exist_ok=True)
res.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
lines = ["# kill -9 during fine-tuning, then --resume\n", f"`{summary['command']}` (CPU, 1 thread)\n",
         f"- interrupted runs: **{summary['kills']}** (of which {summary['kills_with_a_checkpoint_being_written']} "
         "with a checkpoint being written at the kill)",
         f"- corrupt published checkpoints found after the kills: **{summary['corrupt_checkpoints']}**",
         f"- most steps lost by one kill: **{summary['max_steps_lost']}** (checkpoint every {args.every})",
         f"- final weights (EMA and raw) bitwise equal to the uninterrupted run: **{summary['final_weights_bitwise_equal']}**",
         "", "| kill | after (s) | steps done | resumes from | lost | checkpoint being written |",
         "| ---: | ---: | ---: | ---: | ---: | --- |"]
for r in interrupted:
    lines.append(f"| {r['kill']} | {r['after_s']} | {r['steps_done']} | {r['newest_checkpoint']} | {r['steps_lost']} "
                 f"| {'yes' if r['tmp_checkpoint_present'] else 'no'} |")
res.with_suffix(".md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
