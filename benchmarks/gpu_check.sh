#!/usr/bin/env bash
# The checks that need a GPU, as one script for a lent GPU machine (run from the repository root; results under
# ${OUT:-benchmarks/results}). Needs diffprune's dependencies importable (on a machine without the registries: wheels
# installed to a folder on PYTHONPATH, and PYTHONPATH=src for diffprune itself).
#   1. benchmarks/stock_full_size.py on SD-1.5's UNet (random weights from its public config): the MAC fractions the
#      stock layout reaches, plain diffusers loading the stock model (outputs compared in float32), and teacher /
#      free / stock latency per eager call in bf16 at batch 1 and 64.
#   2. benchmarks/fsdp_check.py: `diffprune finetune` under accelerate's real FSDP2 launch on the GPUs.
#   (Earlier sessions' step, results in results/speed-cuda.md: benchmarks/speed.py on SD-1.5 and DiT-XL/2, bf16.)
# Each step has its own time limit, so that one that runs long leaves the others' results.
set -uo pipefail
out="${OUT:-$PWD/benchmarks/results}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c 'import torch, diffusers, torch_pruning; print("torch", torch.__version__, "diffusers", diffusers.__version__, "torch-pruning", torch_pruning.__version__)'
gpus="$(nvidia-smi -L | wc -l)"
(cd benchmarks && timeout 300 python3 stock_full_size.py --models sd15-unet --ratios 0.3 0.45 --target 0.5 \
    --batches 1 64 --device cuda --dtype bfloat16 --threads 16 --results "$out/stock-full-size")
timeout 200 python3 benchmarks/fsdp_check.py --gpus "$gpus" --steps 6 --results "$out/fsdp-check"
