"""Every instruction-set path of a `cpu` kernel, forced once against the float64 oracle, and a record of which ran.

A test of a CPU kernel that has per-ISA paths takes ``isa`` from :func:`isa_params` (each param carries the mark
``isa_path("<kernel>")``); its body calls ``force_isa(isa)`` (a fixture that sets ``REATT_CPU_ISA``). A path
this CPU cannot run is skipped with the instructions it lacks (csrc/cpu_isa.h, so ``REATT_CPU_ISA_CAP`` counts too).
tests/conftest.py collects the outcomes and prints one line per run: the ISA paths tested, and the paths not
testable on this CPU; with ``REATT_ISA_REPORT=<file>`` it merges them into that JSON file (what .ci/run prints at its
end, through scripts/ci/isa_report.py).
"""
from __future__ import annotations

import pytest

from reatt_kernels.cpu import isa as cpu_isa

SKIP_PREFIX = "not testable on this CPU"


def isa_params(kernel: str) -> list:
    """One ``pytest.param`` per path of ``kernel`` (lowest first), each skipped where this CPU cannot run it."""
    out = []
    for level in cpu_isa.paths(kernel):
        marks = [pytest.mark.isa_path(kernel)]
        if not cpu_isa.runnable(level):
            marks.append(pytest.mark.skip(reason=f"{SKIP_PREFIX}: {kernel} {level} needs {cpu_isa.missing(level)}"))
        out.append(pytest.param(level, marks=marks, id=level))
    return out


# ---- the per-run record (tests/conftest.py fills it; .ci/run prints the merged one) ------------------------------------
# results: kernel -> {level: "passed" | "failed" | "not testable: <missing instructions>"}
def _lv(kv):
    return cpu_isa.LEVELS.index(kv[0]) if kv[0] in cpu_isa.LEVELS else 99


def merge_isa_results(into: dict, new: dict) -> dict:
    """Merge one run's record into another: a failure anywhere stays, a pass beats "not testable"."""
    for k, r in new.items():
        m = into.setdefault(k, {})
        for lv, v in r.items():
            if m.get(lv) == "failed" or (m.get(lv) == "passed" and v.startswith("not testable")):
                continue
            m[lv] = v
    return into


def isa_summary(results: dict) -> str:
    """One line: the ISA paths tested, and those not testable here (shared with scripts/ci/isa_report.py)."""
    tested = [f"{k} {{{', '.join(lv for lv, v in sorted(r.items(), key=_lv) if v == 'passed')}}}"
              for k, r in sorted(results.items()) if any(v == "passed" for v in r.values())]
    failed = [f"{k} {lv}" for k, r in sorted(results.items()) for lv, v in sorted(r.items(), key=_lv) if v == "failed"]
    untested: dict = {}
    for k, r in sorted(results.items()):
        for lv, v in sorted(r.items(), key=_lv):
            if v.startswith("not testable"):
                untested.setdefault((lv, v.split(": ", 1)[1]), []).append(k)
    line = "ISA paths tested: " + ("; ".join(tested) or "none")
    line += " | not testable on this CPU: " + ("; ".join(
        f"{lv} of {', '.join(ks)} (needs {why})" for (lv, why), ks in untested.items()) or "none")
    if failed:
        line += " | FAILED: " + ", ".join(failed)
    return line
