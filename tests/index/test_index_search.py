"""The residual index's search methods and calibrated defaults: plaid (centroid interaction over every code of each
candidate, then a small decompressed rerank), its probe path, scan (decompressed MaxSim against every document), and
the build-time calibration that picks the rerank size and falls back to scan where clusters do not predict MaxSim."""
from __future__ import annotations

import warnings

import pytest
import torch

from reatt_kernels.bench.datasets import clustered_corpus, clustered_queries
from reatt_kernels.index import TokenIndex
from reatt_kernels.index.codec import default_n_centroids, default_sample_tokens

DIM = 32


@pytest.fixture(scope="module")
def corpus():
    d, off = clustered_corpus(n_docs=300, dim=DIM, min_len=5, max_len=23, n_centroids=48, topics_per_doc=3,
                              noise=0.1, seed=5)
    q, src = clustered_queries(d, off, 9, q_len=7, noise=0.1, seed=6)
    return d, off, q, src


@pytest.fixture(scope="module")
def residual(corpus):
    d, off, _, _ = corpus
    return TokenIndex.build(d, d_offsets=off, kind="residual", nbits=4, n_centroids=48, kmeans_iters=6,
                            progress=False)


def test_every_method_at_full_rerank_matches_scan(corpus, residual):
    """Reranking every document (plaid with ncandidates >= N, through the all-documents path and through a probe of
    every cell) returns the scan's ranking and scores: the stages before the rerank only choose, never score."""
    _, _, q, _ = corpus
    N = residual.n_docs
    C = residual.codec.centroids.shape[0]
    mask = torch.rand(q.shape[:2]) < 0.8
    mask[:, 0] = True
    ss, si = residual.search(q, mask, k=15, method="scan")
    ps, pi = residual.search(q, mask, k=15, method="plaid", nprobe=0, ncandidates=N)
    qs, qi = residual.search(q, mask, k=15, method="plaid", nprobe=C, ncandidates=N)
    torch.testing.assert_close(ps, ss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(qs, ss, rtol=1e-6, atol=1e-6)
    assert torch.equal(pi, si) and torch.equal(qi, si)
    # the scan is MaxSim of the decompressed vectors
    ref = residual.exact_scores_decompressed(q, mask)
    torch.testing.assert_close(ss, torch.topk(ref, 15, dim=1).values, rtol=1e-5, atol=1e-5)
    assert torch.equal(residual.search(q, mask, k=15, exhaustive=True)[1], si)


def test_plaid_keeps_ncandidates_by_centroid_interaction(corpus, residual):
    """The documents decompressed are the ncandidates best by centroid interaction (ties aside), and the timings name
    each stage."""
    from reatt_kernels import centroid_interaction, centroid_score_table

    _, _, q, _ = corpus
    cand = residual.candidates(q, k=10, nprobe=0, ncandidates=17)
    assert cand.shape == (q.shape[0], 17)
    table = centroid_score_table(q.float(), residual.codec.centroids)
    ci = centroid_interaction(table, residual.codes, residual.offsets, None,
                              torch.ones(q.shape[:2], dtype=torch.bool))
    kth = torch.topk(ci, 17, dim=1).values[:, -1:]
    assert (torch.gather(ci, 1, cand) >= kth).all()
    fused = {"kernel_approx", "kernel_select", "kernel_rerank_topk", "plaid_search"}  # one C++ call (plaid_search)
    residual.search(q[:2], k=10, method="plaid", nprobe=0, ncandidates=17, timings=True)
    assert set(residual.last_timings) == {"centroid_scores"} | fused
    residual.search(q[:2], k=10, method="plaid", nprobe=4, ncandidates=17, timings=True)
    assert set(residual.last_timings) == {"centroid_scores", "probe", "candidates", "approx"} | fused
    residual.search(q[:2], k=10, method="plaid", nprobe=0, ncandidates=17, timings=True, backend="torch")
    assert set(residual.last_timings) == {"centroid_scores", "approx", "decompress_rerank", "topk"}
    residual.search(q[:2], k=10, method="scan", timings=True)
    assert set(residual.last_timings) == {"scan", "topk"}


def test_batch_with_mixed_query_lengths_equals_one_query_at_a_time(corpus, residual):
    """A batch whose queries fall in different LP classes (valid counts 1..16, 17..32, 33..48) runs one kernel call
    per class: every query gets exactly what it gets alone, with and without a per-query allow-list."""
    d, off, _, _ = corpus
    g = torch.Generator().manual_seed(3)
    lens = [40, 3, 17, 9, 33, 16, 1, 25]
    q = torch.randn(len(lens), DIM, 41, generator=g).transpose(1, 2)[:, 1:]  # [8, 40, DIM], non-contiguous
    mask = torch.zeros(len(lens), 40, dtype=torch.bool)
    for a, n in enumerate(lens):
        mask[a, torch.randperm(40, generator=g)[:n]] = True  # valid tokens scattered, not a prefix
    ids = residual.doc_ids
    subset = [ids[torch.randperm(ids.numel(), generator=g)[:n]].tolist() for n in (50, 7, 300, 120, 2, 90, 300, 33)]
    for sub in (None, subset):
        for ncand in (8, "auto"):
            s, i = residual.search(q, k=5, q_mask=mask, ncandidates=ncand, subset=sub)
            for a in range(len(lens)):
                s1, i1 = residual.search(q[a:a + 1], k=5, q_mask=mask[a:a + 1], ncandidates=ncand,
                                         subset=None if sub is None else [sub[a]])
                assert torch.equal(i[a], i1[0]), (a, sub is None, ncand)
                assert torch.equal(s[a], s1[0]), (a, sub is None, ncand)


def test_deleted_documents_never_returned_by_any_method(corpus):
    d, off, q, src = corpus
    index = TokenIndex.build(d, d_offsets=off, kind="residual", nbits=2, n_centroids=32, progress=False)
    gone = src[:3].tolist()
    index.delete(gone)
    for params in ({}, {"method": "scan"}, {"method": "plaid", "nprobe": 4, "ncandidates": 50},
                   {"method": "plaid", "nprobe": 0, "ncandidates": 5}):
        _, i = index.search(q, k=10, **params)
        assert not set(i.flatten().tolist()) & set(gone), params


def test_calibration_sets_defaults_and_survives_save_load(tmp_path, corpus, residual):
    cal = residual.calibration
    assert cal["method"] in ("plaid", "scan") and cal["rerank_factor"] >= 1.0 and cal["n_docs"] == residual.n_docs
    assert residual._ncandidates(10, "auto") == max(10, int(-(-cal["rerank_factor"] * 10 // 1)))
    residual.save(tmp_path / "idx")
    back = TokenIndex.load(tmp_path / "idx")
    assert back.calibration == cal
    _, q, _ = corpus[1], corpus[2], None
    assert torch.equal(back.search(q, k=5)[1], residual.search(q, k=5)[1])


def test_calibration_falls_back_to_scan_without_topical_structure():
    """Random tokens: no centroid predicts MaxSim, so calibration picks scan and says so; the default search then
    returns the scan's results."""
    g = torch.Generator().manual_seed(0)
    docs = [torch.nn.functional.normalize(torch.randn(int(n), DIM, generator=g), dim=-1)
            for n in torch.randint(4, 12, (240,), generator=g)]
    with pytest.warns(UserWarning, match="method='scan'"):
        index = TokenIndex.build(docs, kind="residual", nbits=4, n_centroids=8, progress=False)
    assert index.calibration["method"] == "scan"
    q = torch.nn.functional.normalize(torch.randn(3, 6, DIM, generator=g), dim=-1)
    assert torch.equal(index.search(q, k=10)[1], index.search(q, k=10, method="scan")[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TokenIndex.build(docs, kind="residual", nbits=4, n_centroids=8, progress=False, calibrate=False)


def test_defaults_sample_and_centroids():
    """Every centroid trains on >= 64 sample points: the centroid count is capped by the sample, the sample grows with
    the centroids (at least 2^18 rows, at most the corpus)."""
    for T in (1000, 339_047, 3_000_000, 50_000_000):
        C = default_n_centroids(T)
        S = default_sample_tokens(T, C)
        assert S >= min(T, 64 * C) and S <= T and C >= 1
        assert S // C >= 64 or T < 64
    assert default_n_centroids(339_047) == 4096 and default_n_centroids(3_000_000) == 8192


def test_bad_search_parameters_raise(residual, corpus):
    q = corpus[2]
    with pytest.raises(ValueError, match="method must be"):
        residual.search(q, method="fast")
    with pytest.raises(ValueError, match="ncandidates must be"):
        residual.search(q, ncandidates=0)
    with pytest.raises(ValueError, match="nprobe must be"):
        residual.search(q, nprobe=-1)


@pytest.mark.parametrize("form", ["packed", "list", "iterator"])
def test_calibration_truth_is_exact_on_held_out_pseudo_queries(corpus, form):
    """At build time the calibration's truth is exact MaxSim of its pseudo-queries against the original vectors (not
    the compressed scan), each pseudo-query mixes two documents, and those two are held out of its ranking."""
    from reatt_kernels import maxsim_packed

    d, off, _, _ = corpus
    docs = [d[int(off[i]):int(off[i + 1])] for i in range(off.numel() - 1)]
    vectors = {"packed": d, "list": docs, "iterator": iter([docs[:100], docs[100:]])}[form]
    index = TokenIndex.build(vectors, d_offsets=off if form == "packed" else None, kind="residual", nbits=4,
                             n_centroids=48, progress=False)
    cal = index.calibration
    assert cal["truth"] == "exact" and cal["held_out"] and cal["target"] == 0.99
    (Q, qm, src), truth = index._calib_truth
    assert Q.shape[0] == 32 and truth.shape == (32, off.numel() - 1)
    want = maxsim_packed(Q.to(d.dtype), d, off, qm, backend="torch").float()
    torch.testing.assert_close(truth, want, rtol=1e-5, atol=1e-5)
    for a in range(8):  # every token comes verbatim from one of the two sources, and each source gives some
        srcs = [d[int(off[b]):int(off[b + 1])].float() for b in src[a].tolist()]
        where = [[bool((rows == t).all(1).any()) for rows in srcs] for t in Q[a][qm[a]]]
        assert all(any(w) for w in where) and all(any(w[j] for w in where) for j in (0, 1)), (a, src[a])
    # after adding documents the originals are gone: a new calibration says its truth is the scan
    index.add(docs[:5])
    assert index.calibrate()["truth"] == "scan (decompressed)"
