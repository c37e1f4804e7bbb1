"""Sample quality of a digit model: the share of samples the shipped classifier labels with confidence >= 0.9.

    python benchmarks/teacher_quality.py MODEL [--n 1000] [--samplers ddim:50 ddpm:250] [--guidance 1 2 4]
        [--out FILE.json]

The acceptance bar for a shipped teacher is >= 90% of 1,000 samples (seeds 0..999). For a class-conditional model
(seed s asks for digit s mod 10) the bar counts a sample only when the classifier assigns it to the *requested* class
with confidence >= 0.9, measured at each classifier-free guidance scale of --guidance; the classifier-feature FID
against the 9,000 training digits is reported beside it. Each sampler is SAMPLER:STEPS (ddim: deterministic, eta 0;
ddpm: ancestral, eta 1; uniform timestep spacing). The same share on the 1,000 real test digits is reported
beside it: the ceiling this classifier allows.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from diffprune.classifier import load_classifier, predict
from diffprune.data import load_images, to_grey, to_model_range, to_uint8
from diffprune.io import load_model
from diffprune.metrics import class_accuracy, compute_features, fid_from_features, load_extractor
from diffprune.objective import resolve_scheduler
from diffprune.sampling import labels_for, sample

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("model")
p.add_argument("--n", type=int, default=1000)
p.add_argument("--samplers", nargs="+", default=["ddim:50"], help="SAMPLER:STEPS, e.g. ddim:50 ddpm:250")
p.add_argument("--guidance", nargs="+", type=float, default=[1.0], help="guidance scales (class-conditional models)")
p.add_argument("--out", default=None)
args = p.parse_args()

loaded = load_model(args.model)
model, scheduler = loaded.denoiser, resolve_scheduler(loaded.scheduler)
names = loaded.class_names
labels = labels_for(model, range(args.n), num_classes=len(names) if names else None)
classifier = load_classifier()
_, real_conf = predict(classifier, to_model_range(load_images("mnist", resolution=16, channels=1, split="test")))
extractor = load_extractor("mnist-classifier")
train_feats = compute_features(extractor, load_images("mnist", resolution=16, channels=1, split="train"))
result = {
    "model": args.model, "n": args.n, "conditional": labels is not None,
    "real_test_confident_share": round((real_conf >= 0.9).float().mean().item(), 4),
    "threads": torch.get_num_threads(),
    "command": "python benchmarks/teacher_quality.py " + " ".join(
        f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" if k != "model" else str(v)
        for k, v in vars(args).items() if v is not None),
    "samplers": [],
}
for spec in args.samplers:
    sampler, steps = spec.split(":")
    for scale in (args.guidance if labels is not None else [1.0]):
        t0 = time.time()
        imgs = sample(model, scheduler, seeds=range(args.n), class_labels=labels, guidance_scale=scale,
                      codec=loaded.codec, num_inference_steps=int(steps), sampler=sampler, batch_size=250)
        pred, conf = predict(classifier, to_grey(imgs))
        row = {"sampler": sampler, "steps": int(steps), "guidance_scale": scale,
               "confident_share": round((conf >= 0.9).float().mean().item(), 4),
               "mean_confidence": round(conf.mean().item(), 4),
               "class_histogram": torch.bincount(pred, minlength=10).tolist(),
               "fid_classifier_features": round(fid_from_features(
                   compute_features(extractor, to_uint8(imgs)), train_feats), 2)}
        if labels is not None:
            acc = class_accuracy(to_uint8(imgs), labels, classifier, num_classes=len(names) if names else 10)
            row.update(requested_class_share=round(acc["accuracy"], 4),
                       requested_class_confident_share=round(acc["confident_accuracy"], 4),
                       per_class=[round(a, 3) for a in acc["per_class"]])
        row["seconds"] = round(time.time() - t0, 1)
        result["samplers"].append(row)
        print(json.dumps(row), flush=True)
print(json.dumps(result, indent=2))
if args.out:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
