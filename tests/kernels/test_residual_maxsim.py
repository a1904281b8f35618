"""residual_maxsim (fused decompress + MaxSim): every backend (the CUDA kernel under emulation included) against the
float64 oracle (tests/oracle.py), the spec's edge cases (empty documents, padding candidates, all-masked queries),
opcheck and torch.compile, argument validation, and the CUDA kernel's shared-memory plan against each device's
opt-in limit (under emulation, where the limit is ours to set)."""
from __future__ import annotations

import pytest
import torch

import reatt_kernels as rk
from reatt_kernels import residual_maxsim

from ..oracle import maxsim_oracle, residual_maxsim_oracle
from ..utils import (BACKENDS, CUDA_EMU, _has_cpu_ext, _has_cuda_emu, assert_fp32_level, device_for, needs_cuda_emu,
                    noncontig)

BACKENDS = [*BACKENDS, CUDA_EMU]  # every backend, the CUDA kernel under emulation too

NBITS = [1, 2, 4, 8]


# ---- the op against the oracle --------------------------------------------------------------------------------------------------
def make_codes(nbits, D=24, C=7, lens=(3, 0, 20, 70, 1, 5, 33), Bq=3, Lq=5, Nc=6, device="cpu"):
    """Random codes for odd-sized documents (one empty), candidates with -1 padding and a repeated document, and
    one all-masked query row."""
    Nd = len(lens)
    off = torch.zeros(Nd + 1, dtype=torch.int64)
    off[1:] = torch.tensor(lens).cumsum(0)
    T = int(off[-1])
    cent = torch.randn(C, D)
    w = torch.randn(D, 1 << nbits) * 0.3
    codes = torch.randint(0, C, (T,), dtype=torch.int32)
    packed = torch.randint(0, 256, (T, D * nbits // 8), dtype=torch.uint8)
    q = torch.randn(Bq, Lq, D)
    qm = torch.rand(Bq, Lq) < 0.7
    qm[0, 0] = True
    qm[-1] = False
    cand = torch.randint(-1, Nd, (Bq, Nc))
    cand[0, :3] = torch.tensor([1, 3, 3])  # the empty document, and one document twice
    to = lambda t: t.to(device)  # noqa: E731
    return [to(t) for t in (q, qm, cent, w, codes, packed, off, cand)]


@pytest.mark.parametrize("nbits", NBITS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_maxsim_matches_reference(backend, nbits):
    D = 24 if nbits != 1 else 32  # D * nbits must fill whole bytes
    q, qm, cent, w, codes, packed, off, cand = make_codes(nbits, D=D, device=device_for(backend))
    q = noncontig(q)
    ref, mag = residual_maxsim_oracle(q, qm, cent, w, codes, packed, off, cand, nbits)
    out = residual_maxsim(q, cent, w, codes, packed, off, cand, nbits, qm, backend=backend)
    assert out.dtype == torch.float32 and out.shape == cand.shape
    assert_fp32_level(out, ref, mag, backend=backend,
                      name=f"residual_maxsim[{backend}, nbits={nbits}]")
    # the spec's edge cases, exactly
    assert torch.isinf(out[0, 0]) and out[0, 0] < 0, "an empty document must score -inf"
    assert (out[-1][cand[-1] >= 0] == 0).all(), "a query with no valid token must score 0"
    assert torch.isinf(out[cand < 0]).all(), "padding candidates must score -inf"


def test_residual_maxsim_opcheck_and_compile():
    q, qm, cent, w, codes, packed, off, cand = make_codes(2)
    args = (q, qm, cent, w, codes, packed, off, cand, 2)
    for backend in ["torch"] + (["cpu"] if _has_cpu_ext() else []) + (["cuda_emu"] if _has_cuda_emu() else []):
        torch.library.opcheck(torch.ops.reatt.residual_maxsim.default, args + (backend,))
    fn = torch.compile(lambda *a: residual_maxsim(a[0], *a[2:8], 2, a[1], backend="torch"), fullgraph=True,
                       backend="aot_eager")
    out = fn(*args[:8])
    torch.testing.assert_close(out, residual_maxsim(q, cent, w, codes, packed, off, cand, 2, qm, backend="torch"))


def test_residual_maxsim_rejects_out_of_range_indices():
    """Offsets past the codes, candidate ids past the documents and codes past the centroids fail in Python, naming
    the argument, before any kernel could read out of bounds."""
    q, qm, cent, w, codes, packed, off, cand = make_codes(2)
    bad_off = off.clone()
    bad_off[-1] += 4
    with pytest.raises(ValueError, match="d_offsets must end"):
        residual_maxsim(q, cent, w, codes, packed, bad_off, cand, 2, qm, backend="torch")
    bad_cand = cand.clone()
    bad_cand[1, 2] = off.shape[0] - 1
    with pytest.raises(ValueError, match="cand must hold document ids"):
        residual_maxsim(q, cent, w, codes, packed, off, bad_cand, 2, qm, backend="torch")
    bad_codes = codes.clone()
    bad_codes[5] = cent.shape[0]
    with pytest.raises(ValueError, match="codes must hold centroid ids"):
        residual_maxsim(q, cent, w, codes=bad_codes, packed=packed, d_offsets=off, cand=cand, nbits=2, q_mask=qm,
                        backend="torch")


# ---- the cuda kernel's shared memory against the device's opt-in limit (cuda_emu: the limit is ours to set) ----------
SMEM_LIMITS_KB = {"H100": 227, "A100": 163, "sm_86/89": 99}


@pytest.fixture
def emu_limits():
    """Restores the emulated device limits after a test that changes them."""
    from reatt_kernels.cuda_emu import set_device_limits

    old = set_device_limits()
    yield set_device_limits
    set_device_limits(**old)


def _residual_smem_bytes(Lq, D):
    """The kernel's shared memory, written from its layout: query [Lq, D] + token tile [32, D + 1] + row maxima [Lq]."""
    return 4 * (Lq * D + 32 * (D + 1) + Lq)


@needs_cuda_emu
@pytest.mark.parametrize("gpu", list(SMEM_LIMITS_KB))
def test_residual_maxsim_cuda_emu_smem_limit(emu_limits, gpu):
    """The support check counts query tile + token tile + row maxima against cudaDevAttrMaxSharedMemoryPerBlockOptin:
    the largest query that fits runs (and matches the reference), one more query token is refused with the byte counts
    (also when the query tile alone would still fit), and the launcher itself refuses it with a clear error when
    called past the check, leaving no pending CUDA error behind."""
    import reatt_kernels._C_emu as E
    from reatt_kernels.cuda_emu.residual_maxsim import RESIDUAL_MAXSIM

    limit = SMEM_LIMITS_KB[gpu] * 1024
    emu_limits(smem_optin=limit)
    D, nbits = 64, 4
    lq_fit = (limit // 4 - 32 * (D + 1)) // (D + 1)
    assert _residual_smem_bytes(lq_fit, D) <= limit < _residual_smem_bytes(lq_fit + 1, D)
    assert E.residual_maxsim_smem_cuda(lq_fit + 1, D) == (_residual_smem_bytes(lq_fit + 1, D), limit)
    q, qm, cent, w, codes, packed, off, cand = make_codes(nbits, D=D, lens=(5, 0, 37), Bq=1, Lq=lq_fit + 1, Nc=3)
    cand[0] = torch.tensor([2, 1, 0])
    args = (cent, w, codes, packed, off, cand, nbits)
    out = residual_maxsim(q[:, :lq_fit], *args, qm[:, :lq_fit], backend="cuda_emu")
    ref, mag = residual_maxsim_oracle(q[:, :lq_fit], qm[:, :lq_fit], *args)
    assert_fp32_level(out, ref, mag, backend="cuda_emu", name=f"residual_maxsim cuda_emu at {gpu}'s limit")
    assert 4 * (lq_fit + 1) * D <= limit, "the query tile alone still fits: only the full count refuses it"
    with pytest.raises(rk.BackendUnavailableError, match=f"needs {_residual_smem_bytes(lq_fit + 1, D)} bytes"):
        residual_maxsim(q, *args, qm, backend="cuda_emu")
    with pytest.raises(ValueError, match=f"this device allows {limit}"):
        RESIDUAL_MAXSIM.forward(q.contiguous(), qm.contiguous(), *args)
    assert E.get_last_error() == 0, "a refused launch must leave no pending CUDA error"
    again = residual_maxsim(q[:, :lq_fit], *args, qm[:, :lq_fit], backend="cuda_emu")
    assert torch.equal(again, out), "the next valid launch must run cleanly"


@needs_cuda_emu
def test_refused_launch_leaves_no_pending_error_cuda_emu(emu_limits):
    """maxsim at dim 256 cannot fit any tiling in a 48 KB device: the launcher refuses it (its planner, or a failed
    cudaFuncSetAttribute: the macro clears that error before throwing), leaves no pending runtime error, and the next
    valid launch (any kernel) succeeds."""
    import reatt_kernels._C_emu as E
    from reatt_kernels.cuda_emu.maxsim import MAXSIM

    emu_limits(smem_optin=48 * 1024)
    q = torch.randn(2, 40, 256).bfloat16()
    d = torch.randn(3, 9, 256).bfloat16()
    qm = torch.ones(2, 40, dtype=torch.bool)
    with pytest.raises((RuntimeError, ValueError), match="shared memory|cudaFuncSetAttribute"):
        MAXSIM.forward(q, d, qm, None, None, None, 0, False)
    assert E.get_last_error() == 0, "the refused launch left a CUDA error pending"
    # the next valid launches run: a residual_maxsim (D = 16: under 48 KB) and a small maxsim
    c = make_codes(2, D=16, Bq=2, Lq=3, Nc=4)
    out = residual_maxsim(c[0], *c[2:], 2, c[1], backend="cuda_emu")
    ref, mag = residual_maxsim_oracle(c[0], c[1], *c[2:], 2)
    assert_fp32_level(out, ref, mag, backend="cuda_emu", name="residual_maxsim after the refused launch")
    qs, ds, qms = q[:, :5, :16].contiguous(), d[..., :16].contiguous(), qm[:, :5].contiguous()
    s = rk.maxsim(qs, ds, qms, backend="cuda_emu")
    o = maxsim_oracle("padded", qs, ds, qms)
    assert_fp32_level(s, o["score"], o["mag"], backend="cuda_emu", name="maxsim after the refused launch")
