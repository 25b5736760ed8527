#!/usr/bin/env bash
# The first GPU session, in one command (under 10 minutes on one GPU):
#   1. install the cuda extra (CuPy; PyTorch too if missing, for the comparison)
#   2. pytest -m cuda                            every device test on CuPy
#   3. numpygpt gradcheck --device cuda          every backward pass on CuPy, float64
#   4. benchmarks/gpu_check.py                   GPT-2 small train step and generation, CuPy vs PyTorch CUDA
# and one table in benchmarks/out/gpu_check/table.md (the logs beside it). A step that fails
# is recorded in the table and the next one still runs; the exit code is 1 if any failed.
# Time limits (4.5 + 1.5 + 3 minutes) keep it under 10 minutes after the install; most of a
# first run's time is CuPy compiling its kernels (cached in ~/.cupy/kernel_cache afterwards).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]       PYTHON=... to pick the interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/out/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
status=0
start=$SECONDS

say() { echo "gpu_check [$((SECONDS - start)) s]: $*" >&2; }

say "installing the cuda extra"
if ! "$PY" -m pip install -q -e '.[cuda,test]' >"$OUT/install.log" 2>&1; then
    say "pip install failed (offline?): using what is installed; see $OUT/install.log"
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
    timeout 240 "$PY" -m pip install -q torch >>"$OUT/install.log" 2>&1 || say "no PyTorch: the table has numpygpt alone"
fi
"$PY" -c "from numpygpt import backend; backend.set_device('cuda')" || { say "no usable CUDA device"; exit 1; }

say "pytest -m cuda"
timeout 270 "$PY" -m pytest -m cuda -q -p no:cacheprovider >"$OUT/pytest_cuda.log" 2>&1 || status=1
tail -n 1 "$OUT/pytest_cuda.log" >&2

say "numpygpt gradcheck --device cuda"
timeout 90 "$PY" -m numpygpt gradcheck --device cuda >"$OUT/gradcheck.log" 2>&1 || status=1
tail -n 1 "$OUT/gradcheck.log" >&2

say "GPT-2 small: train step and generation against PyTorch"
timeout 180 "$PY" benchmarks/gpu_check.py --device cuda --pytest-log "$OUT/pytest_cuda.log" \
    --gradcheck-log "$OUT/gradcheck.log" --out "$OUT/table.md" || status=1
say "done (exit $status): $OUT/table.md"
exit $status
