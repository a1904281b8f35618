#!/usr/bin/env bash
# ThreadSanitizer run of the CUDA kernels under CPU emulation: every CUDA thread is an OS thread, so a shared-memory
# race between barriers (a missing __syncthreads, a read of a cp.async destination before its wait and barrier) is a
# data race TSan reports. In CI: scripts/ci/25-cuda-emu-races.sh (small shapes: tests/kernels/test_cuda_emu_races.py).
# Usage: scripts/sanitize/tsan_emu.sh [pytest args]   (default: every CUDA kernel on small shapes + the emulator self-tests)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python}
# REATT_EMU_TSAN_LIB: an already built TSan _C_emu (the mutation gate builds it outside its test timeout).
LIB=${REATT_EMU_TSAN_LIB:-$(PY="$PY" scripts/sanitize/emu_sanitized_build.sh thread build/emu-tsan)}
export LD_PRELOAD="$(gcc -print-file-name=libtsan.so) $(gcc -print-file-name=libstdc++.so)"
# torch and libgomp are not instrumented; only the emulated kernels' accesses are checked.
export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 report_signal_unsafe=0 ${TSAN_OPTIONS:-}"
export REATT_EMU_LIB="$LIB" OMP_NUM_THREADS=1
"$PY" -c "import reatt_kernels._ext as e; m = e.emu(); assert m is not None, e.emu_import_error(); \
assert m.build_info()['tsan'], 'REATT_EMU_LIB is not the TSan build'"
if [ $# -eq 0 ]; then
  set -- tests/kernels/test_cuda_emu_races.py tests/kernels/test_cuda_emu.py -k "not misuse"
fi
exec "$PY" -m pytest -q -p no:cacheprovider --capture=sys "$@"
