"""The index benchmark's correctness parts (CI runs them; no peer, no timing asserted): its metrics against an oracle
written from their definitions, and the quick form end to end on a tiny corpus (table, profile, plot, JSON, and the
fast-plaid row saying "n/a" when its venv is absent)."""
from __future__ import annotations

import json

import torch

from reatt_kernels.bench import index as bench


def _oracle(ids, S, gold, k=10, eps=0.01):
    """recall@k, eps-recall@k and gold@k from their definitions, one query at a time, in float64."""
    rec = epsr = g = 0.0
    for a in range(ids.shape[0]):
        s = S[a].double()
        order = sorted(range(s.numel()), key=lambda j: -float(s[j]))
        top = set(order[:k])
        s_k = float(s[order[k - 1]])
        got = [int(x) for x in ids[a, :k]]
        rec += sum(1 for x in got if x >= 0 and x in top) / k
        epsr += sum(1 for x in got if x >= 0 and float(s[x]) >= s_k - eps * abs(s_k)) / k
        g += float(int(gold[a]) in got)
    n = ids.shape[0]
    return {"recall@10": rec / n, "eps_recall@10": epsr / n, "gold@10": g / n}


def test_quality_matches_oracle():
    torch.manual_seed(0)
    Q, N = 7, 53
    S = torch.randn(Q, N) * 3 + 20
    S[0, 5] = S[0].topk(10).values[-1] * (1 - 0.005)  # inside eps of the 10th score, not in the top 10
    S[1, 6] = S[1].topk(10).values[-1] * (1 - 0.02)   # outside eps
    ids = torch.stack([torch.randperm(N)[:10] for _ in range(Q)])
    ids[0, :3] = torch.tensor([5, int(S[0].argmax()), -1])  # an eps-near document, the best one, a missing slot
    ids[1, 0] = 6
    ids[2] = S[2].topk(10).indices  # a perfect answer
    gold = torch.randint(0, N, (Q,))
    gold[2] = ids[2, 4]
    got = bench.quality(ids, S, gold)
    want = _oracle(ids, S, gold)
    for key, v in want.items():
        assert abs(got[key] - v) < 1e-9, (key, got[key], v)
    # a perfect answer scores 1 on both recalls; an eps-near document counts only for eps-recall
    one = bench.quality(S.topk(10).indices, S, gold)
    assert one["recall@10"] == 1.0 and one["eps_recall@10"] == 1.0


def test_quick_bench_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv(bench.PEER_VENV_ENV, str(tmp_path / "no-venv"))
    out = tmp_path / "out"
    rc = bench.main(["--quick", "--sections", "headline,peer", "--docs", "150", "--peer-docs", "120",
                     "--queries", "6", "--out", str(out), "--cache", str(tmp_path / "cache"), "--rounds", "2",
                     "--allow-noisy"])
    assert rc == 0
    payload = json.loads((out / "bench_index_quick.json").read_text())
    rows = payload["rows"]
    exact = [r for r in rows if r["system"].startswith("exact")]
    resid = [r for r in rows if r["system"].startswith("residual")]
    assert len(exact) == 2 and resid
    for r in exact:  # exact search is its own ground truth
        assert r["recall@10"] == 1.0 and r["eps_recall@10"] == 1.0
    for r in resid:
        assert 0.0 <= r["eps_recall@10"] <= 1.0 and r["recall@10"] <= r["eps_recall@10"] + 1e-9
        assert r["exact_gold@10"] == [e for e in exact if e["section"] == r["section"]][0]["gold@10"]
    default = [r for r in resid if r.get("default") and r["section"] == "headline"][0]
    # the default's stages: the plaid path (probe or every document) or the calibrated scan
    # (the plaid path is one plaid_search call on CPU, with its kernel's own stage split)
    assert ({"centroid_scores", "plaid_search", "kernel_approx", "kernel_rerank_topk"} <= set(default["profile"])
            or {"scan", "topk"} <= set(default["profile"]))
    for r in exact + resid:  # interleaved rounds, each recorded
        assert r["rounds"] == 2 and len(r["ms_p50_rounds"]) == 2 and r["cpu_ms_per_query"] > 0
        assert 0 <= r["gold_recall@100"] <= 1 and r["eps_recall@10_se"] >= 0
    assert any(r.get("method") == "scan" for r in resid) and all(r["ms_b16"] is None or r["ms_b16"] > 0 for r in resid)
    b = default["build"]
    assert b["peak_rss_bytes"] is not None and b["index_bytes"] > 0
    peer = [r for r in rows if r["system"] == "fast-plaid"]
    assert peer and peer[0]["status"] == "n/a" and "fast_plaid_venv.sh" in peer[0]["reason"]
    assert (out / "bench_index_quick.png").stat().st_size > 0
    md = (out / "bench_index_quick.md").read_text()
    assert "eps-recall@10" in md and "per-stage profile" in md and "n/a" in md
    # a second run reuses the cached residual index and says so
    bench.main(["--quick", "--sections", "headline", "--docs", "150", "--queries", "6", "--out", str(out),
                "--cache", str(tmp_path / "cache"), "--rounds", "1", "--allow-noisy"])
    rows2 = json.loads((out / "bench_index_quick.json").read_text())["rows"]
    assert all(r["build"]["reused"] for r in rows2 if r["system"].startswith("residual"))


def test_quality_with_several_gold_documents():
    S = torch.arange(40, dtype=torch.float32).flip(0)[None].repeat(2, 1)
    ids = torch.arange(10)[None].repeat(2, 1)
    assert bench.quality(ids, S, [[39, 3], [20, 30]])["gold@10"] == 0.5


def test_parser_real_corpora_and_gpu_arguments():
    """The real-text corpora and the GPU configuration parse (the GPU path itself runs on a GPU machine only)."""
    p = bench.build_parser()
    a = p.parse_args(["--corpus", "real-all", "--device", "cuda", "--queries", "150"])
    assert a.corpus == "real-all" and a.device == "cuda"
    assert p.parse_args([]).corpus == "synthetic"
    import pytest

    with pytest.raises(SystemExit):
        p.parse_args(["--corpus", "msmarco"])


def test_refuses_a_loaded_machine_unless_told(tmp_path, monkeypatch):
    """Above a 1-minute load of 1.5 at the start the benchmark writes nothing and exits 2; with --allow-noisy it runs,
    and the JSON and its table say the run was noisy."""
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (4.2, 3.0, 2.0))
    out = tmp_path / "out"
    args = ["--quick", "--sections", "headline", "--docs", "80", "--queries", "4", "--out", str(out), "--no-peer",
            "--rounds", "1"]
    assert bench.main(args) == 2 and not (out / "bench_index_quick.json").exists()
    assert bench.main(args + ["--allow-noisy"]) == 0
    payload = json.loads((out / "bench_index_quick.json").read_text())
    assert payload["noisy"] is True and payload["load_avg_start"][0] == 4.2
    assert (out / "bench_index_quick.md").read_text().startswith("**NOISY RUN")


def test_interleaved_rounds_rotate_the_order():
    calls = []

    def system(name):
        def search(q, m):
            calls.append(name)
            return None, torch.zeros((q.shape[0], 10), dtype=torch.int64)
        return search

    q, m = torch.zeros(3, 4, 8), torch.ones(3, 4, dtype=torch.bool)
    res = bench.time_interleaved({"a": system("a"), "b": system("b"), "c": system("c")}, q, m, rounds=3, batch=2)
    # per round and system: 1 warm-up + 3 queries + 1 batch call = 5 calls
    orders = [[calls[r * 15 + j * 5] for j in range(3)] for r in range(3)]
    assert orders == [["a", "b", "c"], ["a", "c", "b"], ["c", "a", "b"]], orders  # rotated, every other reversed
    assert all(r["rounds"] == 3 and r["ids"].shape == (3, 10) for r in res.values())


def test_eps_recall_standard_error_and_gold_recall():
    S = torch.tensor([[5.0, 4, 3, 2, 1, 0, -1, -2, -3, -4, -5, -6]] * 2)
    ids = torch.tensor([list(range(10)), list(range(2, 12))])
    q = bench.quality(ids, S, torch.tensor([0, 11]))
    # per query eps-recall: 1.0 and 0.8 -> mean 0.9, sample sd 0.1414, SE 0.1
    assert abs(q["eps_recall@10"] - 0.9) < 1e-12 and abs(q["eps_recall@10_se"] - 0.1) < 1e-9
    assert bench.gold_recall(ids, [[0, 1, 11], [11]]) == (2 / 3 + 1) / 2
