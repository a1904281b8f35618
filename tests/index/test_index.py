"""Token indexes: the codec, recall of the residual index against exact search per nbits, updates (add / delete / compact), durability (save / load, crash
mid-save, corruption) and edge cases (empty index, dim mismatch, k > documents). The fused op the residual index
searches with, ``residual_maxsim``, is tested per backend in tests/kernels/test_residual_maxsim.py."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from reatt_kernels.bench.datasets import clustered_corpus, clustered_queries
from reatt_kernels.index import IndexCorruptedError, ResidualCodec, TokenIndex
from reatt_kernels.index import io as index_io
from reatt_kernels.index.codec import pack_buckets, unpack_buckets

from ..oracle import residual_decode_oracle

DIM = 32
NBITS = [1, 2, 4, 8]


def test_residual_decode_matches_float64_reference():
    """Codec round trip: encode -> decode equals the float64 decompression reference, and packing is lossless."""
    x = torch.nn.functional.normalize(torch.randn(500, DIM), dim=-1)
    for nbits in NBITS:
        codec = ResidualCodec.train(x, 16, nbits, niter=4)
        codes, packed = codec.encode(x)
        assert codes.dtype == torch.int32 and packed.shape == (500, DIM * nbits // 8)
        dec = codec.decode(codes, packed, torch.float64)
        ref, _ = residual_decode_oracle(codec.centroids, codec.weights, codes, packed, nbits)
        torch.testing.assert_close(dec, ref, rtol=0, atol=1e-12)  # one fp32 + fp32 sum, exact in float64
        b = torch.randint(0, 1 << nbits, (7, DIM))
        assert torch.equal(unpack_buckets(pack_buckets(b, nbits), nbits, DIM), b)
        # more bits, less error: the 8-bit decode is close, the 1-bit one at least beats the centroid alone
        err = (dec.float() - x).norm(dim=1).mean()
        err_centroid = (codec.centroids[codes.long()] - x).norm(dim=1).mean()
        assert err < err_centroid * (0.1 if nbits == 8 else 0.9)


@pytest.mark.parametrize("nbits", NBITS)
def test_codec_pack_layout_matches_spec(nbits):
    """pack_buckets / ResidualCodec.decode follow the spec's bit layout (dimension d in byte d * nbits // 8 at bit
    (d * nbits) % 8, LSB first): decoding packed random buckets equals the oracle's decode, which reads that layout."""
    D, T, C = 16, 9, 3
    b = torch.randint(0, 1 << nbits, (T, D))
    codes = torch.randint(0, C, (T,), dtype=torch.int32)
    codec = ResidualCodec(torch.randn(C, D), torch.zeros(D, (1 << nbits) - 1), torch.randn(D, 1 << nbits), nbits)
    packed = pack_buckets(b, nbits)
    want = codec.centroids.double()[codes.long()] + codec.weights.double()[torch.arange(D)[None, :], b]
    got, _ = residual_decode_oracle(codec.centroids, codec.weights, codes, packed, nbits)
    assert torch.equal(got, want), "pack_buckets does not follow the spec's bit layout"
    assert torch.equal(codec.decode(codes, packed, torch.float64), want)
    assert torch.equal(unpack_buckets(packed, nbits, D), b)


@pytest.mark.parametrize("kind", ["exact", "residual"])
def test_deleted_documents_never_returned_small(kind):
    """A tiny index: a deleted document is never returned, even when it is the best match and k covers everything."""
    docs = [torch.nn.functional.normalize(torch.randn(n, 16), dim=-1) for n in (3, 5, 2, 4)]
    index = TokenIndex.build(docs, kind=kind, nbits=2, n_centroids=4, progress=False)
    q = docs[1][None, :3] + 0.01 * torch.randn(1, 3, 16)
    kw = {"exhaustive": True} if kind == "residual" else {}
    assert index.search(q, k=1, **kw)[1][0, 0] == 1
    index.delete([1])
    s, i = index.search(q, k=4, **kw)
    assert 1 not in i[0].tolist() and sorted(i[0, :3].tolist()) == [0, 2, 3] and i[0, 3] == -1


# ---- indexes on a small clustered corpus ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus():
    d, off = clustered_corpus(n_docs=400, dim=DIM, min_len=6, max_len=24, n_centroids=64, topics_per_doc=3,
                              noise=0.12, seed=3)
    q, src = clustered_queries(d, off, 12, q_len=8, noise=0.1, seed=4)
    return d, off, q, src


@pytest.fixture(scope="module")
def exact(corpus):
    d, off, q, _ = corpus
    return TokenIndex.build(d, d_offsets=off, kind="exact", progress=False)


@pytest.fixture(scope="module")
def residual(corpus):
    d, off, _, _ = corpus
    return TokenIndex.build(d, d_offsets=off, kind="residual", nbits=4, n_centroids=64, kmeans_iters=6,
                            progress=False)


def recall(ids, ref_ids, n):
    return sum(len(set(ids[a, :n].tolist()) & set(ref_ids[a, :n].tolist())) for a in range(ids.shape[0])) / (
        n * ids.shape[0])


# Recall@10 against exact search per nbits (exhaustive rerank over the decompressed corpus / the default pipeline):
# the floors sit below what this corpus measures, so a broken codec or pipeline fails them.
RECALL_FLOOR = {1: 0.65, 2: 0.75, 4: 0.85, 8: 0.95}


@pytest.mark.parametrize("nbits", NBITS)
def test_residual_recall_vs_exact(corpus, exact, nbits):
    d, off, q, src = corpus
    es, ei = exact.search(q, k=10)
    assert (ei[:, 0] == src).all(), "exact search must find each query's source document"
    index = TokenIndex.build(d, d_offsets=off, kind="residual", nbits=nbits, n_centroids=64, kmeans_iters=6,
                             progress=False)
    assert index.bytes_per_token == 2 + DIM * nbits / 8  # uint16 codes (64 centroids) + the packed residual
    _, xi = index.search(q, k=10, exhaustive=True)
    _, ri = index.search(q, k=10)
    _, pi = index.search(q, k=10, nprobe=3, ncandidates=40, timings=True)  # prunes: stages 1-2 really choose
    assert set(index.last_timings) == {"centroid_scores", "probe", "candidates", "approx", "plaid_search",
                                       "kernel_approx", "kernel_select", "kernel_rerank_topk"}
    assert (ri[:, 0] == src).all() and (pi[:, 0] == src).all()
    assert recall(xi, ei, 10) >= RECALL_FLOOR[nbits], recall(xi, ei, 10)
    assert recall(ri, ei, 10) >= RECALL_FLOOR[nbits] - 0.05, recall(ri, ei, 10)
    assert recall(pi, ei, 10) >= RECALL_FLOOR[nbits] - 0.15, recall(pi, ei, 10)


def test_exact_search_padded_queries_cost_valid_tokens_only(corpus, exact):
    """Exact search passes a padded query to the kernel as it is (the kernel packs the valid tokens; issue 29): padded
    queries with holes give bitwise the scores and ids of the same queries sliced to their valid tokens, on the cpu
    backend, whose packed lanes run the very same tiles as the sliced query's."""
    _, _, q, _ = corpus
    Bq, L, D = q.shape
    g = torch.Generator().manual_seed(9)
    qp = torch.randn(Bq, 2 * L, D, generator=g).to(q.dtype)  # junk in the masked slots: it must never matter
    qm = torch.zeros(Bq, 2 * L, dtype=torch.bool)
    for a in range(Bq):
        pos = torch.sort(torch.randperm(2 * L, generator=g)[:L]).values
        qp[a, pos] = q[a]
        qm[a, pos] = True
    ps, pi = exact.search(qp, qm, k=10, backend="cpu")
    for a in range(Bq):
        ss, si = exact.search(q[a:a + 1], k=10, backend="cpu")
        assert torch.equal(pi[a:a + 1], si) and torch.equal(ps[a:a + 1], ss), f"query {a}: padded != sliced"


def test_exact_index_prepares_its_corpus_once():
    """Exact full search reads a corpus prepared once (rk.prepare_corpus): the same one for every search, rebuilt when
    the tokens change (add, compact), with the results of maxsim_packed on the raw tokens."""
    import reatt_kernels as rk

    docs = [torch.nn.functional.normalize(torch.randn(n, 16), dim=-1) for n in (3, 5, 2, 4, 7)]
    index = TokenIndex.build(docs, kind="exact", progress=False)
    q = docs[3][None, :2].clone()
    s, i = index.search(q, k=5)
    first = index._prepared_corpus()
    assert index._prepared_corpus() is first and isinstance(first, rk.PreparedCorpus)
    want = rk.maxsim_packed(q.half(), index.tokens, index.offsets).float()
    assert torch.equal(s, want.topk(5, dim=1).values) and i[0, 0] == 3
    new = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    index.add([new])
    s2, i2 = index.search(new[None, :2], k=1)
    assert index._prepared_corpus() is not first and i2[0, 0] == 5, "the added document must be found"
    index.delete([5])
    index.compact()
    assert index._prepared_corpus().n_docs == 5 and index.search(new[None, :2], k=1)[1][0, 0] != 5


def test_exact_flat_path_matches_full(corpus, exact):
    _, _, q, _ = corpus
    fs, fi = exact.search(q, k=10)
    ss, si = exact.search(q, k=10, method="flat", k_token=256)
    assert torch.equal(fi, si)
    torch.testing.assert_close(fs, ss, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="k_token"):
        exact.search(q, k=10, method="flat", k_token=4096)


def test_build_input_forms_agree(corpus, residual):
    d, off, q, _ = corpus
    docs = [d[int(off[i]):int(off[i + 1])] for i in range(off.numel() - 1)]
    chunks = iter([docs[:150], (d[int(off[150]):int(off[300])], off[150:301] - off[150]), *docs[300:]])
    for form in (docs, chunks):
        idx = TokenIndex.build(form, kind="residual", codec=residual.codec, progress=False, chunk_tokens=500)
        assert torch.equal(idx.codes, residual.codes) and torch.equal(idx.packed, residual.packed)
        assert torch.equal(idx.offsets, residual.offsets) and torch.equal(idx.ivf_docs, residual.ivf_docs)
    ex = TokenIndex.build(iter(docs), kind="exact", progress=False, chunk_tokens=300)
    assert torch.equal(ex.tokens, d.half()) and torch.equal(ex.offsets, off)


@pytest.mark.parametrize("kind", ["exact", "residual"])
def test_add_delete_compact(corpus, exact, residual, kind):
    d, off, q, src = corpus
    base = exact if kind == "exact" else residual
    index = _clone(base)
    # add: new documents (copies of the queries' sources, perturbed) are found by their queries
    new_docs = [torch.nn.functional.normalize(q[a].float() + 0.01 * torch.randn_like(q[a].float()), dim=-1)
                for a in range(4)]
    new_ids = index.add(new_docs, doc_ids=[10_000 + a for a in range(4)])
    assert new_ids.tolist() == [10_000, 10_001, 10_002, 10_003]
    s, i = index.search(q[:4], k=3)
    assert i[:, 0].tolist() == new_ids.tolist()
    with pytest.raises(ValueError, match="unique"):
        index.add(new_docs[:1], doc_ids=[10_000])
    # delete: neither the new documents nor the sources come back, even with k = every document
    gone = torch.cat([new_ids, src[:4]])
    assert index.delete(gone) == 8
    s, i = index.search(q, k=index.doc_ids.numel(), **({"exhaustive": True} if kind == "residual" else {}))
    assert not torch.isin(i, gone).any()
    before = index.search(q, k=10)
    n_tok = index.n_tokens
    index.compact()
    assert index.n_tokens < n_tok and index.doc_ids.numel() == index.n_docs == 400 - 4
    after = index.search(q, k=10)
    assert torch.equal(before[1], after[1])
    torch.testing.assert_close(before[0], after[0])


def _clone(index: TokenIndex) -> TokenIndex:
    out = TokenIndex(index.kind, index.dim, nbits=index.nbits, codec=index.codec)
    for name in ("offsets", "doc_ids", "deleted") + (("tokens",) if index.kind == "exact" else
                                                     ("codes", "packed", "ivf_offsets", "ivf_docs")):
        setattr(out, name, getattr(index, name).clone())
    out.next_id = index.next_id
    return out


# ---- durability ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize("kind", ["exact", "residual"])
def test_save_load_search_identical(tmp_path, corpus, exact, residual, kind, mmap):
    _, _, q, _ = corpus
    index = _clone(exact if kind == "exact" else residual)
    index.delete([5, 7])
    index.save(tmp_path / "idx")
    loaded = TokenIndex.load(tmp_path / "idx", mmap=mmap)
    assert loaded.kind == kind and loaded.n_docs == index.n_docs and loaded.next_id == index.next_id
    a, b = index.search(q, k=10), loaded.search(q, k=10)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.isin(b[1], torch.tensor([5, 7])).any()


def test_crash_mid_save_keeps_previous_index(tmp_path, corpus, residual, monkeypatch):
    _, _, q, _ = corpus
    root = tmp_path / "idx"
    residual.save(root)
    expect = residual.search(q, k=10)
    changed = _clone(residual)
    changed.delete(expect[1][:, 0])

    def crash(name):
        if name == "packed":
            raise KeyboardInterrupt("injected crash mid-save")

    monkeypatch.setattr(index_io, "_AFTER_WRITE_HOOK", crash)
    with pytest.raises(KeyboardInterrupt):
        changed.save(root)
    monkeypatch.setattr(index_io, "_AFTER_WRITE_HOOK", None)
    assert any(p.name.startswith(".tmp-") for p in root.iterdir()), "the crash should leave a partial temp dir"
    got = TokenIndex.load(root).search(q, k=10)
    assert torch.equal(got[1], expect[1]) and torch.equal(got[0], expect[0])
    changed.save(root)  # the next save succeeds and clears the partial one
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())
    assert not torch.isin(TokenIndex.load(root).search(q, k=10)[1], expect[1][:, 0]).any()


def test_process_killed_mid_save_keeps_previous_index(tmp_path, corpus, exact):
    """A real crash: a child process dies (os._exit, no cleanup) after writing one array of the new generation."""
    import subprocess
    import sys

    _, _, q, _ = corpus
    root = tmp_path / "idx"
    exact.save(root)
    expect = exact.search(q, k=10)
    code = (
        "import os, sys, torch\n"
        "from reatt_kernels.index import TokenIndex\n"
        "from reatt_kernels.index import io\n"
        "ix = TokenIndex.load(sys.argv[1])\n"
        "ix.delete(ix.doc_ids[:50])\n"
        "io._AFTER_WRITE_HOOK = lambda name: os._exit(17) if name == 'deleted' else None\n"
        "ix.save(sys.argv[1])\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run([sys.executable, "-c", code, str(root)], env=env, timeout=120)
    assert proc.returncode == 17
    got = TokenIndex.load(root).search(q, k=10)
    assert torch.equal(got[1], expect[1]) and torch.equal(got[0], expect[0])


def test_corrupted_or_truncated_file_fails_loading(tmp_path, residual):
    root = tmp_path / "idx"
    residual.save(root)
    gen = root / (root / "CURRENT").read_text().strip()
    codes = gen / "codes.npy"
    raw = bytearray(codes.read_bytes())
    raw[-3] ^= 0x40  # one flipped bit in the data
    codes.write_bytes(bytes(raw))
    with pytest.raises(IndexCorruptedError, match="codes.npy.*checksum"):
        TokenIndex.load(root)
    raw[-3] ^= 0x40
    codes.write_bytes(bytes(raw[:-10]))  # truncated
    with pytest.raises(IndexCorruptedError, match="codes.npy.*truncated"):
        TokenIndex.load(root)
    codes.write_bytes(bytes(raw))
    TokenIndex.load(root)  # restored bytes load again
    (gen / "manifest.json").write_text("{not json")
    with pytest.raises(IndexCorruptedError, match="manifest.json"):
        TokenIndex.load(root)


# ---- edge cases ----------------------------------------------------------------------------------------------------
def test_empty_index(residual):
    q = torch.randn(2, 5, DIM)
    for index in (TokenIndex.build([], kind="exact", dim=DIM, progress=False),
                  TokenIndex.build([], kind="residual", dim=DIM, codec=residual.codec, nbits=4, progress=False)):
        s, i = index.search(q, k=3)
        assert s.shape == (2, 3) and (i == -1).all() and torch.isinf(s).all()
    with pytest.raises(ValueError, match="dim="):
        TokenIndex.build([], kind="exact", progress=False)


def test_query_dim_mismatch_raises(exact, residual):
    for index in (exact, residual):
        with pytest.raises(ValueError, match="query dim"):
            index.search(torch.randn(1, 4, DIM + 1), k=5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_query_rejected(exact, residual, bad):
    """NaN / inf in a query is an error naming where it is, for every index kind and path, never non-finite scores."""
    q = torch.nn.functional.normalize(torch.randn(3, 5, DIM), dim=-1)
    q[1, 2, 7] = bad
    for index, params in ((exact, {}), (exact, {"method": "flat"}), (residual, {}), (residual, {"exhaustive": True})):
        with pytest.raises(ValueError, match=r"non-finite.*query 1, token 2, dimension 7"):
            index.search(q, k=5, **params)
    # a masked-out token is still checked: padding must be finite too
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 2] = False
    with pytest.raises(ValueError, match="non-finite"):
        residual.search(q, mask, k=5)


def test_streamed_ivf_matches_rebuild(corpus, residual):
    """The inverted lists merged chunk by chunk during the build (and after add) equal a from-scratch rebuild."""
    d, off, _, _ = corpus
    idx = TokenIndex.build(d, d_offsets=off, kind="residual", nbits=4, codec=residual.codec, chunk_tokens=777,
                           progress=False)
    idx.add(d[: int(off[5])], d_offsets=off[:6])
    got = (idx.ivf_offsets.clone(), idx.ivf_docs.clone())
    idx._build_ivf()
    assert torch.equal(got[0], idx.ivf_offsets) and torch.equal(got[1], idx.ivf_docs)


def test_bf16_assignment_close_to_exact():
    """bf16 nearest-centroid assignment (used from BF16_MIN_CENTROIDS centroids up) may pick a near-tied second
    centroid, but its mean squared residual stays within 1% of exact fp32 assignment's."""
    from reatt_kernels.index.codec import assign

    x = torch.nn.functional.normalize(torch.randn(3001, 64), dim=-1)
    c = torch.randn(1031, 64) * 0.1
    exact = assign(x, c, bf16=False).long()
    fast = assign(x, c, bf16=True).long()
    e_exact = ((x - c[exact]) ** 2).sum(1).mean()
    e_fast = ((x - c[fast]) ** 2).sum(1).mean()
    assert (fast == exact).float().mean() > 0.9
    assert e_fast <= e_exact * 1.01, (float(e_fast), float(e_exact))


@pytest.mark.parametrize("kind", ["exact", "residual"])
def test_k_larger_than_documents(kind):
    docs = [torch.nn.functional.normalize(torch.randn(n, 16), dim=-1) for n in (3, 5, 2)]
    index = TokenIndex.build(docs, kind=kind, nbits=2, n_centroids=4, progress=False)
    q = torch.nn.functional.normalize(torch.randn(2, 4, 16), dim=-1)
    s, i = index.search(q, k=7, **({"exhaustive": True} if kind == "residual" else {}))
    assert s.shape == (2, 7) and i.shape == (2, 7)
    assert sorted(i[:, :3].flatten().tolist()) == [0, 0, 1, 1, 2, 2]
    assert (i[:, 3:] == -1).all() and torch.isinf(s[:, 3:]).all() and torch.isfinite(s[:, :3]).all()
    assert (s[:, :-1] >= s[:, 1:]).all()
