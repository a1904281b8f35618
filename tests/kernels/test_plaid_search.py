"""plaid_search (a residual index's whole search in one call) against the float64 oracle (tests/oracle.py): every
backend, every ISA path of the cpu kernel, every nbits, int32 and uint16 codes, the spec's selection rules (eligible
documents only, the ncand best by centroid interaction, ties to the lower row, each document once), and bad input.

Two kinds of inputs:
- *dyadic*: queries, centroids and weights are small multiples of 1/8, so every product and sum is exact in fp32 and
  fp64 alike. The kernel's answer must then equal the oracle's exactly, including which of two tied documents wins:
  the selection and the top-k are checked bit for bit, with many exact ties.
- *random*: continuous values; the returned scores must match the oracle's exact scores of the returned documents at
  fp32-level bounds, the order must be descending, and each returned document must belong to the oracle's top set
  up to that bound.
"""
from __future__ import annotations

import pytest
import torch

import reatt_kernels as rk
from reatt_kernels import plaid_search

from ..isa import isa_params
from ..oracle import plaid_search_oracle
from ..utils import _has_cpu_ext, assert_fp32_level, noncontig

BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(not _has_cpu_ext(), reason="no C++ extension"))]
LENS = (3, 0, 20, 33, 1, 16, 17, 5, 48, 2, 9)  # one empty document; tile boundaries at 16 and 32


def make_index(nbits, D, lens=LENS, C=13, dyadic=True, code_dtype=torch.int32, g=None):
    g = g or torch.Generator().manual_seed(0)
    Nd = len(lens)
    off = torch.zeros(Nd + 1, dtype=torch.int64)
    off[1:] = torch.tensor(lens).cumsum(0)
    T = int(off[-1])
    if dyadic:
        cent = torch.randint(-8, 9, (C, D), generator=g).float() / 8
        w = torch.randint(-4, 5, (D, 1 << nbits), generator=g).float() / 8
    else:
        cent = torch.randn(C, D, generator=g)
        w = torch.randn(D, 1 << nbits, generator=g) * 0.3
    codes = torch.randint(0, C, (T,), generator=g, dtype=torch.int32)
    packed = torch.randint(0, 256, (T, D * nbits // 8), generator=g, dtype=torch.uint8)
    return cent, w, codes.to(code_dtype), packed, off


def make_queries(Bq, Lq, D, dyadic=True, g=None):
    g = g or torch.Generator().manual_seed(1)
    q = (torch.randint(-8, 9, (Bq, Lq, D), generator=g).float() / 8) if dyadic else torch.randn(Bq, Lq, D, generator=g)
    qm = torch.rand(Bq, Lq, generator=g) < 0.6  # holes anywhere, not only a prefix
    qm[0, 0] = True
    if Bq > 2:
        qm[2] = False  # a query with no valid token: every eligible document scores 0
    if Bq > 1:
        qm[1] = True
    return q, qm


def check_exact(out, orc, name):
    s, d = out
    assert torch.equal(d, orc["docs"]), f"{name}: docs\n{d}\n!= oracle\n{orc['docs']}"
    assert torch.equal(s.double(), orc["scores"]), f"{name}: scores\n{s}\n!= oracle\n{orc['scores']}"


DIMS = {1: 32, 2: 24, 4: 24, 8: 24}  # D * nbits whole bytes; 2-bit at D = 24 leaves a 2-byte tail past whole words


@pytest.mark.parametrize("nbits", [1, 2, 4, 8])
@pytest.mark.parametrize("backend", BACKENDS)
def test_plaid_search_dyadic_matches_oracle_exactly(backend, nbits):
    D = DIMS[nbits]
    cent, w, codes, packed, off = make_index(nbits, D)
    q, qm = make_queries(4, 19, D)
    Nd = off.numel() - 1
    live = torch.ones(Nd, dtype=torch.bool)
    live[4] = False
    allow = torch.ones(4, Nd, dtype=torch.bool)
    allow[3, ::2] = False
    for ncand, k in ((4, 3), (Nd, 5), (2, 6), (1, 1)):
        orc = plaid_search_oracle(q, qm, cent, w, codes, packed, off, nbits, k, ncand, live, allow)
        out = plaid_search(noncontig(q), cent, w, codes, packed, off, nbits, k=k, ncandidates=ncand, q_mask=qm,
                           live=live, allow=allow, backend=backend)
        check_exact(out, orc, f"{backend} nbits={nbits} ncand={ncand} k={k}")
    # the all-masked query: every eligible document scores 0, so the lowest rows win
    assert out[0][2].eq(0).all() and out[1][2, 0] == 0


@pytest.mark.parametrize("isa", isa_params("plaid_search"))
@pytest.mark.skipif(not _has_cpu_ext(), reason="no C++ extension")
def test_plaid_search_cpu_isa_paths(isa, force_isa):
    """Each ISA path, forced: every nbits, int32 and uint16 codes, candidate lists with padding and duplicates,
    query lengths that need 2 to 4 table blocks (LP 32..64)."""
    force_isa(isa)
    for nbits in (1, 2, 4, 8):
        D = DIMS[nbits]
        for code_dtype in (torch.int32, torch.uint16):
            cent, w, codes, packed, off = make_index(nbits, D, code_dtype=code_dtype)
            Nd = off.numel() - 1
            for Lq in (7, 40, 64):
                q, qm = make_queries(3, Lq, D)
                cand = torch.tensor([[2, 5, 5, -1, 9, 0, 3, 10], [1, -1, -1, 7, 8, 6, 4, 2], [0, 1, 2, 3, -1, 5, 6, 7]])
                for c in (None, cand):
                    orc = plaid_search_oracle(q, qm, cent, w, codes, packed, off, nbits, 4, 5, cand=c)
                    out = plaid_search(q, cent, w, codes, packed, off, nbits, k=4, ncandidates=5, q_mask=qm, cand=c,
                                       backend="cpu")
                    check_exact(out, orc, f"cpu {isa} nbits={nbits} {code_dtype} Lq={Lq} cand={c is not None}")
                    assert Nd == 11


@pytest.mark.parametrize("isa", isa_params("plaid_search"))
@pytest.mark.skipif(not _has_cpu_ext(), reason="no C++ extension")
def test_plaid_search_interaction_sees_every_token_position(isa, force_isa):
    """The centroid interaction's max reaches every token of a document (the SIMD levels split even and odd tokens and
    treat an odd tail apart): document 0 has one "high" token, at each position of each length 1..9 in turn, among
    "low" ones; document 1 is all "mid". With ncandidates = 1 only the interaction's winner is reranked, so the answer
    is document 0 exactly when its high token was seen. Queries of 1 and 17 valid tokens (LP 16 and 32)."""
    force_isa(isa)
    D, nbits = 16, 4
    g = torch.Generator().manual_seed(7)
    cent = torch.zeros(3, D)
    cent[:, 0] = torch.tensor([-1.0, 0.5, 2.0])  # codes: 0 low, 1 mid, 2 high (dyadic: exact in fp32)
    cent[:, 1:] = torch.randint(-2, 3, (3, D - 1), generator=g).float() / 64
    w = torch.randint(-1, 2, (D, 1 << nbits), generator=g).float() / 256  # residuals too small to reorder
    for nq in (1, 17):
        q = torch.zeros(1, nq, D)
        q[..., 0] = 1.0
        q[..., 1:] = torch.randint(-2, 3, (1, nq, D - 1), generator=g).float() / 64
        for L in range(1, 10):
            for pos in range(L):
                codes = torch.tensor([0] * L + [1] * L, dtype=torch.int32)
                codes[pos] = 2
                packed = torch.randint(0, 256, (2 * L, D * nbits // 8), generator=g, dtype=torch.uint8)
                off = torch.tensor([0, L, 2 * L])
                s, d = plaid_search(q, cent, w, codes, packed, off, nbits, k=1, ncandidates=1, backend="cpu")
                assert d.tolist() == [[0]], f"{isa}: nq={nq} length {L}, high token at {pos}: got document {d}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_plaid_search_ties_go_to_the_lower_row(backend):
    """Identical documents tie exactly in both stages: the lower rows are selected and returned first."""
    nbits, D = 4, 24
    cent, w, codes, packed, off = make_index(nbits, D, lens=(6, 6, 6, 6, 6, 6))
    base_codes, base_packed = codes[:6].clone(), packed[:6].clone()
    codes = base_codes.repeat(6)
    packed = base_packed.repeat(6, 1)
    q, qm = make_queries(2, 9, D)
    out = plaid_search(q, cent, w, codes, packed, off, nbits, k=4, ncandidates=3, q_mask=qm, backend=backend)
    assert out[1].tolist() == [[0, 1, 2, -1], [0, 1, 2, -1]]
    assert out[0][:, :3].eq(out[0][:, :1]).all() and torch.isinf(out[0][:, 3]).all()


# The avx512_bf16 rerank rounds q and the residual to bf16 (relative 2^-9 each; products and sums in fp32): its scores
# are within 2^-7 sum_i max_t sum_d |q_id| |r_td| of the exact ones (twice the first-order bound), on top of fp32 rounding.
BF16_RERANK_BOUND = 2.0 ** -7


@pytest.mark.parametrize("path", ["torch"] + [p for p in isa_params("plaid_search")])
def test_plaid_search_random_inputs(path, force_isa):
    """Continuous random inputs: scores of the returned documents against the oracle's exact scores (fp32-level, or
    the documented bf16 bound on the avx512_bf16 path), descending order, and each returned document in the oracle's
    answer up to that bound."""
    backend = "torch" if path == "torch" else "cpu"
    if backend == "cpu":
        if not _has_cpu_ext():
            pytest.skip("no C++ extension")
        force_isa(path)
    nbits, D = 4, 40
    g = torch.Generator().manual_seed(5)
    lens = tuple(int(x) for x in torch.randint(0, 60, (40,), generator=g))
    cent, w, codes, packed, off = make_index(nbits, D, lens=lens, C=29, dyadic=False, g=g)
    q, qm = make_queries(5, 23, D, dyadic=False, g=g)
    k, ncand = 7, 12
    orc = plaid_search_oracle(q, qm, cent, w, codes, packed, off, nbits, k, ncand)
    s, d = plaid_search(q, cent, w, codes, packed, off, nbits, k=k, ncandidates=ncand, q_mask=qm, backend=backend)
    assert (s[:, :-1] >= s[:, 1:]).all(), "scores must be descending"
    bf16 = path == "avx512_bf16"
    worst_err = 0.0
    for a in range(5):
        got = d[a][d[a] >= 0]
        assert got.numel() == (orc["docs"][a] >= 0).sum(), f"query {a}: {got.numel()} results"
        extra = BF16_RERANK_BOUND * orc["rmag"][a, got] if bf16 else torch.zeros(got.numel(), dtype=torch.float64)
        if bf16:
            err = (s[a, :got.numel()].double() - orc["exact"][a, got]).abs()
            assert (err <= extra + 1e-5 * (1 + orc["mag"][a, got])).all(), (err, extra)
            worst_err = max(worst_err, float(err.max()) if err.numel() else 0.0)
        else:
            assert_fp32_level(s[a, :got.numel()], orc["exact"][a, got], orc["mag"][a, got], backend=backend,
                              name=f"plaid_search[{path}] scores of query {a}")
        # each returned document is in the oracle's answer, or ties it within the path's rounding
        tol = 1e-5 * (1 + orc["mag"][a, got]) + 2 * extra
        worst_kept = orc["scores"][a][orc["docs"][a] >= 0].min()
        assert (orc["exact"][a, got] >= worst_kept - tol).all(), (got, orc["docs"][a])
    assert not bf16 or worst_err > 0, "the bf16 path should round (else this test checks nothing)"


@pytest.mark.skipif(not _has_cpu_ext(), reason="no C++ extension")
def test_plaid_search_matches_the_staged_ops():
    """The fused call returns what the staged pipeline of public ops returns (centroid_interaction, top-ncand,
    residual_maxsim, top-k), on the same dyadic inputs."""
    nbits, D = 4, 24
    cent, w, codes, packed, off = make_index(nbits, D)
    q, qm = make_queries(3, 11, D)
    qm[2, :2] = True
    table = rk.centroid_score_table(q, cent, qm)
    approx = rk.centroid_interaction(table, codes, off, None, qm)
    ncand, k = 5, 3
    for a in range(3):
        order = sorted(range(off.numel() - 1), key=lambda b: (-float(approx[a, b]), b))
        cand = torch.tensor([[b for b in order if approx[a, b] > float("-inf")][:ncand]])
        s = rk.residual_maxsim(q[a:a + 1], cent, w, codes, packed, off, cand, nbits, qm[a:a + 1])
        want = sorted(zip((-s[0]).tolist(), cand[0].tolist()))[:k]
        got_s, got_d = plaid_search(q[a:a + 1], cent, w, codes, packed, off, nbits, k=k, ncandidates=ncand,
                                    q_mask=qm[a:a + 1], backend="cpu")
        assert got_d[0].tolist() == [b for _, b in want] and got_s[0].tolist() == [-x for x, _ in want]


@pytest.mark.skipif(not _has_cpu_ext(), reason="no C++ extension")
def test_plaid_search_reports_stage_seconds():
    nbits, D = 4, 24
    cent, w, codes, packed, off = make_index(nbits, D)
    q, qm = make_queries(2, 5, D)
    st = torch.full((3,), -1.0, dtype=torch.float64)
    plaid_search(q, cent, w, codes, packed, off, nbits, k=2, ncandidates=3, q_mask=qm, stage_seconds=st,
                 backend="cpu")
    assert (st >= 0).all() and (st < 10).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_plaid_search_rejects_bad_input_by_name(backend):
    nbits, D = 4, 24
    cent, w, codes, packed, off = make_index(nbits, D)
    q, qm = make_queries(2, 5, D)
    kw = dict(k=2, ncandidates=3, q_mask=qm, backend=backend)
    bad_codes = codes.clone()
    bad_codes[7] = cent.shape[0]
    with pytest.raises((ValueError, IndexError, RuntimeError), match="code|index"):
        plaid_search(q, cent, w, bad_codes, packed, off, nbits, **kw)
    with pytest.raises((ValueError, IndexError, RuntimeError), match="candidate|index"):
        plaid_search(q, cent, w, codes, packed, off, nbits, cand=torch.tensor([[0, 11], [1, 2]]), **kw)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        plaid_search(q, cent, w, codes, packed, off, nbits, **dict(kw, k=0))
    with pytest.raises(ValueError, match="packed must be uint8"):
        plaid_search(q, cent, w, codes, packed[:, :-1], off, nbits, **kw)
    with pytest.raises(TypeError, match="codes must be int32 or uint16"):
        plaid_search(q, cent, w, codes.long(), packed, off, nbits, **kw)
    with pytest.raises(ValueError, match="allow must be bool"):
        plaid_search(q, cent, w, codes, packed, off, nbits, allow=torch.ones(3, 11, dtype=torch.bool), **kw)
    with pytest.raises(ValueError, match="q_mask must be bool"):
        plaid_search(q, cent, w, codes, packed, off, nbits, **dict(kw, q_mask=qm.int()))


@pytest.mark.skipif(not _has_cpu_ext(), reason="no C++ extension")
def test_plaid_search_cpu_rejects_bad_offsets():
    nbits, D = 4, 24
    cent, w, codes, packed, off = make_index(nbits, D)
    q, qm = make_queries(2, 5, D)
    bad = off.clone()
    bad[3] = bad[4] + 1  # not non-decreasing
    with pytest.raises(ValueError, match="d_offsets"):
        plaid_search(q, cent, w, codes, packed, bad, nbits, k=2, ncandidates=20, q_mask=qm, backend="cpu")


@pytest.mark.skipif(not _has_cpu_ext(), reason="no C++ extension")
def test_plaid_search_auto_runs_the_fp32_rerank(monkeypatch):
    """"auto" never picks the bf16 rerank (it rounds scores and measured only ~5 % faster): unforced results equal the
    fp32 path's bit for bit, on whichever fp32 level this CPU runs."""
    from reatt_kernels.cpu import isa as cpu_isa

    nbits, D = 4, 40
    g = torch.Generator().manual_seed(9)
    cent, w, codes, packed, off = make_index(nbits, D, lens=(30, 17, 45, 8, 33), C=11, dyadic=False, g=g)
    q, qm = make_queries(3, 13, D, dyadic=False, g=g)
    auto = plaid_search(q, cent, w, codes, packed, off, nbits, k=3, ncandidates=4, q_mask=qm, backend="cpu")
    best = cpu_isa.info()["best"]
    monkeypatch.setenv("REATT_CPU_ISA", "avx512" if best == "avx512_bf16" else best)
    fp32 = plaid_search(q, cent, w, codes, packed, off, nbits, k=3, ncandidates=4, q_mask=qm, backend="cpu")
    assert torch.equal(auto[0], fp32[0]) and torch.equal(auto[1], fp32[1])
