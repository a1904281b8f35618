"""Shared test helpers: tolerances (one place), float64 comparison, poisoning, discrete random inputs."""
from __future__ import annotations

import os

import pytest
import torch

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# ---- the error model: every bound of the suite lives here ------------------------------------------------------------
# The oracle (tests/oracle.py) computes in float64 on the same already-rounded inputs the kernel saw, and every kernel
# accumulates in fp32 whatever the input dtype. So a kernel's error is at most a few fp32 unit roundoffs times the sum
# of the absolute values of the terms it accumulated (the oracle returns that sum as ``mag``), plus one rounding of the
# result into the output dtype (scores and losses are fp32; gradients come back in the input dtype).
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# Half the smallest subnormal step of the output dtype: a value below it rounds to 0 or to that step.
TINY = {torch.float64: 0.0, torch.float32: 2.0**-150, torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134}
# "A few ulps": fp32 sums of up to a few hundred terms (blocked or sequential) stay far below the worst case n * u;
# the largest ratio measured on the CPU kernels, the Triton interpreter and the torch backend is ~1 (see docs/testing.md).
FP32_ULPS = 8.0
# Backends that legitimately sum in another order on real hardware get their looser factor here, with the reason.
LOOSER_ULPS = {
    # Tensor-core MMA (Triton on a GPU, the CUDA kernels): fp32 accumulation inside the MMA is not IEEE-sequential
    # (products are aligned to the largest exponent of the K-group and low bits are truncated on sm_90), so a dot of D
    # terms can lose a few more ulps than a sequential fp32 sum. Not measured here (no GPU in this session).
    ("triton", "cuda"): 64.0,
    ("cuda", "cuda"): 64.0,
}


def output_roundoff(dtype, backend=None) -> float:
    """Relative error of one rounding into ``dtype``. The Triton interpreter converts fp32 to bf16 by truncation
    (round toward zero: up to one ulp, 2u) where a GPU rounds to nearest even; measured, triton 3.8."""
    u = UNIT_ROUNDOFF[dtype]
    if backend == "triton" and dtype == torch.bfloat16 and device_for("triton").type == "cpu":
        return 2 * u
    return u


def ulps_for(backend: str) -> float:
    """The fp32 ulps factor for a backend on the device it runs on in this session."""
    return LOOSER_ULPS.get((backend, device_for(backend).type), FP32_ULPS)


def assert_fp32_level(out, ref64, mag, *, backend=None, ulps=None, name: str = "out", out_dtype=None,
                      roundings: int = 1):
    """Assert |out - ref64| <= ulps * u32 * mag + roundings * u(out dtype) * |ref64| + tiny, elementwise.

    ``ulps`` defaults to the backend's factor (:func:`ulps_for`), FP32_ULPS without a backend.

    ``roundings``: how many times the result is legitimately rounded to the output dtype (1; a caller passing more
    says why next to the call).

    ``ref64`` and ``mag`` come from the oracle (float64). Infinities must match exactly; NaN always fails. On failure
    the message gives the max and mean absolute difference, the worst ratio to the bound, and where it is.
    """
    out_dtype = out_dtype or out.dtype
    ulps = ulps if ulps is not None else (ulps_for(backend) if backend else FP32_ULPS)
    o = out.detach().double().cpu()
    r = torch.as_tensor(ref64).double().cpu()
    m = torch.as_tensor(mag).double().cpu()
    assert o.shape == r.shape, f"{name}: shape {tuple(o.shape)} != oracle {tuple(r.shape)}"
    assert not torch.isnan(o).any(), f"{name}: NaN at {torch.isnan(o).nonzero()[:5].tolist()}"
    inf_bad = (torch.isinf(o) | torch.isinf(r)) & ~(torch.isinf(o) & torch.isinf(r) & (torch.sign(o) == torch.sign(r)))
    assert not inf_bad.any(), (f"{name}: infinities differ at {inf_bad.nonzero()[:5].tolist()} "
                               f"(got {o[inf_bad][:5].tolist()}, oracle {r[inf_bad][:5].tolist()})")
    fin = torch.isfinite(r)
    if not fin.any():
        return
    diff = (o - r).abs()[fin]
    # k roundings compound to a relative error of at most (1 + u)^k - 1 (slightly more than k * u); below the
    # normal range each may add half a subnormal step, which later scaling (by at most 2 here) can grow.
    u_out = output_roundoff(out_dtype, backend)
    bound = (ulps * UNIT_ROUNDOFF[torch.float32] * m[fin] + ((1 + u_out) ** roundings - 1) * r[fin].abs()
             + 2 * roundings * TINY[out_dtype])
    ratio = diff / bound.clamp(min=1e-300)
    bad = diff > bound
    if bad.any():
        k = int(ratio.argmax())
        where = fin.nonzero()[k].tolist()
        raise AssertionError(
            f"{name}: max |diff| {diff.max().item():.3e}, mean {diff.mean().item():.3e}; {int(bad.sum())} of "
            f"{diff.numel()} beyond the fp32-level bound ({ulps:g} ulps x magnitude + {roundings} rounding(s) to "
            f"{out_dtype}); "
            f"worst at {where}: got {o[fin][k].item():.9g}, oracle {r[fin][k].item():.9g}, bound "
            f"{bound[k].item():.3e} (ratio {ratio[k].item():.3g})")


def max_ratio(out, ref64, mag, ulps: float = 1.0, out_dtype=None, backend=None) -> float:
    """The worst |out - ref64| / bound (for measuring the error model; 0 when all entries are infinite)."""
    out_dtype = out_dtype or out.dtype
    o, r, m = out.detach().double().cpu(), torch.as_tensor(ref64).double().cpu(), torch.as_tensor(mag).double().cpu()
    fin = torch.isfinite(r)
    if not fin.any():
        return 0.0
    bound = (ulps * UNIT_ROUNDOFF[torch.float32] * m[fin] + output_roundoff(out_dtype, backend) * r[fin].abs()
             + TINY[out_dtype])
    return ((o - r).abs()[fin] / bound.clamp(min=1e-300)).max().item()


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _has_cpu_ext() -> bool:
    from reatt_kernels import available_backends

    return available_backends()["cpu"] == "ok"


def _has_cuda_emu() -> bool:
    from reatt_kernels import available_backends

    return available_backends()["cuda_emu"] == "ok"


def _has_cuda_backend() -> bool:
    from reatt_kernels import available_backends

    return available_backends()["cuda"] == "ok"


# On CI (CI=true) a missing C++ extension or Triton interpreter must fail the suite, never turn into skips: the
# markers then let the tests run (and fail on the missing backend). A skip is reserved for a missing GPU.
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
needs_triton = pytest.mark.skipif(not IN_CI and not _has_triton(),
                                  reason="triton not importable / no GPU and no TRITON_INTERPRET")
needs_cpu_ext = pytest.mark.skipif(not IN_CI and not _has_cpu_ext(), reason="reatt_kernels._C not built")
# _C_emu comes from the same CMake run as _C, so tests/kernels/test_cuda_emu.py fails (not skips) when _C exists without it.
needs_cuda_emu = pytest.mark.skipif(not IN_CI and not _has_cuda_emu(), reason="reatt_kernels._C_emu not built")
needs_cuda = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BACKENDS = [
    "torch",
    pytest.param("cpu", marks=needs_cpu_ext),
    # On a GPU machine the Triton cases run real kernels, so they carry the gpu mark and `pytest -m gpu` (the device
    # script) runs the whole matrix for them; on CPU they run unmarked under the interpreter.
    pytest.param("triton", marks=[needs_triton] + ([pytest.mark.gpu] if torch.cuda.is_available() else [])),
    pytest.param("cuda", marks=needs_cuda),
]
# The CUDA kernels on CPU tensors under emulation (reatt_kernels._C_emu): the cuda column's test on every commit. A
# test file adds it to its backend matrix (`BACKENDS = [*BACKENDS, CUDA_EMU]`) once its op is wired to cuda_emu;
# when every op with a CUDA kernel is, it moves into BACKENDS above.
CUDA_EMU = pytest.param("cuda_emu", marks=needs_cuda_emu)


def device_for(backend: str) -> torch.device:
    """Tensors for a backend: CUDA for cuda (and triton when a GPU exists), else CPU."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def err(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Elementwise |x - ref| in float64, treating equal infinities as 0 error."""
    x, ref = x.double().cpu(), ref.double().cpu()
    same_inf = torch.isinf(x) & torch.isinf(ref) & (torch.sign(x) == torch.sign(ref))
    diff = (x - ref).abs()
    return torch.where(same_inf, torch.zeros_like(diff), diff)


def assert_close_to_ref(out, ref64, base=None, dtype=torch.float32, factor=2.0, name="out"):
    """Assert err(out) <= factor * err(base) + ATOL[dtype] elementwise-max, against a float64 reference.

    ``base`` is PyTorch's own result in the same dtype (its error sets the scale). Infinities must match exactly.
    """
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    o, r = out.double().cpu(), ref64.double().cpu()
    assert not torch.isnan(o).any(), f"{name}: NaN in output"
    inf_mismatch = (torch.isinf(o) | torch.isinf(r)) & ~(torch.isinf(o) & torch.isinf(r) & (torch.sign(o) == torch.sign(r)))
    assert not inf_mismatch.any(), f"{name}: infinities differ at {inf_mismatch.nonzero()[:5].tolist()}"
    e = err(o, r)
    scale = r.abs().clamp(min=1.0)
    e_rel = e / scale
    bound = ATOL[dtype]
    if base is not None:
        bound = factor * (err(base, r) / scale).max().item() + ATOL[dtype]
    mx = e_rel.max().item() if e_rel.numel() else 0.0
    mean = e_rel.mean().item() if e_rel.numel() else 0.0
    assert mx <= bound, f"{name}: max rel err {mx:.3e} (mean {mean:.3e}) > bound {bound:.3e}"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (or the most negative value for ints) so an unwritten output is caught."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(torch.iinfo(t.dtype).min)


def discrete(shape, dtype=torch.float32, device="cpu", scale=8):
    """Random values k/scale with |k| <= scale, k != 0: exact in fp16/bf16, so dot products are exact in fp32 and
    every backend agrees on the argmax (ties broken to the lowest index)."""
    k = torch.randint(1, scale + 1, shape) * (torch.randint(0, 2, shape) * 2 - 1)
    return (k.double() / scale).to(dtype=dtype, device=device)


def noncontig(t: torch.Tensor) -> torch.Tensor:
    """Same values, non-contiguous storage (a strided view of a wider buffer)."""
    buf = torch.empty(t.shape[:-1] + (t.shape[-1] * 2,), dtype=t.dtype, device=t.device)
    buf[..., ::2] = t
    return buf[..., ::2]


def random_mask(shape, p_true=0.75, device="cpu"):
    return torch.rand(shape, device=device) < p_true


def spawn_with_timeout(fn, args, nprocs: int, timeout_s: float = 300.0) -> None:
    """torch.multiprocessing.spawn that can never stall the suite: a worker error is re-raised (as spawn does), and
    workers still running after ``timeout_s`` are killed and the test fails."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"spawned workers did not finish within {timeout_s:.0f} s")
