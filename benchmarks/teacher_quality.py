"""Sample quality of a digit model: the share of samples the shipped classifier labels with confidence >= 0.9.

    python benchmarks/teacher_quality.py MODEL [--n 1000] [--steps 50] [--out benchmarks/results/teacher_quality.json]

The acceptance bar for the shipped teacher is >= 90% of 1,000 samples (DDIM, eta 0, seeds 0..999); the same
share on the 1,000 real test digits is reported beside it.
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
p.add_argument("--steps", type=int, default=50)
p.add_argument("--out", default=None)
args = p.parse_args()

t0 = time.time()
loaded = load_model(args.model)
imgs = sample(loaded.unet, loaded.scheduler or default_scheduler(), seeds=range(args.n),
              num_inference_steps=args.steps, batch_size=250)
classifier = load_classifier()
labels, conf = predict(classifier, imgs)
# the same check on real digits: the ceiling this classifier allows
_, real_conf = predict(classifier, to_model_range(load_images("mnist", resolution=16, channels=1, split="test")))
result = {
    "model": args.model, "n": args.n, "ddim_steps": args.steps,
    "confident_share": round((conf >= 0.9).float().mean().item(), 4),
    "real_test_confident_share": round((real_conf >= 0.9).float().mean().item(), 4),
    "class_histogram": torch.bincount(labels, minlength=10).tolist(),
    "seconds": round(time.time() - t0, 1), "threads": torch.get_num_threads(),
    "command": "python benchmarks/teacher_quality.py " + " ".join(f"{k}={v}" for k, v in vars(args).items()),
}
print(json.dumps(result, indent=2))
if args.out:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
