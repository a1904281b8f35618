"""Triton MaxSim beyond the shared matrix (tests/kernels/test_maxsim.py): both dd modes, the GPU tilings (several programs per
query, multi-tile documents, token chunks, column chunks) forced under the interpreter, dim 256, long queries, wide
bias tables, an sm_90 compilation of every H100 launch configuration (no GPU needed), and GPU-only large /
> 2^31-element checks."""
from __future__ import annotations

import pytest
import torch

import reatt_kernels as rk
from reatt_kernels.reference import maxsim_fwd_ref

from .test_maxsim import make_case, run_api, run_oracle
from ..utils import assert_close_to_ref, assert_fp32_level, device_for, discrete, needs_triton

pytestmark = needs_triton
DEV = device_for("triton")


def _tm():
    from reatt_kernels.triton import maxsim as tm

    return tm


def _canonical(case):
    """(q, d, q_mask, d_mask, d_offsets, pos_bias, group_size) in the launcher's canonical layout."""
    c = case
    q_mask = c["q_mask"] if c["q_mask"] is not None else torch.ones(c["q"].shape[:2], dtype=torch.bool, device=DEV)
    if c["layout"] == "grouped":
        B, n, Ld, D = c["d"].shape
        dm = c["d_mask"].reshape(B * n, Ld) if c["d_mask"] is not None else None
        return c["q"], c["d"].reshape(B * n, Ld, D), q_mask, dm, None, c["pos_bias"], n
    return c["q"], c["d"], q_mask, c["d_mask"], c["d_offsets"], c["pos_bias"], 0


def _check_fwd_bwd(case, dtype, mean=True, modes=(False, True)):
    """Forward (scores, exact argmax on discrete inputs) and both backward modes against the float64 oracle."""
    tm = _tm()
    q, d, qm, dm, off, pb, n = _canonical(case)
    s, am = tm._maxsim_fwd(q, d, qm, dm, off, pb, n, mean)
    # Any fp32 strides for the upstream gradient: a transposed (column-major) one here.
    g = torch.randn(s.shape[::-1], device=DEV).t()
    orc = run_oracle(case, "mean" if mean else "sum", grad=g)
    g[~torch.isfinite(orc["score"]).to(DEV)] = 0.0  # in place: keeps the transposed strides
    assert not g.is_contiguous() or min(g.shape) <= 1
    assert torch.equal(am.cpu().long(), orc["argmax"]), "argmax differs from the oracle"
    assert_fp32_level(s, orc["score"], orc["mag"], backend="triton", name="scores")
    R = pb.shape[0] if pb is not None else 0
    outs = []
    for det in modes:
        got = tm._maxsim_bwd(g, q, d, qm, off, am, R, n, mean, det)
        for name, x, like in zip(("dq", "dd", "dbias"), got, (q, d, torch.empty(R))):
            assert x.shape == like.shape and x.dtype == like.dtype, f"{name}: {x.shape} {x.dtype}"
            ref = orc[name].reshape(x.shape)  # grouped: the oracle's dd is [B, n, Ld, D], the launcher's [B*n, Ld, D]
            assert_fp32_level(x, ref, orc[f"mag_{name}"].reshape(x.shape), backend="triton",
                              name=f"{name} det={det}")
        outs.append(got)
    return outs


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["padded", "packed", "grouped"])
def test_maxsim_triton_dd_modes(layout, dtype, deterministic):
    """The atomic and the deterministic dd scatter each match the float64 reference (through the public API)."""
    case = make_case(layout, (3, 7, 5, 13, 33), dtype, DEV, gen=lambda s: discrete(s))
    for k in ("q", "d", "pos_bias"):
        case[k] = case[k].detach().clone().requires_grad_(True)
    out = run_api(case, "triton", "mean", deterministic=deterministic)
    g = torch.randn(out.shape, device=DEV)
    orc = run_oracle(case, "mean", grad=g)
    out.backward(torch.where(torch.isfinite(orc["score"]).to(DEV), g, torch.zeros_like(g)))
    for key, name in (("q", "dq"), ("d", "dd"), ("pos_bias", "dbias")):
        assert_fp32_level(case[key].grad, orc[name], orc[f"mag_{name}"], backend="triton",
                          name=f"{name} det={deterministic}")


@pytest.fixture
def gpu_tiling(monkeypatch):
    """Force the GPU-shaped tilings under the interpreter: 2 queries per block, 4-token chunks (Lq 9 -> 3 chunks),
    16-token tiles (multi-tile documents), 3 documents per program (several programs per query, a ragged last one),
    3 column chunks of 2-column steps in the dq kernel, 2 column chunks in the dbias kernel, 16-token dd tiles.
    On a GPU every tl.dot keeps M, K >= 16."""
    tm = _tm()
    fwd_config, bwd_config = tm._fwd_config, tm._bwd_config
    gpu = torch.cuda.is_available()

    def small_fwd(Bq, Lq, Ld_tile, D_PAD, n_docs, grouped, *args):
        QB, M_TOK, BLOCK_N, dpp, nw, ns = fwd_config(Bq, Lq, Ld_tile, D_PAD, n_docs, grouped, *args)
        if grouped:
            return 1, (16 if gpu else 4), 16, 3, nw, ns
        return (4 if gpu else 2), 4, 16, 3, nw, ns

    def small_bwd(Bq, Lq, C, *args):
        cfg = bwd_config(Bq, Lq, C, *args)
        cfg.update(M_TOK=4, BLOCK_C=2, n_cchunks=3, M_TOK_B=4, n_cchunks_b=2, BLOCK_N=16, LQ_T=16 if gpu else 4)
        return cfg

    monkeypatch.setattr(tm, "_fwd_config", small_fwd)
    monkeypatch.setattr(tm, "_bwd_config", small_bwd)
    return tm


def test_maxsim_triton_packed_many_docs(gpu_tiling):
    """A packed corpus of 20 ragged documents (0..40 tokens, some empty) split over many programs per query."""
    torch.manual_seed(1)
    Bq, Lq, D, Nd = 3, 9, 24, 20
    lens = torch.randint(0, 41, (Nd,))
    lens[[0, 7, 19]] = torch.tensor([0, 40, 0])
    off = torch.zeros(Nd + 1, dtype=torch.int64)
    off[1:] = lens.cumsum(0)
    q_mask = torch.rand(Bq, Lq) < 0.8
    q_mask[1] = False
    case = dict(layout="packed", q=discrete((Bq, Lq, D), device=DEV), d=discrete((int(off[-1]), D), device=DEV),
                d_offsets=off.to(DEV), d_mask=None, q_mask=q_mask.to(DEV),
                pos_bias=torch.randn(Lq + 50, device=DEV))
    _check_fwd_bwd(case, torch.float32, mean=True)


@pytest.mark.parametrize("layout", ["padded", "grouped"])
def test_maxsim_triton_padded_tiled(gpu_tiling, layout):
    """Padded (d_mask, 3 tiles of 16 per document) and grouped layouts under the GPU-shaped tilings, fp16."""
    case = make_case(layout, (3, 9, 7, 40, 16), torch.float16, DEV, gen=lambda s: discrete(s))
    _check_fwd_bwd(case, torch.float16)


def test_maxsim_triton_dim256():
    """The largest supported dim (one 256-wide tile), bf16, padded with masks and bias."""
    case = make_case("padded", (2, 5, 3, 7, 256), torch.bfloat16, DEV, gen=lambda s: discrete(s))
    _check_fwd_bwd(case, torch.bfloat16)


def test_maxsim_triton_long_query():
    """Lq = 130 > 128: the query is split into token chunks whose partial sums are added after the kernel."""
    case = make_case("padded", (1, 130, 2, 3, 16), torch.float32, DEV, gen=lambda s: discrete(s), masks=False)
    _check_fwd_bwd(case, torch.float32, modes=(True,))


def test_maxsim_triton_wide_bias_fallback(monkeypatch):
    """Bias tables too wide for the in-register histogram fall back to torch's deterministic index_add."""
    tm = _tm()
    monkeypatch.setattr(tm, "MAX_HIST", 4)
    case = make_case("packed", (2, 5, 4, 6, 16), torch.float32, DEV, gen=lambda s: discrete(s))
    _check_fwd_bwd(case, torch.float32, modes=(False,))


def test_maxsim_triton_deterministic_bitwise(gpu_tiling):
    """deterministic=True is bitwise reproducible with several column chunks and dd tiles (and agrees with atomics)."""
    case = make_case("padded", (3, 7, 5, 20, 16), torch.float32, DEV)
    tm = gpu_tiling
    q, d, qm, dm, off, pb, n = _canonical(case)
    s, am = tm._maxsim_fwd(q, d, qm, dm, off, pb, n, True)
    g = torch.randn(s.shape, device=DEV).masked_fill(torch.isinf(s), 0.0)
    a = tm._maxsim_bwd(g, q, d, qm, off, am, pb.shape[0], n, True, True)
    b = tm._maxsim_bwd(g, q, d, qm, off, am, pb.shape[0], n, True, True)
    c = tm._maxsim_bwd(g, q, d, qm, off, am, pb.shape[0], n, True, False)
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y)
        torch.testing.assert_close(x, z, rtol=1e-5, atol=1e-6)


def test_maxsim_triton_not_supported():
    with pytest.raises(rk.BackendUnavailableError, match="dim 300"):
        rk.maxsim(torch.randn(1, 2, 300, device=DEV), torch.randn(2, 3, 300, device=DEV), backend="triton")


def test_maxsim_triton_torch_compile():
    torch._dynamo.reset()
    q = torch.randn(3, 5, 16, device=DEV, requires_grad=True)
    d = torch.randn(4, 6, 16, device=DEV, requires_grad=True)
    pb = torch.randn(12, device=DEV, requires_grad=True)

    def f(q, d, pb):
        return rk.maxsim(q, d, pos_bias=pb, reduce="mean", backend="triton").logsumexp(-1).sum()

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, d, pb)
    out.backward()
    ref = f(q.detach(), d.detach(), pb.detach())
    torch.testing.assert_close(out, ref)
    assert q.grad is not None and d.grad is not None and pb.grad is not None


# ---- GPU only ----------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_maxsim_triton_large_random_gpu(dtype):
    """16 queries x 20k padded documents (real GPU configs: compute regime, many programs) vs the torch backend, and
    a training-like fwd + bwd in both dd modes."""
    q = torch.randn(16, 32, 128, device="cuda", dtype=dtype)
    d = torch.randn(20000, 128, 128, device="cuda", dtype=dtype)
    d_mask = torch.rand(20000, 128, device="cuda") < 0.9
    d_mask[::97] = False
    out = rk.maxsim(q, d, None, d_mask, backend="triton")
    ref = maxsim_fwd_ref(q.double(), d.double(), None, d_mask, None, None, 0, False)[0]
    base = rk.maxsim(q, d, None, d_mask, backend="torch")
    assert_close_to_ref(out, ref, base, dtype, name="16 x 20k")
    # 1 query: the HBM-bound configuration.
    assert_close_to_ref(rk.maxsim(q[:1], d, None, d_mask, backend="triton"), ref[:1], base[:1], dtype, name="1 x 20k")
    # Training-like: all pairs, mean, pos_bias, Ld 200, d 64. Discrete values make every dot product exact, so all
    # backends pick the same argmax and the gradients are comparable elementwise.
    q = discrete((8, 32, 64), dtype=dtype, device="cuda")
    d = discrete((800, 200, 64), dtype=dtype, device="cuda")
    qm = torch.rand(8, 32, device="cuda") < 0.8
    dm = torch.rand(800, 200, device="cuda") < 0.8
    pb = torch.randn(240, device="cuda")
    g = torch.randn(8, 800, device="cuda")
    grads = {}
    for backend, det in (("torch", False), ("triton", False), ("triton", True)):
        qq, dd_, pp = (t.detach().clone().requires_grad_(True) for t in (q, d, pb))
        s = rk.maxsim(qq, dd_, qm, dm, pos_bias=pp, reduce="mean", backend=backend, deterministic=det)
        s.backward(g)
        grads[(backend, det)] = (s.detach(), qq.grad, dd_.grad, pp.grad)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-4)
    for key in (("triton", False), ("triton", True)):
        for x, y in zip(grads[key], grads[("torch", False)]):
            torch.testing.assert_close(x.float(), y.float(), **tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_maxsim_triton_over_2pow31_gpu():
    """1 query vs 200k docs x 128 tokens x 128 dims fp16: 3.3e9 elements (6.6 GB), beyond 32-bit offsets."""
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip("needs ~12 GiB of free GPU memory")
    Nd, Ld, D = 200_000, 128, 128
    assert Nd * Ld * D > 2**31
    q = torch.randn(1, 32, D, device="cuda", dtype=torch.float16)
    d = torch.randn(Nd, Ld, D, device="cuda", dtype=torch.float16)
    s, am = rk.maxsim(q, d, backend="triton", return_argmax=True)
    base = rk.maxsim(q, d, backend="torch")
    assert torch.isfinite(s).all()
    torch.testing.assert_close(s, base, rtol=1e-3, atol=1e-2)
    # The last documents sit past element 2^31: check them (and their argmax) directly.
    tail = torch.einsum("id,bjd->bij", q[0].float(), d[-8:].float())
    torch.testing.assert_close(s[0, -8:], tail.amax(-1).sum(-1), rtol=1e-3, atol=1e-2)
    assert (am[0, -8:] == tail.argmax(-1)).float().mean() > 0.99


# ---- sm_90 compilation without a GPU -------------------------------------------------------------------------------------
_COMPILE_SCRIPT = r'''
import re, subprocess, sys, tempfile, os
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from reatt_kernels.triton import maxsim as tm

tm._num_sms = lambda device: 132  # an H100
tm._interpret = lambda: False
TY = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32",
      torch.int64: "*i64", torch.uint8: "*u8"}
seen = set()


class Capture:
    """Stands in for a kernel: compiles each launch for sm_90 with the JIT's specialisations (1 -> constexpr,
    multiples of 16 -> divisibility) instead of running it."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        def launch(*args, num_warps=4, num_stages=3, **cx):
            sig, attrs, consts = {}, {}, dict(cx)
            for idx, (name, v) in enumerate(zip(self.fn.arg_names, args)):
                if isinstance(v, torch.Tensor):
                    sig[name] = TY[v.dtype]
                    attrs[(idx,)] = [["tt.divisibility", 16]]
                elif v == 1:
                    consts[name] = 1
                else:
                    sig[name] = "i64" if abs(v) >= 2**31 else "i32"
                    if v % 16 == 0:
                        attrs[(idx,)] = [["tt.divisibility", 16]]
            for name in consts:
                sig[name] = "constexpr"
            key = (self.fn.__name__, tuple(sorted(sig.items())), tuple(sorted(consts.items())), num_warps, num_stages)
            if key in seen:
                return
            seen.add(key)
            k = triton.compile(ASTSource(self.fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                               options=dict(num_warps=num_warps, num_stages=num_stages))
            assert k.asm["cubin"], self.fn.__name__
            print(self.fn.__name__, grid, num_warps, num_stages, cx, flush=True)
        return launch


for name in ("_maxsim_fwd_kernel", "_maxsim_bwd_dq_kernel", "_maxsim_bwd_dd_kernel", "_maxsim_bwd_dbias_kernel"):
    setattr(tm, name, Capture(getattr(tm, name)))
M = "meta"


def run(Bq, Lq, Nd, Ld, D, dtype, bias, mean, layout, bwd):
    q = torch.empty(Bq, Lq, D, dtype=dtype, device=M)
    qm = torch.empty(Bq, Lq, dtype=torch.bool, device=M)
    pb = torch.empty(Lq + Ld + 8, device=M) if bias else None
    n, dm, off = (Nd // Bq if layout == "grouped" else 0), None, None
    if layout == "packed":
        off = torch.arange(Nd + 1, dtype=torch.int64) * Ld  # real (CPU) offsets: the backward reads the longest doc
        d = torch.empty(Nd * Ld, D, dtype=dtype, device=M)
    else:
        d = torch.empty(Nd, Ld, D, dtype=dtype, device=M)
        dm = torch.empty(Nd, Ld, dtype=torch.bool, device=M)
    tm._maxsim_fwd(q, d, qm, dm, off, pb, n, mean)
    if bwd:
        C = n or Nd
        g = torch.empty(Bq, C, device=M)
        am = torch.empty(Bq, C, Lq, dtype=torch.int32, device=M)
        for det in (False, True):
            tm._maxsim_bwd(g, q, d, qm, off, am, pb.shape[0] if bias else 0, n, mean, det)


run(1, 32, 200_000, 128, 128, torch.float16, False, False, "padded", False)  # exact search, HBM regime
run(1, 32, 50_000, 88, 128, torch.float16, False, False, "packed", False)  # packed index
run(64, 32, 6400, 200, 64, torch.bfloat16, True, True, "padded", True)  # ReAtt training shape
run(8, 32, 800, 200, 64, torch.bfloat16, True, True, "grouped", True)
run(4, 9, 100, 33, 256, torch.float32, True, False, "packed", True)  # fp32 ("ieee"), dim 256
run(3, 1, 100, 5, 7, torch.float16, True, False, "padded", True)  # Lq 1, dim 7
print("compiled", len(seen))
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU runs compile the kernels for real")
def test_maxsim_triton_compiles_for_sm90():
    """Compile every kernel configuration the launchers pick on an H100 (training, search, packed, grouped, fp32,
    dim 256, Lq 1) for sm_90 with triton's own ptxas, without a GPU: CPU CI otherwise only ever runs the interpreter,
    which accepts code the compiler rejects."""
    import os
    import subprocess
    import sys

    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
        import triton.backends.nvidia  # noqa: F401
    except Exception as exc:  # an internal API moved, or triton was built without the NVIDIA backend
        pytest.skip(f"cannot compile for sm_90 here: {type(exc).__name__}: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "compiled" in res.stdout, res.stdout[-2000:]
