"""MaxSim on CUDA: launchers for the kernels in csrc/maxsim/maxsim_cuda.cu (mma.sync tensor cores for fp16/bf16,
FFMA for fp32; the design, tiling and byte/FLOP counts are in that file's header and benchmarks/NOTES-cuda-maxsim.md).

Launcher contract: reatt_kernels/ops/maxsim.py. Semantics: reatt_kernels/reference/maxsim.py.

- ``_maxsim_fwd``: q [Bq, Lq, D] and d (padded [Nd, Ld, D] + optional d_mask, packed [T, D] + int64 d_offsets, or
  grouped = padded with ``group_size``) in fp32/fp16/bf16, D <= 256, any strides (a non-unit stride on the last dim
  costs a copy; rows that are not 16-byte aligned take a slower element-copy path) -> scores fp32 [Bq, C], argmax
  int32 [Bq, C, Lq]. 64-bit offsets throughout: d may hold more than 2^31 elements.
- ``_maxsim_bwd``: dq [Bq, Lq, D] and dd (d.shape) in the input dtype, contiguous, and dbias fp32 [R]. dq and dbias
  are always reproducible (fixed summation order); dd uses fp32 atomics unless ``deterministic``, which switches to a
  per-document kernel that sums the contributions in a fixed order (bitwise reproducible). Without ``deterministic``
  the ordered kernel is still used up to ATOMIC_MIN_ENTRIES (query, token) entries per document.
"""
from __future__ import annotations

import torch

from .. import _ext
from .._alloc import empty
from .._utils import device_guard

MAX_DIM = 256
# dd without ``deterministic``: fp32 atomics need a zeroed fp32 copy of d (4 bytes per element: +328 MB on the
# 64 x 6400 training shape, which alone would use most of its +0.5 GiB budget) plus a cast pass; the ordered kernel
# writes dd directly and walks every (query, token) entry of a document once per 64 KB token tile. Up to this many
# entries per document (all-pairs training: 64 x 32 = 2048; grouped: Lq) the ordered kernel is predicted to cost about
# what the atomics do (~1 ms each on that shape, H100, unmeasured), so atomics are used only above it.
ATOMIC_MIN_ENTRIES = 4096


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
    with device_guard(q):
        ext.maxsim_fwd_cuda(
            _ext.ptr(q), _ext.ptr(d), _ext.ptr(q_mask), _ext.ptr(d_mask), _ext.ptr(d_offsets), _ext.ptr(pb),
            _ext.ptr(scores), _ext.ptr(argmax), _ext.dtype_code(q), list(q.shape), _strides(q), list(d.shape),
            _strides(d), list(q_mask.stride()), list(d_mask.stride()) if d_mask is not None else [],
            n_docs, pb.shape[0] if pb is not None else 0, group_size, bool(mean), _ext.stream(q),
        )
    return scores, argmax


def _split_plan(rows: int, C: int) -> int:
    """Column splits of the dq gather. The gather is latency-bound (one winning row per column), so aim for ~8k warps
    (62 per SM on an H100) when there are few query rows; one split (no workspace, no second pass) when rows alone
    fill the GPU."""
    return max(1, min(-(-C // 128), 8192 // max(1, rows), 65535))


def _maxsim_bwd(grad, q, d, q_mask, d_offsets, argmax, n_bias, group_size, mean, deterministic, ext=_ext.ext):
    ext = ext()
    q, d = _last_contig(q), _last_contig(d)
    Bq, Lq, D = q.shape
    C = argmax.shape[1]
    dev = q.device
    grad = grad.to(torch.float32)
    argmax = argmax.contiguous()
    d_offsets = d_offsets.contiguous() if d_offsets is not None else None
    nq = q_mask.sum(1, dtype=torch.int32).contiguous()
    ntok = d.numel() // D if D else 0
    dq = empty((Bq, Lq, D), q.dtype, dev)
    n_split = _split_plan(Bq * Lq, C)
    dq_ws = torch.empty((n_split, Bq * Lq, D), dtype=torch.float32, device=dev) if n_split > 1 else None
    entries_per_doc = Lq if group_size else Bq * Lq
    if deterministic or entries_per_doc <= ATOMIC_MIN_ENTRIES:
        deterministic = True
        dd, dd32 = empty(d.shape, d.dtype, dev), None  # every token row is written by the kernel
    else:
        dd32 = torch.zeros((ntok, D), dtype=torch.float32, device=dev)  # atomics accumulate into zeros
        dd = None
    dbias = empty((n_bias,), torch.float32, dev)
    E = Bq * C * Lq
    n_part = max(1, min(-(-E // 2048), 2048)) if n_bias else 0
    dbias_ws = torch.zeros((n_part, n_bias), dtype=torch.float32, device=dev) if n_bias else None
    with device_guard(q):
        ext.maxsim_bwd_cuda(
            _ext.ptr(grad), list(grad.stride()), _ext.ptr(q), _ext.ptr(d), _ext.ptr(d_offsets), _ext.ptr(argmax),
            _ext.ptr(nq), _ext.ptr(dq), _ext.ptr(dq_ws), _ext.ptr(dd), _ext.ptr(dd32), _ext.ptr(dbias),
            _ext.ptr(dbias_ws), _ext.dtype_code(q), list(q.shape), _strides(q), list(d.shape), _strides(d), C,
            n_bias, group_size, bool(mean), bool(deterministic), n_split, n_part, _ext.stream(q),
        )
    if dd is None:
        dd = dd32.to(d.dtype)
    return dq, dd.reshape(d.shape), dbias
