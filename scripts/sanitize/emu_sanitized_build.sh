#!/usr/bin/env bash
# Build a sanitized (or otherwise variant) reatt_kernels._C_emu into its own folder and print the path of the module.
# Usage: scripts/sanitize/emu_sanitized_build.sh address,undefined|thread|none BUILD_DIR
#        REATT_EMU_CXX_FLAGS="-mfma -ffp-contract=fast" scripts/sanitize/emu_sanitized_build.sh none build/emu-fma   (numerics)
# (used by scripts/ci/20-cuda-emu-sanitizers.sh and scripts/sanitize/tsan_emu.sh; the in-tree _C/_C_emu are left alone).
set -euo pipefail
cd "$(dirname "$0")/../.."
SAN=$1
[ "$SAN" = none ] && SAN=
BUILD=$(mkdir -p "$2" && cd "$2" && pwd)
PY=${PY:-python}
PYBIND11_DIR=$("$PY" -c "import pybind11; print(pybind11.get_cmake_dir())")
GEN=()
if "$PY" -c "import ninja" 2>/dev/null || command -v ninja >/dev/null; then GEN=(-G Ninja); fi
LOCK=()
# The lock serialises builds on a shared development machine; REATT_BUILD_LOCK=0 skips it.
if command -v flock >/dev/null && [ "${REATT_BUILD_LOCK:-1}" != 0 ]; then LOCK=(flock /tmp/reatt-build.lock); fi
"${LOCK[@]}" cmake -S . -B "$BUILD" "${GEN[@]}" -DPython_EXECUTABLE="$("$PY" -c "import sys; print(sys.executable)")" -Dpybind11_DIR="$PYBIND11_DIR" \
  -DREATT_CUDA=0 -DREATT_EMU_SANITIZE="$SAN" -DREATT_EMU_CXX_FLAGS="${REATT_EMU_CXX_FLAGS:-}" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$BUILD/lib" >&2
"${LOCK[@]}" cmake --build "$BUILD" --target _C_emu -j "${REATT_BUILD_JOBS:-2}" >&2
ls "$BUILD"/lib/_C_emu*.so
