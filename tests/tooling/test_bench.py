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
from reatt_kernels.bench import util
from reatt_kernels.reference import maxsim_ref

from ..utils import random_mask

ROOT = Path(__file__).resolve().parents[2]


def test_reatt_bench_main_tiny(tmp_path):
    """End to end on a tiny corpus: every backend gets a row, exact backends agree with naive, files are written."""
    rc = bench.main(["--device", "cpu", "--corpus", "synthetic", "--quick", "--docs", "37", "--batch", "1,3", "--min-len", "3", "--max-len", "9",
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


INDEX_ARGS = ["--device", "cpu", "--corpus", "synthetic", "--quick", "--docs", "11", "--batch", "2", "--min-len", "2", "--max-len", "5",
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


def _fake_real_corpus(n_docs=60, dim=16):
    """An EncodedCorpus of clustered vectors with real-corpus shapes: ragged passages, [Q, 32, dim] zero-padded
    questions with a mask, gold lists (some empty, some with two passages)."""
    from reatt_kernels.bench.data.cache import EncodedCorpus
    from reatt_kernels.bench.datasets import clustered_corpus

    d, off = clustered_corpus(n_docs=n_docs, dim=dim, min_len=3, max_len=11, n_centroids=32, seed=3)
    Q = 40
    qlen = torch.randint(1, 33, (Q,))
    mask = torch.arange(32)[None, :] < qlen[:, None]
    src = torch.randint(0, n_docs, (Q,))
    q = torch.zeros(Q, 32, dim, dtype=torch.float16)
    for i in range(Q):  # noisy copies of tokens of the source passage
        toks = d[off[src[i]]:off[src[i] + 1]].float()
        pick = toks[torch.randint(0, toks.shape[0], (int(qlen[i]),))]
        q[i, :qlen[i]] = torch.nn.functional.normalize(pick + 0.1 * torch.randn_like(pick), dim=-1).half()
    gold = [[int(s)] if i % 7 else [] for i, s in enumerate(src)]
    gold[1] = [int(src[1]), (int(src[1]) + 1) % n_docs]
    return EncodedCorpus(
        name="squad-dev", dim=dim, doc_tokens=d, doc_offsets=off, query_tokens=q, query_mask=mask, gold=gold,
        answers=[["a"]] * Q, questions=[f"q{i}" for i in range(Q)], question_ids=[str(i) for i in range(Q)],
        passages=[{"id": str(i), "title": "", "text": "t"} for i in range(n_docs)],
        passage_ids=[str(i) for i in range(n_docs)], folder=Path("."), manifest={"sizes": {"n_passages": n_docs}},
        qrels=[{g: 1 for g in gs} for gs in gold])


REAL_ARGS = ["--device", "cpu", "--quick", "--batch", "1,4", "--queries", "12", "--topk", "5", "--reps", "1",
             "--budget-s", "0", "--backends", "torch,cpu", "--no-plot"]


def test_reatt_bench_real_text(tmp_path, monkeypatch, capsys):
    """The default corpus is real text (data.cache.load_corpus, stubbed here with clustered vectors in its shapes):
    exact backends and the default index side by side, with gold@k, the index's eps-recall against exact, and the
    qrels metrics."""
    from reatt_kernels.bench.data import cache

    fake = _fake_real_corpus()
    seen = {}

    def load(name, dim=None, **kw):
        seen.update(name=name, dim=dim)
        return fake

    monkeypatch.setattr(cache, "load_corpus", load)
    assert bench.main(REAL_ARGS + ["--dim", "16", "--out", str(tmp_path)]) == 0
    assert seen == {"name": "docstrings-small", "dim": 16}  # --quick without --corpus: the small default
    payload = json.loads((tmp_path / "reatt_bench.json").read_text())
    rows = payload["rows"]
    by = {(r["backend"], r["batch"]): r for r in rows}
    assert {"naive", "torch", "cpu", "index"} <= {b for b, _ in by}
    assert payload["corpus"]["name"] == "docstrings-small" and payload["corpus"]["questions_sampled"] == 12
    q = payload["quality"]
    # the quality questions are the ones with a gold passage; exact is its own reference
    assert q["exact"]["recall_vs_exact"] == 1.0 and q["exact"]["eps_recall_vs_exact"] == 1.0
    assert 0.0 <= q["index"]["eps_recall_vs_exact"] <= 1.0 and 0.0 <= q["index"]["gold_at_k"] <= 1.0
    # 60 passages < 100: recall@100 is over the whole corpus, so exact finds every gold passage
    assert q["exact"]["recall@100"] == 1.0 and 0.0 < q["exact"]["ndcg@10"] <= 1.0 and 0.0 < q["exact"]["mrr@10"] <= 1.0
    assert 0.0 <= q["index"]["ndcg@10"] <= 1.0 and q["index"]["recall@100"] is not None
    for n in (1, 4):
        assert by[("torch", n)]["recall_vs_naive"] == 1.0  # masked queries: naive (zero rows) == masked exact
        assert by[("index", n)]["status"] == "ok" and by[("index", n)]["p50_ms"] > 0
        assert by[("index", n)]["gold_at_k"] == q["index"]["gold_at_k"]
        assert by[("cpu", n)]["gold_at_k"] == q["exact"]["gold_at_k"]
        assert by[("cpu", n)]["ndcg@10"] == q["exact"]["ndcg@10"] and by[("index", n)]["mrr@10"] == q["index"]["mrr@10"]
        # useful FLOPs count the unmasked query tokens only
        assert by[("torch", n)]["query_tokens"] < 32 * n or n == 1
    assert "eps-recall" in capsys.readouterr().out

    # an index that cannot build is a note, never a crash
    monkeypatch.setattr(bench, "build_default_index", lambda *a: (_ for _ in ()).throw(RuntimeError("no faiss")))
    assert bench.main(REAL_ARGS + ["--dim", "16", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "reatt_bench.json").read_text())
    assert payload["quality"]["index"] is None
    assert any(r["backend"] == "index" and r["status"] == "n/a" and "no faiss" in r["note"] for r in payload["rows"])


def test_retrieval_quality_definitions():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.995, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    gold = [[3], [0]]
    exact = bench.retrieval_quality(scores.topk(2, dim=1).indices, scores, gold, 2)
    assert exact == {"gold_at_k": 0.0, "recall_vs_exact": 1.0, "eps_recall_vs_exact": 1.0}
    # k = 3: s_3 = 3.0 (row 0); 2.995 is within eps = 0.01 of it (eps-recall counts it, recall does not); -1 = none
    ids = torch.tensor([[0, 3, -1], [4, 0, 3]])
    m = bench.retrieval_quality(ids, scores, gold, 3)
    assert m["gold_at_k"] == 1.0
    assert abs(m["recall_vs_exact"] - (1 / 3 + 2 / 3) / 2) < 1e-12
    assert abs(m["eps_recall_vs_exact"] - (2 / 3 + 2 / 3) / 2) < 1e-12


def test_naive_maxsim_matches_reference_across_chunks():
    q = torch.randn(3, 5, 16, dtype=torch.float64)
    d = torch.randn(23, 7, 16, dtype=torch.float64)
    mask = random_mask((23, 7))
    mask[:, 0] = True  # no empty document: naive would give -inf there, as the reference does
    ref = maxsim_ref(q, d, None, mask)
    out = util.naive_maxsim(q, d, mask, chunk_elems=3 * 5 * 7 * 4)  # 4 documents per chunk: 6 chunks
    torch.testing.assert_close(out, ref.float(), rtol=1e-6, atol=1e-6)


def test_time_fn_quantiles_and_reps():
    t = util.time_fn(lambda: sum(range(2000)), torch.device("cpu"), quantiles=(0.5, 0.2, 0.8, 0.99), min_reps=7,
                      budget_s=0.0)
    assert t["n"] == 7
    assert 0 < t["p20"] <= t["p50"] <= t["p80"] <= t["p99"]


def test_peak_memory_cpu_sees_an_allocation():
    def fn():
        x = torch.ones(24 << 20, dtype=torch.uint8)  # 24 MiB, touched
        time.sleep(0.03)  # held long enough for the sampler
        return int(x[-1])

    m = util.peak_memory(fn, torch.device("cpu"))
    assert m["bytes"] >= 16 << 20, m


def test_format_table_and_slug():
    text = util.format_table([{"a": "x", "b": 1.23456, "note": None}, {"a": "yy", "b": None, "note": "why"}],
                              [("a", "A", ""), ("b", "B", ".2f"), ("note", "note", "")])
    lines = text.splitlines()
    assert lines[0].split() == ["A", "B", "note"] and "1.23" in lines[2] and "n/a" in lines[3] and "why" in lines[3]
    assert util.device_slug(torch.device("cpu")) == "cpu"


def test_device_check_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "device_check.sh")], check=True)
