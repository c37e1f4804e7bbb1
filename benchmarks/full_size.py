"""Full-size denoisers pruned to 0.5x MACs with magnitude: params and MACs before -> after, time, peak memory.

    python benchmarks/full_size.py [--models dit-xl-2-256 ldm4-imagenet-256] [--threads 2]

Models are built from their public configuration values with random weights (nothing is downloaded); magnitude
needs no data. Each model runs in its own process so that its peak memory (ru_maxrss) is its own. Writes
benchmarks/results/full_size.json and .md.

* ``dit-xl-2-256``: facebook/DiT-XL-2-256's transformer config (28 layers, 16 heads x 72, patch 2, 32x32x4 latents,
  1000 classes, learned sigma): 675M parameters.
* ``ldm4-imagenet-256``: the widths of the paper's ImageNet LDM-4 UNet (CompVis cin256: 64x64x3 latents, model
  channels 192 with multipliers 1, 2, 3, 5, two residual blocks per level, attention at 32/16/8 with 32-dim heads,
  1000 classes) as a diffusers ``UNet2DModel`` with a class embedding. The original conditions through
  cross-attention to a class embedding, which ``UNet2DModel`` cannot express; the convolutional trunk, which holds
  most of the MACs, is the same.
* ``sd15-unet``: runwayml/stable-diffusion-v1-5's UNet config (320/640/1280/1280, 8 heads, 768-wide CLIP context):
  860M parameters; MACs per call at 64x64x4 latents (512x512 images) with a 77-token context.
* ``sd21-base-unet``: stabilityai/stable-diffusion-2-1-base's UNet config (head dims 5/10/20/20 as a per-block list,
  linear proj_in/proj_out, 1024-wide OpenCLIP context), 64x64x4 latents, 77 tokens.

Results of different runs go to their own files (``--results``): the first two models are in full_size.md, the
Stable Diffusion UNets in full_size_sd.md.
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from _models import CONFIGS, benchmark_model

NOTES = {
    "dit-xl-2-256": "diffusers' `DiTTransformer2DModel` gives each of the 28 blocks its own timestep and label "
                    "embedder (the original DiT shares one), hence 749.8M parameters rather than the 675M usually "
                    "quoted; the DiT keeps its residual stream (see README), so half the MACs leave 365.6M parameters "
                    "(TinyFusion reports 338M for Diff-Pruning at 50%).",
    "ldm4-imagenet-256": "The LDM-4 row is a UNet2DModel with the paper's widths and a class embedding instead of "
                         "cross-attention (FIELD.md quotes about 400M / 99.8G for the original).",
    "sd15-unet": "For scale, BK-SDM removes whole blocks from SD-1.4's 0.86B-parameter UNet, leaving 0.58B (Base), "
                 "0.49B (Small) or 0.33B (Tiny) parameters, and retrains with distillation.",
    "sd21-base-unet": "SD 2.x: heads are recorded per attention and written back at load (the config's per-block "
                      "head list only shapes the model when it is built).",
}


def one(name: str, threads: int) -> dict:
    import diffusers
    import torch

    from diffprune.prune import PruneConfig, prune_

    torch.set_num_threads(threads)
    cls = CONFIGS[name][0]
    t0 = time.time()
    model = benchmark_model(name).denoiser
    built = time.time() - t0
    report = prune_(model, PruneConfig(method="magnitude", target_macs=0.5), progress=False)
    return {"model": name, "class": cls, "params_before": report.base_params, "params_after": report.params,
            "macs_before": report.base_macs, "macs_after": report.macs, "macs_fraction": report.macs / report.base_macs,
            "ratio": report.ratio, "search_trials": len(report.search), "build_seconds": round(built, 1),
            "prune_seconds": round(report.seconds, 1),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "threads": threads, "torch": torch.__version__, "diffusers": diffusers.__version__}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=list(CONFIGS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--results", default="benchmarks/results/full_size")
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.threads)))
        sys.exit(0)
    rows = []
    for name in args.models:
        out = subprocess.run([sys.executable, __file__, "--one", name, "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    command = (f"python benchmarks/full_size.py --models {' '.join(args.models)} --threads {args.threads}"
               + (f" --results {args.results}" if args.results != "benchmarks/results/full_size" else ""))
    res = Path(args.results)
    res.parent.mkdir(parents=True, exist_ok=True)
    res.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    lines = ["# Full-size denoisers, magnitude pruning to 0.5x MACs (random weights, CPU)\n", f"`{command}`\n",
             "| model | params before -> after | MACs/call before -> after | MACs kept | search trials | prune time "
             "| peak RSS |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['model']} ({r['class']}) | {r['params_before'] / 1e6:.1f}M -> {r['params_after'] / 1e6:.1f}M "
                     f"| {r['macs_before'] / 1e9:.1f}G -> {r['macs_after'] / 1e9:.1f}G | {r['macs_fraction']:.3f} "
                     f"| {r['search_trials']} | {r['prune_seconds'] / 60:.1f} min | {r['peak_rss_gib']} GiB |")
    notes = " ".join(NOTES[r["model"]] for r in rows)
    lines += ["", f"Notes: {notes} `prune time` includes the target-MACs search (a pruned copy and a MAC count per "
              "trial)."]
    res.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
