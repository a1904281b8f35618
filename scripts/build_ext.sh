#!/usr/bin/env bash
# Rebuild reatt_kernels._C in place (incremental CMake build), serialised by a lock so parallel builds never collide.
# Usage: scripts/build_ext.sh            (REATT_CUDA=auto: CUDA when nvcc is found)
#        REATT_CUDA=0 scripts/build_ext.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
exec flock /tmp/reatt-build.lock "$PY" setup.py -q build_ext --inplace
