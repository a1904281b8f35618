"""Every CUDA kernel under emulation on small shapes built to make blocks and warps collide: several resident blocks
(REATT_EMU_RESIDENT, the default 3) write the same output rows at once. Checked against the float64 oracle here; run
again under ThreadSanitizer by scripts/ci/25-cuda-emu-races.sh, where a plain `+=` where an atomic belongs, or a
shared-memory read before its barrier, is a reported data race whatever the timing.

Kernels: maxsim forward (fp16 mma path, several documents per CTA), backward with the atomic dd and with the
deterministic dd, reader_teacher (per-lane and per-warp shared atomics, the block accumulator), distill_kl (dense and
sparse) and residual_maxsim. Each case takes well under a second without TSan.
"""
from __future__ import annotations

import pytest
import torch

import reatt_kernels as rk
from reatt_kernels import _ext

from ..oracle import residual_maxsim_oracle
from .test_distill import _kl_call, check_teacher, kl_case_oracle, make_kl_case, make_teacher_case
from .test_residual_maxsim import make_codes
from .test_maxsim import _leaf, make_case, run_api, run_ref
from ..utils import assert_close_to_ref, assert_fp32_level, discrete, needs_cuda_emu

pytestmark = needs_cuda_emu


@pytest.fixture
def one_sm():
    """An emulated device with 1 SM: the launchers plan few CTAs, so each streams several documents."""
    m = _ext.emu()
    before = m.set_device_limits()
    m.set_device_limits(sm_count=1)
    yield
    m.set_device_limits(sm_count=before["sm_count"])


@pytest.mark.parametrize("deterministic", [False, True], ids=["dd_atomic", "dd_det"])
def test_maxsim_fwd_bwd_blocks_collide(monkeypatch, deterministic, one_sm):
    """8 queries x 3 documents of 3 tokens: every (query, document) pair's warps add into the same 9 dd rows, from
    different blocks (atomic dd: 4 pairs per block) or one block per document (deterministic dd)."""
    from reatt_kernels._dispatch import get_impl

    monkeypatch.setattr(get_impl("maxsim", "cuda_emu"), "atomic_min_entries", 0)  # the atomic kernel whenever allowed
    case = _leaf(make_case("padded", (8, 5, 3, 3, 16), torch.float16, torch.device("cpu"), gen=lambda s: discrete(s)))
    out, am = run_api(case, "cuda_emu", "sum", return_argmax=True, deterministic=deterministic)
    ref_case = _leaf(case)
    ref, am_ref = run_ref(ref_case, "sum")
    assert torch.equal(am, am_ref), "argmax differs from the reference"
    assert_close_to_ref(out, ref, None, torch.float16, name="scores")
    g = torch.where(torch.isfinite(ref.detach()), torch.randn(out.shape), torch.zeros(out.shape))
    out.backward(g)
    ref.backward(g.double())
    for name in ("q", "d", "pos_bias"):
        assert_close_to_ref(case[name].grad, ref_case[name].grad, None, torch.float16, name=f"d{name}")


def test_maxsim_fwd_streams_documents(one_sm):
    """fp16, 1 query: 40 documents over 8 CTAs of 4 slots, so slots stream 2 documents each (the per-document reset
    of the running max and argmax)."""
    case = _leaf(make_case("packed", (1, 8, 40, 5, 16), torch.float16, torch.device("cpu"), gen=lambda s: discrete(s)))
    out, am = run_api(case, "cuda_emu", "sum", return_argmax=True)
    ref, am_ref = run_ref(_leaf(case), "sum")
    assert torch.equal(am, am_ref), "argmax differs from the reference"
    assert_close_to_ref(out, ref, None, torch.float16, name="scores")


def test_reader_teacher_blocks_collide():
    """Rows of one query split over 2 row chunks (blocks) and 8 warps, documents changing inside each 32-token run
    (per-lane shared atomics) and long runs (one warp-sum + one atomic)."""
    attn, doc, mask = make_teacher_case((2, 2, 4, 3, 70, 5), torch.float32, "cpu")
    doc[:, :40] = torch.arange(40) % 5  # a different document every token: lanes collide on the bins
    out = rk.reader_teacher(attn, doc, attn_mask=mask, n_docs=5, backend="cuda_emu")
    check_teacher(out, attn, doc, mask, 5, backend="cuda_emu")


@pytest.mark.parametrize("sparse", [False, True])
def test_distill_kl_blocks(sparse):
    case = make_kl_case((5, 300, 4), torch.float32, "cpu", sparse=sparse)
    s = case["student"].detach().clone().requires_grad_(True)
    loss = _kl_call(case, s, "cuda_emu")
    loss.backward()
    orc = kl_case_oracle(case)
    assert_fp32_level(loss, orc["loss"], orc["mag_loss"], backend="cuda_emu", name="loss")
    assert_fp32_level(s.grad, orc["grad"], orc["mag_grad"], backend="cuda_emu", name="dstudent", roundings=2)


def test_residual_maxsim_blocks():
    from reatt_kernels import residual_maxsim

    q, qm, cent, w, codes, packed, off, cand = make_codes(2, D=24)
    ref, mag = residual_maxsim_oracle(q, qm, cent, w, codes, packed, off, cand, 2)
    out = residual_maxsim(q, cent, w, codes, packed, off, cand, 2, qm, backend="cuda_emu")
    assert_fp32_level(out, ref, mag, backend="cuda_emu", name="residual_maxsim")
