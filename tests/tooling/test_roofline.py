"""The CPU roofline: the C probes (``reatt_kernels._C.cpu_peak_flops`` / ``cpu_read_bandwidth``, csrc/roofline_cpu.cpp),
``roofline()`` built on them, and the floor and bound every benchmark row carries. Nothing here asserts a speed: the
probes run for 10 ms and their numbers are only checked to be positive and finite."""
from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from reatt_kernels import _ext, build_info
from reatt_kernels.bench import util
from reatt_kernels.cpu import isa as cpu_isa

C = _ext.ext()
needs_probes = pytest.mark.skipif(C is None or not hasattr(C, "cpu_peak_flops"),
                                  reason="reatt_kernels._C (with the roofline probes) is not built")
from ..isa import isa_params  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_maxsim.py"
MIB = 1 << 20


def _positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def _threads(n: int) -> int:
    """Threads a probe reports for n asked: n with OpenMP, else 1."""
    return n if build_info().get("openmp") else 1


# ---- the C probes -------------------------------------------------------------------------------------------------
@needs_probes
@pytest.mark.parametrize("n_threads", [1, 2])
def test_fma32_peak_is_a_positive_rate(n_threads):
    r = C.cpu_peak_flops("fma32", n_threads, 0.01)
    assert _positive(r["GFLOPs"]), r
    assert r["isa"] in ("avx512", "avx2", "scalar") and r["threads"] == _threads(n_threads)
    assert "FLOP" in r["method"] and math.isfinite(r["checksum"])


@needs_probes
def test_bf16dp_runs_exactly_where_the_cpu_has_avx512_bf16():
    if C.cpu_has_avx512_bf16():
        r = C.cpu_peak_flops("bf16dp", 1, 0.01)
        assert _positive(r["GFLOPs"]) and r["isa"] == "avx512_bf16" and "vdpbf16ps" in r["method"], r
    else:
        with pytest.raises(ValueError, match=r"bf16dp.*lacks avx512_bf16"):
            C.cpu_peak_flops("bf16dp", 1, 0.01)


@needs_probes
@pytest.mark.parametrize("isa", isa_params("roofline"))
def test_every_probe_path_runs_exactly_as_asked(isa):
    """Each ISA path of the probes, forced: it reports that path and a positive rate, or (bf16dp below its level)
    refuses by name. `auto` runs the best path this CPU has."""
    fma_isa = "avx512" if isa == "avx512_bf16" else isa
    r = C.cpu_peak_flops("fma32", 1, 0.01, isa=fma_isa)
    assert _positive(r["GFLOPs"]) and r["isa"] == fma_isa, r
    b = C.cpu_read_bandwidth(MIB, 1, 0.01, isa=fma_isa)
    assert _positive(b["GBps"]) and f"({fma_isa} loads" in b["method"], b
    if isa == "avx512_bf16":
        r = C.cpu_peak_flops("bf16dp", 1, 0.01, isa=isa)
        assert _positive(r["GFLOPs"]) and r["isa"] == "avx512_bf16", r
    else:
        with pytest.raises(ValueError, match=r"bf16dp.* runs only isa 'avx512_bf16'|lacks avx512_bf16"):
            C.cpu_peak_flops("bf16dp", 1, 0.01, isa=isa)
    best = cpu_isa.info()["best"]
    assert C.cpu_peak_flops("fma32", 1, 0.01)["isa"] == ("avx512" if best == "avx512_bf16" else best)


@needs_probes
def test_probe_refuses_a_path_the_cpu_lacks(monkeypatch):
    monkeypatch.setenv("REATT_CPU_ISA_CAP", "avx2")
    assert cpu_isa.info()["best"] == "avx2" and not C.cpu_has_avx512_bf16()
    with pytest.raises(ValueError, match=r"isa 'avx512' cannot run on this CPU: it lacks avx512f.*REATT_CPU_ISA_CAP"):
        C.cpu_peak_flops("fma32", 1, 0.01, isa="avx512")
    with pytest.raises(ValueError, match=r"isa must be auto, scalar, avx2, avx512 .*got 'sse9'"):
        C.cpu_read_bandwidth(MIB, 1, 0.01, isa="sse9")
    monkeypatch.setenv("REATT_CPU_ISA_CAP", "avx3")
    with pytest.raises(ValueError, match=r"REATT_CPU_ISA_CAP must be one of"):
        C.cpu_peak_flops("fma32", 1, 0.01)


@needs_probes
@pytest.mark.parametrize("n_threads", [1, 2])
def test_read_bandwidth_is_a_positive_rate(n_threads):
    r = C.cpu_read_bandwidth(MIB + 100, n_threads, 0.01)
    assert _positive(r["GBps"]), r
    assert r["bytes"] == MIB  # rounded down to whole 4 KiB pages: the bytes one pass reads
    assert r["threads"] == _threads(n_threads) and "streaming read" in r["method"]


@needs_probes
@pytest.mark.parametrize("call,match", [
    (lambda: C.cpu_peak_flops("fp64", 1, 0.01), r"kind must be 'bf16dp' or 'fma32', got 'fp64'"),
    (lambda: C.cpu_peak_flops("fma32", 0, 0.01), r"n_threads must be >= 1, got 0"),
    (lambda: C.cpu_peak_flops("fma32", 1, 0.0), r"seconds must be"),
    (lambda: C.cpu_peak_flops("fma32", 1, float("nan")), r"seconds must be"),
    (lambda: C.cpu_read_bandwidth(MIB - 1, 1, 0.01), r"n_bytes must be >= 1 MiB"),
    (lambda: C.cpu_read_bandwidth(MIB, -1, 0.01), r"n_threads must be >= 1, got -1"),
    (lambda: C.cpu_read_bandwidth(MIB, 1, -1.0), r"seconds must be"),
], ids=["kind", "flops-threads", "flops-seconds", "flops-seconds-nan", "bytes", "read-threads", "read-seconds"])
def test_probe_arguments_are_checked_by_name(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@needs_probes
def test_cpu_probes_pick_the_dot_ceiling():
    p = util.cpu_probes(1, MIB, 0.01)
    assert p["dot_kind"] == ("bf16dp" if C.cpu_has_avx512_bf16() else "fma32")
    assert p["dot_method"].startswith(p["dot_kind"])
    for key in ("dot_TFLOPs", "fma32_TFLOPs", "read_bandwidth_GBps"):
        assert _positive(p[key]), (key, p)


def test_cpu_probes_without_the_extension(monkeypatch):
    monkeypatch.setattr(_ext, "ext", lambda: None)
    with pytest.raises(RuntimeError, match=r"_C not available"):
        util.cpu_probes(1, MIB, 0.01)


# ---- roofline() on the CPU, its ceilings stubbed (no timing) -------------------------------------------------------
def _fake_time_fn(fn, device, quantiles=(0.5,), **kw):
    return {util._qname(q): 1.0 for q in quantiles}  # every call "takes" 1 ms; fn is never run


def test_cpu_roofline_takes_the_higher_bandwidth_and_the_dot_ceiling(monkeypatch):
    monkeypatch.setattr(util, "time_fn", _fake_time_fn)
    monkeypatch.setattr(util, "cpu_probes", lambda threads, n_bytes, seconds: dict(
        dot_TFLOPs=0.9, dot_kind="bf16dp", dot_method="bf16dp (stub)", fma32_TFLOPs=0.4, fma32_method="stub",
        read_bandwidth_GBps=1e6, read_bandwidth_method="stub read"))
    roof = util.roofline(torch.device("cpu"), quick=True)
    assert roof["sum_bandwidth_GBps"] == pytest.approx(256 * MIB / 1e-3 / 1e9)
    assert roof["bandwidth_GBps"] == 1e6 and "C read probe (this one)" in roof["bandwidth_method"]
    assert roof["dot_TFLOPs"] == 0.9 and roof["matmul_TFLOPs"] > 0  # the old keys stay
    assert util.floor_ms(0, 0.9e12, roof) == (pytest.approx(1000.0), "compute (bf16 dot-product)")


def test_cpu_roofline_falls_back_to_torch_without_the_probes(monkeypatch):
    monkeypatch.setattr(util, "time_fn", _fake_time_fn)

    def no_probes(*a):
        raise RuntimeError("reatt_kernels._C not available (stub)")

    monkeypatch.setattr(util, "cpu_probes", no_probes)
    roof = util.roofline(torch.device("cpu"), quick=True)
    assert roof["dot_TFLOPs"] is None and roof["read_bandwidth_GBps"] is None
    assert roof["bandwidth_GBps"] == roof["sum_bandwidth_GBps"] and "n/a" in roof["bandwidth_method"]
    assert "not available" in roof["dot_method"] and "torch fp32 matmul" in roof["dot_method"]
    assert util.floor_ms(0, 1e12, roof)[1] == "compute (matmul)"


# ---- floor_ms and best_roofline ------------------------------------------------------------------------------------
ROOF = dict(bandwidth_GBps=100.0, matmul_TFLOPs=0.1, dot_TFLOPs=1.0, dot_kind="bf16dp")


@pytest.mark.parametrize("roof,bound,ms", [
    (ROOF, "compute (bf16 dot-product)", 1000.0),
    ({**ROOF, "dot_TFLOPs": 0.5, "dot_kind": "fma32"}, "compute (fp32 FMA)", 2000.0),
    ({**ROOF, "dot_TFLOPs": None}, "compute (matmul)", 10000.0),  # no probe (no extension)
    ({"bandwidth_GBps": 100.0, "matmul_TFLOPs": 0.1}, "compute (matmul)", 10000.0),  # an old JSON, or a GPU
], ids=["bf16dp", "fma32", "probe-n/a", "old-roof"])
def test_floor_ms_uses_the_dot_ceiling_and_names_it(roof, bound, ms):
    assert util.floor_ms(1e9, 1e12, roof) == (pytest.approx(ms), bound)
    # 2e12 bytes at 100 GB/s: 20 s, longer than any of the compute times: memory binds
    assert util.floor_ms(2e12, 1e12, roof) == (pytest.approx(20000.0), "memory")


def test_apply_roofline_names_the_bound_of_each_row():
    rows = [dict(status="ok", p50_ms=4000.0, bytes=1e9, flops=1e12), dict(status="ok", p50_ms=20.0, bytes=1e9,
                                                                         flops=1e6)]
    util.apply_roofline(rows, ROOF)
    assert rows[0]["bound"] == "compute (bf16 dot-product)" and rows[0]["pct_roofline"] == pytest.approx(25.0)
    assert rows[1]["bound"] == "memory" and rows[1]["pct_roofline"] == pytest.approx(50.0)


def test_best_roofline_maxes_the_new_keys_and_reads_old_roofs():
    old = {"bandwidth_GBps": 40.0, "matmul_TFLOPs": 0.2}
    new = {"bandwidth_GBps": 50.0, "matmul_TFLOPs": 0.1, "dot_TFLOPs": 0.8, "dot_kind": "bf16dp",
           "fma32_TFLOPs": 0.4, "read_bandwidth_GBps": 50.0}
    again = {**new, "dot_TFLOPs": 0.85, "fma32_TFLOPs": 0.3, "read_bandwidth_GBps": 45.0}
    best = util.best_roofline(new, again)
    assert (best["dot_TFLOPs"], best["fma32_TFLOPs"], best["read_bandwidth_GBps"]) == (0.85, 0.4, 50.0)
    assert best["dot_kind"] == "bf16dp" and len(best["measurements"]) == 2
    mixed = util.best_roofline(old, new)
    assert mixed["bandwidth_GBps"] == 50.0 and mixed["matmul_TFLOPs"] == 0.2 and mixed["dot_TFLOPs"] == 0.8


# ---- bench_maxsim: the 16-query case and its batch throughput -------------------------------------------------------
@pytest.fixture(scope="module")
def bench_maxsim():
    spec = importlib.util.spec_from_file_location("bench_maxsim", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_bench_maxsim_cpu_cases_include_16_queries(bench_maxsim):
    cpu = torch.device("cpu")
    assert bench_maxsim.case_names(cpu, quick=True)[:2] == ["cpu_fixed_1q_4k", "cpu_fixed_16q_4k"]
    assert "cpu_fixed_16q_20k" in bench_maxsim.case_names(cpu, quick=False)


def test_bench_maxsim_batch_throughput(bench_maxsim):
    def row(case, prov, bq, p50, status="ok"):
        return dict(case=case, provider=prov, status=status, p50_ms=p50, shape=dict(Bq=bq))

    rows = [row("cpu_fixed_1q_4k", "cpu", 1, 2.0), row("cpu_fixed_16q_4k", "cpu", 16, 8.0),
            row("cpu_fixed_1q_4k", "naive", 1, 10.0), row("cpu_fixed_16q_4k", "naive", 16, 160.0),
            row("cpu_fixed_16q_4k", "torch", 16, 5.0),  # no 1-query row: no ratio
            row("cpu_fixed_1q_4k", "maxsim-cpu", 1, None, "n/a"), row("cpu_fixed_16q_4k", "maxsim-cpu", 16, None, "n/a")]
    out = bench_maxsim.add_batch_throughput(rows)
    assert out == {"cpu_fixed_16q_4k": {"cpu": pytest.approx(4.0), "naive": pytest.approx(1.0)}}
    assert rows[1]["batch_throughput_vs_1q"] == pytest.approx(4.0) and "batch_throughput_vs_1q" not in rows[4]


def test_bench_maxsim_roof_line_names_the_ceiling(bench_maxsim):
    line = bench_maxsim._roof_line({**ROOF, "bandwidth_method": "bw", "dot_method": "bf16dp (x)",
                                    "matmul_method": "mm", "fma32_TFLOPs": 0.5})
    assert "1.000 TFLOP/s compute ceiling (bf16dp (x))" in line and "fp32 FMA 0.500" in line
    old = bench_maxsim._roof_line({"bandwidth_GBps": 1.0, "bandwidth_method": "bw", "matmul_TFLOPs": 0.1,
                                   "matmul_method": "mm"})
    assert "0.100 TFLOP/s compute ceiling (mm)" in old


# ---- the per-op benchmark command line: unknown names are usage errors, before anything runs or is written ---------
@pytest.mark.parametrize("argv, match", [
    (["--cases", "cpu_fixed_1q_20k,nope"], r"--cases: unknown \['nope'\]"),
    (["--providers", "cpu,bogus"], r"--providers: unknown \['bogus'\]"),
])
def test_bench_maxsim_rejects_unknown_cases_and_providers(bench_maxsim, tmp_path, capsys, argv, match):
    """A misspelt case or provider used to measure nothing, exit 0 and write an empty results file over the
    committed one."""
    with pytest.raises(SystemExit) as exc:
        bench_maxsim.main(["--device", "cpu", "--out", str(tmp_path), *argv])
    assert exc.value.code == 2
    assert re.search(match, capsys.readouterr().err)
    assert not any(tmp_path.iterdir()), "nothing may be written on a usage error"
