"""MaxSim: every backend (torch included) x dtype x layout x odd shape against the float64 oracle (tests/oracle.py),
forward and backward, with fp32-level bounds; bias tables shorter than the largest distance (the clamp) and
discrete inputs with duplicated tokens (exact ties, lowest j wins) are part of the matrix."""
from __future__ import annotations

import pytest
import torch

import reatt_kernels as rk
from reatt_kernels.reference import maxsim_fwd_ref

from ..oracle import maxsim_oracle
from ..utils import BACKENDS, CUDA_EMU, DTYPES, assert_fp32_level, device_for, discrete, noncontig, random_mask

BACKENDS = [*BACKENDS, CUDA_EMU]  # maxsim's CUDA kernels also run under CPU emulation

LAYOUTS = ["padded", "packed", "grouped"]
# (Bq, Lq, Nd (n per query when grouped), Ld, dim): odd sizes, dim not a multiple of 16, Lq = 1, Ld = 1.
SHAPES = [(3, 7, 5, 13, 33), (2, 32, 3, 40, 64), (1, 1, 1, 1, 16), (2, 5, 4, 1, 7), (4, 9, 6, 17, 128)]


def short_bias_len(Lq, Ld):
    """A bias table shorter than the largest distance n_a + j - i (up to Lq + Ld - 2): the clamp to R - 1 is hit."""
    return max(1, (Lq + Ld) // 3)


def make_case(layout, shape, dtype, device, *, masks=True, bias=True, empty=True, gen=torch.randn, contiguous=True,
              ties=False):
    """Inputs for the public API, in dtype on device.

    bias: False (none), True / "long" (longer than every distance) or "short" (clamped: see short_bias_len).
    ties: the last two tokens of every document are equal, so (where the bias is clamped, or absent) they tie exactly
    and the lower j must win; use with exact (discrete) inputs.
    """
    Bq, Lq, Nd, Ld, D = shape
    q = gen((Bq, Lq, D)).to(dtype=dtype, device=device)
    q_mask = random_mask((Bq, Lq), device=device) if masks else None
    if q_mask is not None and Bq > 1:
        q_mask[-1] = False  # an all-masked query row
    R = short_bias_len(Lq, Ld) if bias == "short" else Lq + Ld + 3
    pos_bias = gen((R,)).to(dtype=torch.float32, device=device) * 0.5 if bias else None
    case = dict(layout=layout, q=q, q_mask=q_mask, pos_bias=pos_bias)
    if layout == "packed":
        lens = torch.randint(1, Ld + 1, (Nd,))
        if empty and Nd > 1:
            lens[1] = 0  # an empty document
        offsets = torch.zeros(Nd + 1, dtype=torch.int64)
        offsets[1:] = lens.cumsum(0)
        d = gen((int(offsets[-1]), D)).to(dtype=dtype, device=device)
        if ties:
            for b in range(Nd):
                if lens[b] >= 2:
                    d[int(offsets[b + 1]) - 1] = d[int(offsets[b + 1]) - 2]
        case.update(d=d, d_offsets=offsets.to(device), d_mask=None)
    else:
        n_docs = Bq * Nd if layout == "grouped" else Nd
        d = gen((n_docs, Ld, D)).to(dtype=dtype, device=device)
        if ties and Ld >= 2:
            d[:, -1] = d[:, -2]
        d_mask = random_mask((n_docs, Ld), device=device) if masks else None
        if d_mask is not None and ties and Ld >= 2:
            d_mask[:, -2:] = True  # keep both twins valid
        if d_mask is not None and empty and n_docs > 1:
            d_mask[1] = False  # an empty document
        if layout == "grouped":
            d = d.reshape(Bq, Nd, Ld, D)
            d_mask = d_mask.reshape(Bq, Nd, Ld) if d_mask is not None else None
        case.update(d=d, d_mask=d_mask, d_offsets=None)
    if not contiguous:
        case["q"] = noncontig(case["q"])
        case["d"] = noncontig(case["d"])
    return case


def run_api(case, backend, reduce="sum", **kw):
    c = case
    if c["layout"] == "padded":
        return rk.maxsim(c["q"], c["d"], c["q_mask"], c["d_mask"], pos_bias=c["pos_bias"], reduce=reduce,
                         backend=backend, **kw)
    if c["layout"] == "packed":
        return rk.maxsim_packed(c["q"], c["d"], c["d_offsets"], c["q_mask"], pos_bias=c["pos_bias"], reduce=reduce,
                                backend=backend, **kw)
    return rk.maxsim_grouped(c["q"], c["d"], c["q_mask"], c["d_mask"], pos_bias=c["pos_bias"], reduce=reduce,
                             backend=backend, **kw)


def run_ref(case, reduce="sum", cast=torch.float64):
    """The float64 reference on the same (already rounded) inputs; differentiable."""
    c = case
    q = c["q"].to(cast)
    d = c["d"].to(cast)
    pb = c["pos_bias"].to(cast) if c["pos_bias"] is not None else None
    if c["layout"] == "grouped":
        B, n, Ld, D = d.shape
        dm = c["d_mask"].reshape(B * n, Ld) if c["d_mask"] is not None else None
        return maxsim_fwd_ref(q, d.reshape(B * n, Ld, D), c["q_mask"], dm, None, pb, n, reduce == "mean")
    return maxsim_fwd_ref(q, d, c["q_mask"], c["d_mask"], c["d_offsets"], pb, 0, reduce == "mean")


def run_oracle(case, reduce="sum", grad=None):
    """The float64 oracle on the same (already rounded) inputs."""
    c = case
    return maxsim_oracle(c["layout"], c["q"], c["d"], c["q_mask"], c["d_mask"], c["d_offsets"], c["pos_bias"], reduce,
                         grad=grad)


def _leaf(case, keys=("q", "d", "pos_bias")):
    out = dict(case)
    for k in keys:
        if out[k] is not None:
            out[k] = out[k].detach().clone().requires_grad_(True)
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_maxsim_fwd(backend, dtype, shape, layout):
    """Random (continuous) inputs: scores within fp32-level error of the oracle, no bias with "sum", and a clamped
    (short) bias table with "mean"."""
    dev = device_for(backend)
    for reduce, bias in (("sum", False), ("mean", "short")):
        case = make_case(layout, shape, dtype, dev, bias=bias)
        out = run_api(case, backend, reduce)
        orc = run_oracle(case, reduce)
        assert out.dtype == torch.float32
        assert_fp32_level(out, orc["score"], orc["mag"], backend=backend,
                          name=f"{backend} {layout} {reduce} bias={bias}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES[:4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_maxsim_bwd(backend, dtype, shape, layout):
    """Discrete inputs make every dot product exact, and twin tokens at the end of every document tie exactly (the
    bias table is short, so the clamp gives the twins the same bias): the argmax must equal the oracle's (lowest j),
    and scores and gradients (dq, dd, dpos_bias from the oracle's explicit backward) must be fp32-level."""
    dev = device_for(backend)
    case = make_case(layout, shape, dtype, dev, gen=lambda s: discrete(s, scale=2), bias="short", ties=True)
    case = _leaf(case)
    out, am = run_api(case, backend, "mean", return_argmax=True)
    g = torch.randn(out.shape, dtype=torch.float32, device=dev)
    orc = run_oracle(case, "mean", grad=g)
    got_am = am.cpu().long()
    assert torch.equal(got_am, orc["argmax"]), (
        f"argmax differs from the oracle at {(got_am != orc['argmax']).nonzero()[:5].tolist()}")
    assert_fp32_level(out, orc["score"], orc["mag"], backend=backend, name=f"{backend} {layout} scores")
    finite = torch.isfinite(orc["score"]).to(dev)
    out.backward(torch.where(finite, g, torch.zeros_like(g)))  # -inf scores of empty docs: their grad is 0 anyway
    for key, name in (("q", "dq"), ("d", "dd"), ("pos_bias", "dbias")):
        got = case[key].grad
        assert got is not None, f"{name} missing"
        assert got.dtype == case[key].dtype
        assert_fp32_level(got, orc[name], orc[f"mag_{name}"], backend=backend, name=f"{backend} {layout} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_maxsim_edge_semantics(backend):
    """Pinned semantics: masked tokens never win, empty docs score -inf with no gradient, empty queries score 0."""
    dev = device_for(backend)
    q = torch.randn(3, 4, 16, device=dev)
    d = torch.randn(4, 5, 16, device=dev)
    q_mask = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool, device=dev)
    d_mask = torch.ones(4, 5, dtype=torch.bool, device=dev)
    d_mask[2] = False  # empty document
    d_mask[0, 3] = False
    d = d.clone()
    d[0, 3] = 100.0  # a masked token with a huge dot product must never win
    d.requires_grad_(True)
    s, am = rk.maxsim(q, d, q_mask, d_mask, backend=backend, return_argmax=True)
    assert torch.isneginf(s[0, 2]) and torch.isneginf(s[2, 2]), "empty document must score -inf"
    assert torch.all(s[1] == 0), "a query with no valid token scores 0"
    assert not torch.isnan(s).any()
    assert not (am[:, 0] == 3).any(), "a masked document token won the max"
    assert torch.all(am[:, 2] == -1) and torch.all(am[1] == -1)
    g = torch.ones_like(s)
    s.backward(g)
    assert torch.all(d.grad[2] == 0), "an empty document received gradient"
    assert torch.all(d.grad[0, 3] == 0), "a masked token received gradient"
    assert torch.isfinite(d.grad).all()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_maxsim_noncontiguous(backend, layout):
    dev = device_for(backend)
    case = make_case(layout, (3, 7, 5, 13, 33), torch.float32, dev, contiguous=False)
    assert not case["q"].is_contiguous() and not case["d"].is_contiguous()
    out = run_api(case, backend, "sum")
    orc = run_oracle(case, "sum")
    assert_fp32_level(out, orc["score"], orc["mag"], backend=backend, name=f"{backend} {layout} noncontig")


@pytest.mark.parametrize("backend", BACKENDS)
def test_maxsim_deterministic_dd(backend):
    dev = device_for(backend)
    case = _leaf(make_case("padded", (4, 9, 6, 17, 64), torch.float32, dev))
    grads = []
    for _ in range(2):
        c = _leaf(case)
        run_api(c, backend, "mean", deterministic=True).sum().backward()
        grads.append((c["q"].grad, c["d"].grad, c["pos_bias"].grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b), "deterministic backward differs between two runs"


@pytest.mark.parametrize("backend", BACKENDS)
def test_maxsim_empty_sizes(backend):
    dev = device_for(backend)
    q = torch.randn(2, 3, 8, device=dev)
    assert rk.maxsim(q, torch.randn(0, 4, 8, device=dev), backend=backend).shape == (2, 0)
    assert rk.maxsim(torch.randn(0, 3, 8, device=dev), torch.randn(5, 4, 8, device=dev), backend=backend).shape == (0, 5)
    s = rk.maxsim(q, torch.randn(5, 0, 8, device=dev), backend=backend)
    assert torch.isneginf(s).all(), "documents with no tokens score -inf"
    s = rk.maxsim(torch.randn(2, 0, 8, device=dev), torch.randn(5, 4, 8, device=dev), backend=backend)
    assert torch.all(s == 0), "queries with no tokens score 0"
    off = torch.tensor([0, 0, 0], dtype=torch.int64, device=dev)
    s = rk.maxsim_packed(q, torch.randn(0, 8, device=dev), off, backend=backend)
    assert s.shape == (2, 2) and torch.isneginf(s).all()


def test_maxsim_gradcheck_reference():
    """float64 gradcheck of the reference (continuous inputs: no ties)."""
    q = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    d = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    pb = torch.randn(9, dtype=torch.float64, requires_grad=True)
    qm = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    dm = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    f = lambda q, d, pb: maxsim_fwd_ref(q, d, qm, dm, None, pb, 0, True)[0]
    assert torch.autograd.gradcheck(f, (q, d, pb))
    # and the custom op (torch backend, explicit backward) agrees with it
    g = lambda q, d, pb: rk.maxsim(q, d, qm, dm, pos_bias=pb, reduce="mean", backend="torch")
    assert torch.autograd.gradcheck(g, (q, d, pb))


# ---- bad inputs ---------------------------------------------------------------------------------------------------------
def test_maxsim_bad_inputs():
    q = torch.randn(2, 3, 8)
    d = torch.randn(4, 5, 8)
    with pytest.raises(ValueError, match="q must be 3-D"):
        rk.maxsim(torch.randn(3, 8), d)
    with pytest.raises(ValueError, match="same dim"):
        rk.maxsim(q, torch.randn(4, 5, 9))
    with pytest.raises(TypeError, match="same dtype"):
        rk.maxsim(q, d.half())
    with pytest.raises(ValueError, match="q_mask must have shape"):
        rk.maxsim(q, d, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="d_mask must be a bool"):
        rk.maxsim(q, d, None, torch.ones(4, 5))
    with pytest.raises(TypeError, match="q must be float32"):
        rk.maxsim(q.int(), d.int())
    with pytest.raises(ValueError, match="reduce must be"):
        rk.maxsim(q, d, reduce="max")
    with pytest.raises(ValueError, match="pos_bias must be 1-D"):
        rk.maxsim(q, d, pos_bias=torch.randn(2, 2))
    with pytest.raises(ValueError, match="backend must be"):
        rk.maxsim(q, d, backend="nope")
    tok = torch.randn(10, 8)
    with pytest.raises(ValueError, match="non-decreasing"):
        rk.maxsim_packed(q, tok, torch.tensor([0, 6, 4, 10]))
    with pytest.raises(ValueError, match="end at the number of token rows"):
        rk.maxsim_packed(q, tok, torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="start at 0"):
        rk.maxsim_packed(q, tok, torch.tensor([1, 4, 10]))
    with pytest.raises(TypeError, match="d_offsets must be int64"):
        rk.maxsim_packed(q, tok, torch.tensor([0, 4, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="d must be \\[B, n, Ld, dim\\]"):
        rk.maxsim_grouped(q, torch.randn(3, 2, 5, 8))
    with pytest.raises(ValueError, match="d_mask must have shape"):
        rk.maxsim_grouped(q, torch.randn(2, 2, 5, 8), None, torch.ones(2, 2, 4, dtype=torch.bool))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_maxsim_device_mismatch():
    with pytest.raises(ValueError, match="is on"):
        rk.maxsim(torch.randn(2, 3, 8), torch.randn(4, 5, 8, device="cuda"))


def test_maxsim_device_mismatch_meta():
    """The device check without a GPU: a meta tensor stands in for another device."""
    with pytest.raises(ValueError, match="is on"):
        rk.maxsim(torch.randn(2, 3, 8), torch.randn(4, 5, 8, device="meta"))


def test_forced_backend_reasons(monkeypatch):
    monkeypatch.setenv("REATT_BACKEND", "cuda")
    with pytest.raises(rk.BackendUnavailableError, match="cuda"):
        rk.maxsim(torch.randn(2, 3, 8), torch.randn(4, 5, 8))
    monkeypatch.setenv("REATT_BACKEND", "torch")
    assert rk.maxsim(torch.randn(2, 3, 8), torch.randn(4, 5, 8)).shape == (2, 4)


def test_available_backends():
    ab = rk.available_backends()
    assert set(ab) == {"torch", "cpu", "triton", "cuda", "cuda_emu"}
    assert ab["torch"] == "ok"
    for name, status in ab.items():
        assert status == "ok" or (isinstance(status, list) and all(isinstance(r, str) and r for r in status)), name


# ---- registration -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_maxsim_opcheck(backend):
    dev = device_for(backend)
    for layout in LAYOUTS:
        c = make_case(layout, (3, 5, 4, 6, 16), torch.float32, dev)
        q = c["q"].requires_grad_(True)
        d = c["d"].detach().requires_grad_(True)
        pb = c["pos_bias"].requires_grad_(True)
        qm = c["q_mask"]
        if layout == "grouped":
            B, n, Ld, D = d.shape
            args = (q, d.reshape(B * n, Ld, D), qm, c["d_mask"].reshape(B * n, Ld), None, pb, n, True, False, backend)
        else:
            args = (q, d, qm, c["d_mask"], c["d_offsets"], pb, 0, True, False, backend)
        torch.library.opcheck(torch.ops.reatt.maxsim_fwd.default, args)
    s, am = torch.ops.reatt.maxsim_fwd(*args)
    g = torch.randn_like(s)
    bargs = (g, args[0].detach(), args[1].detach(), args[2], args[4], am, pb.shape[0], args[6], True, False, backend)
    torch.library.opcheck(torch.ops.reatt.maxsim_bwd.default, bargs)


def test_maxsim_torch_compile():
    torch._dynamo.reset()
    q = torch.randn(3, 5, 16, requires_grad=True)
    d = torch.randn(4, 6, 16, requires_grad=True)
    pb = torch.randn(12, requires_grad=True)

    def f(q, d, pb):
        return rk.maxsim(q, d, pos_bias=pb, reduce="mean").logsumexp(-1).sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = cf(q, d, pb)
    out.backward()
    q2, d2, pb2 = (t.detach().clone().requires_grad_(True) for t in (q, d, pb))
    ref = f(q2, d2, pb2)
    ref.backward()
    assert torch.allclose(out, ref)
    for got, want in ((q.grad, q2.grad), (d.grad, d2.grad), (pb.grad, pb2.grad)):
        assert got is not None and torch.allclose(got, want), "compiled gradients differ from eager"
