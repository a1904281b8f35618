"""TokenIndex.search(..., subset=...): an allow-list of document ids, shared by the batch or one per query. Exact
indexes return exactly the filtered exact top-k (checked against MaxSim of every document, filtered here); residual
indexes return only allowed documents, the filtered scan's top-k when every allowed document is reranked, and every
method (scan, plaid with and without a probe, the staged torch path) agrees on which documents may appear."""
from __future__ import annotations

import pytest
import torch

import reatt_kernels as rk
from reatt_kernels.bench.datasets import clustered_corpus, clustered_queries
from reatt_kernels.index import TokenIndex

DIM = 32


@pytest.fixture(scope="module")
def corpus():
    d, off = clustered_corpus(n_docs=250, dim=DIM, min_len=4, max_len=21, n_centroids=40, topics_per_doc=3,
                              noise=0.12, seed=11)
    q, src = clustered_queries(d, off, 6, q_len=9, noise=0.1, seed=12)
    ids = torch.arange(250, dtype=torch.int64) * 7 + 3  # user ids that are not row numbers
    return d, off, q, src, ids


def filtered_exact_topk(d, off, q, ids, allowed, k):
    """MaxSim of every query against every document (the public op, on the fp16-rounded values the exact index
    stores), disallowed ones removed, then the top k."""
    s = rk.maxsim_packed(q.half().float(), d.half().float(), off, backend="torch")
    ok = torch.stack([torch.isin(ids, torch.as_tensor(a)) for a in allowed])
    s = s.masked_fill(~ok, float("-inf"))
    top = torch.topk(s, k, dim=1)
    return top.values, torch.where(torch.isinf(top.values), -1, ids[top.indices])


@pytest.mark.parametrize("per_query", [False, True])
def test_exact_subset_is_the_filtered_exact_topk(corpus, per_query):
    d, off, q, src, ids = corpus
    index = TokenIndex.build(d, d_offsets=off, kind="exact", doc_ids=ids, progress=False)
    g = torch.Generator().manual_seed(0)
    shared = ids[torch.randperm(250, generator=g)[:40]].tolist() + [10**9]  # an id not in the index: ignored
    per = [ids[torch.randperm(250, generator=g)[:n]].tolist() for n in (1, 5, 30, 80, 3, 250)]
    allowed = per if per_query else [shared] * q.shape[0]
    want_s, want_i = filtered_exact_topk(d, off, q, ids, allowed, 10)
    for method in ("full", "flat"):
        s, i = index.search(q, k=10, subset=per if per_query else shared, method=method,
                            **({"k_token": 2048} if method == "flat" else {}))
        if method == "full":
            assert torch.equal(i, want_i), (i, want_i)
            torch.testing.assert_close(s, want_s.float(), rtol=1e-5, atol=1e-5)
        for a in range(q.shape[0]):
            got = set(i[a][i[a] >= 0].tolist())
            assert got <= set(allowed[a]), (method, a)
    # a query whose list holds one document gets that one, then (-inf, -1)
    if per_query:
        s, i = index.search(q, k=3, subset=per)
        assert i[0].tolist() == [per[0][0], -1, -1] and torch.isinf(s[0, 1:]).all()


@pytest.mark.parametrize("per_query", [False, True])
def test_residual_subset_returns_only_allowed_documents(corpus, per_query):
    d, off, q, src, ids = corpus
    index = TokenIndex.build(d, d_offsets=off, kind="residual", nbits=4, n_centroids=40, doc_ids=ids, progress=False)
    g = torch.Generator().manual_seed(1)
    shared = ids[torch.randperm(250, generator=g)[:60]].tolist()
    per = [ids[torch.randperm(250, generator=g)[:n]].tolist() for n in (2, 7, 60, 120, 1, 250)]
    subset = per if per_query else shared
    allowed = per if per_query else [shared] * q.shape[0]
    # every allowed document reranked: the filtered scan's answer, through every path
    scan_s, scan_i = index.search(q, k=10, subset=subset, method="scan")
    for params in ({"method": "plaid", "nprobe": 0, "ncandidates": 250},
                   {"method": "plaid", "nprobe": index.codec.centroids.shape[0], "ncandidates": 250}):
        for backend in ("auto", "torch"):
            s, i = index.search(q, k=10, subset=subset, backend=backend, **params)
            assert torch.equal(i, scan_i), (params, backend)
            torch.testing.assert_close(s, scan_s, rtol=1e-5, atol=1e-5)
    # the defaults and a small rerank: allowed documents only
    for params in ({}, {"ncandidates": 5}, {"nprobe": 2, "ncandidates": 20}):
        _, i = index.search(q, k=10, subset=subset, **params)
        for a in range(q.shape[0]):
            assert set(i[a][i[a] >= 0].tolist()) <= set(allowed[a]), (params, a)
    # the scan is the filtered decompressed MaxSim
    ref = index.exact_scores_decompressed(q)
    ok = torch.stack([torch.isin(ids, torch.as_tensor(a)) for a in allowed])
    top = torch.topk(ref.masked_fill(~ok, float("-inf")), 10, dim=1)
    assert torch.equal(scan_i, torch.where(torch.isinf(top.values), -1, ids[top.indices]))


def test_subset_and_deletion_combine(corpus):
    d, off, q, src, ids = corpus
    index = TokenIndex.build(d, d_offsets=off, kind="residual", nbits=4, n_centroids=40, doc_ids=ids, progress=False)
    shared = ids[:20].tolist()
    index.delete(shared[:10])
    for method in ("plaid", "scan"):
        _, i = index.search(q, k=10, subset=shared, method=method)
        assert set(i[i >= 0].tolist()) <= set(shared[10:]), method


def test_subset_is_checked_by_name(corpus):
    d, off, q, src, ids = corpus
    index = TokenIndex.build(d, d_offsets=off, kind="exact", doc_ids=ids, progress=False)
    with pytest.raises(TypeError, match=r"subset must be a 1-D sequence of int document ids"):
        index.search(q, k=3, subset=torch.ones(3))
    with pytest.raises(ValueError, match=r"subset has 2 per-query lists for 6 queries"):
        index.search(q, k=3, subset=[[1], [2]])
    with pytest.raises(TypeError, match=r"subset\[1\] must be a 1-D sequence"):
        index.search(q, k=3, subset=[[3]] + [[0.5]] * 5)
