"""Train and ship the MNIST digit classifier (src/diffprune/assets/mnist-classifier).

    python tools/train_classifier.py [--out src/diffprune/assets/mnist-classifier]

Trains on the bundled 9,000-image train split at 16x16, reports accuracy on the 1,000-image test split, and
writes config.json + model.safetensors + metrics.json. Then run tools/update_manifest.py.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from diffprune.classifier import predict, save_classifier, train_classifier
from diffprune.data import load_images, mnist_labels, to_model_range

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--out", default="src/diffprune/assets/mnist-classifier")
p.add_argument("--epochs", type=int, default=60)
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()

t0 = time.time()
train_x = load_images("mnist", resolution=16, channels=1, split="train")
test_x = load_images("mnist", resolution=16, channels=1, split="test")
model = train_classifier(train_x, mnist_labels("train"), epochs=args.epochs, seed=args.seed)
label, _ = predict(model, to_model_range(test_x))
acc = (label == mnist_labels("test")).float().mean().item()
save_classifier(model, args.out)
metrics = {"test_accuracy": acc, "test_images": len(test_x), "train_images": len(train_x), "epochs": args.epochs,
           "seed": args.seed, "seconds": round(time.time() - t0, 1), "torch": torch.__version__,
           "command": "python tools/train_classifier.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items())}
(Path(args.out) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
print(json.dumps(metrics, indent=2))
