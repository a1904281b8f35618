#!/usr/bin/env bash
# CI (issue 19): the CUDA kernels under emulation in two more builds of reatt_kernels._C_emu, each in its own folder.
#  1. ThreadSanitizer (scripts/sanitize/tsan_emu.sh): tests/kernels/test_cuda_emu_races.py runs every CUDA kernel (maxsim forward,
#     backward with the atomic and the deterministic dd, reader_teacher, distill_kl, residual_maxsim) on small shapes
#     where blocks collide, with 3 blocks resident at once; plus the emulator's own block and barrier tests. A data race
#     (a plain `+=` where an atomic belongs, a shared read before its barrier) is a report and fails the check.
#  2. Numerics: multiply-adds contracted into FMA like nvcc's default (-mfma -ffp-contract=fast) and the mma summing
#     pairwise (REATT_EMU_MMA_ORDER=pairwise; the tilings matrix still rotates all three orders): the races file and the
#     emulated tilings matrix in fp32 (FFMA path) and fp16 (mma path) must pass within their written bounds (bf16 takes
#     the fp16 tile geometry). Skipped (with a message) on a CPU without FMA.
# The default build's emulated tests (concurrent blocks, poisoned shared memory, the device-shape sweep) run in pytest.
# Time: see the README's testing section (measured on the shared 2-core machine under load).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python}
t0=$(date +%s)
PY="$PY" scripts/sanitize/tsan_emu.sh tests/kernels/test_cuda_emu_races.py tests/kernels/test_cuda_emu.py \
  -k "not misuse and not maxsim_within and not mma_m16n8k16 and not ldmatrix and not half_conversions"
t1=$(date +%s)
echo "ThreadSanitizer: $((t1 - t0)) s"
if grep -qw fma /proc/cpuinfo 2>/dev/null; then
  LIB=$(PY="$PY" REATT_EMU_CXX_FLAGS="-mfma -ffp-contract=fast" scripts/sanitize/emu_sanitized_build.sh none build/emu-fma)
  REATT_EMU_LIB="$LIB" "$PY" -c "import reatt_kernels._ext as e; m = e.emu(); assert m is not None, e.emu_import_error(); \
assert m.build_info()['fma'], 'REATT_EMU_LIB is not the FMA build'"
  REATT_EMU_LIB="$LIB" REATT_EMU_MMA_ORDER=pairwise OMP_NUM_THREADS=1 "$PY" -m pytest -q -p no:cacheprovider \
    tests/kernels/test_cuda_emu_races.py tests/kernels/test_maxsim_cuda.py \
    -k "cuda_emu and (races or tilings and (dtype0 or dtype1))"
  echo "FMA + pairwise mma: $(( $(date +%s) - t1 )) s"
else
  echo "SKIP numerics variant: this CPU has no FMA instructions"
fi
