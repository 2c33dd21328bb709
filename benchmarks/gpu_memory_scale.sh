#!/usr/bin/env bash
# Issues 23 and 30 on one lent GPU (part 1 prepared for an H200, 139 GiB; part 2, the SEER 1.3B recipe, for an 80 GB
# GPU). NOT RUN yet: no GPU was available in the sessions that wrote them.
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
    --name "gpu_memory_scale_${GPU}" --no-readme || echo "bench_memory_scale.py: exit $? (a target missed or it failed); the SEER run follows"

# ----------------------------------------------------------------------------------------------------------------
# Issue 30: the REAL SEER 1.3B recipe (configs/seer_regnety_1.3b.yaml: regnety_2560 + the 10444-8192-8192-256 head
# without BN, 16k prototypes, 2x224 + 4x96, LARC over every parameter, activation checkpointing on) for a few steps
# on ONE 80 GB GPU. NOT RUN: no GPU was available in the session that wrote it (CPU-only machine).
# One GPU means one process: dist.strategy=ddp (fsdp needs >= 2 processes; on one GPU it would shard nothing) and
# the per-GPU batch of the released run (16 images, "bs16" in its name) as the global batch. Synthetic JPEGs.
# Prints images/s (steps 3.. of SEER_STEPS, after the warm-up steps) and the peak GPU memory, and, when
# `swavkit pretrain --plan` exists (another change adds it), the plan's prediction for the same config beside it.
SEER_STEPS=${SEER_STEPS:-8}
SEER_WORK=${SEER_WORK:-benchmarks/_work/seer_1.3b}
SEER_OVERRIDES=(dist.strategy=ddp train.batch_size=16 model.activation_checkpointing=on data.num_workers=8
                train.log_every_steps=1 "train.loggers=[jsonl]")
timeout 900 python - "$SEER_WORK" "$SEER_STEPS" "${SEER_OVERRIDES[@]}" <<'PY'
import json, statistics, sys, time
from pathlib import Path
sys.path.insert(0, "benchmarks")
import torch
from _common import synthetic_jpegs
from swavkit.config import load_config
from swavkit.training.trainer import train

work, steps, overrides = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
images = synthetic_jpegs(work / "images", 16 * (steps + 2))
cfg = load_config(["configs/seer_regnety_1.3b.yaml"], [f"data.path={images}", f"out_dir={work / 'run'}", *overrides])
torch.cuda.reset_peak_memory_stats()
start = time.perf_counter()
train(cfg, restart=True, stop_after_steps=steps, progress=False)
wall_s = time.perf_counter() - start
records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
speeds = [r["images_per_s"] for r in records if "images_per_s" in r][2:]
peak_gib = torch.cuda.max_memory_allocated() / 2**30
print(f"SEER 1.3B, 1 GPU ({torch.cuda.get_device_name(0)}), batch 16, checkpointing on, bf16: "
      f"{statistics.median(speeds) if speeds else float('nan'):.2f} images/s (median of {len(speeds)} logged steps "
      f"after 2 warm-up), peak memory {peak_gib:.1f} GiB (torch.cuda.max_memory_allocated), {wall_s:.0f} s in all")
PY
if python -m swavkit pretrain --help 2>/dev/null | grep -q -- "--plan"; then
    echo "the plan's prediction for the same config (swavkit pretrain --plan):"
    python -m swavkit pretrain --plan --config configs/seer_regnety_1.3b.yaml "${SEER_OVERRIDES[@]}" \
        data.path="$SEER_WORK/images" out_dir="$SEER_WORK/plan" || echo "(--plan failed: see above)"
else
    echo "swavkit pretrain --plan is not available in this checkout: no prediction to print beside the measurement"
fi
