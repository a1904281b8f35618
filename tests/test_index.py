"""Token indexes: the fused decompress + MaxSim op per backend against a float64 reference, the codec, recall of the
residual index against exact search per nbits, updates (add / delete / compact), durability (save / load, crash
mid-save, corruption) and edge cases (empty index, dim mismatch, k > documents)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import reatt_kernels as rk
from reatt_kernels.datasets import clustered_corpus, clustered_queries
from reatt_kernels.index import IndexCorruptedError, ResidualCodec, TokenIndex, residual_maxsim
from reatt_kernels.index import io as index_io
from reatt_kernels.index.codec import pack_buckets, unpack_buckets

from .oracle import maxsim_oracle, residual_decode_oracle, residual_maxsim_oracle
from .utils import (BACKENDS, CUDA_EMU, _has_cpu_ext, _has_cuda_emu, assert_fp32_level, device_for, needs_cuda_emu,
                    noncontig)

BACKENDS = [*BACKENDS, CUDA_EMU]  # every op here runs its CUDA kernel under emulation too

DIM = 32
NBITS = [1, 2, 4, 8]


# ---- the fused op --------------------------------------------------------------------------------------------------
def make_codes(nbits, D=24, C=7, lens=(3, 0, 20, 70, 1, 5, 33), Bq=3, Lq=5, Nc=6, device="cpu"):
    """Random codes for odd-sized documents (one empty), candidates with -1 padding and a repeated document, and
    one all-masked query row."""
    Nd = len(lens)
    off = torch.zeros(Nd + 1, dtype=torch.int64)
    off[1:] = torch.tensor(lens).cumsum(0)
    T = int(off[-1])
    cent = torch.randn(C, D)
    w = torch.randn(D, 1 << nbits) * 0.3
    codes = torch.randint(0, C, (T,), dtype=torch.int32)
    packed = torch.randint(0, 256, (T, D * nbits // 8), dtype=torch.uint8)
    q = torch.randn(Bq, Lq, D)
    qm = torch.rand(Bq, Lq) < 0.7
    qm[0, 0] = True
    qm[-1] = False
    cand = torch.randint(-1, Nd, (Bq, Nc))
    cand[0, :3] = torch.tensor([1, 3, 3])  # the empty document, and one document twice
    to = lambda t: t.to(device)  # noqa: E731
    return [to(t) for t in (q, qm, cent, w, codes, packed, off, cand)]


@pytest.mark.parametrize("nbits", NBITS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_maxsim_matches_reference(backend, nbits):
    D = 24 if nbits != 1 else 32  # D * nbits must fill whole bytes
    q, qm, cent, w, codes, packed, off, cand = make_codes(nbits, D=D, device=device_for(backend))
    q = noncontig(q)
    ref, mag = residual_maxsim_oracle(q, qm, cent, w, codes, packed, off, cand, nbits)
    out = residual_maxsim(q, cent, w, codes, packed, off, cand, nbits, qm, backend=backend)
    assert out.dtype == torch.float32 and out.shape == cand.shape
    assert_fp32_level(out, ref, mag, backend=backend,
                      name=f"residual_maxsim[{backend}, nbits={nbits}]")
    # the spec's edge cases, exactly
    assert torch.isinf(out[0, 0]) and out[0, 0] < 0, "an empty document must score -inf"
    assert (out[-1][cand[-1] >= 0] == 0).all(), "a query with no valid token must score 0"
    assert torch.isinf(out[cand < 0]).all(), "padding candidates must score -inf"


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


def test_residual_maxsim_opcheck_and_compile():
    q, qm, cent, w, codes, packed, off, cand = make_codes(2)
    args = (q, qm, cent, w, codes, packed, off, cand, 2)
    for backend in ["torch"] + (["cpu"] if _has_cpu_ext() else []) + (["cuda_emu"] if _has_cuda_emu() else []):
        torch.library.opcheck(torch.ops.reatt.residual_maxsim.default, args + (backend,))
    fn = torch.compile(lambda *a: residual_maxsim(a[0], *a[2:8], 2, a[1], backend="torch"), fullgraph=True,
                       backend="aot_eager")
    out = fn(*args[:8])
    torch.testing.assert_close(out, residual_maxsim(q, cent, w, codes, packed, off, cand, 2, qm, backend="torch"))


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
    assert index.bytes_per_token == 4 + DIM * nbits / 8
    _, xi = index.search(q, k=10, exhaustive=True)
    _, ri = index.search(q, k=10)
    _, pi = index.search(q, k=10, nprobe=3, ncandidates=40, timings=True)  # prunes: stages 1-2 really choose
    assert set(index.last_timings) == {"centroid_scores", "probe", "candidates", "approx", "decompress_rerank", "topk"}
    assert (ri[:, 0] == src).all() and (pi[:, 0] == src).all()
    assert recall(xi, ei, 10) >= RECALL_FLOOR[nbits], recall(xi, ei, 10)
    assert recall(ri, ei, 10) >= RECALL_FLOOR[nbits] - 0.05, recall(ri, ei, 10)
    assert recall(pi, ei, 10) >= RECALL_FLOOR[nbits] - 0.15, recall(pi, ei, 10)


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
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
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


def test_residual_maxsim_rejects_out_of_range_indices():
    """Offsets past the codes, candidate ids past the documents and codes past the centroids fail in Python, naming
    the argument, before any kernel could read out of bounds."""
    q, qm, cent, w, codes, packed, off, cand = make_codes(2)
    bad_off = off.clone()
    bad_off[-1] += 4
    with pytest.raises(ValueError, match="d_offsets must end"):
        residual_maxsim(q, cent, w, codes, packed, bad_off, cand, 2, qm, backend="torch")
    bad_cand = cand.clone()
    bad_cand[1, 2] = off.shape[0] - 1
    with pytest.raises(ValueError, match="cand must hold document ids"):
        residual_maxsim(q, cent, w, codes, packed, off, bad_cand, 2, qm, backend="torch")
    bad_codes = codes.clone()
    bad_codes[5] = cent.shape[0]
    with pytest.raises(ValueError, match="codes must hold centroid ids"):
        residual_maxsim(q, cent, w, codes=bad_codes, packed=packed, d_offsets=off, cand=cand, nbits=2, q_mask=qm,
                        backend="torch")


# ---- the cuda kernel's shared memory against the device's opt-in limit (cuda_emu: the limit is ours to set) ----------
SMEM_LIMITS_KB = {"H100": 227, "A100": 163, "sm_86/89": 99}


@pytest.fixture
def emu_limits():
    """Restores the emulated device limits after a test that changes them."""
    from reatt_kernels.cuda_emu import set_device_limits

    old = set_device_limits()
    yield set_device_limits
    set_device_limits(**old)


def _residual_smem_bytes(Lq, D):
    """The kernel's shared memory, written from its layout: query [Lq, D] + token tile [32, D + 1] + row maxima [Lq]."""
    return 4 * (Lq * D + 32 * (D + 1) + Lq)


@needs_cuda_emu
@pytest.mark.parametrize("gpu", list(SMEM_LIMITS_KB))
def test_residual_maxsim_cuda_emu_smem_limit(emu_limits, gpu):
    """The support check counts query tile + token tile + row maxima against cudaDevAttrMaxSharedMemoryPerBlockOptin:
    the largest query that fits runs (and matches the reference), one more query token is refused with the byte counts
    (also when the query tile alone would still fit), and the launcher itself refuses it with a clear error when
    called past the check, leaving no pending CUDA error behind."""
    import reatt_kernels._C_emu as E
    from reatt_kernels.cuda_emu.residual import _residual_maxsim_fwd

    limit = SMEM_LIMITS_KB[gpu] * 1024
    emu_limits(smem_optin=limit)
    D, nbits = 64, 4
    lq_fit = (limit // 4 - 32 * (D + 1)) // (D + 1)
    assert _residual_smem_bytes(lq_fit, D) <= limit < _residual_smem_bytes(lq_fit + 1, D)
    assert E.residual_maxsim_smem_cuda(lq_fit + 1, D) == (_residual_smem_bytes(lq_fit + 1, D), limit)
    q, qm, cent, w, codes, packed, off, cand = make_codes(nbits, D=D, lens=(5, 0, 37), Bq=1, Lq=lq_fit + 1, Nc=3)
    cand[0] = torch.tensor([2, 1, 0])
    args = (cent, w, codes, packed, off, cand, nbits)
    out = residual_maxsim(q[:, :lq_fit], *args, qm[:, :lq_fit], backend="cuda_emu")
    ref, mag = residual_maxsim_oracle(q[:, :lq_fit], qm[:, :lq_fit], *args)
    assert_fp32_level(out, ref, mag, backend="cuda_emu", name=f"residual_maxsim cuda_emu at {gpu}'s limit")
    assert 4 * (lq_fit + 1) * D <= limit, "the query tile alone still fits: only the full count refuses it"
    with pytest.raises(rk.BackendUnavailableError, match=f"needs {_residual_smem_bytes(lq_fit + 1, D)} bytes"):
        residual_maxsim(q, *args, qm, backend="cuda_emu")
    with pytest.raises(ValueError, match=f"this device allows {limit}"):
        _residual_maxsim_fwd(q.contiguous(), qm.contiguous(), *args)
    assert E.get_last_error() == 0, "a refused launch must leave no pending CUDA error"
    again = residual_maxsim(q[:, :lq_fit], *args, qm[:, :lq_fit], backend="cuda_emu")
    assert torch.equal(again, out), "the next valid launch must run cleanly"


@needs_cuda_emu
def test_refused_launch_leaves_no_pending_error_cuda_emu(emu_limits):
    """maxsim at dim 256 cannot fit any tiling in a 48 KB device: the launcher refuses it (its planner, or a failed
    cudaFuncSetAttribute: the macro clears that error before throwing), leaves no pending runtime error, and the next
    valid launch (any kernel) succeeds."""
    import reatt_kernels._C_emu as E
    from reatt_kernels.cuda_emu.maxsim import _maxsim_fwd

    emu_limits(smem_optin=48 * 1024)
    q = torch.randn(2, 40, 256).bfloat16()
    d = torch.randn(3, 9, 256).bfloat16()
    qm = torch.ones(2, 40, dtype=torch.bool)
    with pytest.raises((RuntimeError, ValueError), match="shared memory|cudaFuncSetAttribute"):
        _maxsim_fwd(q, d, qm, None, None, None, 0, False)
    assert E.get_last_error() == 0, "the refused launch left a CUDA error pending"
    # the next valid launches run: a residual_maxsim (D = 16: under 48 KB) and a small maxsim
    c = make_codes(2, D=16, Bq=2, Lq=3, Nc=4)
    out = residual_maxsim(c[0], *c[2:], 2, c[1], backend="cuda_emu")
    ref, mag = residual_maxsim_oracle(c[0], c[1], *c[2:], 2)
    assert_fp32_level(out, ref, mag, backend="cuda_emu", name="residual_maxsim after the refused launch")
    qs, ds, qms = q[:, :5, :16].contiguous(), d[..., :16].contiguous(), qm[:, :5].contiguous()
    s = rk.maxsim(qs, ds, qms, backend="cuda_emu")
    o = maxsim_oracle("padded", qs, ds, qms)
    assert_fp32_level(s, o["score"], o["mag"], backend="cuda_emu", name="maxsim after the refused launch")
