#!/usr/bin/env bash
# One script for a machine with a CUDA GPU: build the CUDA extension, run the whole test suite
# (the cuda-marked tests included; Triton kernels compiled for the GPU instead of interpreted),
# run the full kernel benchmarks, and leave the results under bench/results/ (also copied to $OUT
# when that is set, as on the project's lent GPU machines).
#
#   bash bench/gpu_check.sh            # uses `python3`; set PYTHON=... to choose another interpreter
#
# Environment: FREEATM_CUDA_ARCHS (default: the visible GPU's compute capability), MAX_JOBS (default 8).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

"$PY" - <<'PYEOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("bench/gpu_check.sh needs a CUDA GPU visible to torch; none found")
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PYEOF

CC_ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
export FREEATM_CUDA_ARCHS=${FREEATM_CUDA_ARCHS:-$CC_ARCH}
export MAX_JOBS=${MAX_JOBS:-8}
mkdir -p bench/results
LOG=bench/results/gpu_check.log
: > "$LOG"

echo "== build + editable install (CUDA extension for arch $FREEATM_CUDA_ARCHS)" | tee -a "$LOG"
t0=$(date +%s)
FREEATM_CUDA_EXT=1 "$PY" -m pip install --no-deps --no-build-isolation -e . 2>&1 | tail -n 5 | tee -a "$LOG"
echo "build took $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
"$PY" -m freeatm_kernels.info 2>&1 | tee -a "$LOG"

echo "== tests (all, cuda-marked included)" | tee -a "$LOG"
set +e
"$PY" -m pytest tests -q -p no:cacheprovider -o addopts="-ra" 2>&1 | tee -a "$LOG"
TEST_RC=${PIPESTATUS[0]}
set -e

echo "== full kernel benchmarks" | tee -a "$LOG"
"$PY" -m bench.kernels 2>&1 | tee -a "$LOG"
echo "== generation benchmark (SD1.5 architecture, random weights, fp16, 512x512)" | tee -a "$LOG"
"$PY" -m bench.bench_generate 2>&1 | tee -a "$LOG"
echo "== training benchmark (ResNet-50 224², bf16, batch 256; MoCo-v2 target >= 2000 images/s on one H100)" | tee -a "$LOG"
"$PY" -m bench.bench_train --methods mocov2,mocov2_freeatm,simclr,simclr_freeatm 2>&1 | tee -a "$LOG"
echo "== data-loading benchmark (two-view pipeline 224², batch 256; target DALI GPU >= 3x torch loader images/s at all workers, MoCo-v2 R50 data-wait < 5% fed by DALI)" | tee -a "$LOG"
"$PY" -m bench.data 2>&1 | tee -a "$LOG"
echo "== MAE benchmark (ViT-B/16 224², bf16, fused vs eager masking; target >= 600 images/s on one H100)" | tee -a "$LOG"
"$PY" -m bench.bench_mae 2>&1 | tee -a "$LOG"
echo "== VLP benchmark (BLIP ViT-B/16 224² + BERT-base text, bf16, batch 64: images/s and peak memory at ZeRO-2 / ZeRO-3; ViLT at ZeRO-2)" | tee -a "$LOG"
"$PY" -m bench.bench_vlp 2>&1 | tee -a "$LOG"

if [ -n "${OUT:-}" ]; then
  cp bench/results/*.jsonl bench/results/*.md "$LOG" "$OUT"/ 2>/dev/null || true
fi
echo "tests exit status: $TEST_RC" | tee -a "$LOG"
exit "$TEST_RC"
