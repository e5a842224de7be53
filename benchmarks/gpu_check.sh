#!/usr/bin/env bash
# The GPU check (issues 13 and 20): benchmarks/gpu_check.py runs every section (correctness first, then
# throughput; `pytest -m gpu` is one of them), each in its own time budget, all of them within 8 minutes
# on one GPU; then benchmarks/gpu_report.py prints the summary table and, after a run on a GPU, writes it
# into docs/gpu.md between its gpu_check markers. Needs no network (data/ from `make data`).
#
#   benchmarks/gpu_check.sh                      # on a GPU machine; figures in runs/gpu_check/gpu_check.json
#   benchmarks/gpu_check.sh --device cpu --quick # a dry run of every section on a CPU (pytest -m gpu skips)
#
# Arguments go to gpu_check.py (--only SECTION..., --budget-scale F, --repeats N).
# Environment: PYTHON (default .venv/bin/python), OUT (default runs/gpu_check).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/gpu_check}
# OMP_NUM_THREADS: as set, else 4 on a host of 8 cores or more and 1 below (gpu_common.default_threads).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, whatever the venv has installed
mkdir -p "$OUT"
start=$SECONDS

if [ ! -f data/FashionMNIST/raw/train-images-idx3-ubyte ]; then
    echo "warning: data/FashionMNIST missing (run make data): the sections that run searches will fail" >&2
fi

"$PY" benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.txt" | grep -v '^Traceback\|^  '
status=${PIPESTATUS[0]}

echo
if "$PY" -c 'import json, sys; sys.exit(json.load(open(sys.argv[1]))["device_type"] != "cuda")' \
        "$OUT/gpu_check.json" 2>/dev/null; then
    "$PY" benchmarks/gpu_report.py "$OUT/gpu_check.json" --write-doc docs/gpu.md || status=1
else
    "$PY" benchmarks/gpu_report.py "$OUT/gpu_check.json" || status=1  # a dry run: printed, never the doc
fi
echo "total $((SECONDS - start)) s; exit $status; figures in $OUT/gpu_check.json"
exit "$status"
