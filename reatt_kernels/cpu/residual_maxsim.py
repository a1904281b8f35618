"""The `cpu` backend of residual_maxsim: launcher for csrc/residual_maxsim/residual_maxsim_cpu.cpp (OpenMP, fp32).

The kernel reads each token's centroid part from the centroid score table ``q . centroids^T`` (fp32 [Bq, C, LP],
:func:`reatt_kernels.ops.centroid_interaction.centroid_score_table`) and decodes only the residual: per token it reads
D * nbits / 8 bytes and no centroid row. The index passes the table it already built for candidate generation;
without it the launcher computes it here (2 Bq Lq C D FLOPs, one matmul)."""
from __future__ import annotations

import torch

from .. import _ext
from . import isa
from .._alloc import empty
from .._launcher import ResidualMaxsimLauncher
from ..ops.centroid_interaction import centroid_score_table


def _residual_maxsim_not_supported_reasons(tensors, **facts):
    if not _ext.has("residual_maxsim_fwd_cpu"):
        return ["reatt_kernels._C has no residual_maxsim_fwd_cpu (rebuild: scripts/build_ext.sh)"]
    return []


def _residual_maxsim_fwd(q, q_mask, centroids, weights, codes, packed, d_offsets, cand, nbits, centroid_scores=None):
    Bq, Lq, D = q.shape
    table = centroid_scores if centroid_scores is not None else centroid_score_table(q, centroids, q_mask)
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
        n_groups=counts.numel(), table=P(table), LP=table.shape[2], nthreads=torch.get_num_threads(),
        isa=isa.for_kernel("residual_maxsim")))
    return out


class CpuResidualMaxsim(ResidualMaxsimLauncher):
    """The `cpu` backend of residual_maxsim: csrc/residual_maxsim/residual_maxsim_cpu.cpp."""

    def not_supported_reasons(self, tensors, **facts):
        return _residual_maxsim_not_supported_reasons(tensors, **facts)

    def forward(self, q, q_mask, centroids, weights, codes, packed, d_offsets, cand, nbits, centroid_scores=None):
        return _residual_maxsim_fwd(q, q_mask, centroids, weights, codes, packed, d_offsets, cand, nbits,
                                    centroid_scores)


RESIDUAL_MAXSIM = CpuResidualMaxsim()
