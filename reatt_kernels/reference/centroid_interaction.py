r"""Centroid interaction (PLAID's approximate MaxSim from centroid ids alone): the reference, and THE spec for every
backend.

For query ``a`` and candidate column ``c`` with document ``b = cand[a, c]``::

    ci(a, c) = sum_{i : q_mask[a, i]}  max_{t in d_offsets[b] : d_offsets[b + 1]}  table[a, codes[t], i]

where ``table[a, k, i] = q[a, i] . centroids[k]`` is the per-query centroid score table, fp32 ``[Bq, C, L]``
(``L >= Lq``; columns past ``q_mask``'s width are ignored). It is MaxSim with every document token replaced by its
centroid, so it reads 4 bytes per token (the code) instead of the residual, and it upper-bounds nothing: it is an
estimate that the index uses to pick which candidates to decompress.

- ``cand[a, c] < 0`` marks padding: ``-inf``. ``cand is None``: every document, ``Nc = Nd`` in order.
- An empty document scores ``-inf`` when the query has a valid token; a query with no valid token scores 0.
- Masked query tokens never reach the score, whatever their columns hold (NaN included). A NaN in a valid column
  that reaches a document makes that (query, candidate) score unspecified (as in residual_maxsim).
- fp32 scores (fp64 in the reference when asked).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._launcher import CentroidInteractionLauncher

_CHUNK_ROWS = 1 << 18  # document tokens gathered per step (x L table columns)


def centroid_interaction_ref(table: Tensor, q_mask: Tensor, codes: Tensor, d_offsets: Tensor,
                             cand: Optional[Tensor], dtype=torch.float64) -> Tensor:
    """table fp32 [Bq, C, L], q_mask bool [Bq, Lq] (Lq <= L), codes int32 [T], d_offsets int64 [Nd + 1], cand int64
    [Bq, Nc] or None -> scores [Bq, Nc] in ``dtype``."""
    Bq, C, L = table.shape
    Lq = q_mask.shape[1]
    Nd = d_offsets.shape[0] - 1
    dev = table.device
    if cand is None:
        cand = torch.arange(Nd, device=dev)[None].expand(Bq, Nd)
    Nc = cand.shape[1]
    out = torch.full((Bq, Nc), float("-inf"), dtype=dtype, device=dev)
    lens_all = d_offsets[1:] - d_offsets[:-1]
    for a in range(Bq):
        cols = torch.nonzero(cand[a] >= 0).flatten()
        qm = q_mask[a]
        if not bool(qm.any()):
            out[a, cols] = 0.0
            continue
        tab = table[a, :, :Lq][:, qm].to(dtype)  # [C, n_valid]: masked columns never read
        docs = cand[a, cols]
        lens = lens_all[docs]
        c0 = 0
        while c0 < cols.numel():
            cs = torch.cumsum(lens[c0:], 0)
            c1 = c0 + max(1, int((cs <= _CHUNK_ROWS).sum()))
            dl, dc = lens[c0:c1], docs[c0:c1]
            n_tok = int(dl.sum())
            seg = torch.repeat_interleave(torch.arange(c1 - c0, device=dev), dl, output_size=n_tok)
            start = torch.repeat_interleave(d_offsets[dc] - (torch.cumsum(dl, 0) - dl), dl, output_size=n_tok)
            rows = torch.arange(n_tok, device=dev) + start
            s = tab[codes[rows].long()]  # [n_tok, n_valid]
            best = torch.full((c1 - c0, s.shape[1]), float("-inf"), dtype=dtype, device=dev)
            best.scatter_reduce_(0, seg[:, None].expand_as(s), s, reduce="amax", include_self=True)
            out[a, cols[c0:c1]] = best.sum(1)  # an empty document keeps -inf rows: -inf
            c0 = c1
    return out


# ---- the `torch` backend: the reference in fp32, behind the launcher contract of the kernels ---------------------------
def _centroid_interaction_fwd(table, q_mask, codes, d_offsets, cand):
    return centroid_interaction_ref(table, q_mask, codes, d_offsets, cand, torch.float32)


class TorchCentroidInteraction(CentroidInteractionLauncher):
    """The `torch` backend of centroid_interaction: the spec (gathers and a segment max, chunked); runs on any device."""

    def forward(self, table, q_mask, codes, d_offsets, cand):
        return _centroid_interaction_fwd(table, q_mask, codes, d_offsets, cand)


CENTROID_INTERACTION = TorchCentroidInteraction()
