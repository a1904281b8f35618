#!/usr/bin/env bash
# CI: the CUDA kernels under CPU emulation (reatt_kernels._C_emu) built with AddressSanitizer + UndefinedBehaviorSanitizer
# in a separate build folder, then the slow emulated tests (marker `sanitize`, see below). Any report fails the check:
# ASan catches a shared-memory size formula that is too small (the dynamic smem buffer is allocated at exactly the
# launch's size), out-of-bounds global reads and writes; UBSan misaligned float4/uint4 accesses, overflow, bad shifts.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python}
LIB=$(PY="$PY" scripts/sanitize/emu_sanitized_build.sh address,undefined build/emu-asan)
# Python is not built with ASan: its runtime must be loaded first. Leaks are Python's and torch's, not the kernels'.
# libstdc++ too: ASan intercepts __cxa_throw and must find the real one at start-up (python itself is C).
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export REATT_EMU_LIB="$LIB" OMP_NUM_THREADS=1
"$PY" -c "import reatt_kernels._ext as e; m = e.emu(); assert m is not None, e.emu_import_error(); \
assert m.build_info()['asan'], 'REATT_EMU_LIB is not the ASan build'"
# --capture=sys: a sanitizer report goes to fd 2 directly and must not vanish with pytest's captured output on abort.
# `-m sanitize` (tests/conftest.py): the slow emulated tests, which make ci runs here only (never also plainly); the
# fast tier's emulated tests run plainly in make test. Exit status 5 (nothing selected) fails the check.
exec "$PY" -m pytest -q -p no:cacheprovider --capture=sys tests -m sanitize
