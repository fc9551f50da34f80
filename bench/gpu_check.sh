#!/usr/bin/env bash
# The GPU checks, run as one script on a lent GPU machine (see docs/BENCHMARKS.md):
#   bash bench/gpu_check.sh OUTDIR
# Wheels the machine lacks travel in .whl/ (diffusers, pydantic and their small needs).
set -uo pipefail
out=${1:-/tmp/gpu-check}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 SDMERGE_HASH_CACHE=/tmp/sdmerge-hashes.sqlite3
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
python3 bench/preview_bench.py --cache-dir /tmp/preview-cache --json "$out/preview.json" 2>&1 | grep -v -i deprecat | tee "$out/preview.log"
python3 -m pytest -q -p no:cacheprovider tests/test_nonlinear_merge.py -k gpu 2>&1 | tail -5 | tee "$out/nonlinear_gpu.log"
python3 bench/gpu_merge_bench.py --n 4 --cache-dir /tmp/gpu-merge --json "$out/gpu_merge.json" 2>&1 | tee "$out/gpu_merge.log"
