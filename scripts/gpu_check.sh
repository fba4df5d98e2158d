#!/usr/bin/env bash
# The GPU half of issue 15, as one script for a machine with an NVIDIA GPU (under ~8 minutes):
# VGG-16 and ResNet-50 (benchmarks/zoo.py, random weights: latency does not depend on them) at 2x
# and 4x fewer MACs (uniform Tucker-2), timed by `rankdown bench --device cuda` in bfloat16 at
# batch 1 and 32: eager, CUDA graphs, torch.compile. JSON goes to $OUT (or runs/gpu), for
# docs/benchmarks.md (`python benchmarks/gpu_check.py table`).
#
#   bash scripts/gpu_check.sh            # uses a python whose torch sees CUDA, else makes .venv-gpu
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"

PY=""
for cand in python3 .venv-gpu/bin/python; do
  if command -v "$cand" >/dev/null && "$cand" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    PY=$cand; break
  fi
done
if [ -z "$PY" ]; then
  echo "gpu_check: no torch with CUDA found; installing torch==2.14.1 (CUDA build) into .venv-gpu" >&2
  python3 -m venv .venv-gpu
  .venv-gpu/bin/pip install -q --disable-pip-version-check torch==2.14.1
  PY=.venv-gpu/bin/python
fi
"$PY" -c "import rankdown" 2>/dev/null || "$PY" -m pip install -q --disable-pip-version-check -e . \
  || { echo "gpu_check: could not install rankdown beside $PY" >&2; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt" || true
timeout 480 "$PY" benchmarks/gpu_check.py run --out "$OUT"
echo "gpu_check: results in $OUT" >&2
