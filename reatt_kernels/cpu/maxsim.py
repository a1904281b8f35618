"""MaxSim on the CPU: launchers for the C++ kernels in csrc/maxsim/maxsim_cpu.cpp (OpenMP, AVX-512 / AVX2 / scalar
picked at run time, AVX512_BF16 dot products for bf16 inputs where the CPU has them).

Launcher contract: reatt_kernels/ops/maxsim.py. Semantics: reatt_kernels/reference/maxsim.py.

- ``_maxsim_fwd``: q [Bq, Lq, D] and d (padded [Nd, Ld, D] + optional d_mask, packed [T, D] + d_offsets, or grouped
  = padded with ``group_size``) in fp32/fp16/bf16 with any strides -> scores fp32 [Bq, C], argmax int32 [Bq, C, Lq].
- ``_maxsim_bwd``: dq [Bq, Lq, D] and dd (d.shape) in the input dtype, contiguous, and dbias fp32 [R]. The C++
  backward is deterministic for every thread count, so ``deterministic`` changes nothing here.

Threads: ``torch.get_num_threads()``. ``REATT_CPU_ISA`` (auto | avx512_bf16 | avx512 | avx2 | scalar) forces a kernel
no better than the CPU supports (the tests use it to run every path on one machine). ``REATT_CPU_MAXSIM_SEG`` sets the
document segment length of the forward scan and of the backward's dd staging (default 1024 tokens; the tests use tiny
values to cover long documents cheaply).
"""
from __future__ import annotations

import os

import torch

from .. import _ext
from .._alloc import empty


def _isa() -> str:
    return os.environ.get("REATT_CPU_ISA", "auto") or "auto"


def _seg() -> int:
    return int(os.environ.get("REATT_CPU_MAXSIM_SEG", "0") or 0)


def _maxsim_not_supported_reasons(tensors, **facts) -> list[str]:
    if not _ext.has("maxsim_fwd_cpu"):
        return ["reatt_kernels._C has no maxsim_fwd_cpu (built without csrc/maxsim/maxsim_cpu.cpp?)"]
    return []


def _d_args(d: torch.Tensor, d_offsets):
    """(Nd, Ld, sd_b, sd_l, sd_d) of the document tensor: padded [Nd, Ld, D] or packed [T, D]."""
    if d_offsets is not None:
        return d_offsets.shape[0] - 1, 0, 0, d.stride(0), d.stride(1)
    return d.shape[0], d.shape[1], d.stride(0), d.stride(1), d.stride(2)


def _maxsim_fwd(q, d, q_mask, d_mask, d_offsets, pos_bias, group_size, mean):
    ext = _ext.ext()
    Bq, Lq, D = q.shape
    Nd, Ld, sd_b, sd_l, sd_d = _d_args(d, d_offsets)
    C = group_size if group_size else Nd
    scores = empty((Bq, C), torch.float32, q.device)
    argmax = empty((Bq, C, Lq), torch.int32, q.device)
    q_mask = q_mask.contiguous()
    d_mask = d_mask.contiguous() if d_mask is not None else None
    d_offsets = d_offsets.contiguous() if d_offsets is not None else None
    pb = pos_bias.to(torch.float32).contiguous() if pos_bias is not None else None
    ext.maxsim_fwd_cpu(
        _ext.ptr(q), _ext.dtype_code(q), Bq, Lq, D, *q.stride(), _ext.ptr(q_mask),
        _ext.ptr(d), Nd, Ld, sd_b, sd_l, sd_d, _ext.ptr(d_mask), _ext.ptr(d_offsets),
        _ext.ptr(pb), pb.shape[0] if pb is not None else 0, group_size, bool(mean),
        _ext.ptr(scores), _ext.ptr(argmax), torch.get_num_threads(), _isa(), _seg(),
    )
    return scores, argmax


def _maxsim_bwd(grad, q, d, q_mask, d_offsets, argmax, n_bias, group_size, mean, deterministic):
    ext = _ext.ext()
    Bq, Lq, D = q.shape
    Nd, Ld, sd_b, sd_l, sd_d = _d_args(d, d_offsets)
    grad = grad.to(torch.float32).contiguous()
    argmax = argmax.contiguous()
    q_mask = q_mask.contiguous()
    d_offsets = d_offsets.contiguous() if d_offsets is not None else None
    dq = empty(q.shape, q.dtype, q.device)
    dd = empty(d.shape, d.dtype, d.device)
    dbias = empty((n_bias,), torch.float32, q.device)
    ext.maxsim_bwd_cpu(
        _ext.ptr(grad), _ext.ptr(q), _ext.dtype_code(q), Bq, Lq, D, *q.stride(), _ext.ptr(q_mask),
        _ext.ptr(d), Nd, Ld, sd_b, sd_l, sd_d, _ext.ptr(d_offsets), _ext.ptr(argmax), n_bias, group_size, bool(mean),
        _ext.ptr(dq), _ext.ptr(dd), _ext.ptr(dbias), torch.get_num_threads(), _isa(), _seg(),
    )
    return dq, dd, dbias
