"""Which instruction-set path the cpu kernels run (csrc/cpu_isa.h, reatt_kernels/cpu/isa.py), checked against the
kernel's own CPU's /proc/cpuinfo; REATT_CPU_ISA_CAP, which makes an AVX-512 machine behave as an AVX2-only one; the
one-line record of the ISA paths each test run forced (tests/isa.py, scripts/ci/isa_report.py); and the mutation
gate's rule that a mutant whose code this CPU cannot execute is reported as not runnable, never caught or survived."""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import reatt_kernels as rk
from reatt_kernels.cpu import isa as cpu_isa

from ..isa import isa_summary, merge_isa_results
from ..utils import needs_cpu_ext

ROOT = Path(__file__).resolve().parents[2]
LEVELS = cpu_isa.LEVELS
# csrc/cpu_isa.h's feature names -> /proc/cpuinfo's flag names
CPUINFO_FLAG = {"avx2": "avx2", "fma": "fma", "f16c": "f16c", "avx512f": "avx512f", "avx512bw": "avx512bw",
                "avx512dq": "avx512dq", "avx512vl": "avx512vl", "avx512bf16": "avx512_bf16"}
# What each level needs, written out here from the level table (not read from the code under test).
NEEDS = {"avx2": ["avx2", "fma", "f16c"], "avx512": ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl"]}
NEEDS["avx512_bf16"] = NEEDS["avx512"] + ["avx512bf16"]


def _cpuinfo_flags() -> set:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    pytest.skip("/proc/cpuinfo has no flags line")


@needs_cpu_ext
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the SIMD levels exist on x86-64 only")
@pytest.mark.skipif(bool(os.environ.get("REATT_UNDER_QEMU")),
                    reason="under qemu-x86_64 /proc/cpuinfo describes the host, not the emulated CPU")
def test_detection_agrees_with_proc_cpuinfo(monkeypatch):
    monkeypatch.delenv("REATT_CPU_ISA_CAP", raising=False)
    flags = _cpuinfo_flags()
    info = cpu_isa.info()
    for feat, flag in CPUINFO_FLAG.items():
        assert info["features"][feat] == (flag in flags), f"{feat}: extension says {info['features'][feat]}"
    expect = "scalar"
    for level in ("avx2", "avx512", "avx512_bf16"):
        if not all(CPUINFO_FLAG[f] in flags for f in NEEDS[level]):
            break
        expect = level
    assert info["detected"] == expect == info["best"] and info["cap"] is None
    for level in LEVELS:
        lacking = [f for f in NEEDS.get(level, []) if CPUINFO_FLAG[f] not in flags]
        assert info["missing"][level] == ", ".join(lacking), level


def _run_every_kernel(backend="cpu"):
    """One small call of each cpu kernel that dispatches on the ISA."""
    q, d = torch.randn(2, 5, 24), torch.randn(3, 7, 24)
    rk.maxsim(q, d, backend=backend)
    cent, codes = torch.randn(4, 24), torch.randint(0, 4, (10,), dtype=torch.int32)
    off, cand = torch.tensor([0, 3, 10]), torch.tensor([[0, 1], [1, -1]])
    qm = torch.ones(2, 5, dtype=torch.bool)
    w, packed = torch.randn(24, 16), torch.randint(0, 256, (10, 12), dtype=torch.uint8)
    rk.residual_maxsim(q, cent, w, codes, packed, off, cand, 4, qm, backend=backend)
    rk.centroid_interaction(rk.centroid_score_table(q, cent, qm), codes, off, cand, qm, backend=backend)
    rk.reader_teacher(torch.randn(2, 1, 2, 1, 9), torch.randint(0, 3, (2, 9)), n_docs=3, backend=backend)


@needs_cpu_ext
@pytest.mark.parametrize("cap", LEVELS)
def test_cap_lowers_what_every_kernel_may_run(cap, monkeypatch):
    """Under REATT_CPU_ISA_CAP=<cap>, every cpu kernel runs each level up to min(cap, detected) and refuses each level
    above it by naming the instructions it lacks; "auto" always runs."""
    monkeypatch.setenv("REATT_CPU_ISA_CAP", cap)
    info = cpu_isa.info()
    detected = info["detected"]
    best = LEVELS[min(LEVELS.index(cap), LEVELS.index(detected))]
    assert info["best"] == best and info["cap"] == (None if cap == "avx512_bf16" else cap)
    assert rk._ext.ext().cpu_has_avx512_bf16() == (best == "avx512_bf16")
    assert rk._ext.ext().maxsim_cpu_isa() == best
    for level in ("auto", *LEVELS):
        monkeypatch.setenv("REATT_CPU_ISA", level)
        if level == "auto" or LEVELS.index(level) <= LEVELS.index(best):
            _run_every_kernel()
        else:
            with pytest.raises(ValueError, match=rf"isa '{level}' cannot run on this CPU: it lacks \w"):
                _run_every_kernel()


@needs_cpu_ext
def test_cap_refuses_a_misspelt_level(monkeypatch):
    monkeypatch.setenv("REATT_CPU_ISA_CAP", "avx3")
    with pytest.raises(ValueError, match=r"REATT_CPU_ISA_CAP must be one of scalar, avx2, avx512, avx512_bf16, got 'avx3'"):
        _run_every_kernel()
    monkeypatch.delenv("REATT_CPU_ISA_CAP")
    monkeypatch.setenv("REATT_CPU_ISA", "neon")
    with pytest.raises(ValueError, match=r"isa must be auto, scalar, avx2, avx512.* got 'neon'"):
        _run_every_kernel()


# ---- the record of each run ------------------------------------------------------------------------------------------
def test_isa_summary_names_tested_and_untestable_paths():
    results = {"maxsim": {"avx2": "passed", "scalar": "passed", "avx512": "not testable: avx512f, avx512bw"},
               "reader_teacher": {"scalar": "passed", "avx512": "not testable: avx512f, avx512bw"}}
    assert isa_summary(results) == ("ISA paths tested: maxsim {scalar, avx2}; reader_teacher {scalar} | not testable "
                                    "on this CPU: avx512 of maxsim, reader_teacher (needs avx512f, avx512bw)")
    merged = merge_isa_results({"maxsim": {"avx2": "failed", "scalar": "passed"}},
                               {"maxsim": {"avx2": "passed", "scalar": "not testable: x"}, "roofline": {"scalar": "passed"}})
    assert merged == {"maxsim": {"avx2": "failed", "scalar": "passed"}, "roofline": {"scalar": "passed"}}
    assert isa_summary(merged).endswith(" | FAILED: maxsim avx2")


def test_isa_report_script(tmp_path):
    script = ROOT / "scripts" / "ci" / "isa_report.py"
    missing = subprocess.run([sys.executable, str(script), str(tmp_path / "none.json")], capture_output=True, text=True)
    assert missing.returncode == 1 and "none (no ISA-forced test wrote" in missing.stdout
    rec = tmp_path / "rec.json"
    rec.write_text(json.dumps({"maxsim": {"scalar": "passed", "avx512": "not testable: avx512f"}}))
    ok = subprocess.run([sys.executable, str(script), str(rec)], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip() == (
        "ISA paths tested: maxsim {scalar} | not testable on this CPU: avx512 of maxsim (needs avx512f)")


# ---- the mutation gate ----------------------------------------------------------------------------------------------
def _gate():
    spec = importlib.util.spec_from_file_location("reatt_gate_for_test", ROOT / "scripts" / "mutation" / "gate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gate_ci_selection_takes_a_mutant_the_cpu_runs():
    g = _gate()
    ms = [dict(name="a", path="x.h", isa="avx512"), dict(name="b", path="x.h"), dict(name="c", path="y.h", ci=True,
          isa="avx512_bf16"), dict(name="d", path="y.h"), dict(name="e", path="z.h", isa="avx2")]
    assert [m["name"] for m in g.ci_selection(ms, "avx2")] == ["b", "c", "e"]
    assert [m["name"] for m in g.ci_selection(ms, "avx512_bf16")] == ["a", "c", "e"]
    assert [m["name"] for m in g.ci_selection(ms, "scalar")] == ["b", "c", "e"]  # z.h has no other: kept, not runnable
    assert [g.runs_here(m, "avx512") for m in ms] == [True, True, False, True, True]
    assert not g.runs_here(ms[4], "scalar")


def test_gate_demands_an_isa_for_mutants_of_isa_only_files(tmp_path, monkeypatch):
    g = _gate()
    real = g.load_mutants()
    for m in real:
        need = g.ISA_FILES.get(m["path"])
        if need:
            assert m.get("isa") == need, m["name"]
    dummies = [dict(issue13=True, name=f"m{i}", path="p", old="o", new="n", tests=[]) for i in range(7)]
    (tmp_path / "bad.py").write_text(f"MUTANTS = {dummies!r} + [dict(name='x', path='csrc/maxsim/maxsim_cpu_avx512.h', "
                                     "old='o', new='n', tests=[])]\n")
    monkeypatch.setattr(g, "HERE", tmp_path)
    with pytest.raises(SystemExit, match=r"runs only on avx512 CPUs and up: declare isa='avx512'"):
        g.load_mutants()
    (tmp_path / "bad.py").write_text(f"MUTANTS = {dummies!r} + [dict(name='x', path='p', isa='sse4', old='o', new='n', "
                                     "tests=[])]\n")
    with pytest.raises(SystemExit, match=r"isa must be one of"):
        g.load_mutants()
