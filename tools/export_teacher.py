"""Copy a finished `diffprune train` run into a shipped model folder, then refresh the manifest.

    python tools/export_teacher.py runs/teacher [--out src/diffprune/assets/mnist-teacher]
    python tools/export_teacher.py runs/mnist-dit --out src/diffprune/assets/mnist-dit

Copies the final (EMA) model — a model folder with its scheduler, or a pipeline folder (model_index.json and every
component it names) — and the run's record (train_config.json with the exact command, train_log.csv,
train_summary.json, the last sample grid). Checkpoints and raw weights stay behind.
"""
import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("run")
p.add_argument("--out", default="src/diffprune/assets/mnist-teacher")
args = p.parse_args()

run, out = Path(args.run), Path(args.out)
if not (run / "train_summary.json").is_file():
    sys.exit(f"{run} has no train_summary.json: the run has not finished")
if out.exists():
    shutil.rmtree(out)
out.mkdir(parents=True)
if (run / "model_index.json").is_file():  # a pipeline: the index and its components
    index = json.loads((run / "model_index.json").read_text())
    shutil.copy2(run / "model_index.json", out / "model_index.json")
    for name, value in index.items():
        if isinstance(value, list) and (run / name).is_dir():
            shutil.copytree(run / name, out / name)
else:
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copy2(run / name, out / name)
    shutil.copytree(run / "scheduler", out / "scheduler")
for name in ("train_config.json", "train_log.csv", "train_summary.json"):
    shutil.copy2(run / name, out / name)
grids = sorted((run / "samples").glob("*.png"))
if grids:
    shutil.copy2(grids[-1], out / "samples.png")
subprocess.run([sys.executable, str(Path(__file__).with_name("update_manifest.py"))], check=True)
print(f"exported {run} -> {out}")
