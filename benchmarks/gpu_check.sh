#!/usr/bin/env bash
# The GPU check (issue 13): `pytest -m gpu`, then benchmarks/gpu_check.py's measurements and summary
# table. Under 9 minutes on one GPU; needs no network (data/ from `make data`, synthetic tensors).
#
#   benchmarks/gpu_check.sh                      # on a GPU machine; figures in runs/gpu_check/gpu_check.json
#   benchmarks/gpu_check.sh --device cpu --quick # a dry run of the measurements on a CPU (pytest -m gpu skips)
#
# Environment: PYTHON (default .venv/bin/python), OUT (default runs/gpu_check).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/gpu_check}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
mkdir -p "$OUT"
status=0
start=$SECONDS

if [ ! -f data/FashionMNIST/raw/train-images-idx3-ubyte ]; then
    echo "warning: data/FashionMNIST missing (run make data): the end-to-end sections will fail" >&2
fi
"$PY" - <<'PY' 2>&1 | tee "$OUT/device.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "gpus", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
PY

echo "== pytest -m gpu (limit 180 s)"
timeout 180 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== measurements (limit 330 s)"
timeout 330 "$PY" benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.txt" | grep -v '^Traceback\|^  '
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "pytest -m gpu: $(tail -1 "$OUT/pytest_gpu.txt")"
echo "total $((SECONDS - start)) s; exit $status; figures in $OUT/gpu_check.json"
exit $status
