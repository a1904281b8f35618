"""Custom op ``reatt::centroid_interaction`` (forward only): PLAID's approximate MaxSim from centroid ids, and the
centroid score table it (and the cpu residual_maxsim kernel) reads.

Every backend registered below is a :class:`reatt_kernels._launcher.CentroidInteractionLauncher`::

    forward(table, q_mask, codes, d_offsets, cand) -> scores fp32 [Bq, Nc]
    not_supported_reasons(tensors, **facts) -> list[str]

with table fp32 contiguous [Bq, C, LP], q_mask bool [Bq, Lq] (Lq <= LP), codes int32 [T], d_offsets int64 [Nd + 1],
cand int64 [Bq, Nc] (-1 = padding) or None (every document), all on one device. Semantics:
:mod:`reatt_kernels.reference.centroid_interaction`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._dispatch import get_impl, register_auto_order, register_impl, select
from .._utils import device_guard
from ..cpu import centroid_interaction as cpu_centroid_interaction
from ..reference import centroid_interaction as reference_centroid_interaction
from .maxsim import check_offsets

OP = "centroid_interaction"
register_impl(OP, "torch", reference_centroid_interaction.CENTROID_INTERACTION)
register_impl(OP, "cpu", cpu_centroid_interaction.CENTROID_INTERACTION)
# On a GPU the torch reference runs (gathers and a segment max: memory-bound, a few table rows per token).
register_auto_order(OP, lambda dev, **kw: ["torch"] if dev == "cuda" else ["cpu", "torch"])


def centroid_score_table(q: Tensor, centroids: Tensor, q_mask: Optional[Tensor] = None) -> Tensor:
    """The per-query centroid score table ``table[a, c, i] = q[a, i] . centroids[c]``: fp32 [Bq, C, LP].

    q [Bq, Lq, D] float, centroids [C, D] float, q_mask bool [Bq, Lq] or None. LP is Lq rounded up to a multiple of
    16 (one 512-bit register per 16 query tokens); the padding columns and the columns of masked tokens are 0 (masked
    rows of q are zeroed before the matmul, so a NaN in padding never reaches the table). Cost: one matmul,
    2 Bq Lq C D FLOPs; [Bq, C, LP] fp32 is 1 MiB per query at C = 16384, Lq <= 16."""
    Bq, Lq, D = q.shape
    LP = max(16, -(-Lq // 16) * 16)
    qf = q.float()
    if q_mask is not None:
        qf = qf.masked_fill(~q_mask[..., None], 0.0)
    if LP != Lq:
        qf = torch.cat([qf, qf.new_zeros((Bq, LP - Lq, D))], 1)
    # [Bq, LP, D] @ [D, C] -> [Bq, LP, C], then one transposing copy so each centroid's scores are one contiguous row
    return torch.matmul(qf, centroids.float().T).transpose(1, 2).contiguous()


def check_score_table(table: Tensor, q: Tensor, n_centroids: int) -> None:
    if not isinstance(table, Tensor) or table.dtype != torch.float32 or table.dim() != 3:
        raise ValueError(f"centroid_scores must be an fp32 [Bq, C, LP] table (centroid_score_table), got "
                         f"{getattr(table, 'dtype', type(table).__name__)} {tuple(getattr(table, 'shape', ()))}")
    Bq, Lq = q.shape[:2]
    if table.shape[0] != Bq or table.shape[1] != n_centroids or table.shape[2] < Lq or table.device != q.device:
        raise ValueError(f"centroid_scores must be [{Bq}, {n_centroids}, >= {Lq}] on {q.device}, got "
                         f"{tuple(table.shape)} on {table.device}")


@torch.library.custom_op("reatt::centroid_interaction", mutates_args=())
def centroid_interaction_op(table: Tensor, q_mask: Tensor, codes: Tensor, d_offsets: Tensor, cand: Optional[Tensor],
                            backend: str) -> Tensor:
    """Scores fp32 [Bq, Nc]."""
    Bq = table.shape[0]
    Nc = d_offsets.shape[0] - 1 if cand is None else cand.shape[1]
    if Bq == 0 or Nc == 0:
        return torch.empty((Bq, Nc), dtype=torch.float32, device=table.device)
    with device_guard(table):
        return get_impl(OP, backend).forward(table, q_mask, codes, d_offsets, cand)


@centroid_interaction_op.register_fake
def _centroid_interaction_fake(table, q_mask, codes, d_offsets, cand, backend):
    Nc = d_offsets.shape[0] - 1 if cand is None else cand.shape[1]
    return table.new_empty((table.shape[0], Nc), dtype=torch.float32)


def centroid_interaction(table: Tensor, codes: Tensor, d_offsets: Tensor, cand: Optional[Tensor] = None,
                         q_mask: Optional[Tensor] = None, *, backend: str = "auto") -> Tensor:
    """PLAID's centroid interaction: MaxSim with each document token replaced by its centroid, from the codes alone.

        ci(a, c) = sum_{i : q_mask[a, i]} max_{t in document cand[a, c]} table[a, codes[t], i]

    Args:
        table: fp32 [Bq, C, LP], ``centroid_score_table(q, centroids, q_mask)``.
        codes: int32 (or uint16) [T] centroid id per token. d_offsets: int64 [Nd + 1].
        cand: int64 [Bq, Nc] document ids per query, -1 for padding; None scores every document (Nc = Nd).
        q_mask: bool [Bq, Lq] with Lq <= LP (None: the first LP tokens are all valid).
        backend: "auto", "torch" or "cpu".
    Returns:
        fp32 [Bq, Nc]; -inf for padding and empty documents, 0 for a query with no valid token.
    """
    for name, t in (("table", table), ("codes", codes), ("d_offsets", d_offsets)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != table.device:
            raise ValueError(f"{name} is on {t.device} but table is on {table.device}")
    if table.dim() != 3 or table.dtype != torch.float32:
        raise ValueError(f"table must be fp32 [Bq, C, LP] (centroid_score_table), got {table.dtype} "
                         f"{tuple(table.shape)}")
    Bq, C, LP = table.shape
    if codes.dim() != 1 or codes.dtype not in (torch.int32, torch.uint16):
        raise TypeError(f"codes must be int32 or uint16 [T], got {codes.dtype} {tuple(codes.shape)}")
    if codes.dtype == torch.uint16:  # a CPU index's compact codes: the kernels read int32
        codes = codes.to(torch.int32)
    if d_offsets.dtype != torch.int64 or d_offsets.dim() != 1 or d_offsets.shape[0] < 1:
        raise ValueError(f"d_offsets must be int64 [Nd + 1], got {d_offsets.dtype} {tuple(d_offsets.shape)}")
    check_offsets(d_offsets, codes.shape[0], table)
    if cand is not None:
        if not isinstance(cand, Tensor) or cand.dtype != torch.int64 or cand.dim() != 2 or cand.shape[0] != Bq:
            raise ValueError(f"cand must be int64 [{Bq}, Nc] or None, got {getattr(cand, 'dtype', None)} "
                             f"{tuple(getattr(cand, 'shape', ()))}")
        if cand.device != table.device:
            raise ValueError(f"cand is on {cand.device} but table is on {table.device}")
    if q_mask is None:
        q_mask = torch.ones((Bq, LP), dtype=torch.bool, device=table.device)
    elif q_mask.dtype != torch.bool or q_mask.dim() != 2 or q_mask.shape[0] != Bq or q_mask.shape[1] > LP:
        raise ValueError(f"q_mask must be bool [{Bq}, Lq] with Lq <= {LP}, got {q_mask.dtype} {tuple(q_mask.shape)}")
    if not torch.compiler.is_compiling():
        # The kernel indexes the table by code and documents by candidate id: out-of-range values fail here, named.
        zero = torch.zeros((), dtype=torch.int64, device=table.device)
        c_hi = cand.max() if cand is not None and cand.numel() else zero
        k_lo, k_hi = (codes.min().long(), codes.max().long()) if codes.numel() else (zero, zero)
        c_hi, k_lo, k_hi = torch.stack([c_hi, k_lo, k_hi]).tolist()
        if c_hi >= d_offsets.shape[0] - 1:
            raise ValueError(f"cand must hold document ids in [0, {d_offsets.shape[0] - 1}) (negative = padding), got "
                             f"max {c_hi}")
        if k_lo < 0 or k_hi >= C:
            raise ValueError(f"codes must hold centroid ids in [0, {C}), got [{k_lo}, {k_hi}]")
    args = [table.contiguous(), q_mask.contiguous(), codes.contiguous(), d_offsets.contiguous(),
            None if cand is None else cand.contiguous()]
    name = select(OP, args, backend, lp=LP)
    return torch.ops.reatt.centroid_interaction(*args, name)
