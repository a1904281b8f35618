"""MaxSim, the CUDA kernels only: every tiling path of the forward kernel, cuda against triton on large inputs, the
deterministic dd mode (bitwise), poisoned outputs, packed search past 2^31 elements, and bad inputs.

The shared matrix (tests/kernels/test_maxsim.py) already runs every layout x dtype x odd shape for backends "cuda" and
"cuda_emu"; the shapes here are picked to reach each branch of the tiling plan in csrc/maxsim/maxsim_launch.cu (WR =
1/2/4 rows per warp group, row chunks for Lq > 128, dim 64/128 register fast paths, generic dims, unaligned rows).
Each test runs for "cuda" on a GPU (gpu mark) and for "cuda_emu": the same kernels on CPU tensors under the CPU
emulation of the CUDA execution model (reatt_kernels._C_emu), on every commit. Under emulation every CUDA thread is an
OS thread, so the emulated cases use the same shapes but fewer layout/dtype combinations where a test would take
more than a few seconds (each tiling branch still runs once per dtype).
"""
from __future__ import annotations

import pytest
import torch

import reatt_kernels as rk
from reatt_kernels import _alloc, _ext
from reatt_kernels._dispatch import get_impl
from reatt_kernels.reference import maxsim_fwd_ref

from .test_maxsim import _leaf, make_case, run_api, run_ref
from ..utils import assert_close_to_ref, device_for, discrete, needs_cuda, needs_cuda_emu

# The CUDA kernels on a GPU, and the same kernels under CPU emulation.
CUDA_BACKENDS = [pytest.param("cuda", marks=needs_cuda), pytest.param("cuda_emu", marks=needs_cuda_emu)]


def _sync(backend):
    if backend == "cuda":
        torch.cuda.synchronize()


# ---- always runs (CPU) --------------------------------------------------------------------------------------------------
def test_maxsim_cuda_bindings_and_reasons():
    """The built extension exposes the cuda bindings exactly when it was built with CUDA, and without a GPU the cuda
    backend says why instead of crashing."""
    from reatt_kernels.cuda import maxsim as cuda_maxsim

    assert _ext.has("maxsim_fwd_cuda") == _ext.cuda_built()
    assert _ext.has("maxsim_bwd_cuda") == _ext.cuda_built()
    assert any("dim 300" in r for r in cuda_maxsim.MAXSIM.not_supported_reasons([], dim=300))
    status = rk.available_backends()["cuda"]
    if torch.cuda.is_available() and _ext.cuda_built():
        assert status == "ok"
    if not torch.cuda.is_available():
        assert isinstance(status, list) and any("no CUDA GPU" in r for r in status), status
        with pytest.raises(rk.BackendUnavailableError, match="no CUDA GPU"):
            rk.maxsim(torch.randn(2, 3, 8), torch.randn(4, 5, 8), backend="cuda")


# ---- GPU, and CPU emulation ----------------------------------------------------------------------------------------------
# (Bq, Lq, Nd, Ld, dim) and the forward tiling each one reaches.
TILINGS = [
    pytest.param((1, 32, 37, 128, 128), id="search-WR1-DS4-dim128"),
    pytest.param((16, 32, 19, 77, 128), id="batch-WR4-dim128"),
    pytest.param((2, 24, 9, 50, 64), id="WR2-dim64"),
    pytest.param((2, 200, 5, 70, 64), id="Lq200-row-chunks"),
    pytest.param((3, 7, 11, 33, 96), id="generic-dim96"),
    pytest.param((2, 9, 5, 40, 250), id="generic-dim250"),
    pytest.param((37, 1, 13, 9, 128), id="Lq1-many-queries"),
    pytest.param((5, 40, 6, 1, 33), id="dim33-unvectorised"),
    # Backward paths the training shape takes: > 128 columns (split dq + reduce kernel) and documents longer than one
    # deterministic-dd tile (Ld > 16384 / dim).
    pytest.param((2, 8, 300, 9, 64), id="bwd-split-dq-C300"),
    pytest.param((2, 16, 5, 300, 128), id="bwd-multi-tile-dd-Ld300"),
]


LAYOUTS = ["padded", "packed", "grouped"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Under emulation (every CUDA thread an OS thread, ~0.1 ms per warp collective on 2 cores) the same branches with
# fewer documents and tokens: each keeps the condition that picks its tiling (rows for WR, Lq > 128, C > 128 for the
# split dq, Ld > 16384 / dim for several dd tiles, dim 64/128 or generic, odd sizes).
# The search shape keeps 37 documents: with 1 SM (8 CTAs targeted) each CTA gets 5 of them and its first slot streams
# two, so a running max that is not reset between a slot's documents is caught.
EMU_SHAPES = {
    (1, 32, 37, 128, 128): (1, 32, 37, 40, 128),
    (16, 32, 19, 77, 128): (5, 32, 3, 37, 128),
    (2, 200, 5, 70, 64): (2, 150, 3, 37, 64),
    (37, 1, 13, 9, 128): (37, 1, 3, 9, 128),
    (2, 8, 300, 9, 64): (1, 8, 131, 3, 64),
    (2, 16, 5, 300, 128): (2, 16, 2, 150, 128),
}


def _emu_subset(dtype, shape, layout):
    """Under emulation each (tiling, dtype) runs with one layout, rotating, so all three layouts meet every tiling."""
    k = [p.values[0] for p in TILINGS].index(shape)
    return LAYOUTS[(k + DTYPES.index(dtype)) % 3] == layout


def _shape(backend, shape):
    return EMU_SHAPES.get(shape, shape) if backend == "cuda_emu" else shape


# Device-shape sweep under emulation: SM counts (1: few CTAs, so each streams several documents; 7: a ragged split;
# 132: an H100), opt-in shared memory (H100 227 KB, A100 163 KB, sm_86/89 99 KB) and the mma accumulation order (k,
# pairwise, reverse k). Rotated like the layouts, so each tiling meets every SM count, smem limit and order once over
# its three dtypes, at no extra run.
EMU_SM_COUNTS = [1, 7, 132]
EMU_SMEM_KB = [227, 163, 99]
EMU_MMA_ORDERS = ["seq", "pairwise", "reverse"]


def _emu_device(dtype, shape):
    k, i = [p.values[0] for p in TILINGS].index(shape), DTYPES.index(dtype)
    return EMU_SM_COUNTS[(k + i) % 3], EMU_SMEM_KB[(k + 2 * i) % 3], EMU_MMA_ORDERS[(2 * k + i) % 3]


@pytest.fixture
def emu_device(request):
    """Set the emulated device for one test (cuda_emu only) and restore it after."""
    m = _ext.emu()
    saved = (m.set_device_limits(), m.emu_config()) if m is not None else None

    def set_(sm_count, smem_kb, mma_order):
        m.set_device_limits(smem_optin=smem_kb * 1024, sm_count=sm_count)
        m.set_emu_config(mma_order=mma_order)

    yield set_
    if saved is not None:
        m.set_device_limits(smem_optin=saved[0]["smem_optin"], sm_count=saved[0]["sm_count"])
        m.set_emu_config(mma_order=saved[1]["mma_order"])


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", TILINGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_maxsim_cuda_tilings_fwd_bwd(dtype, shape, layout, backend, emu_device):
    """Discrete inputs (exact dot products): argmax must equal the reference exactly; scores and gradients are
    bounded by PyTorch's own error in the same dtype. Under emulation each case also runs on its own emulated device
    (SM count, smem limit, mma order: _emu_device)."""
    if backend == "cuda_emu" and not _emu_subset(dtype, shape, layout):
        pytest.skip("emulation: this tiling and dtype run with another layout")
    if backend == "cuda_emu":
        emu_device(*_emu_device(dtype, shape))
    dev = device_for(backend)
    case = _leaf(make_case(layout, _shape(backend, shape), dtype, dev, gen=lambda s: discrete(s)))
    out, am = run_api(case, backend, "mean", return_argmax=True)
    ref_case = _leaf(case)
    ref, am_ref = run_ref(ref_case, "mean")
    assert torch.equal(am.cpu(), am_ref.cpu()), "argmax differs from the reference"
    assert_close_to_ref(out, ref, None, dtype, name="scores")
    g = torch.randn(out.shape, device=dev)
    g = torch.where(torch.isfinite(ref.detach()), g, torch.zeros_like(g))
    out.backward(g)
    q64 = case["q"].detach().double().requires_grad_(True)
    d64 = case["d"].detach().double().requires_grad_(True)
    pb64 = case["pos_bias"].detach().double().requires_grad_(True)
    r, _ = run_ref(dict(case, q=q64, d=d64, pos_bias=pb64), "mean")
    r.backward(torch.where(torch.isfinite(r), g.double(), torch.zeros_like(r)))
    bc = _leaf(case)
    run_api(bc, "torch", "mean").backward(g)
    for name, got, t64, base in (("dq", case["q"].grad, q64, bc["q"]), ("dd", case["d"].grad, d64, bc["d"]),
                                 ("dpos_bias", case["pos_bias"].grad, pb64, bc["pos_bias"])):
        assert_close_to_ref(got, t64.grad, base.grad, dtype, factor=3.0, name=f"{layout} {name}")


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("n_bias", [40, 5000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_maxsim_cuda_ties(dtype, n_bias, backend):
    """Values in {-1, +1}: dot products take few values, so almost every row has ties, across the 4 lanes of a quad,
    across n8 tiles and across 32-token chunks; the argmax must still be the lowest j, exactly as in the reference.
    n_bias = 5000 exceeds the smem bias cache (4096) and takes the L1 path."""
    dev = device_for(backend)
    for layout, shape in (("padded", (3, 40, 7, 100, 16)), ("packed", (2, 33, 5, 90, 32)), ("grouped", (4, 8, 6, 70, 16))):
        case = make_case(layout, shape, dtype, dev, gen=lambda sh: discrete(sh, scale=1))
        if case["pos_bias"] is not None:
            case["pos_bias"] = discrete((n_bias,), scale=1).to(dev)
        out, am = run_api(case, backend, "sum", return_argmax=True)
        ref, am_ref = run_ref(case, "sum")
        assert torch.equal(am.cpu(), am_ref.cpu()), f"{layout}: argmax differs from the reference (ties)"
        assert_close_to_ref(out, ref, None, dtype, name=layout)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_maxsim_cuda_unaligned_rows(dtype, backend):
    """Rows that start off a 16-byte boundary take the element-copy path (no cp.async)."""
    dev = device_for(backend)
    nq, nd = (3, 50) if backend == "cuda" else (2, 7)  # emulation: fewer queries and documents
    q = torch.randn(nq, 32, 128, device=dev, dtype=dtype)
    big = torch.randn(nd, 60, 129, device=dev, dtype=dtype)
    d = big[:, :, 1:]  # stride 129 elements, base offset 2 bytes: unaligned for 16-byte copies
    s = rk.maxsim(q, d, backend=backend)
    ref, _ = maxsim_fwd_ref(q.double(), d.double(), None, None, None, None, 0, False)
    base = rk.maxsim(q, d, backend="torch")
    assert_close_to_ref(s, ref, base, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_maxsim_cuda_vs_triton_large(layout):
    """Large random fp16 inputs: cuda and triton both within the bound of the float64 reference, and their argmaxes
    agree (continuous inputs: a near-tie may flip with the summation order, so a tiny fraction may differ)."""
    if rk.available_backends()["triton"] != "ok":
        pytest.skip("triton backend unavailable")
    dev = torch.device("cuda")
    case = make_case(layout, (8, 32, 1500, 128, 128), torch.float16, dev)
    ref, _ = run_ref(case, "sum")
    base = run_api(case, "torch", "sum")
    out_c, am_c = run_api(case, "cuda", "sum", return_argmax=True)
    out_t, am_t = run_api(case, "triton", "sum", return_argmax=True)
    assert_close_to_ref(out_c, ref, base, torch.float16, name="cuda")
    assert_close_to_ref(out_t, ref, base, torch.float16, name="triton")
    agree = (am_c == am_t).double().mean().item()
    assert agree > 0.999, f"cuda and triton argmax agree on only {agree:.5f}"


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("layout", ["padded", "packed", "grouped"])
def test_maxsim_cuda_deterministic_bitwise(monkeypatch, layout, backend):
    """deterministic=True: dq, dd and dpos_bias are bitwise equal over two runs, on a shape where many (query, token)
    pairs pick the same document token (short documents), so fp32 atomics would race. The atomic mode (forced on for
    the third run) must agree with it to rounding."""
    dev = device_for(backend)
    shape = (8, 32, 16, 5, 64) if backend == "cuda" else (4, 32, 5, 5, 64)  # emulation: fewer queries and documents
    case = make_case(layout, shape, torch.bfloat16, dev)
    grads = []
    for det in (True, True, False):
        if not det:
            monkeypatch.setattr(get_impl("maxsim", backend), "atomic_min_entries", 0)
        c = _leaf(case)
        s = run_api(c, backend, "mean", deterministic=det)
        torch.manual_seed(1)  # the same upstream gradient every run
        g = torch.randn(s.shape, device=dev)
        s.backward(torch.where(torch.isfinite(s), g, torch.zeros_like(g)))
        grads.append((c["q"].grad.clone(), c["d"].grad.clone(), c["pos_bias"].grad.clone()))
    for a, b in zip(grads[0], grads[1]):
        assert torch.equal(a, b), "deterministic backward differs between two runs"
    for a, b in zip(grads[0], grads[2]):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_maxsim_cuda_poisoned_outputs(monkeypatch, deterministic, backend):
    """Launchers on NaN-poisoned buffers: every output element is written (no NaN, no INT_MIN), including empty
    documents, all-masked queries, Lq > 128 (row chunks) and tokens that never win."""
    impl = get_impl("maxsim", backend)
    monkeypatch.setattr(impl, "atomic_min_entries", 0)  # the atomic kernel runs whenever allowed
    monkeypatch.setattr(_alloc, "POISON", True)
    dev = device_for(backend)
    for layout, shape in (("padded", (3, 150, 7, 9, 64)), ("packed", (4, 33, 9, 40, 128)), ("grouped", (5, 7, 3, 6, 48))):
        if backend == "cuda_emu":  # emulation: fewer queries and documents, the same branches
            shape = (min(shape[0], 2),) + shape[1:2] + (min(shape[2], 4),) + shape[3:]
        c = make_case(layout, shape, torch.float16, dev)
        d, dm = c["d"], c["d_mask"]
        gs = 0
        if layout == "grouped":
            B, n, Ld, D = d.shape
            d, dm, gs = d.reshape(B * n, Ld, D), dm.reshape(B * n, Ld), n
        scores, argmax = impl.forward(c["q"], d, c["q_mask"], dm, c["d_offsets"], c["pos_bias"], gs, True)
        _sync(backend)
        assert not torch.isnan(scores).any(), f"{layout}: unwritten score"
        assert (argmax >= -1).all(), f"{layout}: unwritten argmax"
        g = torch.where(torch.isfinite(scores), torch.randn_like(scores), torch.zeros_like(scores))
        dq, dd, db = impl.backward(g, c["q"], d, c["q_mask"], c["d_offsets"], argmax, c["pos_bias"].shape[0], gs,
                                      True, deterministic)
        for name, t in (("dq", dq), ("dd", dd), ("dbias", db)):
            assert torch.isfinite(t).all(), f"{layout}: unwritten or non-finite {name}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_maxsim_cuda_packed_over_2e31_elements():
    """A packed corpus of more than 2^31 elements (18M tokens x 128, fp16, 4.6 GB): documents at the start and past
    the 2^31-element mark match a chunked reference computed on just those documents."""
    dev = torch.device("cuda")
    D, T = 128, 18_000_000
    assert T * D > 2**31
    if torch.cuda.get_device_properties(dev).total_memory < 12 * 2**30:
        pytest.skip("needs ~12 GB of GPU memory")
    d = torch.empty((T, D), dtype=torch.float16, device=dev)
    for s in range(0, T, 1 << 22):
        d[s : s + (1 << 22)].normal_()
    lens = torch.randint(48, 129, (T // 80,), device=dev)
    offsets = torch.zeros(lens.numel() + 1, dtype=torch.int64, device=dev)
    offsets[1:] = lens.cumsum(0)
    nd = int((offsets <= T).sum().item()) - 1
    offsets = offsets[: nd + 1].clone()
    offsets[-1] = T  # the last document takes the remaining rows
    q = torch.randn((1, 32, D), dtype=torch.float16, device=dev)
    scores = rk.maxsim_packed(q, d, offsets, backend="cuda")
    assert scores.shape == (1, nd) and torch.isfinite(scores).all()
    for b0, b1 in ((0, 300), (nd - 300, nd)):
        t0, t1 = int(offsets[b0]), int(offsets[b1])
        sub_off = offsets[b0 : b1 + 1] - t0
        ref, _ = maxsim_fwd_ref(q.double(), d[t0:t1].double(), None, None, sub_off, None, 0, False)
        base = rk.maxsim_packed(q, d[t0:t1], sub_off, backend="torch")
        assert_close_to_ref(scores[:, b0:b1], ref, base, torch.float16, name=f"docs {b0}:{b1} (token {t0}..)")
    assert int(offsets[nd - 300]) * D > 2**31, "the tail documents must lie past 2^31 elements"


@needs_cuda_emu
def test_maxsim_cuda_emu_past_2e31_elements():
    """Under emulation the forward and the backward address more than 2^31 elements without the RAM: d is a strided
    view [3, 7, 64] fp16 with a document stride of 2^32 + 4096 elements into a 17 GB sparse mapping (anonymous,
    MAP_NORESERVE: only the touched documents get pages). Documents 1 and 2 start past 2^32 elements, so an element
    offset narrowed to 32 bits wraps to zeros (or outside the mapping) and the scores or dq differ."""
    m = _ext.emu()
    C, Ld, D = 3, 7, 64
    sdb = 2**32 + 4096
    n = (C - 1) * sdb + Ld * D
    buf = m.sparse_buffer(n * 2)
    d = torch.frombuffer(buf, dtype=torch.float16).as_strided((C, Ld, D), (sdb, D, 1))
    assert d.storage_offset() == 0 and d.stride(0) * (C - 1) > 2**32
    d.copy_(discrete((C, Ld, D)).half())
    d.requires_grad_(True)
    q = discrete((2, 5, D)).half().requires_grad_(True)
    out, am = rk.maxsim(q, d, reduce="sum", backend="cuda_emu", return_argmax=True)
    d_small = d.detach().clone().requires_grad_(True)  # contiguous, 900 elements
    q64 = q.detach().double().requires_grad_(True)
    ref, am_ref = maxsim_fwd_ref(q64, d_small.double(), None, None, None, None, 0, False)
    assert torch.equal(am, am_ref), "argmax differs past 2^31 elements"
    assert_close_to_ref(out, ref, None, torch.float16, name="scores past 2^31 elements")
    g = torch.randn(out.shape)
    out.backward(g)
    r, _ = rk.maxsim(q64, d_small.double(), reduce="sum", backend="torch", return_argmax=True)
    r.backward(g.double())
    assert_close_to_ref(q.grad, q64.grad, None, torch.float16, name="dq (gathered past 2^31 elements)")
    assert_close_to_ref(d.grad, d_small.grad, None, torch.float16, name="dd")
    assert buf.resident_bytes() < 64 * 2**20, "the sparse mapping grew: something touched untouched documents"


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_maxsim_cuda_bad_inputs(backend):
    dev = device_for(backend)
    with pytest.raises(rk.BackendUnavailableError, match="dim 300"):
        rk.maxsim(torch.randn(2, 3, 300, device=dev), torch.randn(4, 5, 300, device=dev), backend=backend)
    if backend == "cuda":
        with pytest.raises(rk.BackendUnavailableError, match="tensors on cpu"):
            rk.maxsim(torch.randn(2, 3, 8), torch.randn(4, 5, 8), backend="cuda")
    else:
        with pytest.raises(rk.BackendUnavailableError, match="tensors on meta"):
            rk.maxsim(torch.randn(2, 3, 8, device="meta"), torch.randn(4, 5, 8, device="meta"), backend=backend)
    ext = _ext.ext() if backend == "cuda" else _ext.emu()
    q = torch.randn(2, 3, 8, device=dev)
    d = torch.randn(4, 5, 8, device=dev)
    qm = torch.ones(2, 3, dtype=torch.bool, device=dev)
    sc = torch.empty(2, 4, device=dev)
    am = torch.empty(2, 4, 3, dtype=torch.int32, device=dev)
    fields = dict(q=q.data_ptr(), d=d.data_ptr(), q_mask=qm.data_ptr(), scores=sc.data_ptr(), argmax=am.data_ptr(),
                  dtype=_ext.DTYPE_CODES[torch.float32], Bq=2, Lq=3, D=8, sq_b=24, sq_l=8, sq_d=1, Nd=4, Ld=5, sd_b=40,
                  sd_l=8, sd_d=1, sqm_b=3, sqm_l=1, stream=_ext.stream(q))

    def args(**change):
        return _ext.fill(ext.MaxsimArgs(), **dict(fields, **change))

    ext.maxsim_fwd_cuda(args())  # the valid call runs
    _sync(backend)
    with pytest.raises(ValueError, match="dtype must be"):
        ext.maxsim_fwd_cuda(args(dtype=_ext.DTYPE_CODES[torch.int32]))
    with pytest.raises(ValueError, match="contiguous"):
        ext.maxsim_fwd_cuda(args(sd_l=1, sd_d=5))
    with pytest.raises(ValueError, match="dim must be"):
        ext.maxsim_fwd_cuda(args(D=300))
    with pytest.raises(ValueError, match="grouped layout needs"):
        ext.maxsim_fwd_cuda(args(group_size=3))
    with pytest.raises(AttributeError):
        args(n_docs=4)  # a misspelt field is an error, never ignored
