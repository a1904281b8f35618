"""MaxSim's C++ CPU backend: what the shared matrix in test_maxsim.py does not reach.

- every kernel ISA the machine supports (REATT_CPU_ISA: scalar, avx2, avx512, avx512_bf16), fp32/fp16/bf16, at odd and
  larger dims, query lengths that need several register tiles and document lengths that leave short tiles;
- the exact fp32 filter of the avx512_bf16 path on adversarial inputs (bf16 rounding erases every difference between
  the document tokens, so only the fp32 rescoring can find the winner);
- a large ragged packed corpus, non-contiguous fp16/bf16 inputs, bitwise equality across thread counts, and bad input
  errors from inside C++.
"""
from __future__ import annotations

import pytest
import torch

import reatt_kernels as rk
from reatt_kernels import _ext

from ..isa import isa_params
from ..oracle import maxsim_oracle
from ..utils import DTYPES, assert_fp32_level, discrete, needs_cpu_ext, noncontig, random_mask

pytestmark = needs_cpu_ext

def _isa_params():
    return isa_params("maxsim")


@pytest.fixture
def isa_env(force_isa):
    return force_isa


def _packed(Nd, max_len, D, dtype, gen, empty=(1,)):
    lens = torch.randint(1, max_len + 1, (Nd,))
    for b in empty:
        if b < Nd:
            lens[b] = 0
    off = torch.zeros(Nd + 1, dtype=torch.int64)
    off[1:] = lens.cumsum(0)
    return gen((int(off[-1]), D)).to(dtype), off


@pytest.mark.parametrize("D", [33, 128])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("isa", _isa_params())
def test_maxsim_cpu_isa_fwd_bwd(isa, dtype, D, isa_env):
    """Discrete inputs (exact dot products in fp32): every ISA must reproduce the reference argmax exactly, its scores,
    and the gradients of the reference backward through that argmax. Lq = 40 needs two query tiles plus a tail on
    every vector width; Ld = 37 leaves a short document tile for every tile width."""
    isa_env(isa)
    Bq, Lq, Nd, Ld = 3, 40, 6, 37
    q = discrete((Bq, Lq, D), dtype, scale=2)
    d = discrete((Nd, Ld, D), dtype, scale=2)
    d[:, -1] = d[:, -2]  # twin tokens: past the clamped distances they tie exactly, and the lower j must win
    qm = random_mask((Bq, Lq))
    qm[-1] = False
    dm = random_mask((Nd, Ld))
    dm[:, -2:] = True
    dm[2] = False
    pb = discrete((30,))  # shorter than the largest distance (Lq + Ld - 2): the clamp is hit
    for layout in ("padded", "packed"):
        if layout == "padded":
            args = (q, d, qm, dm, None, pb, 0, True)
        else:
            tok, off = _packed(Nd, Ld, D, dtype, lambda s: discrete(s, scale=2))
            for b in range(Nd):
                if off[b + 1] - off[b] >= 2:
                    tok[off[b + 1] - 1] = tok[off[b + 1] - 2]
            args = (q, tok, qm, None, off, pb, 0, True)
        s, am = torch.ops.reatt.maxsim_fwd(*args, False, "cpu")
        g = torch.randn(s.shape)
        orc = maxsim_oracle(layout, q, args[1], qm, args[3], args[4], pb, "mean", grad=g)
        assert torch.equal(am.long(), orc["argmax"]), f"{isa} {layout}: argmax differs from the oracle"
        assert_fp32_level(s, orc["score"], orc["mag"], name=f"{isa} {layout} scores")
        dq, dd, db = torch.ops.reatt.maxsim_bwd(g, args[0], args[1], qm, args[4], am, pb.shape[0], 0, True, False,
                                                "cpu")
        assert dq.dtype == dtype and dd.dtype == dtype and db.dtype == torch.float32
        for name, got in (("dq", dq), ("dd", dd), ("dbias", db)):
            assert_fp32_level(got, orc[name], orc[f"mag_{name}"], name=f"{isa} {layout} {name}")


@pytest.mark.parametrize("seg", ["0", "7"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_maxsim_cpu_filter_adversarial(layout, seg, monkeypatch):
    """All document tokens equal up to differences bf16 cannot represent: the bf16 pass of the fp32 filter sees
    (near-)ties everywhere and every token becomes a candidate; the exact rescoring must still return the exact fp32
    maximum and the lowest maximising j. Values are chosen so that every fp32 dot product is exact (q = m / 256 with
    |m| <= 512, d = m / 1024 with |m| <= 1024, D = 32: sums are multiples of 2^-18 below 2^6), so the float64
    reference's argmax, ties included, is the answer. With whole documents the rescoring budget runs out and the
    plain fp32 tile takes over; with 7-token segments every candidate is rescored."""
    monkeypatch.setenv("REATT_CPU_MAXSIM_SEG", seg)
    Bq, Lq, Nd, Ld, D = 2, 9, 5, 50, 32
    q = torch.randint(-512, 513, (Bq, Lq, D)).float() / 256
    base = torch.randint(-1000, 1001, (Nd, 1, D))
    d = (base + torch.randint(-2, 3, (Nd, Ld, D))).clamp(-1024, 1024).float() / 1024
    pb = torch.randint(-4, 5, (Lq + Ld,)).float() / 8
    qm = torch.ones(Bq, Lq, dtype=torch.bool)
    qm[1, 3] = False
    if layout == "padded":
        dm = random_mask((Nd, Ld), p_true=0.9)
        args = (q, d, qm, dm, None, pb, 0, False)
    else:
        dm = None
        lens = torch.tensor([50, 0, 17, 33, 1])
        off = torch.zeros(Nd + 1, dtype=torch.int64)
        off[1:] = lens.cumsum(0)
        tok = torch.cat([d[b, : lens[b]] for b in range(Nd)])
        args = (q, tok, qm, None, off, pb, 0, False)
    s, am = torch.ops.reatt.maxsim_fwd(*args, False, "cpu")
    orc = maxsim_oracle(layout, q, args[1], qm, args[3], args[4], pb, "sum")
    assert torch.equal(am.long(), orc["argmax"]), "argmax differs from the exact oracle"
    assert torch.equal(s.double(), orc["score"]), "scores are not the exact fp32 maxima"


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_maxsim_cpu_filter_runner_up_wins(layout):
    """The fp32 filter skips the rescoring scan in lanes whose bf16 runner-up cannot reach the threshold. Here one
    query token per document sees two document tokens that bf16 cannot tell apart (they differ by 2^-11 in one
    coordinate, below bf16's resolution at 0.25), so pass 1 keeps the earlier one, and only the scan can find that
    the later one wins in fp32; every other lane of the query has no such rival, so a scan decision made for the whole
    lane group, or one that ignored the runner-up, returns the wrong token. All products are exact in fp32 (q =
    m / 256, d in multiples of 2^-11 below 1, D = 32), so the float64 oracle's argmax is the answer."""
    g = torch.Generator().manual_seed(7)
    Bq, Lq, Nd, Ld, D = 2, 19, 4, 37, 32
    q = torch.randint(-256, 257, (Bq, Lq, D), generator=g).float() / 256
    # The bulk: weak random tokens (multiples of 1/64, bf16-exact), well below the planted pair.
    d = torch.randint(-8, 9, (Nd, Ld, D), generator=g).float() / 64
    for b in range(Nd):
        a, i = b % Bq, (3 * b + 5) % Lq
        ja, jb = 2 + b, 20 + b  # the earlier token ja ties in bf16 with the later jb, which wins in fp32
        sign = torch.where(q[a, i] >= 0, 1.0, -1.0)
        d[b, ja] = 0.5 * sign
        k0 = int(q[a, i].abs().argmax())
        d[b, ja, k0] = 0.25 * sign[k0]
        d[b, jb] = d[b, ja]
        d[b, jb, k0] = (0.25 + 2.0**-11) * sign[k0]
        assert torch.equal(d[b, ja].bfloat16(), d[b, jb].bfloat16())
    qm = torch.ones(Bq, Lq, dtype=torch.bool)
    if layout == "padded":
        args = (q, d, qm, None, None, None, 0, False)
    else:
        off = torch.arange(Nd + 1, dtype=torch.int64) * Ld
        args = (q, d.reshape(Nd * Ld, D), qm, None, off, None, 0, False)
    s, am = torch.ops.reatt.maxsim_fwd(*args, False, "cpu")
    orc = maxsim_oracle(layout, q, args[1], qm, None, args[4], None, "sum")
    for b in range(Nd):
        a, i = b % Bq, (3 * b + 5) % Lq
        assert int(orc["argmax"][a, b, i]) == 20 + b, "the planted later token must be the exact winner"
    assert torch.equal(am.long(), orc["argmax"]), "argmax differs from the exact oracle"
    assert torch.equal(s.double(), orc["score"]), "scores are not the exact fp32 maxima"


def test_maxsim_cpu_large_ragged_packed():
    """A ragged corpus (lengths 0..150, some empty) through the packed layout, fp32 random unit vectors, bias, mean."""
    Bq, Lq, Nd, D = 2, 32, 400, 128
    q = torch.nn.functional.normalize(torch.randn(Bq, Lq, D), dim=-1)
    lens = torch.randint(0, 151, (Nd,))
    lens[::37] = 0
    off = torch.zeros(Nd + 1, dtype=torch.int64)
    off[1:] = lens.cumsum(0)
    tok = torch.nn.functional.normalize(torch.randn(int(off[-1]), D), dim=-1)
    qm = random_mask((Bq, Lq), p_true=0.9)
    pb = torch.randn(64) * 0.1
    s = rk.maxsim_packed(q, tok, off, qm, pos_bias=pb, reduce="mean", backend="cpu")
    orc = maxsim_oracle("packed", q, tok, qm, None, off, pb, "mean")
    assert torch.isneginf(s[:, lens == 0]).all()
    assert_fp32_level(s, orc["score"], orc["mag"], name="ragged packed")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_maxsim_cpu_noncontiguous_half(dtype, layout):
    """Strided fp16/bf16 inputs take the converting copy paths (and, for bf16, the pair packing with odd D)."""
    Bq, Lq, Nd, Ld, D = 3, 7, 5, 13, 33
    q = noncontig(torch.randn(Bq, Lq, D).to(dtype))
    qm = random_mask((Bq, Lq))
    pb = torch.randn(Lq + Ld) * 0.5
    if layout == "padded":
        d = noncontig(torch.randn(Nd, Ld, D).to(dtype))
        dm = random_mask((Nd, Ld))
        out = rk.maxsim(q, d, qm, dm, pos_bias=pb, backend="cpu")
        orc = maxsim_oracle("padded", q, d, qm, dm, None, pb, "sum")
    else:
        tok, off = _packed(Nd, Ld, D, dtype, torch.randn)
        tok = noncontig(tok)
        out = rk.maxsim_packed(q, tok, off, qm, pos_bias=pb, backend="cpu")
        orc = maxsim_oracle("packed", q, tok, qm, None, off, pb, "sum")
    assert not q.is_contiguous()
    assert_fp32_level(out, orc["score"], orc["mag"], name=f"{layout} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_maxsim_cpu_threads_bitwise(dtype):
    """Forward and backward are bitwise equal with 1 and 2 threads (150 documents: several dbias blocks)."""
    q = torch.randn(3, 9, 40).to(dtype)
    d = torch.randn(150, 21, 40).to(dtype)
    qm = random_mask((3, 9))
    dm = random_mask((150, 21))
    pb = torch.randn(40)
    outs = []
    prev = torch.get_num_threads()
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            qq = q.clone().requires_grad_(True)
            dd = d.clone().requires_grad_(True)
            pp = pb.clone().requires_grad_(True)
            s, am = rk.maxsim(qq, dd, qm, dm, pos_bias=pp, reduce="mean", backend="cpu", return_argmax=True)
            s.backward(torch.linspace(-1, 1, s.numel()).reshape(s.shape))
            outs.append((s.detach(), am, qq.grad, dd.grad, pp.grad))
    finally:
        torch.set_num_threads(prev)
    for name, a, b in zip(("scores", "argmax", "dq", "dd", "dbias"), *outs):
        assert torch.equal(a, b), f"{name} differs between 1 and 2 threads"


def test_maxsim_cpu_grouped_bias_mean_bf16():
    """Grouped layout on the bf16 dot-product path with bias and mean, against the float64 reference."""
    B, n, Lq, Ld, D = 4, 3, 11, 29, 64
    q = torch.randn(B, Lq, D).bfloat16()
    d = torch.randn(B, n, Ld, D).bfloat16()
    qm = random_mask((B, Lq))
    dm = random_mask((B, n, Ld))
    dm[0, 1] = False
    pb = torch.randn(Lq + Ld) * 0.5
    out = rk.maxsim_grouped(q, d, qm, dm, pos_bias=pb, reduce="mean", backend="cpu")
    orc = maxsim_oracle("grouped", q, d, qm, dm, None, pb, "mean")
    assert torch.isneginf(out[0, 1])
    assert_fp32_level(out, orc["score"], orc["mag"], name="grouped bf16")


def test_maxsim_cpu_bad_inputs_from_cpp(monkeypatch):
    """Errors raised inside C++ arrive as ValueError naming the argument."""
    q = torch.randn(2, 3, 8)
    d = torch.randn(4, 5, 8)
    qm = torch.ones(2, 3, dtype=torch.bool)
    s, am = torch.ops.reatt.maxsim_fwd(q, d, qm, None, None, None, 0, False, False, "cpu")
    bad = am.clone()
    bad[0, 0, 0] = 5  # outside the 5-token documents
    with pytest.raises(ValueError, match="argmax"):
        torch.ops.reatt.maxsim_bwd(torch.ones_like(s), q, d, qm, None, bad, 0, 0, False, False, "cpu")
    monkeypatch.setenv("REATT_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="isa must be"):
        rk.maxsim(q, d, backend="cpu")


@pytest.mark.parametrize("dtype", DTYPES)
def test_maxsim_cpu_segmented_long_documents(dtype, monkeypatch):
    """Documents longer than the segment (forced to 7 tokens here; 1024 by default) are scanned segment by segment
    with the running max carried across, and their dd staged segment by segment: same argmax, scores and gradients as
    the reference (discrete inputs: exact), padded with a mask and packed, with bias, strided and in place."""
    monkeypatch.setenv("REATT_CPU_MAXSIM_SEG", "7")
    Bq, Lq, Nd, Ld, D = 2, 19, 4, 40, 48
    q = discrete((Bq, Lq, D), dtype)
    qm = random_mask((Bq, Lq))
    pb = discrete((Lq + Ld,))
    d = discrete((Nd, Ld, D), dtype)
    dm = random_mask((Nd, Ld))
    tok, off = _packed(Nd, Ld, D, dtype, lambda s: discrete(s))
    for args in ((q, d, qm, dm, None), (q, noncontig(d), qm, dm, None), (q, tok, qm, None, off),
                 (q, noncontig(tok), qm, None, off)):
        s, am = torch.ops.reatt.maxsim_fwd(*args, pb, 0, False, False, "cpu")
        g = torch.randn(s.shape)
        orc = maxsim_oracle("packed" if args[4] is not None else "padded", *args, pb, "sum", grad=g)
        assert torch.equal(am.long(), orc["argmax"]), "argmax differs across segments"
        assert_fp32_level(s, orc["score"], orc["mag"], name="segmented scores")
        # The backward stages dd segment by segment too.
        got = torch.ops.reatt.maxsim_bwd(g, args[0], args[1], qm, args[4], am, pb.shape[0], 0, False, False, "cpu")
        for name, x in zip(("dq", "dd", "dbias"), got):
            assert_fp32_level(x, orc[name], orc[f"mag_{name}"], name=f"segmented {name}")
