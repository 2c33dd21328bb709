#!/usr/bin/env bash
# Issue 5's GPU check, prepared for a lent GPU machine: two stages, each one device call.
#   stage 1: the CUDA tests, Sinkhorn, end-to-end pretrain (colour ops in the workers, then as by
#            default: on the GPU)                                   at most ~4.5 minutes by its limits
#   stage 2: training step (+ levers), the 16-core data pipeline vs lightly   at most ~4 minutes
#   torch.compile (measured on an H200 on 2026-11-27: 0.92x eager) only on request:
#            gpu_session.sh compile 230 --reps 3 --steps 5 --compile-budget-s 190
# With a 15-minute device budget and 1-2 minutes to start a machine, both stages fit one session only
# if the second call follows while the machine is still warm.
# On the machine, from the repository root, with timm + lightly wheels carried in .whl/ (see
# benchmarks/README.md, "GPU check"):
#   BENCH_COMMIT=<sha> bash benchmarks/gpu_session.sh 1      # then: ... gpu_session.sh 2
#   BENCH_COMMIT=<sha> bash benchmarks/gpu_session.sh data 150 --reps-data 3    # one part again
# Each part runs under its own time limit, so one that hangs costs only itself. The JSON files it wrote,
# benchmarks/README.md and a log are copied to $OUT (at most 8 files come back) after every part.
set -u
stage=${1:-1}
out=${OUT:-/tmp/gpu_session}
mkdir -p "$out"
log="$out/log_stage$stage.txt"
marker=$(mktemp)
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
    export PYTHONPATH=$PWD
fi
(nvidia-smi -L; nproc; python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)") 2>&1 | tee -a "$log"

collect() {
    find benchmarks/results -name 'gpu_*.json' -newer "$marker" -exec cp {} "$out"/ \;
    cp benchmarks/README.md "$out"/ 2>/dev/null
}

part() {  # part NAME LIMIT_S [bench_gpu.py options]
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s) $(date +%T)" | tee -a "$log"
    timeout "$limit" python3 benchmarks/bench_gpu.py --parts "$name" "$@" 2>&1 | tee -a "$log"
    echo "=== $name exit ${PIPESTATUS[0]} $(date +%T)" | tee -a "$log"
    collect
}

if [ "$stage" = 1 ]; then
    echo "=== CUDA tests $(date +%T)" | tee -a "$log"
    timeout 45 python3 -m pytest -q -p no:cacheprovider tests/test_sinkhorn.py tests/test_multicrop.py 2>&1 | tail -5 | tee -a "$log"
    part sinkhorn 35 --reps 5
    part e2e 190 --images 2048 --e2e-epochs 3 --e2e-timeout 85
elif [ "$stage" = 2 ]; then
    part step 120 --reps 4 --steps 5
    part data 110 --reps-data 2 --images 4096
else  # one part again: gpu_session.sh PART [LIMIT_S (150)] [bench_gpu.py options]
    part "$1" "${2:-150}" "${@:3}"
fi
