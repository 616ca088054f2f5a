#!/usr/bin/env bash
# Check deploy-prune's CUDA paths on this GPU machine in about five minutes (docs/backends.md):
#   benchmarks/device_check.sh [SUMMARY.json] [--cpu-smoke] [--budget-s S] [--work DIR]
# Writes SUMMARY.json (default benchmarks/results/device_check.json) and SUMMARY.md beside it;
# what it runs: benchmarks/device_check.py. Python: $DEVICE_CHECK_PYTHON, else the project's
# .venv, else python3 (a lent GPU machine gets the checkout without its .venv).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${DEVICE_CHECK_PYTHON:-$root/.venv/bin/python}"
if [ -z "${DEVICE_CHECK_PYTHON:-}" ] && ! "$py" -c '' 2>/dev/null; then
    echo "[device-check] no working $py: using python3" >&2
    py=python3
fi
site=""
if [ -d "$root/.whl" ] && ! "$py" -c 'import torch_pruning, onnx2torch, pydantic' 2>/dev/null; then
    # `make device-wheels`: the packages the GPU machine's Python lacks
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/device-check-site \
        "$root"/.whl/*.whl && site=/tmp/device-check-site
fi
export PYTHONPATH="$root${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$py" "$root/benchmarks/device_check.py" "$@"
