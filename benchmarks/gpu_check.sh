#!/usr/bin/env bash
# The checks that need a GPU, as one script for a lent GPU machine (run from the repository root; results under
# ${OUT:-benchmarks/results}). Needs diffprune's dependencies importable (on a machine without the registries: wheels
# installed to a folder on PYTHONPATH, and PYTHONPATH=src for diffprune itself).
#   1. benchmarks/fsdp_check.py: `diffprune finetune` under accelerate's real FSDP2 launch on the GPUs.
#   2. benchmarks/speed.py on full-size denoisers (random weights from their public configs), bf16: SD-1.5's UNet
#      (and, given time, DiT-XL/2) pruned with magnitude to 0.5x MACs, teacher vs student per eager call at batch 64
#      (at batch 1 and 16 both were launch-bound on an H200: ~50 ms per call whatever the batch or the width).
# Each step has its own time limit, so that one that runs long leaves the others' results.
set -uo pipefail
out="${OUT:-benchmarks/results}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c 'import torch, diffusers, torch_pruning; print("torch", torch.__version__, "diffusers", diffusers.__version__, "torch-pruning", torch_pruning.__version__)'
gpus="$(nvidia-smi -L | wc -l)"
timeout 240 python3 benchmarks/fsdp_check.py --gpus "$gpus" --steps 6 --results "$out/fsdp-check"
cd benchmarks
timeout 200 python3 speed.py --models sd15-unet --targets 0.5 --batches 64 --round-to 8 --device cuda \
    --dtype bfloat16 --threads 16 --results "$out/speed-cuda-sd15"
timeout 200 python3 speed.py --models dit-xl-2-256 --targets 0.5 --batches 64 --round-to 8 --device cuda \
    --dtype bfloat16 --threads 16 --results "$out/speed-cuda-dit"
