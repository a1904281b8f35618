"""Which instruction-set path the ``cpu`` kernels run: the Python face of csrc/cpu_isa.h.

Levels, cumulative (each needs every instruction of the ones before it):

- ``scalar``: baseline x86-64 (SSE2) code the compiler vectorises; the only path off x86-64 or off GCC;
- ``avx2``: + AVX2, FMA, F16C;
- ``avx512``: + AVX-512 F, BW, DQ, VL;
- ``avx512_bf16``: + AVX512_BF16 (``vdpbf16ps``): MaxSim's bf16 screen and the roofline's bf16 probe.

Every CPU kernel resolves its path in C++ from the same answer, so the kernels, the tests (tests/isa.py), the mutation
gate and the benchmarks agree on what runs here:

- ``REATT_CPU_ISA`` = ``auto`` (default: the best path the CPU runs) or a level name: forces that path in every CPU
  kernel that has it (a kernel without a bf16 path runs ``avx512`` for ``avx512_bf16``); a level the CPU lacks is an
  error naming the missing instructions. The tests use it to run every path on one machine.
- ``REATT_CPU_ISA_CAP`` = a level name: the extension behaves as on a CPU whose best level is that one. On an AVX-512
  machine, ``REATT_CPU_ISA_CAP=avx2`` runs, tests and reports exactly what an AVX2-only CPU would.
"""
from __future__ import annotations

import os

from .. import _ext

LEVELS = ("scalar", "avx2", "avx512", "avx512_bf16")

# The best path each CPU kernel has (csrc: the `top` argument of cpu_isa::resolve).
KERNELS = {
    "maxsim": "avx512_bf16",
    "residual_maxsim": "avx512",
    "centroid_interaction": "avx512",
    "reader_teacher": "avx512",
    "plaid_search": "avx512_bf16",
    "roofline": "avx512_bf16",
}


def requested() -> str:
    """``REATT_CPU_ISA`` (``auto`` when unset or empty)."""
    return os.environ.get("REATT_CPU_ISA", "auto") or "auto"


def for_kernel(kernel: str) -> str:
    """The requested path, lowered to the best one ``kernel`` has (``avx512_bf16`` -> ``avx512`` where the kernel has
    no bf16 path)."""
    want = requested()
    top = KERNELS[kernel]
    if want in LEVELS and LEVELS.index(want) > LEVELS.index(top):
        return top
    return want


def info() -> dict:
    """``{best, detected, cap, features, levels, missing}`` from the extension (csrc/cpu_isa.h), or a scalar-only
    answer with the import error when the extension is not built."""
    ext = _ext.ext()
    if ext is None or not hasattr(ext, "cpu_isa_info"):
        why = "reatt_kernels._C is not built" if ext is None else "reatt_kernels._C has no cpu_isa_info (rebuild)"
        return dict(best="scalar", detected="scalar", cap=None, features={}, levels=list(LEVELS),
                    missing={lv: (why if lv != "scalar" else "") for lv in LEVELS})
    return dict(ext.cpu_isa_info())


def paths(kernel: str) -> list[str]:
    """Every path ``kernel`` has, lowest first."""
    return list(LEVELS[: LEVELS.index(KERNELS[kernel]) + 1])


def runnable(level: str) -> bool:
    """Whether this CPU (under ``REATT_CPU_ISA_CAP``) runs ``level``."""
    return LEVELS.index(level) <= LEVELS.index(info()["best"])


def missing(level: str) -> str:
    """The instructions ``level`` needs that this CPU lacks (or that ``REATT_CPU_ISA_CAP`` hides); "" if it runs."""
    return info()["missing"].get(level, "")
