"""A corpus prepared once (issue 29, item 1): ``rk.prepare_corpus`` stores the offsets (validated once) and, with
``screen=True`` where the cpu kernel screens fp32 / fp16 documents in bf16 (an AVX512_BF16 CPU), its bf16 screen rows
and per-document norm bounds, so no search converts the corpus again. ``maxsim`` and ``maxsim_packed`` take the prepared corpus in place of
the documents.

The screen only decides which dot products the kernel computes exactly, so the results must be those of the
unprepared call bit for bit, and those of the float64 oracle (tests/oracle.py): on every ISA path (the screen is read
by avx512_bf16 only; the others must ignore it), with document segments (REATT_CPU_MAXSIM_SEG), masked query tokens,
a clamped bias, empty documents, adversarial near-ties (every token a candidate: the fallback converts the prepared
fp16 rows itself), and through every backend and autograd.
"""
from __future__ import annotations

import pytest
import torch

import reatt_kernels as rk
from reatt_kernels.cpu import isa as cpu_isa
from reatt_kernels.cpu import maxsim as cpu_maxsim

from ..isa import isa_params
from ..oracle import maxsim_oracle
from ..utils import BACKENDS, CUDA_EMU, DTYPES, assert_fp32_level, device_for, discrete, needs_cpu_ext, random_mask

BACKENDS = [*BACKENDS, CUDA_EMU]


def _corpus(Nd, max_len, D, dtype, gen, seed=0, empty=(1,)):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len + 1, (Nd,), generator=g)
    for b in empty:
        lens[b] = 0
    off = torch.zeros(Nd + 1, dtype=torch.int64)
    off[1:] = lens.cumsum(0)
    return gen((int(off[-1]), D)).to(dtype), off


def _unit(shape):
    return torch.nn.functional.normalize(torch.randn(shape), dim=-1)


@needs_cpu_ext
def test_prepare_corpus_layout():
    """The screen is the bf16 rounding of every row, zero past dim, Dq = dim rounded up to 32 apart; the bound is an
    upper bound of each document's largest row norm, and tight (an empty document: 0). bf16 tokens need no screen."""
    tok, off = _corpus(9, 30, 40, torch.float32, _unit, empty=(1, 4))
    tok[off[2] + 3] *= 3.0  # the largest row of document 2 is not its first
    c = rk.prepare_corpus(tok, off, screen=True)
    assert c.n_docs == 9 and c.dim == 40 and torch.equal(c.offsets, off)
    if not cpu_maxsim.screen_useful(torch.float32):
        assert c.screen is None and c.norm is None
        pytest.skip("this CPU's maxsim kernel has no bf16 screen (no AVX512_BF16): nothing more to check")
    assert c.screen.dtype == torch.bfloat16 and tuple(c.screen.shape) == (tok.shape[0], 64)
    assert torch.equal(c.screen[:, :40], tok.bfloat16()) and (c.screen[:, 40:].float() == 0).all()
    for b in range(9):
        rows = tok[off[b]:off[b + 1]].double()
        true = rows.norm(dim=1).max().item() if rows.shape[0] else 0.0
        assert true <= c.norm[b].item() <= true * (1 + 1e-5) + 1e-30, f"document {b}: bound {c.norm[b]} vs {true}"
    assert rk.prepare_corpus(tok.bfloat16(), off, screen=True).screen is None
    assert rk.prepare_corpus(tok, off).screen is None  # off by default


@needs_cpu_ext
@pytest.mark.parametrize("seg", ["0", "7"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("isa", isa_params("maxsim"))
def test_prepared_equals_unprepared(isa, dtype, seg, force_isa, monkeypatch):
    """Continuous unit vectors (the screen keeps real candidates) and discrete ones (exact dot products, ties): a
    prepared corpus gives the unprepared scores and argmax bit for bit, and the oracle's (fp32-level; the exact argmax
    for discrete inputs), with query masks (holes, an all-masked query), a clamped bias, mean, empty documents."""
    force_isa(isa)
    monkeypatch.setenv("REATT_CPU_MAXSIM_SEG", seg)
    Bq, Lq, Nd, D = 3, 21, 17, 64
    for gen, exact in ((_unit, False), (lambda s: discrete(s, scale=2), True)):
        tok, off = _corpus(Nd, 40, D, dtype, gen, seed=int(seg))
        q = gen((Bq, Lq, D)).to(dtype)
        qm = random_mask((Bq, Lq), p_true=0.6)
        qm[1] = False
        pb = torch.randn(20) * 0.1
        corpus = rk.prepare_corpus(tok, off, screen=True)
        s1, a1 = rk.maxsim_packed(q, corpus, None, qm, pos_bias=pb, reduce="mean", backend="cpu", return_argmax=True)
        s0, a0 = rk.maxsim_packed(q, tok, off, qm, pos_bias=pb, reduce="mean", backend="cpu", return_argmax=True)
        assert torch.equal(a1, a0), f"{isa} {dtype}: argmax differs from the unprepared call"
        assert torch.equal(s1, s0), f"{isa} {dtype}: scores differ from the unprepared call"
        orc = maxsim_oracle("packed", q, tok, qm, None, off, pb, "mean")
        assert_fp32_level(s1, orc["score"], orc["mag"], name=f"{isa} {dtype} prepared")
        if exact:
            assert torch.equal(a1.long(), orc["argmax"]), f"{isa} {dtype}: argmax differs from the oracle"


@needs_cpu_ext
@pytest.mark.parametrize("seg", ["0", "7"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prepared_filter_adversarial(dtype, seg, monkeypatch):
    """Every document token equal up to differences bf16 cannot see (test_maxsim_cpu.py's adversarial filter case): on
    the screened path every token is a candidate, whole documents exhaust the rescoring budget and fall back to the
    plain fp32 tile (for fp16 rows the fallback converts the prepared rows itself), 7-token segments rescore every
    candidate (fp16: one converted row at a time). Every dot product is exact, so the oracle's argmax and scores are
    the answer, exactly."""
    monkeypatch.setenv("REATT_CPU_MAXSIM_SEG", seg)
    Bq, Lq, Nd, Ld, D = 2, 9, 5, 50, 32
    q = (torch.randint(-512, 513, (Bq, Lq, D)).float() / 256).to(dtype)
    base = torch.randint(-1000, 1001, (Nd, 1, D))
    d = ((base + torch.randint(-2, 3, (Nd, Ld, D))).clamp(-1024, 1024).float() / 1024).to(dtype)
    lens = torch.tensor([50, 0, 17, 33, 1])
    off = torch.zeros(Nd + 1, dtype=torch.int64)
    off[1:] = lens.cumsum(0)
    tok = torch.cat([d[b, :lens[b]] for b in range(Nd)])
    qm = torch.ones(Bq, Lq, dtype=torch.bool)
    qm[1, 3] = False
    pb = torch.randint(-4, 5, (Lq + Ld,)).float() / 8
    s, am = rk.maxsim_packed(q, rk.prepare_corpus(tok, off, screen=True), None, qm, pos_bias=pb, backend="cpu",
                             return_argmax=True)
    orc = maxsim_oracle("packed", q, tok, qm, None, off, pb, "sum")
    assert torch.equal(am.long(), orc["argmax"]), "argmax differs from the exact oracle"
    assert torch.equal(s.double(), orc["score"]), "scores are not the exact fp32 maxima"


@pytest.mark.parametrize("backend", BACKENDS)
def test_prepared_corpus_every_backend_and_autograd(backend):
    """Every backend takes a prepared corpus (the others read its rows and offsets): the scores and argmax of the
    unprepared call, through maxsim_packed and maxsim alike, and q's gradient through it."""
    dev = device_for(backend)
    tok, off = _corpus(6, 13, 33, torch.float32, lambda s: discrete(s, scale=2), seed=2)
    tok, off = tok.to(dev), off.to(dev)
    corpus = rk.prepare_corpus(tok, off, screen=True)
    q = discrete((3, 7, 33), scale=2).to(dev).requires_grad_(True)
    qm = random_mask((3, 7)).to(dev)
    s1, a1 = rk.maxsim_packed(q, corpus, None, qm, backend=backend, return_argmax=True)
    s2 = rk.maxsim(q, corpus, qm, backend=backend)
    q0 = q.detach().clone().requires_grad_(True)
    s0, a0 = rk.maxsim_packed(q0, tok, off, qm, backend=backend, return_argmax=True)
    assert torch.equal(a1, a0) and torch.equal(s1, s0) and torch.equal(s2, s0), f"{backend}: prepared != unprepared"
    g = torch.randn(s0.shape).to(dev)
    fin = torch.isfinite(s0)
    s1.backward(torch.where(fin, g, torch.zeros_like(g)))
    s0.backward(torch.where(fin, g, torch.zeros_like(g)))
    assert torch.equal(q.grad, q0.grad), f"{backend}: dq differs"


@needs_cpu_ext
def test_prepare_corpus_api_errors_and_padded_input():
    tok, off = _corpus(4, 9, 16, torch.float32, _unit)
    corpus = rk.prepare_corpus(tok, off)
    q = _unit((2, 5, 16))
    with pytest.raises(ValueError, match="d_offsets=None"):
        rk.maxsim_packed(q, corpus, off)
    with pytest.raises(ValueError, match="no d_mask"):
        rk.maxsim(q, corpus, None, torch.ones(4, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="same dtype"):
        rk.maxsim_packed(q.half(), corpus)
    with pytest.raises(ValueError, match="end at"):
        rk.prepare_corpus(tok, off[:-1])
    with pytest.raises(ValueError, match="d_offsets"):
        rk.prepare_corpus(tok)
    with pytest.raises(ValueError, match="d_offsets"):
        rk.maxsim_packed(q, tok)
    # Padded documents without a mask: every document Ld tokens long.
    d = _unit((5, 11, 16))
    pc = rk.prepare_corpus(d)
    assert pc.n_docs == 5 and torch.equal(pc.offsets, torch.arange(6) * 11)
    assert torch.equal(rk.maxsim(q, pc, backend="cpu"), rk.maxsim(q, d, backend="cpu"))
    assert "PreparedCorpus(docs=5" in repr(pc) and pc.nbytes() >= d.numel() * 4


@needs_cpu_ext
def test_prepared_screen_skipped_below_bf16(monkeypatch):
    """Under REATT_CPU_ISA_CAP=avx512 (a CPU without AVX512_BF16) no screen is built: the kernel there never reads one."""
    monkeypatch.setenv("REATT_CPU_ISA_CAP", "avx512")
    if cpu_isa.info()["best"] != "avx512":
        pytest.skip("this CPU has no avx512 path to cap at")
    tok, off = _corpus(3, 5, 16, torch.float32, _unit)
    assert rk.prepare_corpus(tok, off, screen=True).screen is None


@needs_cpu_ext
def test_prepared_opcheck():
    """reatt::maxsim_fwd with a prepared screen (its two optional tensors) passes torch.library.opcheck (schema, fake
    tensor, autograd registration)."""
    tok, off = _corpus(4, 6, 16, torch.float32, _unit)
    c = rk.prepare_corpus(tok, off, screen=True)
    q = _unit((3, 5, 16)).requires_grad_(True)
    qm = random_mask((3, 5))
    pb = torch.randn(12, requires_grad=True)
    args = (q, c.tokens, qm, None, c.offsets, pb, 0, True, False, "cpu", c.screen, c.norm)
    torch.library.opcheck(torch.ops.reatt.maxsim_fwd.default, args)
