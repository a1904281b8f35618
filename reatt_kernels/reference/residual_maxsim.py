r"""Fused decompress + MaxSim (``residual_maxsim``): the reference, and THE spec for every backend.

For query ``a`` and candidate column ``c`` with document ``b = cand[a, c]``::

    v_t[d]       = centroids[codes[t], d] + weights[d, bucket(packed[t], d)]      (decompressed token t)
    bucket(p, d) = (p[d * nbits // 8] >> ((d * nbits) % 8)) & (2^nbits - 1)
    score(a, c)  = sum_{i : q_mask[a, i]}  max_{t in d_offsets[b] : d_offsets[b + 1]}  q[a, i] . v_t

- ``cand[a, c] < 0`` marks padding: the score is ``-inf``.
- An empty document scores ``-inf`` (when the query has a valid token); a query with no valid token scores 0.
- Vectors are not renormalised after decompression (the index stores unit vectors; the residual keeps them close).
- NaN and infinities: masked query tokens never reach the score, whatever they hold (NaN and inf included). Infinities
  in valid query tokens, centroids or weights follow IEEE arithmetic of the dot products. A NaN that reaches a valid
  pair score makes that (query, candidate) score *unspecified*: this reference returns NaN, the kernels skip NaN pair
  scores in the max (NaN, -inf or finite). Every other score is unaffected and exact.
- Scores are fp32 (fp64 in the reference when asked).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._launcher import ResidualMaxsimLauncher

NBITS = (1, 2, 4, 8)
_CHUNK_ELEMS = 1 << 24  # query tokens x candidate tokens per chunk (64 MiB of fp32 scores)


def check_nbits(nbits: int, dim: int) -> None:
    if nbits not in NBITS:
        raise ValueError(f"nbits must be one of {NBITS}, got {nbits!r}")
    if (dim * nbits) % 8 != 0:
        raise ValueError(f"dim * nbits must be a multiple of 8 (whole bytes per token), got dim={dim}, nbits={nbits}")


def pack_buckets(buckets: Tensor, nbits: int) -> Tensor:
    """buckets uint8/int [T, D] in [0, 2^nbits) -> packed uint8 [T, D * nbits // 8]."""
    T, D = buckets.shape
    per = 8 // nbits
    b = buckets.to(torch.int32).reshape(T, D // per, per)
    shifts = (torch.arange(per, device=b.device, dtype=torch.int32) * nbits)
    return (b << shifts).sum(-1).to(torch.uint8)


def unpack_buckets(packed: Tensor, nbits: int, dim: int) -> Tensor:
    """packed uint8 [T, dim * nbits // 8] -> buckets int64 [T, dim]."""
    per = 8 // nbits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * nbits
    b = (packed.to(torch.int32)[:, :, None] >> shifts) & ((1 << nbits) - 1)
    return b.reshape(packed.shape[0], dim).long()


def residual_decode_ref(centroids, weights, codes, packed, nbits, dtype=torch.float64) -> Tensor:
    """Decompress rows: codes [T] + packed [T, P] -> [T, D] in ``dtype``."""
    D = centroids.shape[1]
    b = unpack_buckets(packed, nbits, D)
    dims = torch.arange(D, device=codes.device)
    return centroids.to(dtype)[codes.long()] + weights.to(dtype)[dims[None, :], b]


def residual_maxsim_ref(q, q_mask, centroids, weights, codes, packed, d_offsets, cand, nbits,
                        dtype=torch.float64) -> Tensor:
    """Reference: q [Bq, Lq, D], q_mask bool [Bq, Lq] or None, centroids [C, D], weights [D, 2^nbits], codes int32
    [T], packed uint8 [T, D * nbits // 8], d_offsets int64 [Nd + 1], cand int64 [Bq, Nc] -> scores [Bq, Nc] in
    ``dtype``. Decompresses only the candidates' tokens, chunk by chunk."""
    Bq, Lq, D = q.shape
    Nc = cand.shape[1]
    dev = q.device
    if q_mask is None:
        q_mask = torch.ones((Bq, Lq), dtype=torch.bool, device=dev)
    out = torch.full((Bq, Nc), float("-inf"), dtype=dtype, device=dev)
    lens_all = d_offsets[1:] - d_offsets[:-1]
    for a in range(Bq):
        qa = q[a].to(dtype)
        qm = q_mask[a]
        valid = cand[a] >= 0
        cols = torch.nonzero(valid).flatten()
        if not bool(qm.any()):
            out[a, cols] = 0.0
            continue
        docs = cand[a, cols]
        lens = lens_all[docs]
        step_tokens = max(1, _CHUNK_ELEMS // max(1, Lq))
        c0 = 0
        while c0 < cols.numel():
            # grow the chunk until it holds about step_tokens tokens
            cs = torch.cumsum(lens[c0:], 0)
            c1 = c0 + max(1, int((cs <= step_tokens).sum()))
            dl, dc = lens[c0:c1], docs[c0:c1]
            n_tok = int(dl.sum())
            seg = torch.repeat_interleave(torch.arange(c1 - c0, device=dev), dl)
            start = torch.repeat_interleave(d_offsets[dc], dl)
            within = torch.arange(n_tok, device=dev) - torch.repeat_interleave(torch.cumsum(dl, 0) - dl, dl)
            rows = start + within
            v = residual_decode_ref(centroids, weights, codes[rows], packed[rows], nbits, dtype)
            s = qa @ v.T  # [Lq, n_tok]
            best = torch.full((Lq, c1 - c0), float("-inf"), dtype=dtype, device=dev)
            best.scatter_reduce_(1, seg[None, :].expand(Lq, -1), s, reduce="amax", include_self=True)
            out[a, cols[c0:c1]] = best[qm].sum(0)
            c0 = c1
    return out


# ---- the `torch` backend: the reference in fp32, behind the launcher contract of the kernels ---------------------------
def _residual_maxsim_fwd(q, q_mask, centroids, weights, codes, packed, d_offsets, cand, nbits, centroid_scores=None):
    # the spec decompresses: centroid_scores (an optimisation of the cpu kernel) is not used
    return residual_maxsim_ref(q, q_mask, centroids, weights, codes, packed, d_offsets, cand, nbits, torch.float32)


class TorchResidualMaxsim(ResidualMaxsimLauncher):
    """The `torch` backend of residual_maxsim: the spec (decode, then MaxSim, chunked)."""

    def forward(self, q, q_mask, centroids, weights, codes, packed, d_offsets, cand, nbits, centroid_scores=None):
        # the spec decompresses: centroid_scores is not used
        return _residual_maxsim_fwd(q, q_mask, centroids, weights, codes, packed, d_offsets, cand, nbits)


RESIDUAL_MAXSIM = TorchResidualMaxsim()
