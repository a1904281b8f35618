r"""A residual index's search in one call (PLAID's pipeline): the reference, and THE spec for every backend.

Inputs (per batch of ``Bq`` queries; ``table`` and the packed queries come from the op's front end,
:func:`reatt_kernels.ops.plaid_search.plaid_search`):

- ``table`` fp32 ``[Bq, C, LP]``: ``table[a, c, i] = q[a, i] . centroids[c]`` over each query's valid tokens, packed
  first (column ``i < n_valid[a]``); other columns are ignored.
- ``q`` fp32 ``[Bq, LP, D]``: the valid tokens first (rows ``>= n_valid[a]`` ignored); ``n_valid`` int ``[Bq]``.
- ``weights`` fp32 ``[D, 2^nbits]``, ``codes`` int ``[T]`` (int32 or uint16), ``packed`` uint8 ``[T, D nbits / 8]``,
  ``d_offsets`` int64 ``[Nd + 1]``: the compressed documents (:mod:`reatt_kernels.reference.residual_maxsim` for
  the bit layout).
- ``live`` bool ``[Nd]`` or None, ``allow`` bool ``[Bq, Nd]`` or None: a document is *eligible* for query ``a`` when
  it is live and allowed.
- ``cand`` int64 ``[Bq, Nc]`` or None: the candidate documents of each query (an inverted-list probe; -1 padding);
  None = every document.

Semantics, for each query ``a`` (``n = n_valid[a]``):

1. ``approx(a, b) = sum_{i < n} max_{t in b} table[a, codes[t], i]`` for every eligible candidate ``b`` (centroid
   interaction). ``n = 0``: every eligible candidate scores 0. An empty document (no token) with ``n > 0`` scores
   ``-inf``.
2. Candidates with ``approx > -inf`` are ordered by (approx descending, document row ascending); the first ``ncand``
   distinct documents are kept.
3. Each kept document is scored exactly from its compressed tokens:
   ``score(a, b) = sum_{i < n} max_{t in b} (table[a, codes[t], i] + sum_d q[a, i, d] weights[d, bucket(t, d)])``,
   which is MaxSim against the decompressed tokens ``centroid + residual`` (the table holds the centroid part).
4. The kept documents are ordered by (score descending, row ascending); the first ``k`` are returned as
   ``scores`` fp32 ``[Bq, k]`` and document rows ``docs`` int64 ``[Bq, k]`` (rows of ``d_offsets``, not user ids).
   Fewer than ``k`` kept documents: the tail is ``(-inf, -1)``.

A NaN in a valid table column or query row leaves the scores it reaches unspecified (NaN ranks as -inf in
selection); the kernels never read past an array. Out-of-range codes, candidate ids and offsets are errors.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._launcher import PlaidSearchLauncher
from .residual_maxsim import unpack_buckets


def _order(score: Tensor, doc: Tensor) -> Tensor:
    """Positions sorted by (score descending, doc ascending); NaN as -inf."""
    s = torch.nan_to_num(score.double(), nan=float("-inf"))
    o = torch.argsort(doc, stable=True)
    return o[torch.argsort(-s[o], stable=True)]


def plaid_search_ref(table: Tensor, q: Tensor, n_valid: Tensor, weights: Tensor, codes: Tensor, packed: Tensor,
                     d_offsets: Tensor, nbits: int, k: int, ncand: int, live: Optional[Tensor] = None,
                     allow: Optional[Tensor] = None, cand: Optional[Tensor] = None,
                     dtype=torch.float64) -> tuple[Tensor, Tensor]:
    """-> (scores [Bq, k] in ``dtype``, docs int64 [Bq, k]); see the module docstring."""
    Bq, C, LP = table.shape
    D = q.shape[2]
    Nd = d_offsets.shape[0] - 1
    dev = table.device
    lens = d_offsets[1:] - d_offsets[:-1]
    doc_of_tok = torch.repeat_interleave(torch.arange(Nd, device=dev), lens, output_size=codes.shape[0])
    codes_l = codes.long()
    buckets = unpack_buckets(packed, nbits, D).long()  # [T, D]
    resid = weights.to(dtype)[torch.arange(D, device=dev)[None, :], buckets]  # [T, D]: r_t
    out_s = torch.full((Bq, k), float("-inf"), dtype=dtype, device=dev)
    out_d = torch.full((Bq, k), -1, dtype=torch.int64, device=dev)
    for a in range(Bq):
        n = int(n_valid[a])
        docs = torch.arange(Nd, device=dev) if cand is None else cand[a]
        docs = docs[docs >= 0]
        ok = torch.ones(docs.shape, dtype=torch.bool, device=dev)
        if live is not None:
            ok &= live[docs]
        if allow is not None:
            ok &= allow[a, docs]
        docs = docs[ok]
        tab = table[a, :, :n].to(dtype)  # [C, n]
        # (1) centroid interaction, every token of every document, then the per-document max
        per_tok = tab[codes_l]  # [T, n]
        best = torch.full((Nd, n), float("-inf"), dtype=dtype, device=dev)
        best.scatter_reduce_(0, doc_of_tok[:, None].expand_as(per_tok), per_tok, reduce="amax", include_self=True)
        approx = best.sum(1) if n > 0 else torch.zeros(Nd, dtype=dtype, device=dev)
        a_docs = approx[docs]
        keep = a_docs > float("-inf")
        docs, a_docs = docs[keep], a_docs[keep]
        # (2) the ncand best distinct documents
        order = _order(a_docs, docs)
        chosen, seen = [], set()
        for j in order.tolist():
            d = int(docs[j])
            if d not in seen:
                seen.add(d)
                chosen.append(d)
            if len(chosen) == ncand:
                break
        if not chosen:
            continue
        chosen_t = torch.tensor(chosen, dtype=torch.int64, device=dev)
        # (3) exact scores from the compressed tokens
        pair = tab[codes_l] + resid @ q[a, :n].to(dtype).T  # [T, n]
        bestp = torch.full((Nd, n), float("-inf"), dtype=dtype, device=dev)
        bestp.scatter_reduce_(0, doc_of_tok[:, None].expand_as(pair), pair, reduce="amax", include_self=True)
        score = (bestp.sum(1) if n > 0 else torch.zeros(Nd, dtype=dtype, device=dev))[chosen_t]
        # (4) top-k of the kept documents (an empty document can only be kept when n = 0, where it scores 0)
        live_s = score > float("-inf")
        chosen_t, score = chosen_t[live_s], score[live_s]
        o = _order(score, chosen_t)[:k]
        out_s[a, :o.numel()] = score[o]
        out_d[a, :o.numel()] = chosen_t[o]
    return out_s, out_d


# ---- the `torch` backend: the reference in fp32, behind the launcher contract of the kernels ---------------------------
class TorchPlaidSearch(PlaidSearchLauncher):
    """The `torch` backend of plaid_search: the spec (dense per-token gathers; for tests and small indexes)."""

    def forward(self, table, q, n_valid, weights, codes, packed, d_offsets, nbits, k, ncand, live, allow, cand,
                stage_s=None):
        return plaid_search_ref(table, q, n_valid, weights, codes, packed, d_offsets, nbits, k, ncand, live, allow,
                                cand, torch.float32)


PLAID_SEARCH = TorchPlaidSearch()
