"""MaxSim on the CPU: launchers for the C++ kernels in csrc/maxsim/maxsim_cpu.cpp (OpenMP, AVX-512 / AVX2 / scalar
picked at run time, AVX512_BF16 dot products for bf16 inputs where the CPU has them).

Launcher contract: reatt_kernels/ops/maxsim.py. Semantics: reatt_kernels/reference/maxsim.py.

- ``_maxsim_fwd``: q [Bq, Lq, D] and d (padded [Nd, Ld, D] + optional d_mask, packed [T, D] + d_offsets, or grouped
  = padded with ``group_size``) in fp32/fp16/bf16 with any strides -> scores fp32 [Bq, C], argmax int32 [Bq, C, Lq].
- ``_maxsim_bwd``: dq [Bq, Lq, D] and dd (d.shape) in the input dtype, contiguous, and dbias fp32 [R]. The C++
  backward is deterministic for every thread count, so ``deterministic`` changes nothing here.

Threads: ``torch.get_num_threads()``. ``REATT_CPU_ISA`` (auto | avx512_bf16 | avx512 | avx2 | scalar) forces a kernel
no better than the CPU supports (reatt_kernels/cpu/isa.py; the tests use it to run every path on one machine). ``REATT_CPU_MAXSIM_SEG`` sets the
document segment length of the forward scan and of the backward's dd staging (default 1024 tokens; the tests use tiny
values to cover long documents cheaply).
"""
from __future__ import annotations

import os

import torch

from .. import _ext
from . import isa
from .._alloc import empty
from .._launcher import MaxsimLauncher


def _seg() -> int:
    return int(os.environ.get("REATT_CPU_MAXSIM_SEG", "0") or 0)


def _maxsim_not_supported_reasons(tensors, **facts) -> list[str]:
    if not _ext.has("maxsim_fwd_cpu"):
        return ["reatt_kernels._C has no maxsim_fwd_cpu (built without csrc/maxsim/maxsim_cpu.cpp?)"]
    return []


def _args(ext, q, d, q_mask, d_offsets, group_size, mean):
    """The MaxsimArgs (csrc/maxsim/maxsim_args.h) both directions share. q and d keep any strides; q_mask comes
    contiguous (the C++ kernels index it row-major and check the strides say so)."""
    Bq, Lq, D = q.shape
    if d_offsets is not None:  # packed [T, D]
        layout = dict(Nd=d_offsets.shape[0] - 1, T=d.shape[0], sd_l=d.stride(0), sd_d=d.stride(1),
                      d_offsets=_ext.ptr(d_offsets))
    else:  # padded [Nd, Ld, D]
        layout = dict(Nd=d.shape[0], Ld=d.shape[1], sd_b=d.stride(0), sd_l=d.stride(1), sd_d=d.stride(2))
    return _ext.fill(
        ext.MaxsimArgs(), dtype=_ext.dtype_code(q), q=_ext.ptr(q), Bq=Bq, Lq=Lq, D=D, sq_b=q.stride(0),
        sq_l=q.stride(1), sq_d=q.stride(2), q_mask=_ext.ptr(q_mask), sqm_b=Lq, sqm_l=1, d=_ext.ptr(d),
        group_size=group_size, mean=bool(mean), n_threads=torch.get_num_threads(), isa=isa.for_kernel("maxsim"), seg=_seg(), **layout)


def _maxsim_fwd(q, d, q_mask, d_mask, d_offsets, pos_bias, group_size, mean, screen=None):
    ext = _ext.ext()
    Bq, Lq, D = q.shape
    C = group_size if group_size else (d_offsets.shape[0] - 1 if d_offsets is not None else d.shape[0])
    scores = empty((Bq, C), torch.float32, q.device)
    argmax = empty((Bq, C, Lq), torch.int32, q.device)
    q_mask = q_mask.contiguous()
    d_mask = d_mask.contiguous() if d_mask is not None else None
    d_offsets = d_offsets.contiguous() if d_offsets is not None else None
    pb = pos_bias.to(torch.float32).contiguous() if pos_bias is not None else None
    args = _args(ext, q, d, q_mask, d_offsets, group_size, mean)
    _ext.fill(args, pos_bias=_ext.ptr(pb), R=pb.shape[0] if pb is not None else 0, scores=_ext.ptr(scores),
              argmax=_ext.ptr(argmax))
    if d_mask is not None:
        _ext.fill(args, d_mask=_ext.ptr(d_mask), sdm_b=d_mask.shape[1], sdm_l=1)
    if screen is not None:  # a prepared corpus: the fp32 filter reads its screen rows instead of converting d
        d_screen, d_norm = screen
        _ext.fill(args, d_screen=_ext.ptr(d_screen), screen_ld=d_screen.stride(0), d_norm=_ext.ptr(d_norm))
    ext.maxsim_fwd_cpu(args)
    return scores, argmax


def _maxsim_prepare(d_tokens, d_offsets):
    """(d_screen bf16 [T, Dq], d_norm fp32 [Nd]) of a packed corpus, Dq = dim rounded up to 32: the fp32 filter's
    per-document preparation, done once (csrc/maxsim/maxsim_cpu.cpp: maxsim_prepare_cpu)."""
    ext = _ext.ext()
    T, D = d_tokens.shape
    Dq = (D + 31) // 32 * 32
    d_screen = torch.empty((T, Dq), dtype=torch.bfloat16)
    d_norm = torch.empty((d_offsets.shape[0] - 1,), dtype=torch.float32)
    args = _ext.fill(ext.MaxsimArgs(), dtype=_ext.dtype_code(d_tokens), D=D, d=_ext.ptr(d_tokens),
                     Nd=d_offsets.shape[0] - 1, T=T, sd_l=d_tokens.stride(0), sd_d=d_tokens.stride(1),
                     d_offsets=_ext.ptr(d_offsets), d_screen=_ext.ptr(d_screen), screen_ld=Dq,
                     d_norm=_ext.ptr(d_norm), n_threads=torch.get_num_threads())
    ext.maxsim_prepare_cpu(args)
    return d_screen, d_norm


def screen_useful(dtype) -> bool:
    """Whether this CPU's maxsim kernel reads a prepared screen for ``dtype``: the fp32 filter (fp32 and fp16 inputs)
    runs on the avx512_bf16 path only (REATT_CPU_ISA_CAP counts)."""
    return (_ext.has("maxsim_prepare_cpu") and dtype in (torch.float32, torch.float16)
            and isa.runnable("avx512_bf16"))


def _maxsim_bwd(grad, q, d, q_mask, d_offsets, argmax, n_bias, group_size, mean, deterministic):
    ext = _ext.ext()
    grad = grad.to(torch.float32).contiguous()
    argmax = argmax.contiguous()
    q_mask = q_mask.contiguous()
    d_offsets = d_offsets.contiguous() if d_offsets is not None else None
    dq = empty(q.shape, q.dtype, q.device)
    dd = empty(d.shape, d.dtype, d.device)
    dbias = empty((n_bias,), torch.float32, q.device)
    args = _args(ext, q, d, q_mask, d_offsets, group_size, mean)
    _ext.fill(args, grad=_ext.ptr(grad), sg_b=grad.shape[1], sg_c=1, argmax=_ext.ptr(argmax), R=n_bias,
              dq=_ext.ptr(dq), dd=_ext.ptr(dd), dbias=_ext.ptr(dbias))
    ext.maxsim_bwd_cpu(args)
    return dq, dd, dbias


class CpuMaxsim(MaxsimLauncher):
    """The `cpu` backend of maxsim: csrc/maxsim/maxsim_cpu.cpp through _C.maxsim_fwd_cpu / maxsim_bwd_cpu."""

    def not_supported_reasons(self, tensors, **facts):
        return _maxsim_not_supported_reasons(tensors, **facts)

    def forward(self, q, d, q_mask, d_mask, d_offsets, pos_bias, group_size, mean, screen=None):
        return _maxsim_fwd(q, d, q_mask, d_mask, d_offsets, pos_bias, group_size, mean, screen)

    def backward(self, grad, q, d, q_mask, d_offsets, argmax, n_bias, group_size, mean, deterministic):
        return _maxsim_bwd(grad, q, d, q_mask, d_offsets, argmax, n_bias, group_size, mean, deterministic)


MAXSIM = CpuMaxsim()
