r"""MaxSim (late-interaction) scoring: the reference, and THE spec for every backend.

For a query ``a`` with tokens ``q[a, i]`` and a document ``b`` with tokens ``d[b, j]``::

    score(a, b) = sum_{i valid}  max_{j valid} ( q[a, i] . d[b, j] + pos_bias[r] ),   r = clamp(n_a + j - i, 0, R - 1)

- ``n_a`` is the number of valid query tokens (``q_mask[a].sum()``); ``i`` and ``j`` are raw token positions (``j`` is
  the position inside the document: the padded column, or ``row - d_offsets[b]`` in the packed layout). With T5's right
  padding this is ReAtt's relative position between query token ``i`` and document token ``j`` once the document is
  appended after the query. ``pos_bias`` is optional ([R], pre-expanded per distance).
- ``reduce="mean"`` divides by ``n_a`` (ReAtt's training score); ``"sum"`` is the search score.
- A masked document token never wins the max. Ties go to the lowest ``j``.
- A document with no valid token scores ``-inf`` (never NaN) and receives no gradient.
- A query with no valid token scores 0 (even against an empty document: a sum over no terms).
- Inputs are fp32, fp16 or bf16 (fp64 too, for the reference only); accumulation and scores are fp32 (fp64 for fp64).
- ``argmax[a, c, i]`` is the winning ``j`` (int32), or -1 where query token ``i`` is masked, the document is empty, or
  no pair of token ``i`` scores above -inf.

NaN and infinities:
- Masked query tokens, masked or padding document tokens, and pos_bias entries that no valid pair uses never reach any
  output, whatever they hold (NaN and inf included).
- ``pos_bias`` may hold -inf (a forbidden distance): such a pair never wins. When every valid pair of a valid query
  token is forbidden, that token's max is -inf, its argmax is -1 (no gradient), and the score is -inf.
- Infinities in valid tokens follow IEEE arithmetic of the dot products (e.g. a -inf in ``q`` against a positive
  ``d`` entry gives +inf).
- A NaN that reaches a valid pair score (from ``q``, ``d`` or ``pos_bias``) makes that (query, document) score, and
  the gradients that flow through the query token holding it, *unspecified*: this reference returns NaN, while the
  cpu, triton and cuda kernels skip NaN pair scores in the max (so the score may be NaN, -inf or finite). Every other
  score is unaffected and exact, and argmax stays in [-1, Ld). Check inputs with ``torch.isfinite`` where NaN can
  occur: a check inside the kernels would cost a full extra pass over ``d``.

Gradients go through the argmax only: ``dq[a,i] = g * d[b, j*]``, ``dd[b, j*] += g * q[a,i]``,
``dpos_bias[r*] += g`` with ``g = grad[a, b]`` (divided by ``n_a`` for ``mean``). The token-pair scores are materialised
here chunk by chunk (bounded memory); the kernels never materialise them.

Three layouts share these semantics:
- all pairs, padded: ``q`` [Bq, Lq, D] x ``d`` [Nd, Ld, D] (+ ``d_mask`` [Nd, Ld]) -> [Bq, Nd];
- all pairs, packed: ``d_tokens`` [T, D] with ``d_offsets`` int64 [Nd + 1] -> [Bq, Nd];
- grouped: ``q`` [B, Lq, D] x ``d`` [B, n, Ld, D], each query against its own n documents -> [B, n].
Internally (``maxsim_fwd_ref``) grouped is the padded layout with ``d`` flattened to [B * n, Ld, D] and
``group_size = n``: document ``b`` belongs to query ``b // n``, and the output column is ``b % n``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._launcher import MaxsimLauncher

# Elements of the fp32 token-pair score chunk (Bq x docs x Lq x Ld): 2^25 -> 128 MiB.
_CHUNK_ELEMS = 1 << 25


def _cdtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _docs(d: Tensor, d_mask: Optional[Tensor], d_offsets: Optional[Tensor], b0: int, b1: int):
    """Documents b0:b1 as a padded block ([C, Lc, D], mask [C, Lc])."""
    if d_offsets is None:
        dm = d_mask[b0:b1] if d_mask is not None else torch.ones(d[b0:b1].shape[:2], dtype=torch.bool, device=d.device)
        return d[b0:b1], dm
    off = d_offsets[b0 : b1 + 1]
    lens = off[1:] - off[:-1]
    lc = int(lens.max().item()) if lens.numel() else 0
    pos = off[:-1, None] + torch.arange(lc, device=d.device)[None, :]
    dm = torch.arange(lc, device=d.device)[None, :] < lens[:, None]
    rows = pos.masked_fill(~dm, 0).clamp(max=max(d.shape[0] - 1, 0))
    if d.shape[0] == 0:
        return d.new_zeros((b1 - b0, lc, d.shape[-1])), dm
    return d[rows], dm


def _reduce_chunk(s: Tensor, q_mask: Tensor, nq: Tensor, dm: Tensor, pb: Optional[Tensor], mean: bool):
    """s [A, C, Lq, Lc] raw dot products; dm [A or 1, C, Lc]. Returns scores [A, C], argmax int32 [A, C, Lq]."""
    A, C, Lq, Lc = s.shape
    if pb is not None:
        R = pb.numel()
        r = nq[:, None, None] + torch.arange(Lc, device=s.device)[None, None, :] - torch.arange(Lq, device=s.device)[None, :, None]
        s = s + pb[r.clamp(0, R - 1)][:, None]
    s = s.masked_fill(~dm[:, :, None, :], float("-inf"))
    if Lc == 0:
        val = s.new_full((A, C, Lq), float("-inf"))
        am = torch.zeros((A, C, Lq), dtype=torch.int64, device=s.device)
    else:
        am = s.argmax(-1)  # first maximal index: ties go to the lowest j
        val = s.gather(-1, am[..., None]).squeeze(-1)
    empty = ~dm.any(-1)  # [A or 1, C]
    qm = q_mask[:, None, :]
    # No winner when every valid pair of token i scores -inf (e.g. each distance's pos_bias is -inf): argmax -1, as
    # for an empty document, so no gradient flows (the kernels' strict > never moves off -1 either).
    am = am.masked_fill(empty[..., None] | ~qm | torch.isneginf(val), -1)
    val = val.masked_fill(~qm, 0.0)
    score = val.sum(-1)
    if mean:
        score = score / nq.clamp(min=1).to(score.dtype)[:, None]
    return score, am.to(torch.int32)


def maxsim_fwd_ref(
    q: Tensor,
    d: Tensor,
    q_mask: Optional[Tensor],
    d_mask: Optional[Tensor],
    d_offsets: Optional[Tensor],
    pos_bias: Optional[Tensor],
    group_size: int,
    mean: bool,
) -> tuple[Tensor, Tensor]:
    """Canonical forward (all layouts). Differentiable by autograd (through the argmax gather).

    Args:
        q: [Bq, Lq, D]. d: padded [Nd, Ld, D] or packed [T, D] (with ``d_offsets`` [Nd + 1] int64).
        q_mask: bool [Bq, Lq] or None. d_mask: bool [Nd, Ld] or None (padded only).
        pos_bias: [R] or None. group_size: 0 for all pairs, n for grouped (Nd == Bq * n). mean: divide by n_a.
    Returns:
        scores [Bq, Nd or n] fp32 (fp64 for fp64 input), argmax int32 [Bq, Nd or n, Lq].
    """
    Bq, Lq, D = q.shape
    cdt = _cdtype(q)
    dev = q.device
    if q_mask is None:
        q_mask = torch.ones((Bq, Lq), dtype=torch.bool, device=dev)
    nq = q_mask.sum(1)
    qc = q.to(cdt)
    pb = pos_bias.to(cdt) if pos_bias is not None else None
    Nd = d_offsets.numel() - 1 if d_offsets is not None else d.shape[0]
    if d_offsets is not None:
        ld_max = int((d_offsets[1:] - d_offsets[:-1]).max().item()) if Nd > 0 else 0
    else:
        ld_max = d.shape[1]
    per_doc = max(1, Lq * max(ld_max, 1))
    scores, argmaxes = [], []
    if group_size == 0:
        step = max(1, _CHUNK_ELEMS // max(1, Bq * per_doc))
        for b0 in range(0, Nd, step):
            b1 = min(Nd, b0 + step)
            dpad, dm = _docs(d, d_mask, d_offsets, b0, b1)
            s = torch.einsum("aid,bjd->abij", qc, dpad.to(cdt))
            sc, am = _reduce_chunk(s, q_mask, nq, dm[None], pb, mean)
            scores.append(sc)
            argmaxes.append(am)
        if not scores:
            return q.new_zeros((Bq, 0), dtype=cdt), torch.zeros((Bq, 0, Lq), dtype=torch.int32, device=dev)
        return torch.cat(scores, 1), torch.cat(argmaxes, 1)
    n = group_size
    if Nd != Bq * n:
        raise ValueError(f"grouped layout needs Bq * n documents ({Bq} * {n}), got {Nd}")
    step = max(1, _CHUNK_ELEMS // max(1, n * per_doc))
    for a0 in range(0, Bq, step):
        a1 = min(Bq, a0 + step)
        dpad, dm = _docs(d, d_mask, d_offsets, a0 * n, a1 * n)
        dpad = dpad.reshape(a1 - a0, n, dpad.shape[1], D)
        dm = dm.reshape(a1 - a0, n, dm.shape[1])
        s = torch.einsum("aid,anjd->anij", qc[a0:a1], dpad.to(cdt))
        sc, am = _reduce_chunk(s, q_mask[a0:a1], nq[a0:a1], dm, pb, mean)
        scores.append(sc)
        argmaxes.append(am)
    if not scores:
        return q.new_zeros((0, n), dtype=cdt), torch.zeros((0, n, Lq), dtype=torch.int32, device=dev)
    return torch.cat(scores, 0), torch.cat(argmaxes, 0)


def maxsim_bwd_ref(
    grad: Tensor,
    q: Tensor,
    d: Tensor,
    q_mask: Optional[Tensor],
    d_offsets: Optional[Tensor],
    argmax: Tensor,
    n_bias: int,
    group_size: int,
    mean: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Canonical backward through the saved argmax (all layouts).

    Args:
        grad: [Bq, C] upstream gradient of the scores (any float dtype; used in fp32/fp64).
        argmax: int32 [Bq, C, Lq] from the forward. n_bias: R (0 when there is no pos_bias).
    Returns:
        dq like q ([Bq, Lq, D], q.dtype), dd like d (d.shape, d.dtype), dbias [R] fp32 (fp64 for fp64 input).
    """
    Bq, Lq, D = q.shape
    cdt = _cdtype(q)
    dev = q.device
    if q_mask is None:
        q_mask = torch.ones((Bq, Lq), dtype=torch.bool, device=dev)
    C = argmax.shape[1]
    nq = q_mask.sum(1)
    w = grad.to(cdt)
    if mean:
        w = w / nq.clamp(min=1).to(cdt)[:, None]
    valid = argmax >= 0
    W = w[:, :, None] * valid.to(cdt)  # [Bq, C, Lq]
    cols = torch.arange(C, device=dev)
    doc = (torch.arange(Bq, device=dev)[:, None] * group_size + cols[None, :]) if group_size else cols[None, :].expand(Bq, C)
    if d_offsets is not None:
        base = d_offsets[doc]
        dtok = d
    else:
        base = doc * d.shape[1]
        dtok = d.reshape(-1, D)
    flat = base[:, :, None] + argmax.clamp(min=0).to(torch.int64)  # [Bq, C, Lq]
    ntok = dtok.shape[0]
    qc = q.to(cdt)
    dq = torch.zeros((Bq, Lq, D), dtype=cdt, device=dev)
    dd = torch.zeros((ntok, D), dtype=cdt, device=dev)
    step = max(1, (1 << 24) // max(1, Bq * Lq * D))
    for c0 in range(0, C, step):
        c1 = min(C, c0 + step)
        fl = flat[:, c0:c1].clamp(max=max(ntok - 1, 0))
        Wc = W[:, c0:c1]
        if ntok > 0:
            dq += torch.einsum("acl,acld->ald", Wc, dtok[fl].to(cdt))
            contrib = Wc[..., None] * qc[:, None]  # [Bq, c, Lq, D]
            dd.index_add_(0, fl.reshape(-1), contrib.reshape(-1, D))
    dbias = torch.zeros((max(n_bias, 0),), dtype=cdt, device=dev)
    if n_bias > 0:
        r = nq[:, None, None] + argmax.to(torch.int64) - torch.arange(Lq, device=dev)[None, None, :]
        r = r.clamp(0, n_bias - 1)
        dbias.index_add_(0, r[valid], W[valid])
    return dq.to(q.dtype), dd.reshape(d.shape).to(d.dtype), dbias


def maxsim_ref(q, d, q_mask=None, d_mask=None, *, pos_bias=None, reduce="sum", return_argmax=False):
    """All-pairs padded MaxSim reference: q [Bq, Lq, D], d [Nd, Ld, D] -> [Bq, Nd] (see module docstring)."""
    s, am = maxsim_fwd_ref(q, d, q_mask, d_mask, None, pos_bias, 0, reduce == "mean")
    return (s, am) if return_argmax else s


def maxsim_packed_ref(q, d_tokens, d_offsets, q_mask=None, *, pos_bias=None, reduce="sum", return_argmax=False):
    """Packed MaxSim reference: q [Bq, Lq, D], d_tokens [T, D], d_offsets [Nd + 1] -> [Bq, Nd]."""
    s, am = maxsim_fwd_ref(q, d_tokens, q_mask, None, d_offsets, pos_bias, 0, reduce == "mean")
    return (s, am) if return_argmax else s


def maxsim_grouped_ref(q, d, q_mask=None, d_mask=None, *, pos_bias=None, reduce="sum", return_argmax=False):
    """Grouped MaxSim reference: q [B, Lq, D], d [B, n, Ld, D] (d_mask [B, n, Ld]) -> [B, n]."""
    B, n, Ld, D = d.shape
    dm = d_mask.reshape(B * n, Ld) if d_mask is not None else None
    s, am = maxsim_fwd_ref(q, d.reshape(B * n, Ld, D), q_mask, dm, None, pos_bias, n, reduce == "mean")
    return (s, am) if return_argmax else s


# ---- the `torch` backend: the reference itself, behind the same launcher contract as the kernels -----------------------
def _maxsim_fwd(q, d, q_mask, d_mask, d_offsets, pos_bias, group_size, mean):
    return maxsim_fwd_ref(q, d, q_mask, d_mask, d_offsets, pos_bias, group_size, mean)


def _maxsim_bwd(grad, q, d, q_mask, d_offsets, argmax, n_bias, group_size, mean, deterministic):
    if deterministic and q.device.type == "cuda":
        # index_add_ on CUDA uses float atomics unless torch's deterministic mode is on.
        from .._utils import deterministic_algorithms

        with deterministic_algorithms():
            return maxsim_bwd_ref(grad, q, d, q_mask, d_offsets, argmax, n_bias, group_size, mean)
    return maxsim_bwd_ref(grad, q, d, q_mask, d_offsets, argmax, n_bias, group_size, mean)


class TorchMaxsim(MaxsimLauncher):
    """The `torch` backend of maxsim: the spec itself (chunked, bounded memory)."""

    def forward(self, q, d, q_mask, d_mask, d_offsets, pos_bias, group_size, mean, screen=None):
        return _maxsim_fwd(q, d, q_mask, d_mask, d_offsets, pos_bias, group_size, mean)

    def backward(self, grad, q, d, q_mask, d_offsets, argmax, n_bias, group_size, mean, deterministic):
        return _maxsim_bwd(grad, q, d, q_mask, d_offsets, argmax, n_bias, group_size, mean, deterministic)


MAXSIM = TorchMaxsim()
