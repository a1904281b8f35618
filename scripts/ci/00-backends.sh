#!/usr/bin/env bash
# CI must fail, not skip, when the C++ CPU backend, the Triton interpreter or the CUDA emulation is missing: without them
# the suite's cpu, triton and cuda_emu cases would turn into skips and pass silently. (A missing GPU is the only acceptable skip.) ~5 s.
set -euo pipefail
cd "$(dirname "$0")/../.."
TRITON_INTERPRET=1 "${PY:-python}" - <<'PY'
import reatt_kernels as rk

ab = rk.available_backends()
print("available_backends:", ab)
bad = {name: ab[name] for name in ("torch", "cpu", "triton", "cuda_emu") if ab[name] != "ok"}
if bad:
    raise SystemExit(f"backends unavailable on CI (they must not become skips): {bad}")
PY
