"""The user's own corpora (``beir:PATH``, ``jsonl:PATH``), offline, through ``reatt-bench`` and the index benchmark.

The qrels metrics are checked against values worked out by hand in the comments (never by calling pytrec_eval again).
The end-to-end tests encode a BEIR folder with a one-hot "encoder" (each wordpiece is its own unit vector), so MaxSim of a
query and a passage is the number of query words the passage contains and every ranking below is known by hand."""
from __future__ import annotations

import json
import math
import types
from pathlib import Path

import pytest
import torch

from reatt_kernels.bench import main as bench
from reatt_kernels.bench.data import cache as C
from reatt_kernels.bench.data import encode as E
from reatt_kernels.bench.data.fetch import SourceError
from reatt_kernels.bench.data.sources import resolve
from reatt_kernels.bench.data.sources.beir import read_beir
from reatt_kernels.bench.data.sources.jsonl import read_fid

pytest.importorskip("pytrec_eval")

INV_LOG2_3 = 1 / math.log2(3)  # the DCG discount of rank 2 (rank 1: 1 / log2(2) = 1; rank 3: 1 / log2(4) = 1/2)


# ---- a BEIR folder, ranked by hand --------------------------------------------------------------------------------

FILLERS = 110  # documents "theta f<i>": each scores 1 for q3, so a q3 document that scores 0 ranks beyond 100


def write_beir(path: Path) -> Path:
    docs = {
        "d1": "alpha beta gamma f1",   # q1 score 3 (not relevant: grade 0)
        "d2": "alpha beta f2",         # q1 score 2, grade 1
        "d3": "alpha f3",              # q1 score 1, grade 2
        "d4": "delta epsilon f4",      # q2 score 2 (not judged)
        "d5": "delta f5",              # q2 score 1, grade 1
        "d8": "zeta eta theta f8",     # q3 score 3, grade 1
        "d9": "f9 f10",                # q3 score 0, grade 2: ranks after the 110 fillers and d8
        **{f"n{i}": f"theta f{20 + i}" for i in range(FILLERS)},
    }
    path.mkdir(parents=True)
    (path / "corpus.jsonl").write_text("".join(json.dumps({"_id": k, "title": "", "text": v, "metadata": {}}) + "\n"
                                               for k, v in docs.items()))
    queries = {"q1": "alpha beta gamma", "q2": "delta epsilon", "q3": "zeta eta theta", "q4": "alpha"}
    (path / "queries.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in queries.items()))
    (path / "qrels").mkdir()
    rows = ["query-id\tcorpus-id\tscore", "q1\td1\t0", "q1\td2\t1", "q1\td3\t2", "q2\td5\t1", "q2\tdX\t1",
            "q3\td8\t1", "q3\td9\t2", "qX\td1\t1"]  # dX and qX are unknown: dropped and counted; q4 has no qrels
    (path / "qrels" / "test.tsv").write_text("\n".join(rows) + "\n")
    return path


# By hand, from the scores in write_beir (MaxSim with one-hot tokens = number of query words in the passage):
#   q1: ranking d1 (3), d2 (2), d3 (1), then zeros. Grades d1 0, d2 1, d3 2.
#       DCG@10 = 0 + 1 / log2(3) + 2 / log2(4); ideal = 2 + 1 / log2(3). MRR@10 = 1/2 (d2 at rank 2). recall@100 = 1.
#   q2: ranking d4 (2), d5 (1). Grade d5 1 (dX dropped). nDCG@10 = (1 / log2(3)) / 1; MRR@10 = 1/2; recall@100 = 1.
#   q3: ranking d8 (3), then 110 fillers (1 each), d9 (0) beyond rank 100. Grades d8 1, d9 2.
#       DCG@10 = 1; ideal = 2 + 1 / log2(3). MRR@10 = 1. recall@100 = 1/2.
HAND = {
    "ndcg@10": ((INV_LOG2_3 + 1) / (2 + INV_LOG2_3) + INV_LOG2_3 + 1 / (2 + INV_LOG2_3)) / 3,
    "recall@100": (1 + 1 + 0.5) / 3,
    "mrr@10": (0.5 + 0.5 + 1) / 3,
}


def test_read_beir(tmp_path):
    passages, questions, stats = read_beir(write_beir(tmp_path / "b"))
    assert len(passages) == 7 + FILLERS and passages[0] == {"id": "d1", "title": "", "text": "alpha beta gamma f1"}
    by = {q["id"]: q for q in questions}
    assert set(by) == {"q1", "q2", "q3"}  # q4 has no judgement
    assert by["q1"]["qrels"] == {"d1": 0, "d2": 1, "d3": 2} and by["q1"]["gold_ids"] == ["d2", "d3"]
    assert by["q2"]["qrels"] == {"d5": 1} and by["q3"]["gold_ids"] == ["d8", "d9"]
    assert stats["n_qrels_unknown_doc"] == 1 and stats["n_qrels_unknown_query"] == 1
    assert stats["n_queries_without_qrels"] == 1
    with pytest.raises(SourceError, match=r"lacks qrels/test\.tsv .*a BEIR folder holds corpus\.jsonl"):
        (tmp_path / "b" / "qrels" / "test.tsv").unlink()
        read_beir(tmp_path / "b")
    bad = write_beir(tmp_path / "c")
    (bad / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td2\n")
    with pytest.raises(SourceError, match=r"test\.tsv:2: expected 'query-id<TAB>corpus-id<TAB>integer score'"):
        read_beir(bad)


class OneHot(torch.nn.Module):
    """Each wordpiece's vector is its one-hot row: MaxSim = how many query wordpieces the passage contains."""

    def __init__(self, vocab: int):
        super().__init__()
        self.config = types.SimpleNamespace(hidden_size=vocab, max_position_embeddings=512)

    def forward(self, input_ids, attention_mask):
        return types.SimpleNamespace(
            last_hidden_state=torch.nn.functional.one_hot(input_ids, self.config.hidden_size).float())


@pytest.fixture
def one_hot(tmp_path, monkeypatch):
    """The one-hot encoder standing in for the default one, and REATT_DATA in tmp_path."""
    transformers = pytest.importorskip("transformers")
    words = "alpha beta gamma delta epsilon zeta eta theta".split() + [f"f{i}" for i in range(20 + FILLERS)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."] + words
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizerFast(vocab=str(tmp_path / "vocab.txt"), do_lower_case=True)
    enc = E.Encoder(E.EncoderInfo("minilm", "one-hot", tmp_path, {}, "test"), OneHot(len(vocab)), tok,
                    [tok.cls_token_id], [tok.sep_token_id], tok.pad_token_id, 510, len(vocab))
    monkeypatch.setattr(C, "load_encoder", lambda *a, **k: enc)
    monkeypatch.setenv("REATT_DATA", str(tmp_path / "cache"))
    return enc


ARGS = ["--device", "cpu", "--quick", "--batch", "1", "--queries", "10", "--reps", "1", "--budget-s", "0", "--backends", "cpu",
        "--no-naive", "--no-index", "--no-plot"]


def test_beir_round_trip_through_reatt_bench(tmp_path, one_hot):
    folder = write_beir(tmp_path / "scifact-like")
    out = tmp_path / "out"
    assert bench.main(ARGS + ["--corpus", f"beir:{folder}", "--out", str(out)]) == 0
    payload = json.loads((out / "reatt_bench.json").read_text())
    exact = payload["quality"]["exact"]
    assert payload["corpus"]["questions_sampled"] == 3
    for k, v in HAND.items():
        assert exact[k] == pytest.approx(v, abs=1e-4), (k, exact[k], v)
    row = next(r for r in payload["rows"] if r["backend"] == "cpu")
    assert row["ndcg@10"] == exact["ndcg@10"] and "eps_recall_vs_exact" in row and row["p50_ms"] > 0
    # reatt-data build caches it like the others; a changed file is noticed and the text rebuilt
    from reatt_kernels.bench.data import cli

    assert cli.main(["build", f"beir:{folder}"]) == 0
    slug = resolve(f"beir:{folder}").slug
    assert slug.startswith("beir-scifact-like-") and (tmp_path / "cache" / "corpora" / slug / "manifest.json").exists()
    with open(folder / "qrels" / "test.tsv", "a") as f:
        f.write("q2\td4\t1\n")  # d4 is q2's top hit: now also relevant
    assert bench.main(ARGS + ["--corpus", f"beir:{folder}", "--out", str(out)]) == 0
    again = json.loads((out / "reatt_bench.json").read_text())["quality"]["exact"]
    # q2: d4 (grade 1) at rank 1, d5 (grade 1) at rank 2: nDCG@10 = 1, MRR@10 = 1
    assert again["mrr@10"] == pytest.approx((0.5 + 1 + 1) / 3, abs=1e-9)


def test_jsonl_sources(tmp_path, one_hot):
    # one FiD/DPR questions file: the ctxs are the passages (repeated ones kept once); gold by each rule in turn
    fid = tmp_path / "dev.jsonl"
    rows = [
        {"question": "alpha beta", "answers": ["f1"], "ctxs": [{"id": "a", "title": "", "text": "alpha beta f1"},
                                                               {"id": "b", "title": "", "text": "gamma f2"}]},
        {"question": "gamma", "answers": ["zzz"], "ctxs": [{"id": "b", "title": "", "text": "gamma f2",
                                                            "has_answer": True}, {"id": "c", "text": "delta f3"}]},
        {"question": "delta", "answers": "f3", "gold_ids": ["c"], "ctxs": [{"id": "c", "text": "delta f3"}]},
        {"question": "theta", "answers": ["nowhere"], "ctxs": [{"title": "", "text": "theta f4"}]},  # no gold
    ]
    fid.write_text("".join(json.dumps(r) + "\n" for r in rows))
    passages, questions, stats = read_fid(fid)
    assert [p["id"] for p in passages] == ["a", "b", "c", "p3"]
    assert [q["gold_ids"] for q in questions] == [["a"], ["b"], ["c"], []]
    assert stats["n_questions_without_gold"] == 1 and questions[2]["answers"] == ["f3"]
    # a folder with passages.jsonl and questions.jsonl (what reatt-data build writes)
    d = tmp_path / "fid"
    d.mkdir()
    (d / "passages.jsonl").write_text("".join(json.dumps(p) + "\n" for p in passages))
    (d / "questions.jsonl").write_text(json.dumps({"question": "alpha", "gold_ids": ["a", "zz"]}) + "\n")
    p2, q2, s2 = read_fid(d)
    assert len(p2) == 4 and q2[0]["gold_ids"] == ["a"] and s2["n_gold_unknown"] == 1
    with pytest.raises(SourceError, match=r"jsonl:.*lacks questions\.jsonl"):
        (d / "questions.jsonl").unlink()
        read_fid(d)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n{"question": 3}\n')
    with pytest.raises(SourceError, match=r"bad\.jsonl:2: expected an object with a non-empty string 'question'"):
        read_fid(bad)
    # end to end: the questions with a gold passage are scored (3 of 4)
    out = tmp_path / "out"
    assert bench.main(ARGS + ["--corpus", f"jsonl:{fid}", "--out", str(out)]) == 0
    payload = json.loads((out / "reatt_bench.json").read_text())
    assert payload["corpus"]["questions_sampled"] == 3
    # "alpha beta" -> a (2 of 2 words); "gamma" -> b (the only passage with it); "delta" -> c: all at rank 1
    assert payload["quality"]["exact"]["mrr@10"] == 1.0 and payload["quality"]["exact"]["ndcg@10"] == 1.0


def test_unknown_corpus_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--corpus", "squad-train"])
    assert e.value.code == 2
    assert "unknown corpus 'squad-train'" in capsys.readouterr().err


def test_beir_through_the_index_benchmark(tmp_path, one_hot):
    """benchmarks/bench_index.py on a BEIR folder: every system gets the qrels metrics; exact's are the hand values."""
    from reatt_kernels.bench import index as index_bench

    folder = write_beir(tmp_path / "b")
    out = tmp_path / "out"
    assert index_bench.main(["--corpus", f"beir:{folder}", "--queries", "10", "--no-peer", "--threads", "1",
                             "--out", str(out), "--rounds", "1", "--allow-noisy"]) == 0
    rows = json.loads((out / "bench_index_beir.json").read_text())["rows"]
    exact = next(r for r in rows if r["system"].startswith("exact"))
    for k, v in HAND.items():
        assert exact[k] == pytest.approx(v, abs=1e-4), (k, exact[k], v)
    residual = [r for r in rows if r["system"].startswith("residual")]
    assert residual and all(0 <= r["ndcg@10"] <= 1 and r["recall@100"] is not None for r in residual)
    assert "nDCG@10" in (out / "bench_index_beir.md").read_text()
