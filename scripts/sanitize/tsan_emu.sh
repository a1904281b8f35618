#!/usr/bin/env bash
# ThreadSanitizer run of the CUDA kernels under CPU emulation: every CUDA thread is an OS thread, so a shared-memory
# race between barriers (a missing __syncthreads, a read of a cp.async destination before its wait and barrier) is a
# data race TSan reports. Not in CI (TSan slows the emulator ~5-15x; see docs/testing.md, "Testing the CUDA kernels on CPU").
# Usage: scripts/sanitize/tsan_emu.sh [pytest args]   (default: the emulated maxsim tests)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python}
LIB=$(PY="$PY" scripts/sanitize/emu_sanitized_build.sh thread build/emu-tsan)
export LD_PRELOAD="$(gcc -print-file-name=libtsan.so) $(gcc -print-file-name=libstdc++.so)"
# torch and libgomp are not instrumented; only the emulated kernels' accesses are checked.
export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 report_signal_unsafe=0 ${TSAN_OPTIONS:-}"
export REATT_EMU_LIB="$LIB" OMP_NUM_THREADS=1
"$PY" -c "import reatt_kernels._ext as e; m = e.emu(); assert m is not None, e.emu_import_error(); \
assert m.build_info()['tsan'], 'REATT_EMU_LIB is not the TSan build'"
if [ $# -eq 0 ]; then
  set -- tests/kernels/test_cuda_emu.py tests/kernels/test_maxsim.py tests/kernels/test_maxsim_cuda.py -k "cuda_emu and not misuse"
fi
exec "$PY" -m pytest -q -p no:cacheprovider --capture=sys "$@"
