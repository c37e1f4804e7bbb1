"""Sample quality of a digit model: the share of samples the shipped classifier labels with confidence >= 0.9.

    python benchmarks/teacher_quality.py MODEL [--n 1000] [--samplers ddim:50 ddpm:250] [--out FILE.json]

The acceptance bar for the shipped teacher is >= 90% of 1,000 samples (seeds 0..999). Each sampler is
SAMPLER:STEPS (ddim: deterministic, eta 0; ddpm: ancestral, eta 1; uniform timestep spacing). The same share on
the 1,000 real test digits is reported beside it: the ceiling this classifier allows.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from diffprune.classifier import load_classifier, predict
from diffprune.data import load_images, to_model_range
from diffprune.io import load_model
from diffprune.sampling import default_scheduler, sample

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("model")
p.add_argument("--n", type=int, default=1000)
p.add_argument("--samplers", nargs="+", default=["ddim:50"], help="SAMPLER:STEPS, e.g. ddim:50 ddpm:250")
p.add_argument("--out", default=None)
args = p.parse_args()

loaded = load_model(args.model)
classifier = load_classifier()
_, real_conf = predict(classifier, to_model_range(load_images("mnist", resolution=16, channels=1, split="test")))
result = {
    "model": args.model, "n": args.n,
    "real_test_confident_share": round((real_conf >= 0.9).float().mean().item(), 4),
    "threads": torch.get_num_threads(),
    "command": "python benchmarks/teacher_quality.py " + " ".join(
        f"--{k} {' '.join(v) if isinstance(v, list) else v}" if k != "model" else str(v) for k, v in vars(args).items()),
    "samplers": [],
}
for spec in args.samplers:
    sampler, steps = spec.split(":")
    t0 = time.time()
    imgs = sample(loaded.unet, loaded.scheduler or default_scheduler(), seeds=range(args.n),
                  num_inference_steps=int(steps), sampler=sampler, batch_size=250)
    labels, conf = predict(classifier, imgs)
    result["samplers"].append({
        "sampler": sampler, "steps": int(steps), "confident_share": round((conf >= 0.9).float().mean().item(), 4),
        "mean_confidence": round(conf.mean().item(), 4), "class_histogram": torch.bincount(labels, minlength=10).tolist(),
        "seconds": round(time.time() - t0, 1)})
    print(json.dumps(result["samplers"][-1]), flush=True)
print(json.dumps(result, indent=2))
if args.out:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
