"""Custom op ``reatt::plaid_search`` (forward only): a residual index's whole search for a batch of queries.

Every backend registered below is a :class:`reatt_kernels._launcher.PlaidSearchLauncher`. The public function
:func:`plaid_search` packs each query's valid tokens first, builds the centroid score table written directly as
``[Bq, C, LP]`` (one matmul ``centroids @ q^T`` per query, no transposing copy), checks shapes and dtypes (O(1): the
codes and offsets are checked inside the kernel's own loops, never by a separate pass over the corpus), and calls the
op. Semantics: :mod:`reatt_kernels.reference.plaid_search`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._dispatch import get_impl, register_auto_order, register_impl, select
from .._utils import device_guard
from ..cpu import plaid_search as cpu_plaid_search
from ..reference import plaid_search as reference_plaid_search
from ..reference.residual_maxsim import check_nbits

OP = "plaid_search"
register_impl(OP, "torch", reference_plaid_search.PLAID_SEARCH)
register_impl(OP, "cpu", cpu_plaid_search.PLAID_SEARCH)
# GPU indexes keep the staged pipeline of ops (TokenIndex); the torch reference runs anywhere, densely.
register_auto_order(OP, lambda dev, **kw: ["cpu", "torch"] if dev == "cpu" else ["torch"])


@torch.library.custom_op("reatt::plaid_search", mutates_args=("stage_s",))
def plaid_search_op(table: Tensor, q: Tensor, n_valid: Tensor, weights: Tensor, codes: Tensor, packed: Tensor,
                    d_offsets: Tensor, nbits: int, k: int, ncand: int, live: Optional[Tensor], allow: Optional[Tensor],
                    cand: Optional[Tensor], stage_s: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
    """(scores fp32 [Bq, k], document rows int64 [Bq, k])."""
    with device_guard(table):
        return get_impl(OP, backend).forward(table, q, n_valid, weights, codes, packed, d_offsets, nbits, k, ncand,
                                             live, allow, cand, stage_s)


@plaid_search_op.register_fake
def _plaid_search_fake(table, q, n_valid, weights, codes, packed, d_offsets, nbits, k, ncand, live, allow, cand,
                       stage_s, backend):
    Bq = table.shape[0]
    return table.new_empty((Bq, k)), table.new_empty((Bq, k), dtype=torch.int64)


def pack_query_tokens(q: Tensor, q_mask: Optional[Tensor]) -> tuple[Tensor, Tensor, int]:
    """Each query's valid tokens first, zero rows after: (q fp32 [Bq, LP, D], n_valid int32 [Bq], LP), LP = the
    largest valid count rounded up to 16 (one 512-bit register of table columns per 16 tokens)."""
    Bq, Lq, D = q.shape
    if q_mask is None:
        q_mask = torch.ones((Bq, Lq), dtype=torch.bool, device=q.device)
    n_valid = q_mask.sum(1, dtype=torch.int32)
    n_max = int(n_valid.max()) if Bq else 0
    LP = max(16, -(-n_max // 16) * 16)
    order = torch.argsort((~q_mask).to(torch.int8), dim=1, stable=True)  # valid tokens first, in their order
    packed = torch.gather(q.float(), 1, order[..., None].expand(Bq, Lq, D))
    keep = torch.arange(Lq, device=q.device)[None, :] < n_valid[:, None]
    packed = packed.masked_fill(~keep[..., None], 0.0)  # padding never reaches the table, NaN included
    out = packed.new_zeros((Bq, LP, D))
    w = min(Lq, LP)
    out[:, :w] = packed[:, :w]
    return out, n_valid, LP


def plaid_score_table(qp: Tensor, centroids: Tensor) -> Tensor:
    """``table[a, c, i] = qp[a, i] . centroids[c]``, fp32 [Bq, C, LP], written directly in that layout (each centroid's
    scores one contiguous row) by ``centroids @ qp^T``: 2 Bq LP C D FLOPs, no transposing copy."""
    return torch.matmul(centroids.float(), qp.transpose(1, 2))


def plaid_search(q: Tensor, centroids: Tensor, weights: Tensor, codes: Tensor, packed: Tensor, d_offsets: Tensor,
                 nbits: int, *, k: int, ncandidates: int, q_mask: Optional[Tensor] = None,
                 live: Optional[Tensor] = None, allow: Optional[Tensor] = None, cand: Optional[Tensor] = None,
                 stage_seconds: Optional[Tensor] = None, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """A residual index's search in one call: centroid interaction over every eligible candidate, the
    ``ncandidates`` best, their decompressed MaxSim, the ``k`` best.

    Args:
        q: [Bq, Lq, D] float; q_mask bool [Bq, Lq] or None (all valid). At most 64 valid tokens per query on the
            ``cpu`` backend.
        centroids fp32 [C, D]; weights fp32 [D, 2^nbits]; codes int32 or uint16 [T]; packed uint8 [T, D*nbits/8];
        d_offsets int64 [Nd + 1]: the compressed documents (reatt_kernels.index.ResidualCodec).
        k, ncandidates: results per query (>= 1), documents reranked per query (>= 1).
        live: bool [Nd] or None (deleted documents False). allow: bool [Bq, Nd] or [Nd] or None (a per-query
            allow-list: only these documents can be returned). cand: int64 [Bq, Nc] or None: candidate documents
            (-1 padding), None = every document.
        stage_seconds: None, or an fp64 [3] tensor the ``cpu`` kernel fills with the seconds of its stages
            (interaction, selection, rerank + top-k).
    Returns:
        scores fp32 [Bq, k] descending, document rows int64 [Bq, k] (rows of ``d_offsets``; ties: the lower row
        first); ``(-inf, -1)`` past the documents that qualify.
    """
    for name, t in (("q", q), ("centroids", centroids), ("weights", weights), ("codes", codes), ("packed", packed),
                    ("d_offsets", d_offsets)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if q.dim() != 3 or not q.is_floating_point():
        raise ValueError(f"q must be a float [Bq, Lq, D] tensor, got {q.dtype} {tuple(q.shape)}")
    Bq, Lq, D = q.shape
    check_nbits(nbits, D)
    if centroids.dim() != 2 or centroids.shape[1] != D:
        raise ValueError(f"centroids must be [C, {D}], got {tuple(centroids.shape)}")
    C = centroids.shape[0]
    if weights.shape != (D, 1 << nbits):
        raise ValueError(f"weights must be fp32 [{D}, {1 << nbits}], got {tuple(weights.shape)}")
    if codes.dim() != 1 or codes.dtype not in (torch.int32, torch.uint16):
        raise TypeError(f"codes must be int32 or uint16 [T], got {codes.dtype} {tuple(codes.shape)}")
    if codes.dtype == torch.uint16 and C > 65536:
        raise ValueError(f"uint16 codes address at most 65536 centroids, got C = {C}")
    T = codes.shape[0]
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (T, D * nbits // 8):
        raise ValueError(f"packed must be uint8 [{T}, {D * nbits // 8}], got {packed.dtype} {tuple(packed.shape)}")
    if d_offsets.dtype != torch.int64 or d_offsets.dim() != 1 or d_offsets.shape[0] < 1:
        raise ValueError(f"d_offsets must be int64 [Nd + 1], got {d_offsets.dtype} {tuple(d_offsets.shape)}")
    Nd = d_offsets.shape[0] - 1
    for name, v in (("k", k), ("ncandidates", ncandidates)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if q_mask is not None and (q_mask.dtype != torch.bool or tuple(q_mask.shape) != (Bq, Lq)):
        raise ValueError(f"q_mask must be bool [{Bq}, {Lq}], got {q_mask.dtype} {tuple(q_mask.shape)}")
    if live is not None and (live.dtype != torch.bool or tuple(live.shape) != (Nd,)):
        raise ValueError(f"live must be bool [{Nd}], got {live.dtype} {tuple(live.shape)}")
    if allow is not None:
        if allow.dtype != torch.bool or allow.dim() not in (1, 2) or allow.shape[-1] != Nd:
            raise ValueError(f"allow must be bool [{Bq}, {Nd}] or [{Nd}], got {allow.dtype} {tuple(allow.shape)}")
        allow = allow.expand(Bq, Nd) if allow.dim() == 1 else allow
        if allow.shape[0] != Bq:
            raise ValueError(f"allow must be bool [{Bq}, {Nd}] or [{Nd}], got {tuple(allow.shape)}")
    if cand is not None and (cand.dtype != torch.int64 or cand.dim() != 2 or cand.shape[0] != Bq):
        raise ValueError(f"cand must be int64 [{Bq}, Nc] or None, got {cand.dtype} {tuple(cand.shape)}")
    qp, n_valid, LP = pack_query_tokens(q, q_mask)
    return plaid_search_prepared(plaid_score_table(qp, centroids), qp, n_valid, weights, codes, packed, d_offsets,
                                 nbits, k=k, ncandidates=ncandidates, live=live, allow=allow, cand=cand,
                                 stage_seconds=stage_seconds, backend=backend)


def plaid_search_prepared(table: Tensor, qp: Tensor, n_valid: Tensor, weights: Tensor, codes: Tensor, packed: Tensor,
                          d_offsets: Tensor, nbits: int, *, k: int, ncandidates: int, live: Optional[Tensor] = None,
                          allow: Optional[Tensor] = None, cand: Optional[Tensor] = None,
                          stage_seconds: Optional[Tensor] = None, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """:func:`plaid_search` from queries already packed (:func:`pack_query_tokens`) and their table
    (:func:`plaid_score_table`), with arguments already checked: what an index calls, having validated its arrays
    once at build and load (the kernel still bounds-checks every code, candidate and offset it reads)."""
    args = [table, qp, n_valid, weights.float().contiguous(), codes.contiguous(), packed.contiguous(),
            d_offsets.contiguous(), nbits, k, ncandidates, None if live is None else live.contiguous(),
            None if allow is None else allow.contiguous(), None if cand is None else cand.contiguous(), stage_seconds]
    name = select(OP, [table, qp, codes, packed], backend, lp=table.shape[2])
    return torch.ops.reatt.plaid_search(*args, name)
