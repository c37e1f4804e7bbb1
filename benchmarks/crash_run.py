"""kill -9 at many moments of a `diffprune run` (prune, fine-tune, eval, report, cache writes), rerun the same command
each time, and compare with an uninterrupted run.

    python benchmarks/crash_run.py [--kills 12] [--seed 0]

The run is a shortened quick demo (calibration on 8 images every 5th timestep, 60 fine-tuning steps with a checkpoint
every 20, evaluation on 32 samples with the FID statistics and teacher samples going through the cache). An
uninterrupted run in a fresh folder with a cold cache is the reference. Then one run folder and one cache are killed
again and again: kill i lands at a fraction of the reference's duration spread over the whole run (stage by stage:
the fractions are where prune, fine-tune, eval and the report happened in the reference), measured from the start of
that attempt; after each kill the same command runs once more to the end. Checked after every rerun: no stage that
had finished before the kill was redone (its log says "skipped"), nothing was left beside the run folder or in the
cache but finished entries, and the final outputs equal the reference's: the pruned and fine-tuned weights bitwise,
`pruning.json`'s widths, and FID, SSIM, MSE to the last digit. Writes benchmarks/results/crash_run.json and .md.
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

import yaml

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--kills", type=int, default=12)
p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
p.add_argument("--work", default="benchmarks/runs/crash-run")
p.add_argument("--results", default="benchmarks/results/crash_run")
args = p.parse_args()

work = Path(args.work).resolve()
shutil.rmtree(work, ignore_errors=True)
(work / "box").mkdir(parents=True)
config = yaml.safe_load(Path("src/diffprune/configs/demo-quick.yaml").read_text())
config["finetune"].update(steps=60, checkpoint_every=20, log_every=10)
config["eval"].update(n=32, steps=10, latency_batches=[1], latency_repeats=10)
(work / "run.yaml").write_text(yaml.safe_dump(config))
env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def command(out: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "diffprune", "run", str(work / "run.yaml"), "--out", str(out), "--device", "cpu"], \
        {**env, "DIFFPRUNE_CACHE": str(cache)}


def run_logged(out: Path, cache: Path, kill_after: float | None = None) -> tuple[str, float, bool]:
    """Run the command; with ``kill_after``, SIGKILL it that many seconds in. Returns (log, seconds, killed)."""
    cmd, e = command(out, cache)
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=kill_after)
        return stdout, time.time() - t0, False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, _ = proc.communicate()
        return stdout, time.time() - t0, True


def figures(out: Path) -> dict:
    from safetensors.torch import load_file

    m = json.loads((out / "eval" / "metrics.json").read_text())
    pruned = json.loads((out / "prune" / "model" / "pruning.json").read_text())
    weights = {stage: load_file(out / stage / "model" / "diffusion_pytorch_model.safetensors")
               for stage in ("prune", "finetune")}
    return {"fid": m["fid"], "ssim": m["ssim"], "mse": m["mse"], "widths": pruned["widths"], "weights": weights}


def same(a: dict, b: dict) -> bool:
    import torch

    return all(a[k] == b[k] for k in ("fid", "ssim", "mse", "widths")) and all(
        a["weights"][s].keys() == b["weights"][s].keys()
        and all(torch.equal(a["weights"][s][k], b["weights"][s][k]) for k in a["weights"][s]) for s in a["weights"])


def leftovers(out: Path, cache: Path) -> list[str]:
    """Anything beside the run folder, and anything in the cache that is not a finished entry."""
    beside = [p.name for p in out.parent.iterdir() if p != out]
    stray = [str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".safetensors")]
    return beside + stray


ref_out, ref_cache = work / "ref" / "run", work / "ref-cache"
ref_out.parent.mkdir()
log, duration, _ = run_logged(ref_out, ref_cache)
reference = figures(ref_out)
print(f"uninterrupted run: {duration:.1f} s", flush=True)

rng = random.Random(args.seed)
cache = work / "cache"  # one cache for every attempt: its entries are written, killed and verified across attempts
rows = []
for i in range(args.kills):
    out = work / "box" / f"run-{i}"  # a fresh run folder, so kill i lands where its moment falls in the run
    at = duration * (0.05 + 0.9 * (i + rng.random()) / args.kills)
    killed_log, ran, killed = run_logged(out, cache, kill_after=at)
    finished_at_kill = [s for s in ("prune", "finetune", "eval") if (out / s / "stage.json").is_file()]
    rerun_log, rerun_s, _ = run_logged(out, cache)
    skipped = [s for s in ("prune", "finetune", "eval") if f"[{s}] complete with the same settings" in rerun_log]
    during = next((s for s in ("prune", "finetune", "eval") if s not in finished_at_kill), "after eval")
    row = {"kill": i, "at_s": round(at, 2), "killed": killed, "during": during if killed else "not killed",
        "finished_at_kill": finished_at_kill, "skipped_on_rerun": skipped,
        "redone_after_finishing": [s for s in finished_at_kill if s not in skipped],
        "rerun_s": round(rerun_s, 1), "leftovers": leftovers(out, cache),
        "equal_to_uninterrupted": (out / "eval" / "metrics.json").is_file() and same(figures(out), reference)}
    rows.append(row)
    print(json.dumps(row), flush=True)
    shutil.rmtree(out)

summary = {"kills": len(rows), "killed": sum(r["killed"] for r in rows),
           "equal": sum(r["equal_to_uninterrupted"] for r in rows),
           "stages_redone_after_finishing": sum(len(r["redone_after_finishing"]) for r in rows),
           "with_leftovers": sum(bool(r["leftovers"]) for r in rows),
           "during": {s: sum(r["during"] == s for r in rows) for s in ("prune", "finetune", "eval", "after eval", "not killed")},
           "uninterrupted_s": round(duration, 1), "command": "python benchmarks/crash_run.py " + " ".join(sys.argv[1:])}
Path(args.results + ".json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=2) + "\n")
md = ["# kill -9 during `diffprune run`, then the same command again", "",
      f"`{summary['command']}` (uninterrupted: {summary['uninterrupted_s']} s). {summary['kills']} kills "
      f"({summary['during']}); final outputs equal to the uninterrupted run's in {summary['equal']} of "
      f"{summary['kills']}; stages redone after they had finished: {summary['stages_redone_after_finishing']}; "
      f"reruns that left anything beside the run folder or a non-entry in the cache: {summary['with_leftovers']}.", "",
      "| kill | at (s) | during | finished at the kill | skipped on rerun | equal | leftovers |", "|---|---|---|---|---|---|---|"]
md += [f"| {r['kill']} | {r['at_s']} | {r['during']} | {', '.join(r['finished_at_kill']) or '-'} | "
       f"{', '.join(r['skipped_on_rerun']) or '-'} | {r['equal_to_uninterrupted']} | {', '.join(r['leftovers']) or '-'} |"
       for r in rows]
Path(args.results + ".md").write_text("\n".join(md) + "\n")
print(json.dumps(summary, indent=2))
