"""The `cpu` backend of residual_maxsim: launcher for csrc/residual_maxsim/residual_maxsim_cpu.cpp (OpenMP, fp32)."""
from __future__ import annotations

import torch

from .. import _ext
from .._alloc import empty
from .._launcher import ResidualMaxsimLauncher


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
    ext = _ext.ext()
    ext.residual_maxsim_fwd_cpu(_ext.fill(
        ext.ResidualMaxsimArgs(), q=P(q), q_mask=P(q_mask), centroids=P(centroids), weights=P(weights), codes=P(codes),
        packed=P(packed), offsets=P(d_offsets), cand=P(cand), out=P(out), Bq=Bq, Lq=Lq, D=D, C=centroids.shape[0],
        Nd=d_offsets.shape[0] - 1, Nc=cand.shape[1], nbits=nbits, order=P(order), group_off=P(group_off),
        n_groups=counts.numel()))
    return out


class CpuResidualMaxsim(ResidualMaxsimLauncher):
    """The `cpu` backend of residual_maxsim: csrc/residual_maxsim/residual_maxsim_cpu.cpp."""

    def not_supported_reasons(self, tensors, **facts):
        return _residual_maxsim_not_supported_reasons(tensors, **facts)

    def forward(self, q, q_mask, centroids, weights, codes, packed, d_offsets, cand, nbits):
        return _residual_maxsim_fwd(q, q_mask, centroids, weights, codes, packed, d_offsets, cand, nbits)


RESIDUAL_MAXSIM = CpuResidualMaxsim()
