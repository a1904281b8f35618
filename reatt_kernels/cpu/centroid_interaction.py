"""The `cpu` backend of centroid_interaction: launcher for csrc/residual_maxsim/residual_maxsim_cpu.cpp (OpenMP)."""
from __future__ import annotations

import torch

from .. import _ext
from . import isa
from .._alloc import empty
from .._launcher import CentroidInteractionLauncher

LP_SUPPORTED = (16, 32, 48, 64)


def _centroid_interaction_not_supported_reasons(tensors, **facts):
    reasons = []
    if not _ext.has("centroid_interaction_fwd_cpu"):
        reasons.append("reatt_kernels._C has no centroid_interaction_fwd_cpu (rebuild: scripts/build_ext.sh)")
    if facts.get("lp") not in LP_SUPPORTED:
        reasons.append(f"the kernel keeps the running max in registers for tables of {LP_SUPPORTED} columns, "
                       f"got {facts.get('lp')}")
    return reasons


def _centroid_interaction_fwd(table, q_mask, codes, d_offsets, cand):
    Bq, C, LP = table.shape
    Nd = d_offsets.shape[0] - 1
    Nc = Nd if cand is None else cand.shape[1]
    out = empty((Bq, Nc), torch.float32, table.device)
    P = _ext.ptr
    _ext.ext().centroid_interaction_fwd_cpu(P(table), P(q_mask), P(codes), P(d_offsets), 0 if cand is None else P(cand),
                                            P(out), Bq, q_mask.shape[1], C, LP, Nd, Nc, torch.get_num_threads(),
                                            isa.for_kernel("centroid_interaction"))
    return out


class CpuCentroidInteraction(CentroidInteractionLauncher):
    """The `cpu` backend of centroid_interaction: csrc/residual_maxsim/residual_maxsim_cpu.cpp."""

    def not_supported_reasons(self, tensors, **facts):
        return _centroid_interaction_not_supported_reasons(tensors, **facts)

    def forward(self, table, q_mask, codes, d_offsets, cand):
        return _centroid_interaction_fwd(table, q_mask, codes, d_offsets, cand)


CENTROID_INTERACTION = CpuCentroidInteraction()
