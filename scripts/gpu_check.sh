#!/usr/bin/env bash
# GPU check of the paper-scale path (issue 24); under 8 minutes on one GPU. Never part of CI.
#   bash scripts/gpu_check.sh [OUT]      (run from the repository root; OUT default gpu_check_<UTC time>.txt)
# 1. gsplat parity tests (pytest -m cuda); 2. `perf paper` for ViT-S/14 and ViT-B/14 at 576x880 (random weights,
# generated scenes in the official ScanNet++ layout, batch 14; ViT-B as micro-batches of 7, accumulate 2,
# per the memory plan in docs/SCALING.md); 3. `perf train --precision 32 tf32 bf16-mixed` on the GPU.
# Every table goes to OUT; a failing part is noted there and the script goes on.
set -uo pipefail
OUT=${1:-gpu_check_$(date -u +%Y%m%dT%H%M%SZ).txt}
DATA=${GPU_CHECK_DATA:-/tmp/bench_gpu_check_data}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
part() {  # part NAME SECONDS CMD...: run CMD with a time limit, its output into OUT
  local name=$1 limit=$2; shift 2
  echo "== $name ($(date -u +%H:%M:%S) UTC): $*" | tee -a "$OUT"
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT.log" | grep -v '^\[' >> "$OUT"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || echo "!! $name failed (exit $rc; log: $OUT.log)" | tee -a "$OUT"
}
{
  echo "# bench GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, gsplat; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gsplat', gsplat.__version__)"
  git rev-parse --short HEAD 2>/dev/null
} >> "$OUT" 2>&1
part "gsplat parity (pytest -m cuda)" 120 python -m pytest -q -m cuda tests/test_splat.py
part "perf paper ViT-S/14, batch 14 (first: generates the scenes)" 150 python -m bench perf paper --backbone dinov2_vits14 --device cuda \
  --batch 14 --warmup 1 --steps 3 --data-dir "$DATA"
part "perf paper ViT-B/14, batch 14 (accumulate 2 x 7)" 120 python -m bench perf paper --backbone dinov2_vitb14 \
  --device cuda --batch 14 --warmup 1 --steps 3 --data-dir "$DATA" method.optim.accumulate=2
part "perf train 32 / tf32 / bf16-mixed" 60 python -m bench perf train --ranks 1 --precision 32 tf32 bf16-mixed \
  --variants --steps 20 --warmup 3 device=cuda
echo "tables: $OUT"
