#!/usr/bin/env bash
# Issue 23 on one lent GPU (prepared for an H200, 139 GiB; NOT RUN yet: no GPU was available when it was written).
# One call, prints the table and writes benchmarks/results/gpu_memory_scale_<gpu>.json:
#   1. per-process memory (torch.cuda.max_memory_allocated) of DDP, FSDP and FSDP + activation checkpointing at
#      1 process (one GPU: FSDP has nothing to shard over, so this shows its overhead, not its saving), the SEER
#      crops 2x224 + 4x96 at batch 32 per GPU, bf16, regnety_160;
#   2. activation checkpointing's activation cut and step-time ratio (interleaved arms, medians);
#   3. the largest RegNetY under the GPU's memory (estimate) and the largest whose step REALLY runs at batch 32
#      on this GPU, plain and checkpointed (--measure-largest: regnety_160 upwards until out of memory).
# Usage (from the repository root, the venv active):  bash benchmarks/gpu_memory_scale.sh
set -euo pipefail
cd "$(dirname "$0")/.."
GPU=$(python -c "import torch; print(torch.cuda.get_device_name(0).split()[-1].lower())")
CAP=$(python -c "import torch; print(int(torch.cuda.get_device_properties(0).total_memory / 2**30))")
timeout 560 python benchmarks/bench_memory_scale.py --device cuda --precision bf16 --batch 32 \
    --counts 2 4 --sizes 224 96 --backbone regnety_160 --steps 3 --reps 5 --threads 0 \
    --cap-gib "$CAP" --estimate-batch 32 --measure-largest --search-from regnety_160 \
    --name "gpu_memory_scale_${GPU}" --no-readme
