"""The main job ``reatt-bench`` and the shared measurement helpers: tiny shapes, a few seconds in total."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from reatt_kernels.bench import main as bench
from reatt_kernels.reference import maxsim_ref

from ..utils import random_mask

ROOT = Path(__file__).resolve().parents[2]


def test_reatt_bench_main_tiny(tmp_path):
    """End to end on a tiny corpus: every backend gets a row, exact backends agree with naive, files are written."""
    rc = bench.main(["--device", "cpu", "--quick", "--docs", "37", "--batch", "1,3", "--min-len", "3", "--max-len", "9",
                     "--dim", "16", "--q-len", "5", "--topk", "4", "--reps", "2", "--budget-s", "0",
                     "--out", str(tmp_path)])
    assert rc == 0
    payload = json.loads((tmp_path / "reatt_bench.json").read_text())
    assert (tmp_path / "reatt_bench.png").stat().st_size > 0
    rows = payload["rows"]
    assert {(r["backend"], r["batch"]) for r in rows} == {(b, n) for b in ("naive",) + bench.BACKEND_ORDER
                                                          for n in (1, 3)}
    by = {(r["backend"], r["batch"]): r for r in rows}
    for n in (1, 3):
        assert by[("naive", n)]["status"] == "ok"
        assert by[("torch", n)]["status"] == "ok"
        # The reference backend and naive compute the same exact scores: same top-k.
        assert by[("torch", n)]["recall_vs_naive"] == 1.0
        # Triton on CPU is the interpreter: reported, with its reason, not timed.
        assert by[("triton", n)]["status"] == "n/a" and "interpreter" in by[("triton", n)]["note"]
        r = by[("torch", n)]
        assert r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"] <= r["p99_ms"]
        assert abs(r["ms_per_query_p50"] * n - r["p50_ms"]) < 1e-9
    assert payload["corpus"]["tokens"] == rows[0]["tokens"]
    assert payload["roofline"]["bandwidth_GBps"] > 0 and payload["roofline"]["matmul_TFLOPs"] > 0
    assert payload["index"] is None


INDEX_ARGS = ["--device", "cpu", "--quick", "--docs", "11", "--batch", "2", "--min-len", "2", "--max-len", "5",
              "--dim", "8", "--q-len", "3", "--reps", "1", "--budget-s", "0", "--backends", "torch", "--no-naive",
              "--index", "--no-plot"]


@pytest.mark.parametrize("mode", ["rows", "missing", "raises"])
def test_reatt_bench_index_flag(tmp_path, monkeypatch, capsys, mode):
    """--index hands the built corpus to reatt_kernels.bench.index.run(args) and records its rows; a missing or failing
    module is a note, never a crash. (The real index modes are the index engineer's, and take minutes on CPU: stubbed.)"""
    seen = {}

    def run(args):
        seen["args"] = args
        if mode == "raises":
            raise RuntimeError("boom")
        return [{"system": "stub", "batch": 1, "p50_ms_per_query": 0.5}]

    stub = None if mode == "missing" else types.SimpleNamespace(run=run)
    monkeypatch.setitem(sys.modules, "reatt_kernels.bench.index", stub)
    assert bench.main(INDEX_ARGS + ["--out", str(tmp_path)]) == 0
    idx = json.loads((tmp_path / "reatt_bench.json").read_text())["index"]
    printed = capsys.readouterr().out
    if mode == "rows":
        assert idx == {"rows": [{"system": "stub", "batch": 1, "p50_ms_per_query": 0.5}], "note": None}
        tokens, offsets = seen["args"].corpus
        assert offsets.numel() == 12 and tokens.shape[0] == int(offsets[-1]) and seen["args"].quick
        assert "stub" in printed
    else:
        assert idx["rows"] == []
        assert idx["note"].startswith("index: not available" if mode == "missing" else "index: failed")
        assert idx["note"] in printed
    assert not (tmp_path / "reatt_bench.png").exists()


def test_naive_maxsim_matches_reference_across_chunks():
    q = torch.randn(3, 5, 16, dtype=torch.float64)
    d = torch.randn(23, 7, 16, dtype=torch.float64)
    mask = random_mask((23, 7))
    mask[:, 0] = True  # no empty document: naive would give -inf there, as the reference does
    ref = maxsim_ref(q, d, None, mask)
    out = bench.naive_maxsim(q, d, mask, chunk_elems=3 * 5 * 7 * 4)  # 4 documents per chunk: 6 chunks
    torch.testing.assert_close(out, ref.float(), rtol=1e-6, atol=1e-6)


def test_time_fn_quantiles_and_reps():
    t = bench.time_fn(lambda: sum(range(2000)), torch.device("cpu"), quantiles=(0.5, 0.2, 0.8, 0.99), min_reps=7,
                      budget_s=0.0)
    assert t["n"] == 7
    assert 0 < t["p20"] <= t["p50"] <= t["p80"] <= t["p99"]


def test_peak_memory_cpu_sees_an_allocation():
    def fn():
        x = torch.ones(24 << 20, dtype=torch.uint8)  # 24 MiB, touched
        time.sleep(0.03)  # held long enough for the sampler
        return int(x[-1])

    m = bench.peak_memory(fn, torch.device("cpu"))
    assert m["bytes"] >= 16 << 20, m


def test_format_table_and_slug():
    text = bench.format_table([{"a": "x", "b": 1.23456, "note": None}, {"a": "yy", "b": None, "note": "why"}],
                              [("a", "A", ""), ("b", "B", ".2f"), ("note", "note", "")])
    lines = text.splitlines()
    assert lines[0].split() == ["A", "B", "note"] and "1.23" in lines[2] and "n/a" in lines[3] and "why" in lines[3]
    assert bench.device_slug(torch.device("cpu")) == "cpu"


def test_device_check_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "device_check.sh")], check=True)
