"""NaN and infinity semantics of every kernel, on every backend, as the reference docstrings define them.

maxsim / residual_maxsim: non-finite values in masked tokens (and unused pos_bias entries) never reach an output; a
-inf pos_bias forbids a distance (all forbidden: score -inf, argmax -1, no gradient); a NaN in a valid token leaves
every other score exact. reader_teacher: a row with NaN/+inf at a valid token is dropped (contributes 0), non-finite
values at invalid tokens are ignored, p_T stays finite. distill_kl: NaN/+inf students raise; rows without teacher mass
have loss 0 and gradient 0. Expected values come from the float64 references on the *clean* inputs or from the rule
itself (e.g. "row r is dropped" = the reference without row r, rescaled), never from the backend under test.
"""
from __future__ import annotations

import pytest
import torch

import reatt_kernels as rk
from reatt_kernels import residual_maxsim

from ..oracle import maxsim_oracle, reader_teacher_oracle, residual_maxsim_oracle
from ..utils import BACKENDS, CUDA_EMU, assert_fp32_level, device_for

BACKENDS = [*BACKENDS, CUDA_EMU]  # every op here runs its CUDA kernel under emulation too

NAN, INF = float("nan"), float("inf")


# ---- maxsim ------------------------------------------------------------------------------------------------------------
def _maxsim_case(dev, Bq=3, Lq=5, Nd=4, Ld=7, D=16):
    q = torch.randn(Bq, Lq, D)
    d = torch.randn(Nd, Ld, D)
    qm = torch.ones(Bq, Lq, dtype=torch.bool)
    qm[0, 1] = qm[1, 3] = False
    qm[2] = False  # a query with no valid token: 0 against everything
    dm = torch.ones(Nd, Ld, dtype=torch.bool)
    dm[0, 2] = dm[3, 5] = False
    dm[1] = False  # an empty document: -inf
    pb = torch.randn(Lq + Ld + 3) * 0.5
    return [t.to(dev) for t in (q, d, qm, dm, pb)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_maxsim_nonfinite_in_masked_tokens_never_reaches_output(backend):
    dev = device_for(backend)
    q, d, qm, dm, pb = _maxsim_case(dev)
    ref = maxsim_oracle("padded", q, d, qm, dm, pos_bias=pb)["score"]
    qp, dp = q.clone(), d.clone()
    qp[0, 1, 3], qp[1, 3] = NAN, INF  # masked query tokens
    qp[2, 0, 0] = NAN  # the query with no valid token
    dp[0, 2, 5], dp[3, 5] = NAN, -INF  # masked document tokens
    dp[1, 0, 0] = NAN  # the empty document
    Lq, Ld = q.shape[1], d.shape[1]
    n_a_max = int(qm.sum(1).max())
    pbp = torch.cat([pb, torch.full((4,), NAN, device=dev)])  # entries past the largest distance n_a + Ld - 1 - 0
    assert pbp.shape[0] > n_a_max + Ld - 1 + 3
    for reduce in ("sum", "mean"):
        o = maxsim_oracle("padded", q, d, qm, dm, pos_bias=pb, reduce=reduce)
        s, am = rk.maxsim(qp, dp, qm, dm, pos_bias=pbp, reduce=reduce, backend=backend, return_argmax=True)
        assert_fp32_level(s, o["score"], o["mag"], backend=backend, name=f"{backend} {reduce}")
        assert torch.equal(am.cpu().long(), o["argmax"])
    assert torch.isneginf(ref[:2, 1]).all() and (ref[2] == 0).all()
    # packed layout: masked query tokens only (packed documents have no padding)
    lens = dm.sum(1)
    off = torch.zeros(d.shape[0] + 1, dtype=torch.int64, device=dev)
    off[1:] = lens.cumsum(0)
    s = rk.maxsim_packed(qp, d[dm], off, qm, backend=backend)
    o = maxsim_oracle("packed", q, d[dm], qm, d_offsets=off)
    assert_fp32_level(s, o["score"], o["mag"], backend=backend, name=f"{backend} packed")


@pytest.mark.parametrize("backend", BACKENDS)
def test_maxsim_neginf_pos_bias_forbids_distances(backend):
    dev = device_for(backend)
    q, d, qm, dm, pb = _maxsim_case(dev)
    pbp = pb.clone()
    pbp[2:6] = -INF  # some distances forbidden
    o = maxsim_oracle("padded", q, d, qm, dm, pos_bias=pbp)
    s, am = rk.maxsim(q, d, qm, dm, pos_bias=pbp, backend=backend, return_argmax=True)
    assert_fp32_level(s, o["score"], o["mag"], backend=backend, name="partly forbidden")
    assert torch.equal(am.cpu().long(), o["argmax"])
    # every distance forbidden: each valid query token has no winner, the score is -inf, nothing gets a gradient
    ql, dl = q.clone().requires_grad_(True), d.clone().requires_grad_(True)
    pall = torch.full_like(pb, -INF).requires_grad_(True)
    s, am = rk.maxsim(ql, dl, qm, dm, pos_bias=pall, backend=backend, return_argmax=True)
    assert torch.isneginf(s[:2]).all() and (s[2] == 0).all()
    assert (am == -1).all(), "a token with no pair above -inf has no winner"
    s.masked_fill(torch.isinf(s), 0.0).sum().backward()
    for name, g in (("dq", ql.grad), ("dd", dl.grad), ("dpos_bias", pall.grad)):
        assert g is not None and (g == 0).all(), f"{name}: a pair scoring -inf must not receive gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_maxsim_nan_in_valid_token_leaves_other_scores_exact(backend):
    """A NaN in a valid token makes the scores it touches unspecified; every other score stays exact."""
    dev = device_for(backend)
    q, d, qm, dm, pb = _maxsim_case(dev)
    o = maxsim_oracle("padded", q, d, qm, dm, pos_bias=pb)
    ref = o["score"]
    qp, dp = q.clone(), d.clone()
    qp[0, 0, 4] = NAN  # touches query 0 against every document
    dp[2, 1, 7] = NAN  # touches document 2 against every query with a valid token
    s, am = rk.maxsim(qp, dp, qm, dm, pos_bias=pb, backend=backend, return_argmax=True)
    touched = torch.zeros_like(ref, dtype=torch.bool)
    touched[0] = True
    touched[:, 2] = True
    touched[2] = False  # query 2 has no valid token: 0 whatever the documents hold
    touched[:, 1] = False  # document 1 is empty: -inf whatever the query holds
    keep = ~touched.cpu()
    assert_fp32_level(s.cpu()[keep], ref[keep], o["mag"][keep], backend=backend, name="untouched scores")
    assert ((am >= -1) & (am < d.shape[1])).all(), "argmax must stay in [-1, Ld)"


# ---- residual_maxsim ---------------------------------------------------------------------------------------------------
def _residual_case(dev, nbits=2, D=24, C=5, lens=(4, 0, 9, 33, 1), Bq=3, Lq=5, Nc=5):
    off = torch.zeros(len(lens) + 1, dtype=torch.int64)
    off[1:] = torch.tensor(lens).cumsum(0)
    T = int(off[-1])
    cent, w = torch.randn(C, D), torch.randn(D, 1 << nbits) * 0.3
    codes = torch.randint(0, C, (T,), dtype=torch.int32)
    packed = torch.randint(0, 256, (T, D * nbits // 8), dtype=torch.uint8)
    q = torch.randn(Bq, Lq, D)
    qm = torch.ones(Bq, Lq, dtype=torch.bool)
    qm[0, 2] = qm[1, 0] = False
    qm[2] = False
    cand = torch.tensor([[0, 1, 2, 3, -1], [3, 4, 2, 0, 1], [1, 2, -1, 4, 0]])
    return [t.to(dev) for t in (q, qm, cent, w, codes, packed, off, cand)], nbits


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_maxsim_nonfinite_semantics(backend):
    dev = device_for(backend)
    (q, qm, cent, w, codes, packed, off, cand), nbits = _residual_case(dev)
    args = (cent, w, codes, packed, off, cand, nbits)
    ref, mag = residual_maxsim_oracle(q, qm, *args)
    qp = q.clone()
    qp[0, 2, 1], qp[1, 0] = NAN, INF  # masked query tokens
    qp[2, 3, 3] = NAN  # the query with no valid token
    out = residual_maxsim(qp, *args[:-1], nbits, qm, backend=backend)
    assert_fp32_level(out, ref, mag, backend=backend, name="masked NaN/inf")
    assert (out[2][cand[2] >= 0] == 0).all() and torch.isneginf(out[cand < 0]).all()
    assert torch.isneginf(out[0, 1]) and torch.isneginf(out[1, 4]), "an empty document scores -inf"
    # a NaN in a valid token of query 1: queries 0 and 2 stay exact
    qp[1, 2, 5] = NAN
    out = residual_maxsim(qp, *args[:-1], nbits, qm, backend=backend)
    keep = torch.tensor([True, False, True], device=dev)
    assert_fp32_level(out[keep], ref[keep.cpu()], mag[keep.cpu()], backend=backend, name="untouched queries")


# ---- reader_teacher ----------------------------------------------------------------------------------------------------
def _rt_case(dev, is_logits, B=2, L=1, H=3, T=2, S=21, n=3):
    attn = torch.randn(B, L, H, T, S, dtype=torch.float64) * 2
    if not is_logits:
        attn = torch.softmax(attn, -1)
    doc = (torch.arange(S) * n // S).repeat(B, 1)
    doc[:, 4] = -1  # a padding token
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[:, 7] = False  # a masked token
    return attn.float().to(dev), doc.to(dev), mask.to(dev)


@pytest.mark.parametrize("is_logits", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_reader_teacher_nonfinite_semantics(backend, is_logits):
    dev = device_for(backend)
    attn, doc, mask = _rt_case(dev, is_logits)
    B, L, H, T, S = attn.shape
    n, R = 3, L * H * T
    clean, clean_mag = reader_teacher_oracle(attn, doc, mask, n, is_logits)
    # non-finite values at invalid tokens (padding, masked) never contribute
    ap = attn.clone()
    ap[0, 0, 0, 0, 4], ap[0, 0, 1, 1, 7], ap[1, 0, 2, 0, 4], ap[1, 0, 0, 1, 7] = NAN, INF, -INF, NAN
    out = rk.reader_teacher(ap, doc, attn_mask=mask, is_logits=is_logits, n_docs=n, backend=backend)
    assert_fp32_level(out, clean, clean_mag, backend=backend, name="invalid tokens")
    # a row with NaN or +inf at a valid token is dropped: the mean of the other rows' p, still divided by every row
    ap = attn.clone()
    dropped = [(0, 0, 1, 0, NAN), (0, 0, 2, 1, INF), (1, 0, 0, 0, NAN)]
    for b, l, h, t, v in dropped:
        ap[b, l, h, t, 10] = v
    keep = torch.ones(B, L, H, T, dtype=torch.bool, device=dev)
    for b, l, h, t, _ in dropped:
        keep[b, l, h, t] = False
    # expected from the rule: each row's p alone (the reference on that one row), summed over the kept rows, / R
    expect = torch.zeros(B, n, dtype=torch.float64)
    expect_mag = torch.zeros(B, n, dtype=torch.float64)
    for l in range(L):
        for h in range(H):
            for t in range(T):
                p, pm = reader_teacher_oracle(attn[:, l:l + 1, h:h + 1, t:t + 1], doc, mask, n, is_logits)
                expect += p * keep[:, l, h, t].cpu().double()[:, None]
                expect_mag += pm
    expect /= R
    expect_mag /= R
    out = rk.reader_teacher(ap, doc, attn_mask=mask, is_logits=is_logits, n_docs=n, backend=backend)
    assert torch.isfinite(out).all() and (out >= 0).all(), "p_T must stay finite and >= 0"
    assert_fp32_level(out, expect, expect_mag, backend=backend, name="dropped rows")
    assert torch.allclose(out.sum(1).cpu(), keep.reshape(B, R).sum(1).float().cpu() / R, atol=1e-5)
    if is_logits:  # -inf at a valid token carries no mass, the row stays
        ap = attn.clone()
        ap[0, 0, 1, 0, 10] = -INF
        out = rk.reader_teacher(ap, doc, attn_mask=mask, is_logits=True, n_docs=n, backend=backend)
        assert_fp32_level(out, *reader_teacher_oracle(ap, doc, mask, n, True), backend=backend, name="-inf logit")
        assert torch.allclose(out.sum(1).cpu(), torch.ones(B), atol=1e-5)


# ---- distill_kl --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_distill_kl_nonfinite_student_raises(backend):
    dev = device_for(backend)
    t = torch.softmax(torch.randn(3, 9), -1).to(dev)
    tp = torch.softmax(torch.randn(3, 2), -1).to(dev)
    tc = torch.tensor([[0, 1], [2, 3], [4, 5]], device=dev)
    for v, col in ((NAN, 1), (INF, 1), (NAN, 8), (INF, 8)):  # col 8: no sparse teacher mass there
        s = torch.randn(3, 9, device=dev)
        s[1, col] = v
        with pytest.raises(ValueError, match="non-finite loss"):
            rk.distill_kl(s, t, backend=backend)
        with pytest.raises(ValueError, match="non-finite loss"):
            rk.distill_kl(s, teacher_probs=tp, teacher_cols=tc, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_distill_kl_rows_without_teacher_mass(backend):
    """T_b = 0 (empty teacher, or an all-zero row normalised under compile): loss 0, gradient 0 -- also when the
    student row is all -inf. Called through the custom op, as torch.compile does (the eager value checks are skipped)."""
    dev = device_for(backend)
    s = torch.randn(3, 7, device=dev)
    s[2] = -INF
    t = torch.softmax(torch.randn(3, 7), -1).to(dev)
    t[1] = 0.0
    t[2] = 0.0
    for normalize in (True, False):
        loss, grad = torch.ops.reatt.distill_kl_fwd(s, t, None, None, normalize, "none", True, backend)
        assert (loss[1:] == 0).all() and (grad[1:] == 0).all(), f"normalize={normalize}"
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    tp = torch.zeros(3, 2, device=dev)
    tp[0] = torch.tensor([0.25, 0.75])
    tc = torch.tensor([[0, 1], [2, 3], [4, 5]], device=dev)
    for normalize in (True, False):
        loss, grad = torch.ops.reatt.distill_kl_fwd(s, None, tp, tc, normalize, "none", True, backend)
        assert (loss[1:] == 0).all() and (grad[1:] == 0).all(), f"sparse normalize={normalize}"
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
