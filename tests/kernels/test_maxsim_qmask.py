"""MaxSim with masked query tokens (issue 29, item 0): the kernels pack a query's valid tokens (cpu: into the first
vector lanes; cuda: into the first rows of a row block; triton: into the first token chunk), so these are the masks
that break a packing: random holes, an all-masked query, a single valid token, the last token only, valid tokens only
beyond the first vector tile (i >= 40: past the 32 lanes of an AVX-512 tile and the 32 rows of a CUDA warp), a
prefix, and a full query, one pattern per query of a batch.

The bias distance uses the ORIGINAL token index (r = n_a + j - i), so a lane packed to the wrong index shows in the
scores: the tables here are shorter than the largest distance (the clamp is hit) and differ per distance. Inputs are
discrete (every dot product exact, twin document tokens: exact ties, the lowest j wins), with an empty document, in
every layout and dtype, checked against the float64 oracle (tests/oracle.py): argmax exactly (-1 on every masked
token), scores and gradients at fp32 level, and exactly zero dq on masked query rows. Outputs are poisoned (NaN)
before the kernels write them (REATT_POISON=1, tests/conftest.py).
"""
from __future__ import annotations

import pytest
import torch

import reatt_kernels as rk
from reatt_kernels.cpu import isa as cpu_isa

from ..isa import isa_params
from ..oracle import maxsim_oracle
from ..utils import BACKENDS, CUDA_EMU, DTYPES, assert_fp32_level, device_for, discrete, noncontig
from .test_maxsim import _leaf, run_api, run_oracle

BACKENDS = [*BACKENDS, CUDA_EMU]
# The fast tier runs the first layout / dim of each matrix below, `make ci` the rest (marked slow here: tests/conftest.py's
# FIRST_SHAPE_ONLY reads callspec.indices, which pytest 9 numbers per combination, not per parameter).
LAYOUTS = ["padded", pytest.param("packed", marks=pytest.mark.slow), pytest.param("grouped", marks=pytest.mark.slow)]
PATTERNS = ["holes", "all_masked", "single", "last_only", "beyond_first_tile", "prefix", "full"]


def qmask_patterns(Lq: int, gen: torch.Generator) -> torch.Tensor:
    """bool [len(PATTERNS), Lq], one row per pattern (Lq >= 44)."""
    m = torch.zeros(len(PATTERNS), Lq, dtype=torch.bool)
    holes = torch.rand(Lq, generator=gen) < 0.5
    holes[:2] = torch.tensor([False, True])  # a hole at the start, then a valid token
    m[0] = holes
    m[2, 17] = True  # a single valid token, mid-query
    m[3, Lq - 1] = True  # the last token only
    m[4, 40:] = True  # only beyond the first 32-lane / 32-row tile, with a hole
    m[4, 42] = False
    m[5, :16] = True
    m[6] = True
    return m


def qmask_case(layout: str, dtype, device, *, Lq: int = 45, Nd: int = 5, Ld: int = 23, D: int = 33, R: int = 30,
               contiguous: bool = True, seed: int = 0) -> dict:
    """A case dict for tests/kernels/test_maxsim.py's run_api / run_oracle: 7 queries (one per PATTERNS row) x Nd
    documents (n per query when grouped) with twin last tokens and one empty document; pos_bias [R] with R shorter than
    the largest distance Lq + Ld - 2."""
    gen = torch.Generator().manual_seed(seed)
    Bq = len(PATTERNS)
    q = discrete((Bq, Lq, D), dtype, scale=2)
    case = dict(layout=layout, q=q.to(device), q_mask=qmask_patterns(Lq, gen).to(device),
                pos_bias=discrete((R,)).to(device))
    if layout == "packed":
        lens = torch.randint(2, Ld + 1, (Nd,), generator=gen)
        lens[1] = 0
        off = torch.zeros(Nd + 1, dtype=torch.int64)
        off[1:] = lens.cumsum(0)
        d = discrete((int(off[-1]), D), dtype, scale=2)
        for b in range(Nd):
            if lens[b] >= 2:
                d[int(off[b + 1]) - 1] = d[int(off[b + 1]) - 2]
        case.update(d=d.to(device), d_offsets=off.to(device), d_mask=None)
    else:
        n_docs = Bq * Nd if layout == "grouped" else Nd
        d = discrete((n_docs, Ld, D), dtype, scale=2)
        d[:, -1] = d[:, -2]
        dm = torch.rand(n_docs, Ld, generator=gen) < 0.8
        dm[:, -2:] = True
        dm[1] = False
        if layout == "grouped":
            d, dm = d.reshape(Bq, Nd, Ld, D), dm.reshape(Bq, Nd, Ld)
        case.update(d=d.to(device), d_mask=dm.to(device), d_offsets=None)
    if not contiguous:
        case["q"], case["d"] = noncontig(case["q"]), noncontig(case["d"])
    return case


def check_qmask_case(case: dict, backend: str, reduce: str = "mean", name: str = "") -> None:
    """Forward and backward of one case against the oracle (see the module docstring)."""
    dev = case["q"].device
    case = _leaf(case)
    out, am = run_api(case, backend, reduce, return_argmax=True)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dev)
    orc = run_oracle(case, reduce, grad=g)
    qm = case["q_mask"].cpu()
    got_am = am.cpu().long()
    assert torch.equal(got_am, orc["argmax"]), (
        f"{name}: argmax differs from the oracle at {(got_am != orc['argmax']).nonzero()[:5].tolist()}")
    assert (got_am.permute(0, 2, 1)[~qm] == -1).all(), f"{name}: a masked query token has an argmax"
    assert_fp32_level(out, orc["score"], orc["mag"], backend=backend, name=f"{name} scores")
    assert torch.all(out[qm.sum(1) == 0] == 0), f"{name}: an all-masked query must score 0"
    finite = torch.isfinite(orc["score"]).to(dev)
    out.backward(torch.where(finite, g, torch.zeros_like(g)))
    dq = case["q"].grad
    assert torch.all(dq.cpu()[~qm] == 0), f"{name}: a masked query row received gradient"
    for key, gname in (("q", "dq"), ("d", "dd"), ("pos_bias", "dbias")):
        got = case[key].grad
        assert got is not None and got.dtype == case[key].dtype, f"{name}: {gname} missing or in the wrong dtype"
        assert_fp32_level(got, orc[gname], orc[f"mag_{gname}"], backend=backend, name=f"{name} {gname}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_maxsim_qmask_patterns(backend, dtype, layout):
    """Every backend, dtype and layout on the seven mask patterns (odd dim 33, 45 query tokens)."""
    case = qmask_case(layout, dtype, device_for(backend))
    check_qmask_case(case, backend, name=f"{backend} {layout} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_maxsim_qmask_noncontiguous_sum(backend):
    """Strided q and d (the converting copy paths), reduce="sum"."""
    case = qmask_case("padded", torch.float32, device_for(backend), contiguous=False, seed=3)
    assert not case["q"].is_contiguous()
    check_qmask_case(case, backend, reduce="sum", name=f"{backend} noncontig")


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("D", [33, pytest.param(128, marks=pytest.mark.slow)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("isa", isa_params("maxsim"))
def test_maxsim_qmask_cpu_isa(isa, dtype, D, layout, force_isa, monkeypatch):
    """Every CPU kernel ISA (REATT_CPU_ISA), at dim 128 (the AVX-512 tiles) and an odd dim, with 7-token document
    segments (REATT_CPU_MAXSIM_SEG: the running max of a packed lane carried across segments) and whole documents."""
    force_isa(isa)
    for seg in ("0", "7"):
        monkeypatch.setenv("REATT_CPU_MAXSIM_SEG", seg)
        case = qmask_case(layout, dtype, torch.device("cpu"), D=D, Ld=37, seed=int(seg))
        check_qmask_case(case, "cpu", name=f"cpu {isa} {layout} {dtype} D={D} seg={seg}")


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_maxsim_qmask_long_query(backend, layout):
    """150 query tokens (several CUDA row chunks, two Triton token chunks, ten AVX-512 vectors): holes everywhere,
    valid tokens only past token 130, an all-masked query and a full one. Packed, the first three fit one chunk, so
    whole programs / row chunks have no valid row (the Triton forward, dq and dbias skip them)."""
    dev = device_for(backend)
    Lq, D = 150, 64
    case = qmask_case(layout, torch.float32, dev, Lq=Lq, Nd=4, Ld=19, D=D, R=40, seed=5)
    qm = torch.zeros(4, Lq, dtype=torch.bool)
    qm[0] = torch.rand(Lq, generator=torch.Generator().manual_seed(2)) < 0.6
    qm[1, 131:] = True
    qm[3] = True
    case.update(q=discrete((4, Lq, D), scale=2).to(dev), q_mask=qm.to(dev))
    check_qmask_case(case, backend, name=f"{backend} {layout} long query")


@pytest.mark.parametrize("backend", ["cpu", pytest.param("torch")])
def test_maxsim_qmask_padded_equals_sliced(backend):
    """A padded query costs its valid tokens only because the kernel packs them, so passing it padded gives the same
    result as slicing it to its valid tokens first (the index's exact search relies on this). The cpu kernel computes
    the very same tiles either way: bitwise equal."""
    if backend == "cpu" and rk.available_backends()["cpu"] != "ok":
        pytest.skip("reatt_kernels._C not built")
    g = torch.Generator().manual_seed(4)
    q = torch.randn(3, 32, 64, generator=g)
    qm = torch.rand(3, 32, generator=g) < 0.5
    tok = torch.randn(300, 64, generator=g)
    off = torch.tensor([0, 40, 40, 170, 300])
    padded = rk.maxsim_packed(q, tok, off, qm, backend=backend)
    for a in range(3):
        sliced = rk.maxsim_packed(q[a:a + 1, qm[a]], tok, off, backend=backend)
        if backend == "cpu":
            assert torch.equal(padded[a:a + 1], sliced), "padded and sliced queries differ"
        else:
            torch.testing.assert_close(padded[a:a + 1], sliced)


def test_maxsim_qmask_cpu_bias_gather_all_isas(force_isa):
    """Tiles that straddle a hole read the bias per lane (a gather) and contiguous tiles read it as one run: a query
    whose first half is a prefix and whose second half has holes takes both paths in one call, on every ISA path this
    CPU runs (test_maxsim_qmask_cpu_isa reports the others as not testable)."""
    if rk.available_backends()["cpu"] != "ok":
        pytest.skip("reatt_kernels._C not built")
    Lq, D = 70, 16
    qm = torch.ones(2, Lq, dtype=torch.bool)
    qm[0, 40::3] = False
    qm[1, ::2] = False
    q = discrete((2, Lq, D), scale=2)
    d = discrete((3, 50, D), scale=2)
    pb = discrete((Lq + 50,), scale=8)  # every distance its own value: a lane with the wrong index is caught
    orc = maxsim_oracle("padded", q, d, qm, None, None, pb, "sum")
    for isa in [lv for lv in cpu_isa.paths("maxsim") if cpu_isa.runnable(lv)]:
        force_isa(isa)
        s, am = rk.maxsim(q, d, qm, pos_bias=pb, backend="cpu", return_argmax=True)
        assert torch.equal(am.long(), orc["argmax"]), f"{isa}: argmax differs from the oracle"
        assert torch.equal(s.double(), orc["score"]), f"{isa}: scores are not exact"
