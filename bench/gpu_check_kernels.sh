#!/usr/bin/env bash
# GPU check 1 (issue 16): every CUDA test, the CUDA extension and the op benchmarks, in one command of at most
# 9 minutes on an H200. Each stage runs under its own time limit (one hang cannot eat the budget) and writes its
# log under OUT; OUT/stages.txt lists each stage's exit code and seconds, OUT/summary.md the tables.
#
#   bash bench/gpu_check_kernels.sh [OUT]     # OUT: the argument, else $OUT, else bench/results/gpu-check-kernels
#   DRY=1 bash bench/gpu_check_kernels.sh /tmp/g1   # on a CPU machine: every stage at its CPU size (no build)
#
# COMMIT (env): the commit being measured, for a tree copied without .git (else git rev-parse HEAD).
# PYTHON (env): the interpreter (default python3: the device image's, which holds torch).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-bench/results/gpu-check-kernels}}
PY=${PYTHON:-python3}
DRY=${DRY:-0}
mkdir -p "$OUT"
: > "$OUT/stages.txt"

source bench/stage.sh

# 1. What ran where.
{
    echo "commit: ${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
    date -u +"date: %Y-%m-%dT%H:%M:%SZ"
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None); print('triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1

# pytest-timeout is on the device image; a CPU machine may lack it (then the stage limits alone apply).
TIMEOUT=()
if "$PY" -c "import pytest_timeout" 2>/dev/null; then TIMEOUT=(--timeout 90); fi

# 2. The CUDA extension (sm_90), then the GPU tests and the op test files on CUDA.
if [ "$DRY" = 1 ]; then
    echo "build          skipped (DRY=1: CPU machine)" | tee -a "$OUT/stages.txt"
else
    stage build 240 env DSD_FAST_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
        "$PY" -m pip install --no-deps --no-build-isolation --no-index -e .
fi
stage gpu-tests 150 "$PY" -m pytest -q -p no:cacheprovider "${TIMEOUT[@]}" -m gpu tests --junitxml "$OUT/junit-gpu.xml"
if [ "$DRY" = 1 ]; then
    OPS_TESTS=(tests/test_backend.py)  # the op files at CPU size take minutes; the gpu stage proved the wiring
else
    OPS_TESTS=(tests/test_ops_noise.py tests/test_ops_losses.py tests/test_ops_dct.py tests/test_functional.py
               tests/test_cuda_ext.py tests/test_backend.py)
fi
stage op-tests 120 "$PY" -m pytest -q -p no:cacheprovider "${TIMEOUT[@]}" -m "not gpu" "${OPS_TESTS[@]}" \
    --junitxml "$OUT/junit-ops.xml"

# 3. The ceilings: copy bandwidth and bf16 matrix rate, measured in this run.
if [ "$DRY" = 1 ]; then
    echo "ceilings       skipped (DRY=1: needs CUDA)" | tee -a "$OUT/stages.txt"
else
    stage ceilings 45 "$PY" bench/ceilings.py "$OUT/ceilings.json"
fi

# 4. The op benchmarks against eager and torch.compile of the reference (512 x {1, 3} x {32^2, 64^2}, fp32 and
#    bf16 on CUDA; one tiny case each on a CPU).
stage bench-ops 170 "$PY" -m pytest -q -p no:cacheprovider bench/test_bench_elementwise.py bench/test_bench_dct.py \
    --benchmark-enable --benchmark-json "$OUT/h200-ops.json"

# 5. The tables: % of the copy bandwidth measured above (render_table's default where there is none).
PEAK=()
if [ -f "$OUT/ceilings.json" ]; then
    PEAK=(--peak-tbps "$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['copy_GBps'] / 1000)" \
        "$OUT/ceilings.json")")
fi
stage summary 30 "$PY" bench/render_table.py "$OUT/h200-ops.json" "${PEAK[@]}"
{ echo "# GPU check 1"; echo; echo '```'; cat "$OUT/stages.txt"; echo '```'; echo; cat "$OUT/summary.log"; } \
    > "$OUT/summary.md"
cat "$OUT/stages.txt"
tail -n 40 "$OUT/summary.log"
