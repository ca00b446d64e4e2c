#!/usr/bin/env bash
# GPU check 2 (issue 17): the training-step ladder against EDM's own step, 50k one-step generation + FID, and a
# one-GPU torchrun smoke, in one command of at most 9 minutes on an H200. Each stage runs under its own time limit
# and logs under OUT; OUT/stages.txt lists each stage's exit code and seconds, OUT/summary.md the tables.
#
#   bash bench/gpu_check_train.sh [OUT]        # OUT: the argument, else $OUT, else bench/results/gpu-check-train
#   DRY=1 bash bench/gpu_check_train.sh /tmp/t1    # on a CPU machine: every stage at its CPU size
#
# The anchor rung needs NVlabs/edm's code in bench/.edm (git-ignored: git clone https://github.com/NVlabs/edm
# bench/.edm; carry it to the device); without it those cases skip. No build: the fused rungs run the Triton
# kernels (the CUDA extension is issue 16's check). COMMIT (env): the commit measured, for a tree without .git.
# PYTHON (env): the interpreter (default python3: the device image's, which holds torch).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-bench/results/gpu-check-train}}
PY=${PYTHON:-python3}
DRY=${DRY:-0}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
: > "$OUT/stages.txt"
export PYTHONPATH="$PWD:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}" DSD_FAST_COMMIT=${COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}

source bench/stage.sh
bench() {  # bench NAME SECONDS FILE [pytest args...]: one benchmark stage, its records in OUT/NAME.json
    local name=$1 limit=$2 file=$3
    shift 3
    stage "$name" "$limit" "$PY" -m pytest -q -p no:cacheprovider "$file" --benchmark-enable \
        --benchmark-json "$OUT/$name.json" "$@"
}

# 1. What ran where.
{
    echo "commit: $DSD_FAST_COMMIT"
    date -u +"date: %Y-%m-%dT%H:%M:%SZ"
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
    "$PY" -c "import edm_anchor; print('edm anchor:', edm_anchor.why_not() or edm_anchor.EDM_DIR)" 2>&1
} > "$OUT/env.txt" 2>&1

# 2. The bf16 matrix ceiling for the MFU (test_bench_train reads bench/results/ceilings.json for this device).
if [ "$DRY" = 1 ]; then
    echo "ceilings       skipped (DRY=1: needs CUDA)" | tee -a "$OUT/stages.txt"
else
    stage ceilings 40 "$PY" bench/ceilings.py bench/results/ceilings.json
    cp bench/results/ceilings.json "$OUT/ceilings.json" 2>/dev/null
fi

# 3. Phase I ladder, cifar10 (DDPM++ 32^2, batch 512): the anchor (EDM's step at fp32 and --fp16), then ours.
#    Timed steps, warm-up steps per case: the compiled rungs compile in their warm-up; clamp vs truncated is
#    measured on the uncompiled rungs (one compile per compiled rung keeps the stage inside its limit).
if [ "$DRY" = 1 ]; then P32=cpu-tiny; P64=cpu-tiny; STEPS=1,1; STEPS2=1,1; else P32=cifar10; P64=afhq; STEPS=5,2; STEPS2=3,1; fi
DSD_FAST_BENCH_PRESETS=$P32 DSD_FAST_BENCH_STEPS=$STEPS \
    bench train-p1-32 150 bench/test_bench_train.py -k "pretrain and not (compile and clamp)"
# 4. Phase II (D-SiD) ladder, cifar10: eager, bf16 and the full fast rung (bf16+compile alone is step 3's).
DSD_FAST_BENCH_PRESETS=$P32 DSD_FAST_BENCH_STEPS=$STEPS2 DSD_FAST_BENCH_RUNGS=eager-fp32,bf16,bf16+compile+fused \
    bench train-p2-32 150 bench/test_bench_train.py -k "distill"
# 5. Phase I at 64^2 (afhq, batch 256): the slow and the fast end of the ladder.
if [ "$DRY" != 1 ]; then
    DSD_FAST_BENCH_PRESETS=$P64 DSD_FAST_BENCH_STEPS=$STEPS DSD_FAST_BENCH_RUNGS=eager-fp32,bf16+compile+fused \
        bench train-p1-64 60 bench/test_bench_train.py -k "pretrain and truncated"
fi

# 6. 50,000 one-step 64^2 images at batch 1024 in bf16: generation, features (edm, gpu modes) and latents -> FID.
if [ "$DRY" = 1 ]; then N=8; else N=50000; fi
DSD_FAST_BENCH_IMAGES=$N DSD_FAST_BENCH_ROUNDS=1,1 \
    bench generate 80 bench/test_bench_generate.py -k "not clean"

# 7. torchrun on one GPU (nccl; gloo on a CPU): --parallel ddp and fsdp, three Phase I steps each.
"$PY" -c "import numpy as np, sys; np.savez(sys.argv[1], x=np.random.default_rng(0).integers(0, 256, (256, 32, 32, 3), dtype=np.uint8))" "$OUT/smoke-data.npz"
for parallel in ddp fsdp; do
    if [ "$DRY" = 1 ]; then SMOKE=(--preset cpu-tiny --batch 8 --kimg 0.024 --device cpu); else SMOKE=(--preset cifar10 --batch 128 --kimg 0.384 --precision bf16); fi
    stage "torchrun-$parallel" 35 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m dsd_fast pretrain \
        --dataset "$OUT/smoke-data.npz" --sigma 0.2 "${SMOKE[@]}" --parallel "$parallel" --log-every 1 \
        --grid-images 4 --sample-steps 2 --lr-rampup-kimg 0 --outdir "$OUT/smoke-$parallel"
    rm -f "$OUT/smoke-$parallel"/*.pt  # checkpoints are not results (and would not travel back)
done
rm -f "$OUT/smoke-data.npz"

# 8. The tables.
stage summary 15 "$PY" bench/render_table.py "$OUT"/train-*.json --out "$OUT/train-table.md"
{
    echo "# GPU check 2"; echo; echo '```'; cat "$OUT/stages.txt"; echo '```'; echo
    cat "$OUT/train-table.md" 2>/dev/null; echo
    "$PY" -c "
import json, sys
for b in json.load(open(sys.argv[1]))['benchmarks']:
    e = b['extra_info']
    print(f\"- {e['stage']} ({e['feature_mode']}), N={e['images']}: {e.get('img_per_s', 0):.0f} img/s, {e.get('s_per_50k', 0):.1f} s per 50k\")
" "$OUT/generate.json" 2>&1
    for parallel in ddp fsdp; do echo "- torchrun --parallel $parallel: $(tail -n 1 "$OUT/smoke-$parallel/metrics.jsonl" 2>/dev/null || echo 'no metrics')"; done
} > "$OUT/summary.md"
cat "$OUT/stages.txt"
tail -n 40 "$OUT/summary.md"
