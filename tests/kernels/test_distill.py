"""Attention distillation: reader_teacher, distill_kl, retrieval_distill_loss against the float64 oracle
(tests/oracle.py) with fp32-level bounds, every backend (torch included).

Inputs are random (never zeros/ones) with odd sizes, masks, a document whose tokens are all padding, a query with no
valid token, one-hot teachers and teachers with exact zeros, logits up to 1e4, B = 1 and n = 1. Launcher outputs are
NaN-poisoned (REATT_POISON=1, set by conftest), so an unwritten element fails the comparisons.
"""
from __future__ import annotations

import pytest
import torch

import reatt_kernels as rk
from reatt_kernels import _alloc
from reatt_kernels.reference.distill import distill_kl_ref

from ..isa import isa_params
from ..oracle import dense_teacher_oracle, kl_oracle, reader_teacher_oracle, retrieval_distill_oracle
from ..utils import BACKENDS, CUDA_EMU, DTYPES, _has_cpu_ext, assert_fp32_level, device_for, needs_triton, noncontig, random_mask

BACKENDS = [*BACKENDS, CUDA_EMU]  # every op here runs its CUDA kernel under emulation too


def check_teacher(out, attn, doc, mask, n, is_logits=True, backend="torch", name="reader_teacher"):
    """reader_teacher output against the oracle on the same attention values."""
    ref, mag = reader_teacher_oracle(attn, doc, mask, n, is_logits)
    assert_fp32_level(out, ref, mag, backend=backend, name=f"{backend} {name}")


def kl_case_oracle(case, reduction="batchmean", normalize=False, grad_out=1.0):
    """kl_oracle for a make_kl_case dict (dense or sparse teacher)."""
    s = case["student"]
    t = case.get("teacher")
    if t is None:
        t = dense_teacher_oracle(case["teacher_probs"], case["teacher_cols"], s.shape[-1])
    return kl_oracle(s, t, reduction, normalize, grad_out=grad_out.detach().cpu() if torch.is_tensor(grad_out)
                     else grad_out)


# ---- reader_teacher ----------------------------------------------------------------------------------------------------
# (B, L, H, T, S, n): odd sizes, n = 1, B = 1, S not a multiple of any tile.
RT_SHAPES = [(3, 2, 3, 5, 37, 5), (1, 1, 1, 1, 11, 1), (2, 1, 4, 1, 50, 7)]


def make_teacher_case(shape, dtype, device, *, is_logits=True, magnitude=3.0, masks=True):
    B, L, H, T, S, n = shape
    attn = torch.randn(B, L, H, T, S, dtype=torch.float64) * magnitude
    if not is_logits:
        attn = torch.softmax(attn, -1)
    attn = attn.to(dtype=dtype, device=device)
    doc = torch.randint(0, n, (B, S))
    doc[torch.rand(B, S) < 0.15] = -1  # padding tokens
    if n > 2:
        doc[doc == n - 2] = -1  # a document whose tokens are all padding
    attn_mask = random_mask((B, S)) if masks else None
    if masks and B > 1:
        attn_mask[-1] = False  # a query with no valid token: an all-zero teacher row
    return attn, doc.to(device), (attn_mask.to(device) if attn_mask is not None else None)


@pytest.mark.parametrize("is_logits", [True, False])
@pytest.mark.parametrize("shape", RT_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_reader_teacher(backend, dtype, shape, is_logits):
    dev = device_for(backend)
    n = shape[-1]
    attn, doc, mask = make_teacher_case(shape, dtype, dev, is_logits=is_logits)
    out = rk.reader_teacher(attn, doc, attn_mask=mask, is_logits=is_logits, n_docs=n, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (shape[0], n)
    check_teacher(out, attn, doc, mask, n, is_logits, backend)
    valid_rows = (mask & (doc >= 0)).any(1) if mask is not None else (doc >= 0).any(1)
    sums = out.sum(1).cpu()
    assert torch.allclose(sums[valid_rows.cpu()], torch.ones(()), atol=1e-4), "rows must sum to 1"
    assert torch.all(out[~valid_rows] == 0), "a query with no valid token gets an all-zero row"
    if n > 2:
        assert torch.all(out[:, n - 2] == 0), "a document whose tokens are all padding gets 0"


@pytest.mark.parametrize("backend", BACKENDS)
def test_reader_teacher_layouts(backend):
    """4-D/3-D slices, layer/step selection (ReAtt: last layer, step 0), non-contiguous input, huge logits."""
    dev = device_for(backend)
    B, L, H, T, S, n = 3, 3, 2, 4, 29, 4
    attn, doc, mask = make_teacher_case((B, L, H, T, S, n), torch.float32, dev, masks=False)
    out = rk.reader_teacher(attn, doc, n_docs=n, backend=backend)
    check_teacher(out, attn, doc, None, n, backend=backend)
    # ReAtt's setting == the 3-D slice [B, H, S] of the last layer at step 0
    reatt = rk.reader_teacher(attn, doc, layers=-1, steps=0, n_docs=n, backend=backend)
    check_teacher(reatt, attn[:, -1:, :, :1], doc, None, n, backend=backend, name="last layer, step 0")
    check_teacher(rk.reader_teacher(attn[:, -1, :, 0], doc, n_docs=n, backend=backend), attn[:, -1:, :, :1], doc, None,
                  n, backend=backend, name="3-D slice")
    # layer lists (evenly spaced: a view; otherwise a gather) and a step slice, on the 4-D form
    for layers, steps in (([0, 2], slice(1, 4, 2)), ([2, 0, 1], [3])):
        got = rk.reader_teacher(attn, doc, layers=layers, steps=steps, n_docs=n, backend=backend)
        sel = attn[:, torch.tensor(layers)][:, :, :, torch.arange(T)[steps] if isinstance(steps, slice) else steps]
        check_teacher(got, sel, doc, None, n, backend=backend, name=f"layers {layers} steps {steps}")
    got4 = rk.reader_teacher(attn[:, 1], doc, steps=[0, 1], n_docs=n, backend=backend)
    check_teacher(got4, attn[:, 1:2, :, :2], doc, None, n, backend=backend, name="4-D, steps [0, 1]")
    # non-contiguous: every axis strided
    nc = noncontig(attn.transpose(2, 3)).transpose(2, 3)
    assert not nc.is_contiguous()
    check_teacher(rk.reader_teacher(nc, doc, n_docs=n, backend=backend), attn, doc, None, n, backend=backend,
                  name="non-contiguous")
    # logits of magnitude 1e4 (fp32): max-subtracted, finite, exact to rounding
    big = attn * 1e4 / attn.abs().amax()
    got = rk.reader_teacher(big, doc, n_docs=n, backend=backend)
    check_teacher(got, big, doc, None, n, backend=backend, name="|logits| 1e4")
    # n_docs defaults to doc_index.max() + 1 (extra trailing documents get 0)
    assert rk.reader_teacher(attn, doc, backend=backend).shape == (B, int(doc.max()) + 1)
    wide = rk.reader_teacher(attn, doc, n_docs=n + 3, backend=backend)
    assert torch.all(wide[:, n:] == 0) and torch.allclose(wide[:, :n], out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reader_teacher_neginf_logits(backend):
    """-inf logits carry no mass; a row whose valid logits are all -inf (with or without padding) contributes 0."""
    dev = device_for(backend)
    B, L, H, T, S, n = 2, 1, 3, 2, 23, 3
    attn, doc, _ = make_teacher_case((B, L, H, T, S, n), torch.float32, dev, masks=False)
    doc[1] = torch.arange(S, device=dev) % n  # query 1: no padding at all
    attn = attn.clone()
    attn[..., 5] = float("-inf")  # one token never attended
    attn[0, 0, 1, 0] = float("-inf")  # a row with only -inf logits (query 0 has padding)
    attn[1, 0, 2, 1] = float("-inf")  # a row with only -inf logits and every token valid
    out = rk.reader_teacher(attn, doc, n_docs=n, backend=backend)
    check_teacher(out, attn, doc, None, n, backend=backend, name="-inf logits")
    R = L * H * T
    assert torch.isfinite(out).all() and torch.all(out.cpu() >= 0)
    assert torch.allclose(out.sum(1).cpu(), torch.full((B,), (R - 1) / R, dtype=torch.float32), atol=1e-5)
    # (the all -inf row has mass 0 and the mean still divides by every row: each row of p_T sums to (R - 1) / R)


@pytest.mark.parametrize("is_logits", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_reader_teacher_long_rows_fid_layout(backend, is_logits):
    """Rows longer than one chunk of every kernel (S = 601: several 256-token warp chunks / 256-token CPU blocks), with
    the FiD layout (each document a contiguous run, so whole 32-token groups share a document) and logits that grow
    along the row (the running max rises chunk after chunk: every rescale path runs)."""
    dev = device_for(backend)
    B, L, H, T, S, n = 2, 1, 3, 2, 601, 5
    attn = torch.randn(B, L, H, T, S, dtype=torch.float64) + torch.linspace(0, 6, S, dtype=torch.float64)
    if not is_logits:
        attn = torch.softmax(attn, -1)
    lens = torch.tensor([150, 97, 0, 203, 151])  # one empty document; a run ends mid-group
    doc = torch.repeat_interleave(torch.arange(n), lens)
    doc = torch.cat([doc, torch.full((S - doc.numel(),), -1)]).repeat(B, 1)  # trailing padding
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, 300:340] = False
    for dtype in DTYPES:
        a = attn.to(dtype)
        out = rk.reader_teacher(a.to(dev), doc.to(dev), attn_mask=mask.to(dev), is_logits=is_logits, n_docs=n,
                                backend=backend)
        check_teacher(out, a, doc, mask, n, is_logits, backend=backend, name=f"long rows {dtype}")
        assert torch.all(out[:, 2] == 0)


@pytest.mark.parametrize("isa", isa_params("reader_teacher"))
@pytest.mark.skipif(not _has_cpu_ext(), reason="no C++ extension")
def test_reader_teacher_cpu_isa_paths(isa, force_isa):
    """Each instruction-set path of the cpu kernel, forced, against the oracle: every dtype, logits and
    probabilities, strided and contiguous rows, rows of several 256-token blocks with a rising max."""
    force_isa(isa)
    for dtype in DTYPES:
        for is_logits in (True, False):
            for shape in RT_SHAPES[:2] + [(2, 1, 2, 2, 601, 5)]:
                attn, doc, mask = make_teacher_case(shape, dtype, "cpu", is_logits=is_logits)
                if shape[4] == 601 and is_logits:
                    attn = (attn.double() + torch.linspace(0, 6, 601, dtype=torch.float64)).to(dtype)
                for a in (attn, noncontig(attn)):
                    out = rk.reader_teacher(a, doc, attn_mask=mask, is_logits=is_logits, n_docs=shape[-1],
                                            backend="cpu")
                    check_teacher(out, a, doc, mask, shape[-1], is_logits, "cpu", name=f"{isa} {dtype} {shape}")


@needs_triton
@pytest.mark.parametrize("is_logits", [True, False])
def test_reader_teacher_triton_split_s(is_logits):
    """The split-S path (used on GPU when B x row blocks cannot fill the SMs, e.g. ReAtt's B x 16 heads): partial
    online-softmax states per token range, merged by the combine kernel."""
    from reatt_kernels.triton.distill import _reader_teacher_launch

    dev = device_for("triton")
    for shape in ((3, 1, 4, 1, 150, 5), (2, 2, 3, 2, 97, 1)):
        attn, doc, mask = make_teacher_case(shape, torch.float32, dev, is_logits=is_logits)
        attn[0, 0, 0, 0, :40] = float("-inf") if is_logits else 0.0  # a token range with no mass for one row
        for split in (2, 3):
            out = _reader_teacher_launch(attn, doc, mask, shape[-1], is_logits, split_s=split)
            check_teacher(out, attn, doc, mask, shape[-1], is_logits, "triton", name=f"split {split}")


def test_reader_teacher_is_detached():
    attn = torch.randn(2, 3, 17, requires_grad=True)
    out = rk.reader_teacher(attn, torch.randint(0, 3, (2, 17)), n_docs=3)
    assert not out.requires_grad


def test_reader_teacher_bad_inputs():
    attn = torch.randn(2, 3, 4, 17)
    doc = torch.randint(0, 3, (2, 17))
    with pytest.raises(ValueError, match="doc_index must have shape"):
        rk.reader_teacher(attn, doc[:, :5])
    with pytest.raises(TypeError, match="doc_index must be int32 or int64"):
        rk.reader_teacher(attn, doc.float())
    with pytest.raises(ValueError, match="doc_index values must be in"):
        rk.reader_teacher(attn, doc, n_docs=2)
    with pytest.raises(ValueError, match="doc_index values must be in"):
        rk.reader_teacher(attn, doc - 2, n_docs=3)
    with pytest.raises(ValueError, match="attn must be"):
        rk.reader_teacher(torch.randn(2, 17), doc)
    with pytest.raises(TypeError, match="attn must be float"):
        rk.reader_teacher(attn.int(), doc)
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        rk.reader_teacher(attn, doc, attn_mask=torch.ones(2, 16, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask must be a bool"):
        rk.reader_teacher(attn, doc, attn_mask=torch.ones(2, 17))
    with pytest.raises(ValueError, match="layers needs a 5-D"):
        rk.reader_teacher(attn, doc, layers=0)
    with pytest.raises(ValueError, match="steps index 9 is out of range"):
        rk.reader_teacher(attn, doc, steps=[9])


# ---- distill_kl --------------------------------------------------------------------------------------------------------
# (B, M, n): odd sizes, B = 1, n = 1, n = M.
KL_SHAPES = [(5, 37, 4), (1, 1, 1), (3, 200, 1), (7, 64, 64), (2, 700, 9)]  # 700: several columns per thread


def make_kl_case(shape, dtype, device, *, sparse, magnitude=3.0):
    """Student logits (with -inf where the teacher is 0), a teacher with exact zeros and one one-hot row."""
    B, M, n = shape
    student = (torch.randn(B, M, dtype=torch.float64) * magnitude).to(dtype)
    cols = torch.stack([torch.randperm(M)[:n] for _ in range(B)])
    tp = torch.softmax(torch.randn(B, n, dtype=torch.float64) * 2, -1)
    if n > 2:
        tp[0, 1] = 0.0  # exact zeros
        tp[0] /= tp[0].sum()
    if B > 1:
        tp[1] = 0.0
        tp[1, 0] = 1.0  # one-hot
    dense = torch.zeros(B, M, dtype=torch.float64).scatter_(1, cols, tp)
    if M > n:
        # a student logit of -inf where the teacher has no mass: allowed, contributes 0
        free = (dense == 0).nonzero()
        student[free[0, 0], free[0, 1]] = float("-inf")
    case = dict(student=student.to(device))
    if sparse:
        case.update(teacher_probs=tp.float().to(device), teacher_cols=cols.to(device))
    else:
        case.update(teacher=dense.float().to(device))
    return case


def _kl_call(case, student, backend, **kw):
    t = {k: v for k, v in case.items() if k != "student"}
    return rk.distill_kl(student, **t, backend=backend, **kw)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("shape", KL_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_distill_kl(backend, dtype, shape, sparse):
    dev = device_for(backend)
    case = make_kl_case(shape, dtype, dev, sparse=sparse)
    s = case["student"].detach().clone().requires_grad_(True)
    loss = _kl_call(case, s, backend)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    g = torch.rand((), device=dev) + 0.5  # an upstream gradient that is not 1
    loss.backward(g)
    orc = kl_case_oracle(case, grad_out=g)
    assert_fp32_level(loss, orc["loss"], orc["mag_loss"], backend=backend, name=f"{backend} loss")
    assert s.grad.dtype == dtype
    # 2 roundings to the student dtype with an upstream gradient != 1: the op saves d loss / d student in the
    # student's dtype in the forward (so that loss.backward() costs nothing), and the backward rescales it by g.
    assert_fp32_level(s.grad, orc["grad"], orc["mag_grad"], backend=backend, name=f"{backend} dstudent", roundings=2)
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_distill_kl_reductions_and_numerics(backend):
    dev = device_for(backend)
    case = make_kl_case((5, 37, 4), torch.float32, dev, sparse=True)
    dense = make_kl_case((5, 37, 4), torch.float32, dev, sparse=False)
    for reduction in ("batchmean", "sum", "mean", "none"):
        for c in (case, dense):
            s = c["student"].detach().clone().requires_grad_(True)
            out = _kl_call(c, s, backend, reduction=reduction)
            g = torch.rand(out.shape, device=dev) + 0.5
            out.backward(g)
            orc = kl_case_oracle(c, reduction, grad_out=g)
            assert_fp32_level(out, orc["loss"], orc["mag_loss"], backend=backend, name=f"{backend} {reduction}")
            assert_fp32_level(s.grad, orc["grad"], orc["mag_grad"], backend=backend, name=f"{backend} {reduction} grad")
    # the upstream gradient is exactly 1 (the common loss.backward()): the saved gradient is returned as is
    s = case["student"].detach().clone().requires_grad_(True)
    _kl_call(case, s, backend).backward()
    orc = kl_case_oracle(case)
    assert_fp32_level(s.grad, orc["grad"], orc["mag_grad"], backend=backend, name=f"{backend} grad (upstream 1)")
    # logits of magnitude 1e4 in fp32: log-sum-exp stays finite and accurate
    for c in (case, dense):
        big = dict(c, student=c["student"] * (1e4 / c["student"][torch.isfinite(c["student"])].abs().max()))
        s = big["student"].detach().clone().requires_grad_(True)
        out = _kl_call(big, s, backend)
        out.backward()
        orc = kl_case_oracle(big)
        assert torch.isfinite(out) and torch.isfinite(s.grad).all()
        assert_fp32_level(out, orc["loss"], orc["mag_loss"], backend=backend, name=f"{backend} 1e4 loss")
        assert_fp32_level(s.grad, orc["grad"], orc["mag_grad"], backend=backend, name=f"{backend} 1e4 grad")
    # normalize_teacher: an unnormalised teacher gives the same loss as its normalised self
    raw = dict(dense, teacher=dense["teacher"] * 3.7)
    assert torch.allclose(_kl_call(raw, dense["student"], backend, normalize_teacher=True),
                          _kl_call(dense, dense["student"], backend), rtol=1e-5, atol=1e-6)
    rawp = dict(case, teacher_probs=case["teacher_probs"] * 0.3)
    assert torch.allclose(_kl_call(rawp, case["student"], backend, normalize_teacher=True),
                          _kl_call(case, case["student"], backend), rtol=1e-5, atol=1e-6)
    # no grad mode: no gradient is computed, the loss is the same
    with torch.no_grad():
        assert torch.allclose(_kl_call(case, case["student"], backend), _kl_call(case, case["student"], "torch"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_distill_kl_noncontiguous(backend):
    dev = device_for(backend)
    case = make_kl_case((5, 37, 4), torch.float16, dev, sparse=False)
    s = noncontig(case["student"]).requires_grad_(True)
    t = noncontig(case["teacher"])
    out = rk.distill_kl(s, t, backend=backend)
    out.backward()
    orc = kl_case_oracle(case)
    assert_fp32_level(out, orc["loss"], orc["mag_loss"], backend=backend, name=f"{backend} loss")
    assert_fp32_level(s.grad, orc["grad"], orc["mag_grad"], backend=backend, name=f"{backend} grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_distill_kl_bad_inputs(backend):
    dev = device_for(backend)
    s = torch.randn(3, 6, device=dev)
    t = torch.softmax(torch.randn(3, 6, device=dev), -1)
    tp = torch.softmax(torch.randn(3, 2, device=dev), -1)
    tc = torch.tensor([[0, 1], [2, 3], [4, 5]], device=dev)
    with pytest.raises(ValueError, match="teacher must have student's shape"):
        rk.distill_kl(s, t[:, :5], backend=backend)
    with pytest.raises(ValueError, match="teacher_cols must have teacher_probs' shape"):
        rk.distill_kl(s, teacher_probs=tp, teacher_cols=tc[:, :1], backend=backend)
    with pytest.raises(ValueError, match="teacher_cols must be in"):
        rk.distill_kl(s, teacher_probs=tp, teacher_cols=tc + 1, backend=backend)
    with pytest.raises(ValueError, match="must not repeat"):
        rk.distill_kl(s, teacher_probs=tp, teacher_cols=tc * 0 + torch.tensor([1, 1], device=dev), backend=backend)
    with pytest.raises(ValueError, match="teacher_probs must hold finite probabilities >= 0"):
        rk.distill_kl(s, teacher_probs=torch.tensor([[1.5, -0.5]] * 3, device=dev), teacher_cols=tc, backend=backend)
    with pytest.raises(ValueError, match="teacher must hold finite probabilities >= 0"):
        rk.distill_kl(s, t - 0.1, backend=backend)
    with pytest.raises(ValueError, match="rows must sum to 1"):
        rk.distill_kl(s, t * 0.9, backend=backend)
    with pytest.raises(ValueError, match="has no mass"):
        rk.distill_kl(s, t * 0, normalize_teacher=True, backend=backend)
    with pytest.raises(ValueError, match="either teacher"):
        rk.distill_kl(s, t, teacher_probs=tp, teacher_cols=tc, backend=backend)
    with pytest.raises(ValueError, match="reduction must be"):
        rk.distill_kl(s, t, reduction="avg", backend=backend)
    with pytest.raises(TypeError, match="teacher_cols must be an int"):
        rk.distill_kl(s, teacher_probs=tp, teacher_cols=tc.float(), backend=backend)
    # teacher mass on a -inf student logit: a clear error, never inf/NaN
    s_inf = s.clone()
    s_inf[1, 3] = float("-inf")
    with pytest.raises(ValueError, match=r"student\[1, 3\] = -inf"):
        rk.distill_kl(s_inf, teacher_probs=tp, teacher_cols=tc, backend=backend)
    s_inf[2] = float("-inf")  # a whole row of -inf
    with pytest.raises(ValueError, match="-inf"):
        rk.distill_kl(s_inf, t, backend=backend)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_distill_kl_empty_teacher(backend, dtype):
    """An empty teacher (M = 0 dense, n = 0 sparse) has no mass: loss 0 and gradient 0, as the reference (never an
    error: the kernels get null teacher pointers then)."""
    dev = device_for(backend)
    for reduction in ("batchmean", "none"):
        s = torch.randn(3, 0, device=dev, dtype=dtype).requires_grad_(True)
        loss = rk.distill_kl(s, torch.zeros(3, 0, device=dev), reduction=reduction, backend=backend)
        assert (loss == 0).all() and loss.shape == ((3,) if reduction == "none" else ())
        loss.sum().backward()
        assert s.grad.shape == (3, 0)
        s = torch.randn(3, 6, device=dev, dtype=dtype).requires_grad_(True)
        loss = rk.distill_kl(s, teacher_probs=torch.zeros(3, 0, device=dev),
                             teacher_cols=torch.zeros(3, 0, dtype=torch.int64, device=dev), reduction=reduction,
                             backend=backend)
        assert (loss == 0).all()
        loss.sum().backward()
        assert (s.grad == 0).all(), "no teacher mass: T_b = 0, so the gradient T_b * softmax - t is 0"


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` numbers at |x| (float64), from the format: 10 (fp16) or 7 (bf16) fraction bits."""
    frac, min_exp = (10, -14) if dtype == torch.float16 else (7, -126)
    e = torch.floor(torch.log2(x.abs().clamp(min=2.0 ** min_exp)))
    return torch.pow(2.0, e - frac)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_distill_kl_grad_rounds_once(backend, dtype, sparse):
    """Each gradient element is (T * softmax - t) * scale computed in fp32 and rounded to the student's dtype ONCE: so
    it is within one ulp *of its own magnitude* of the float64 value. Rounding T * softmax first and then the
    difference (as the sparse patch did) is off by an ulp of the larger T * softmax: many ulps of a small difference.
    The student is close to log(teacher), so T * softmax - t cancels at the teacher's columns."""
    dev = device_for(backend)
    B, M, n = 4, 29, 5
    cols = torch.stack([torch.randperm(M)[:n] for _ in range(B)])
    tp = torch.softmax(torch.randn(B, n, dtype=torch.float64), -1)
    s = torch.full((B, M), -12.0, dtype=torch.float64)
    s.scatter_(1, cols, tp.log() + 0.01 * torch.randn(B, n, dtype=torch.float64))
    s = s.to(dtype)
    dense = torch.zeros(B, M, dtype=torch.float64).scatter_(1, cols, tp)
    kw = (dict(teacher_probs=tp.float().to(dev), teacher_cols=cols.to(dev)) if sparse
          else dict(teacher=dense.float().to(dev)))
    sl = s.to(dev, copy=True).requires_grad_(True)
    rk.distill_kl(sl, **kw, backend=backend).backward()  # upstream 1: the forward's gradient, untouched
    ref = kl_oracle(s, dense.float())["grad"]  # d loss / d student in float64, on the same rounded inputs
    got = sl.grad.double().cpu()
    bound = _ulp(ref, dtype) + 1e-7  # one ulp at the value (half for the rounding, half for fp32 ties) + fp32 noise
    worst = ((got - ref).abs() / bound).max().item()
    assert worst <= 1.0, f"{backend} {dtype} sparse={sparse}: gradient off by {worst:.1f} x (ulp + 1e-7)"


def test_distill_kl_gradcheck_reference():
    s = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    t = torch.softmax(torch.randn(3, 7, dtype=torch.float64), -1)
    t[0, 2] = 0.0
    t[0] /= t[0].sum()
    tp = torch.softmax(torch.randn(3, 2, dtype=torch.float64), -1)
    tc = torch.tensor([[0, 6], [3, 1], [5, 2]])
    assert torch.autograd.gradcheck(lambda s: distill_kl_ref(s, t), (s,))
    assert torch.autograd.gradcheck(lambda s: distill_kl_ref(s, teacher_probs=tp, teacher_cols=tc), (s,))
    # the custom op (torch backend, gradient from the forward) agrees with it
    assert torch.autograd.gradcheck(lambda s: rk.distill_kl(s, t, backend="torch"), (s,))
    assert torch.autograd.gradcheck(lambda s: rk.distill_kl(s, teacher_probs=tp, teacher_cols=tc, reduction="none",
                                                            backend="torch"), (s,))


# ---- retrieval_distill_loss --------------------------------------------------------------------------------------------
def _retrieval_case(B=3, n=2, Lq=5, Ld=7, D=16, dtype=torch.float64, device="cpu"):
    q = torch.randn(B, Lq, D, dtype=dtype, device=device)
    d = torch.randn(B * n, Ld, D, dtype=dtype, device=device)
    q_mask = random_mask((B, Lq), device=device)
    q_mask[:, 0] = True
    d_mask = random_mask((B * n, Ld), device=device)
    d_mask[:, 0] = True
    pb = torch.randn(Lq + Ld + 2, dtype=dtype, device=device) * 0.3
    teacher = torch.softmax(torch.randn(B, n, dtype=torch.float64), -1).to(device=device, dtype=torch.float32)
    return q, d, q_mask, d_mask, pb, teacher


def test_retrieval_distill_loss_gradcheck():
    """float64: the composed op (torch backend) vs finite differences, for q, d, pos_bias and a learned scale."""
    q, d, qm, dm, pb, teacher = _retrieval_case(B=2, n=2, Lq=3, Ld=4, D=4)
    leaves = [t.requires_grad_(True) for t in (q, d, pb)]
    scale = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    f = lambda q, d, pb, sc: rk.retrieval_distill_loss(q, d, teacher.double(), q_mask=qm, d_mask=dm, pos_bias=pb,
                                                       scale=sc, backend="torch")
    assert torch.autograd.gradcheck(f, (*leaves, scale), fast_mode=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_retrieval_distill_loss(backend, dtype):
    dev = device_for(backend)
    B, n = 3, 2
    q, d, qm, dm, pb, teacher = _retrieval_case(B, n, dtype=torch.float64)
    q, d = q.to(dtype), d.to(dtype)  # round once; the references see the same values
    dm[1] = False  # an empty in-batch document (not one of query 0's): student -inf, teacher 0
    teacher[0] = torch.tensor([1.0, 0.0])  # one-hot, with an exact zero on query 0's second document
    try:
        rk.maxsim(q[:1].to(dev), d[:1].to(dev), backend=backend)
    except rk.BackendUnavailableError as exc:
        pytest.skip(f"maxsim has no {backend} backend yet: {exc}")
    ql, dl, pbl = (t.detach().to(dev).requires_grad_(True) for t in (q, d, pb.float()))
    scale = torch.tensor(2.3, device=dev, requires_grad=True)
    loss = rk.retrieval_distill_loss(ql, dl, teacher.to(dev), q_mask=qm.to(dev), d_mask=dm.to(dev), pos_bias=pbl,
                                     scale=scale, backend=backend)
    loss.backward()
    orc = retrieval_distill_oracle(q, d, teacher, q_mask=qm, d_mask=dm, pos_bias=pb.float(), scale=scale.item())
    assert_fp32_level(loss, orc["loss"], orc["mag_loss"], backend=backend, name=f"{backend} loss")
    for name, got in (("dq", ql.grad), ("dd", dl.grad), ("dbias", pbl.grad), ("dscale", scale.grad)):
        assert got is not None and torch.isfinite(got).all(), name
        assert_fp32_level(got, orc[name], orc[f"mag_{name}"], backend=backend, name=f"{backend} {name}")
    assert torch.all(dl.grad[1] == 0), "an empty document receives no gradient"


def test_retrieval_distill_loss_packed_and_cols():
    """Packed documents and explicit teacher_cols give the same loss as the padded default layout."""
    B, n, Ld, D = 2, 3, 6, 8
    q, d, qm, _, pb, teacher = _retrieval_case(B, n, Ld=Ld, D=D, dtype=torch.float32)
    lens = torch.randint(1, Ld + 1, (B * n,))
    dm = torch.arange(Ld)[None, :] < lens[:, None]
    padded = rk.retrieval_distill_loss(q, d, teacher, q_mask=qm, d_mask=dm, pos_bias=pb, scale=3.0)
    offsets = torch.zeros(B * n + 1, dtype=torch.int64)
    offsets[1:] = lens.cumsum(0)
    packed = rk.retrieval_distill_loss(q, d[dm], teacher, q_mask=qm, d_offsets=offsets, pos_bias=pb, scale=3.0)
    assert torch.allclose(padded, packed, rtol=1e-5, atol=1e-6)
    # documents in reverse order, teacher columns to match
    perm = torch.arange(B * n).flip(0)
    cols = torch.argsort(perm)[torch.arange(B * n)].reshape(B, n)
    rev = rk.retrieval_distill_loss(q, d[perm], teacher, q_mask=qm, d_mask=dm[perm], pos_bias=pb, scale=3.0,
                                    teacher_cols=cols)
    assert torch.allclose(padded, rev, rtol=1e-5, atol=1e-6)
    orc = retrieval_distill_oracle(q, d, teacher, q_mask=qm, d_mask=dm, pos_bias=pb, scale=3.0)
    assert_fp32_level(padded, orc["loss"], orc["mag_loss"], name="auto padded")
    orc = retrieval_distill_oracle(q, d[dm], teacher, q_mask=qm, d_offsets=offsets, pos_bias=pb, scale=3.0)
    assert_fp32_level(packed, orc["loss"], orc["mag_loss"], name="auto packed")
    with pytest.raises(ValueError, match="B \\* n"):
        rk.retrieval_distill_loss(q, d[:-1], teacher, q_mask=qm, d_mask=dm[:-1])
    with pytest.raises(ValueError, match="scale must be"):
        rk.retrieval_distill_loss(q, d, teacher, scale=-1.0)
    with pytest.raises(ValueError, match="teacher must be \\[B, n\\]"):
        rk.retrieval_distill_loss(q, d, teacher[:1])


# ---- registration ------------------------------------------------------------------------------------------------------
def test_poisoning_is_active():
    assert _alloc.POISON, "tests must run with REATT_POISON=1 so unwritten outputs are caught"


@pytest.mark.parametrize("backend", BACKENDS)
def test_distill_opcheck(backend):
    dev = device_for(backend)
    attn, doc, mask = make_teacher_case((2, 2, 3, 2, 19, 4), torch.float32, dev)
    torch.library.opcheck(torch.ops.reatt.reader_teacher.default, (attn, doc, mask, 4, True, backend))
    torch.library.opcheck(torch.ops.reatt.reader_teacher.default, (attn, doc.int(), None, 5, False, backend))
    for sparse in (False, True):
        c = make_kl_case((3, 11, 2), torch.float32, dev, sparse=sparse)
        s = c["student"].requires_grad_(True)
        args = (s, c.get("teacher"), c.get("teacher_probs"), c.get("teacher_cols"), False, "batchmean", True, backend)
        torch.library.opcheck(torch.ops.reatt.distill_kl_fwd.default, args)
        args = (s, c.get("teacher"), c.get("teacher_probs"), c.get("teacher_cols"), True, "none", True, backend)
        torch.library.opcheck(torch.ops.reatt.distill_kl_fwd.default, args)


def test_distill_torch_compile():
    torch._dynamo.reset()
    attn, doc, mask = make_teacher_case((2, 1, 3, 2, 19, 4), torch.float32, "cpu")
    q, d, qm, dm, pb, _ = _retrieval_case(2, 4, dtype=torch.float32)
    q.requires_grad_(True)
    d.requires_grad_(True)
    scale = torch.tensor(2.0, requires_grad=True)

    def f(attn, doc, mask, q, d, scale):
        teacher = rk.reader_teacher(attn, doc, attn_mask=mask, layers=-1, steps=0, n_docs=4)
        teacher = (teacher + 1e-3) / (teacher + 1e-3).sum(-1, keepdim=True)
        kl = rk.distill_kl(q.sum(-1)[:, :4] * 0.1, teacher)
        return kl + rk.retrieval_distill_loss(q, d, teacher, q_mask=qm, d_mask=dm, pos_bias=pb, scale=scale)

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = cf(attn, doc, mask, q, d, scale)
    out.backward()
    grads = [t.grad.clone() for t in (q, d, scale)]
    for t in (q, d, scale):
        t.grad = None
    ref = f(attn, doc, mask, q, d, scale)
    ref.backward()
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    for g, t in zip(grads, (q, d, scale)):
        assert torch.allclose(g, t.grad, rtol=1e-5, atol=1e-6)
