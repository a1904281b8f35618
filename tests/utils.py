"""Shared test helpers: tolerances (one place), float64 comparison, poisoning, discrete random inputs."""
from __future__ import annotations

import os

import pytest
import torch

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


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


needs_triton = pytest.mark.skipif(not _has_triton(), reason="triton not importable / no GPU and no TRITON_INTERPRET")
needs_cpu_ext = pytest.mark.skipif(not _has_cpu_ext(), reason="reatt_kernels._C not built")
# _C_emu comes from the same CMake run as _C, so tests/test_cuda_emu.py fails (not skips) when _C exists without it.
needs_cuda_emu = pytest.mark.skipif(not _has_cuda_emu(), reason="reatt_kernels._C_emu not built")
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
