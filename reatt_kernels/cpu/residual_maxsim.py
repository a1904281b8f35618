"""The `cpu` backend of residual_maxsim: launcher for csrc/residual_maxsim/residual_maxsim_cpu.cpp (OpenMP, fp32)."""
from __future__ import annotations

import torch

from .. import _ext
from .._alloc import empty


def _residual_maxsim_not_supported_reasons(tensors, **facts):
    if not _ext.has("residual_maxsim_fwd_cpu"):
        return ["reatt_kernels._C has no residual_maxsim_fwd_cpu (rebuild: scripts/build_ext.sh)"]
    return []


def _residual_maxsim_fwd(q, q_mask, centroids, weights, codes, packed, d_offsets, cand, nbits):
    Bq, Lq, D = q.shape
    out = empty(cand.shape, torch.float32, q.device)
    # Group the (query, candidate) pairs by document so the kernel decodes each document once per call.
    flat = cand.reshape(-1)
    order = torch.argsort(flat, stable=True)
    _, counts = torch.unique_consecutive(flat[order], return_counts=True)
    group_off = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    group_off[1:] = torch.cumsum(counts, 0)
    P = _ext.ptr
    _ext.ext().residual_maxsim_fwd_cpu(P(q), P(q_mask), P(centroids), P(weights), P(codes), P(packed), P(d_offsets),
                                       P(cand), P(order), P(group_off), counts.numel(), P(out), Bq, Lq, D, centroids.shape[0], d_offsets.shape[0] - 1,
                                       cand.shape[1], nbits)
    return out
