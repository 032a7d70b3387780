#!/usr/bin/env bash
# GPU check: training images/s and model-FLOP utilisation of the paper preset (ResNeXt-50 at
# 400x400, bf16, channels-last, data on the GPU) beside the naive fp32 loop, on one card, in
# under 5 minutes. Figures go to OUT_DIR/gpu_train.json (+ nvidia-smi.txt, log.txt).
#
#   benchmarks/gpu.sh OUT_DIR [extra gpu_train.py arguments]      # or: OUT=DIR benchmarks/gpu.sh
#   benchmarks/gpu.sh /tmp/smoke --device cpu --steps 2 --batch-size 2 --model plain_cnn --input-size 64
#
# By default it runs eager first (the number to quote), then, time permitting, torch.compile
# (compile time reported apart) into OUT_DIR/gpu_train_compile/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-benchmarks/results/gpu}}"
shift || true
mkdir -p "$OUT_DIR"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv 2>/dev/null \
    || echo "no nvidia-smi"; } > "$OUT_DIR/nvidia-smi.txt"
# eager: ours (30 timed steps) + naive (5 timed steps); about 1-2 minutes on an H100
timeout 200 "$PY" benchmarks/gpu_train.py --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/log.txt"
rc=${PIPESTATUS[0]}
# torch.compile, optional: only on a GPU, only with the time left
if [ "$rc" = 0 ] && [ -z "${NO_COMPILE:-}" ] && "$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
   && [[ " $* " != *" --device cpu "* ]]; then
  timeout 150 "$PY" benchmarks/gpu_train.py --out "$OUT_DIR/gpu_train_compile" --compile --skip-naive "$@" \
    > "$OUT_DIR/log_compile.txt" 2>&1 || echo "torch.compile run did not finish (see log_compile.txt)"
fi
exit "$rc"
