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
                     "--queries", "6", "--out", str(out), "--cache", str(tmp_path / "cache")])
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
    assert {"centroid_scores", "probe", "candidates", "approx", "decompress_rerank", "topk"} <= set(default["profile"])
    b = default["build"]
    assert b["peak_rss_bytes"] is not None and b["index_bytes"] > 0
    peer = [r for r in rows if r["system"] == "fast-plaid"]
    assert peer and peer[0]["status"] == "n/a" and "fast_plaid_venv.sh" in peer[0]["reason"]
    assert (out / "bench_index_quick.png").stat().st_size > 0
    md = (out / "bench_index_quick.md").read_text()
    assert "eps-recall@10" in md and "per-stage profile" in md and "n/a" in md
    # a second run reuses the cached residual index and says so
    bench.main(["--quick", "--sections", "headline", "--docs", "150", "--queries", "6", "--out", str(out),
                "--cache", str(tmp_path / "cache")])
    rows2 = json.loads((out / "bench_index_quick.json").read_text())["rows"]
    assert all(r["build"]["reused"] for r in rows2 if r["system"].startswith("residual"))
