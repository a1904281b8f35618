"""MaxSim on CUDA: launchers for the kernels in csrc/maxsim/maxsim_{fwd,bwd}.cu (mma.sync tensor cores for fp16/bf16,
FFMA for fp32; the design, tiling and byte/FLOP counts are in csrc/maxsim/maxsim_cuda.cuh and
benchmarks/NOTES-cuda-maxsim.md).

Launcher contract: reatt_kernels/ops/maxsim.py. Semantics: reatt_kernels/reference/maxsim.py.

- ``_maxsim_fwd``: q [Bq, Lq, D] and d (padded [Nd, Ld, D] + optional d_mask, packed [T, D] + int64 d_offsets, or
  grouped = padded with ``group_size``) in fp32/fp16/bf16, D <= 256, any strides (a non-unit stride on the last dim
  costs a copy; rows that are not 16-byte aligned take a slower element-copy path) -> scores fp32 [Bq, C], argmax
  int32 [Bq, C, Lq]. 64-bit offsets throughout: d may hold more than 2^31 elements.
- ``_maxsim_bwd``: dq [Bq, Lq, D] and dd (d.shape) in the input dtype, contiguous, and dbias fp32 [R]. dq and dbias
  are always reproducible (fixed summation order); dd uses fp32 atomics unless ``deterministic``, which switches to a
  per-document kernel that sums the contributions in a fixed order (bitwise reproducible). Without ``deterministic``
  the ordered kernel is still used up to ATOMIC_MIN_ENTRIES (query, token) entries per document (the launch plan, in
  csrc/maxsim/maxsim_launch.cu; ``maxsim_plan_cuda`` returns it).
"""
from __future__ import annotations

import torch

from .. import _ext
from .._alloc import empty
from .._launcher import MaxsimLauncher
from .._utils import device_guard

MAX_DIM = 256  # csrc/maxsim/maxsim_cuda.cuh::MAX_DIM (the binding checks it too)


# Every launcher takes ``ext``: the loader of the compiled module that holds the kernels. _ext.ext (reatt_kernels._C,
# GPU pointers and the current stream) by default; reatt_kernels/cuda_emu/ passes _ext.emu (the same kernels under CPU
# emulation: CPU pointers, stream 0), so both backends share this launcher code.
def _maxsim_not_supported_reasons(tensors, dim=None, ext=_ext.ext, **facts) -> list[str]:
    reasons = []
    if not _ext.has("maxsim_fwd_cuda", ext):
        reasons.append("reatt_kernels._C has no maxsim_fwd_cuda (built without CUDA: REATT_CUDA=0 or no nvcc)"
                       if ext is _ext.ext else "reatt_kernels._C_emu has no maxsim_fwd_cuda")
    if dim is not None and dim > MAX_DIM:
        reasons.append(f"dim {dim} > {MAX_DIM} (the cuda kernels keep a padded dim of at most {MAX_DIM} in smem)")
    return reasons


def _last_contig(t: torch.Tensor) -> torch.Tensor:
    """The kernels read rows with unit stride on the last dim; any other strides are passed through."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _strides(t: torch.Tensor) -> list[int]:
    s = list(t.stride())
    if t.shape[-1] == 1:
        s[-1] = 1  # a size-1 dim may report any stride
    return s


def _args(ext, q, d, q_mask, d_offsets, group_size, mean):
    """The MaxsimArgs (csrc/maxsim/maxsim_args.h) both directions share: q, d, q_mask and the layout."""
    Bq, Lq, D = q.shape
    sq, sd = _strides(q), _strides(d)
    if d_offsets is not None:  # packed [T, D]
        layout = dict(Nd=d_offsets.shape[0] - 1, T=d.shape[0], sd_l=sd[0], sd_d=sd[1], d_offsets=_ext.ptr(d_offsets))
    else:  # padded [Nd, Ld, D]
        layout = dict(Nd=d.shape[0], Ld=d.shape[1], sd_b=sd[0], sd_l=sd[1], sd_d=sd[2])
    return _ext.fill(
        ext.MaxsimArgs(), dtype=_ext.dtype_code(q), q=_ext.ptr(q), Bq=Bq, Lq=Lq, D=D, sq_b=sq[0], sq_l=sq[1],
        sq_d=sq[2], q_mask=_ext.ptr(q_mask), sqm_b=q_mask.stride(0), sqm_l=q_mask.stride(1), d=_ext.ptr(d),
        group_size=group_size, mean=bool(mean), stream=_ext.stream(q), **layout)


def _maxsim_fwd(q, d, q_mask, d_mask, d_offsets, pos_bias, group_size, mean, ext=_ext.ext):
    ext = ext()
    q, d = _last_contig(q), _last_contig(d)
    Bq, Lq, D = q.shape
    n_docs = d_offsets.shape[0] - 1 if d_offsets is not None else d.shape[0]
    C = group_size if group_size else n_docs
    scores = empty((Bq, C), torch.float32, q.device)
    argmax = empty((Bq, C, Lq), torch.int32, q.device)
    d_offsets = d_offsets.contiguous() if d_offsets is not None else None
    pb = pos_bias.to(torch.float32).contiguous() if pos_bias is not None else None
    args = _args(ext, q, d, q_mask, d_offsets, group_size, mean)
    _ext.fill(args, pos_bias=_ext.ptr(pb), R=pb.shape[0] if pb is not None else 0, scores=_ext.ptr(scores),
              argmax=_ext.ptr(argmax))
    if d_mask is not None:
        _ext.fill(args, d_mask=_ext.ptr(d_mask), sdm_b=d_mask.stride(0), sdm_l=d_mask.stride(1))
    with device_guard(q):
        ext.maxsim_fwd_cuda(args)
    return scores, argmax


def _maxsim_bwd(grad, q, d, q_mask, d_offsets, argmax, n_bias, group_size, mean, deterministic, ext=_ext.ext,
                atomic_min_entries=-1):
    ext = ext()
    q, d = _last_contig(q), _last_contig(d)
    Bq, Lq, D = q.shape
    dev = q.device
    grad = grad.to(torch.float32)
    argmax = argmax.contiguous()
    d_offsets = d_offsets.contiguous() if d_offsets is not None else None
    nq = q_mask.sum(1, dtype=torch.int32).contiguous()
    ntok = d.numel() // D if D else 0
    args = _args(ext, q, d, q_mask, d_offsets, group_size, mean)
    _ext.fill(args, grad=_ext.ptr(grad), sg_b=grad.stride(0), sg_c=grad.stride(1), argmax=_ext.ptr(argmax),
              nq=_ext.ptr(nq), R=n_bias, deterministic=bool(deterministic),
              atomic_min_entries=atomic_min_entries)
    with device_guard(q):
        # The plan (C++, the one the binding follows) says which workspaces to allocate.
        plan = ext.maxsim_plan_cuda(args, backward=True)
        n_split, n_part = plan["n_split"], plan["n_part"]
        dq = empty((Bq, Lq, D), q.dtype, dev)
        dq_ws = torch.empty((n_split, Bq * Lq, D), dtype=torch.float32, device=dev) if n_split > 1 else None
        if plan["ordered_dd"]:
            dd, dd32 = empty(d.shape, d.dtype, dev), None  # every token row is written by the kernel
        else:
            dd, dd32 = None, torch.zeros((ntok, D), dtype=torch.float32, device=dev)  # atomics accumulate into zeros
        dbias = empty((n_bias,), torch.float32, dev)
        dbias_ws = torch.zeros((n_part, n_bias), dtype=torch.float32, device=dev) if n_bias else None
        _ext.fill(args, dq=_ext.ptr(dq), dq_ws=_ext.ptr(dq_ws), dd=_ext.ptr(dd), dd32=_ext.ptr(dd32),
                  dbias=_ext.ptr(dbias), dbias_ws=_ext.ptr(dbias_ws))
        ext.maxsim_bwd_cuda(args)
    if dd is None:
        dd = dd32.to(d.dtype)
    return dq, dd.reshape(d.shape), dbias


class CudaMaxsim(MaxsimLauncher):
    """The `cuda` backend of maxsim: csrc/maxsim/maxsim_{fwd,bwd}.cu through ``ext().maxsim_fwd_cuda`` /
    ``maxsim_bwd_cuda``. ``ext`` loads the compiled module: _ext.ext (reatt_kernels._C: GPU pointers, the current
    stream), or _ext.emu for the `cuda_emu` backend (the same kernels under CPU emulation: CPU pointers, stream 0)."""

    def __init__(self, ext=_ext.ext):
        self.ext = ext
        # dd without ``deterministic`` uses fp32 atomics only above a number of (query, token) entries per document
        # that the C++ plan owns (csrc/maxsim/maxsim_cuda.cuh::ATOMIC_MIN_ENTRIES). -1 keeps it; the tests set 0 to
        # run the atomic kernel on small shapes.
        self.atomic_min_entries = -1

    def not_supported_reasons(self, tensors, **facts):
        return _maxsim_not_supported_reasons(tensors, ext=self.ext, **facts)

    def forward(self, q, d, q_mask, d_mask, d_offsets, pos_bias, group_size, mean, screen=None):
        return _maxsim_fwd(q, d, q_mask, d_mask, d_offsets, pos_bias, group_size, mean, ext=self.ext)

    def backward(self, grad, q, d, q_mask, d_offsets, argmax, n_bias, group_size, mean, deterministic):
        return _maxsim_bwd(grad, q, d, q_mask, d_offsets, argmax, n_bias, group_size, mean, deterministic,
                           ext=self.ext, atomic_min_entries=self.atomic_min_entries)


MAXSIM = CudaMaxsim(_ext.ext)
