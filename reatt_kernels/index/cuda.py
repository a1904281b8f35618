"""The `cuda` backend of residual_maxsim: launcher for csrc/index/residual_cuda.cu."""
from __future__ import annotations

import torch

from .. import _ext
from .._alloc import empty


def _residual_maxsim_not_supported_reasons(tensors, **facts):
    if not _ext.has("residual_maxsim_fwd_cuda"):
        return ["reatt_kernels._C has no residual_maxsim_fwd_cuda (build with REATT_CUDA=1)"]
    q = tensors[0]
    if q is not None and q.shape[1] * q.shape[2] * 4 > 160 * 1024:
        return [f"query of {q.shape[1]} x {q.shape[2]} fp32 does not fit in shared memory"]
    return []


def _residual_maxsim_fwd(q, q_mask, centroids, weights, codes, packed, d_offsets, cand, nbits):
    Bq, Lq, D = q.shape
    out = empty(cand.shape, torch.float32, q.device)
    P = _ext.ptr
    _ext.ext().residual_maxsim_fwd_cuda(P(q), P(q_mask), P(centroids), P(weights), P(codes), P(packed), P(d_offsets),
                                        P(cand), P(out), Bq, Lq, D, d_offsets.shape[0] - 1, cand.shape[1], nbits,
                                        _ext.stream(q))
    return out
