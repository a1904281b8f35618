#!/usr/bin/env bash
# CI: the cpu kernels on an AVX2-only CPU, emulated, where the CI machine itself has AVX-512. QEMU's user mode
# (`qemu-x86_64 -cpu max`, Debian's qemu-user 7.2) runs AVX2 and FMA but no AVX-512, and reports so through CPUID. So
# under it the extension's own detection must find the avx2 level, every ISA-forced oracle test of every cpu kernel
# runs its avx2 and scalar paths (tests marked isa_path, tests/isa.py) and skips the AVX-512 ones by name, and any
# AVX-512 instruction that leaked into code an AVX2 CPU runs dies with SIGILL. ~2 minutes (TCG runs Python ~10x slower).
#
# The other direction has no tool here: QEMU 7.2 raises SIGILL on the first AVX-512 instruction (checked with a
# one-line vaddps zmm program), no QEMU on Debian's or PyPI's registries implements AVX-512, and Intel SDE is not on any
# registry this machine reaches. An AVX2-only CI machine says so in the ISA line at the end of .ci/run
# (docs/testing.md, "ISA paths").
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python}
best=$("$PY" -c "import reatt_kernels.cpu.isa as i; print(i.info()['detected'])")
case "$best" in
  avx512|avx512_bf16) ;;
  *) echo "this CPU's best level is $best: its avx2 and scalar paths already ran natively; nothing to emulate"; exit 0 ;;
esac
if ! command -v qemu-x86_64 >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian's qemu-user (for qemu-x86_64)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-user >/tmp/reatt-qemu-apt.log 2>&1 || {
      tail -5 /tmp/reatt-qemu-apt.log; echo "FAILED: apt-get install qemu-user (log above)"; exit 1; }
  else
    echo "FAILED: qemu-x86_64 is missing and cannot be installed here (not root, or no apt-get): install qemu-user"
    exit 1
  fi
fi
under=$(qemu-x86_64 -cpu max "$PY" -c "import reatt_kernels.cpu.isa as i; print(i.info()['detected'])")
[ "$under" = avx2 ] || { echo "FAILED: under qemu-x86_64 -cpu max the extension detects '$under', expected avx2"; exit 1; }
echo "under qemu-x86_64 -cpu max ($(qemu-x86_64 --version | head -1)): the extension detects $under"
# REATT_UNDER_QEMU: /proc/cpuinfo still describes the host there, so the test comparing it with the detection skips.
REATT_UNDER_QEMU=1 exec qemu-x86_64 -cpu max "$PY" -m pytest -q -p no:cacheprovider tests -m "isa_path" \
  tests/tooling/test_isa.py
