r"""Attention distillation (ReAtt's retriever-from-reader loss): the reference, and THE spec for every backend.

Three ops share one story: the reader's cross-attention is the teacher, the retriever's MaxSim scores are the student.

**reader_teacher** (no gradient: a teacher). For a Fusion-in-Decoder reader, ``attn[b, l, h, t, s]`` is the
decoder-to-encoder cross-attention of layer ``l``, head ``h``, decoder step ``t`` over the encoder tokens ``s`` of all
``n`` documents of query ``b`` concatenated. ``doc_index[b, s]`` is the document of token ``s`` (0..n-1), or -1 for
padding. A token is *valid* when ``doc_index[b, s] >= 0`` and ``attn_mask[b, s]`` (when given). Then::

    p[b, l, h, t, s] = softmax over valid s of attn[b, l, h, t, :]          (is_logits=True)
                     = attn[b, l, h, t, s] / sum over valid s' of attn[b, l, h, t, s']   (is_logits=False: probabilities,
                                                                           renormalised over the valid tokens)
    p_T[b, k]        = mean over (l, h, t) of  sum over s with doc_index[b, s] == k of p[b, l, h, t, s]

so every row of ``p_T`` [B, n] (fp32) sums to 1. Edge cases: a document whose tokens are all padding gets 0; an
(l, h, t) row with no valid token (or, for probabilities, zero mass on the valid tokens) contributes 0, so a query
with no valid token at all gets an all-zero row. Invalid tokens never contribute, whatever their value (NaN and inf
included).

NaN and infinities in ``attn`` (valid tokens): a logit of -inf carries no mass; a row whose valid logits are all -inf
has no mass and contributes 0. A row holding NaN or +inf at a valid token (logits), or NaN/+inf probabilities at a
valid token, is *dropped*: it contributes 0, like a row without mass, and never turns ``p_T`` into NaN (the mean still
divides by every row, so that query's ``p_T`` row then sums to less than 1). ``p_T`` is therefore always finite and
>= 0. (Negative probabilities are not checked: garbage in, garbage out.)

**distill_kl**: ``KL(teacher || softmax(student))`` row-wise over ``student`` [B, M]::

    loss[b] = sum_j t[b, j] * (log t[b, j] - log_softmax(student[b])_j),     0 * log 0 = 0
    d loss[b] / d student[b, j] = T_b * softmax(student[b])_j - t[b, j],      T_b = sum_j t[b, j]  (= 1 normally)

reduced by ``reduction``: "batchmean" (sum / B, the default and the true KL mean), "sum", "mean" (sum / (B * M), as
torch's kl_div) or "none" ([B]). The teacher is dense [B, M], or sparse: ``teacher_probs`` [B, n] at the columns
``teacher_cols`` [B, n] (unique per row, in [0, M)), mass 0 elsewhere. ``normalize_teacher`` divides each teacher row by
its sum first. A student logit of -inf is allowed where the teacher mass is 0 (it contributes 0 and gets gradient 0);
teacher mass on a -inf logit makes the row's loss +inf (the public API turns that into a ValueError). Computation is in
fp32 (fp64 for fp64 students) with a max-subtracted log-sum-exp, so |logits| up to 1e4 are exact to fp32 rounding.
The teacher gets no gradient. The gradient is computed in fp32 and rounded to the student's dtype once.

NaN and infinities: a student row of only -inf with no teacher mass has loss 0 and gradient 0. A row with no teacher
mass at all (an empty teacher: M = 0, or n = 0 in the sparse form; with ``normalize_teacher`` also an all-zero row,
reachable only when the eager checks are skipped) has ``T_b = 0``: loss 0 and gradient 0. A NaN or +inf student logit
makes that row's loss NaN (the public API raises a ValueError); NaN, inf or negative teacher entries are rejected by
the public API (under torch.compile, where those checks are skipped, they give NaN/inf, never a crash).

**retrieval_distill_loss**: ``student = scale * maxsim(q, d, ...)`` for every query against every in-batch document
(an empty document scores -inf and so takes no part), then ``distill_kl`` against the sparse teacher [B, n] whose
columns default to query a's own documents a*n .. a*n+n-1. The -inf score of an empty document is kept as is (never
multiplied by the scale, whose gradient would be 0 * -inf = NaN); the document gets gradient 0, and teacher mass on
it raises. NaN in q/d follows maxsim's semantics (see :mod:`reatt_kernels.reference.maxsim`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._launcher import DistillKlLauncher, ReaderTeacherLauncher

# Elements of one fp32 chunk of attention rows in the reader-teacher reference: 2^22 -> 16 MiB.
_CHUNK_ELEMS = 1 << 22


def _cdtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _valid_tokens(doc_index: Tensor, attn_mask: Optional[Tensor]) -> Tensor:
    valid = doc_index >= 0
    if attn_mask is not None:
        valid = valid & attn_mask
    return valid


# ---- reader_teacher ----------------------------------------------------------------------------------------------------
def reader_teacher_fwd_ref(attn: Tensor, doc_index: Tensor, attn_mask: Optional[Tensor], n_docs: int,
                           is_logits: bool) -> Tensor:
    """Canonical forward. attn [B, L, H, T, S] (any strides, any float dtype), doc_index int [B, S], attn_mask bool
    [B, S] or None -> p_T [B, n_docs] fp32 (fp64 for fp64 attn). Chunked over (layer, heads): bounded memory."""
    B, L, H, T, S = attn.shape
    cdt = _cdtype(attn)
    dev = attn.device
    valid = _valid_tokens(doc_index, attn_mask)  # [B, S]
    w = torch.zeros((B, S), dtype=cdt, device=dev)  # token weights summed over rows
    R = L * H * T
    hc = max(1, min(H, _CHUNK_ELEMS // max(1, B * T * S)))
    for l in range(L):
        for h0 in range(0, H, hc):
            # One fp32 chunk [B, hc, T, S], worked on in place (copy=True: never write into the caller's fp32 attn).
            x = attn[:, l, h0 : h0 + hc].to(cdt, memory_format=torch.contiguous_format, copy=True)
            vm = valid[:, None, None, :]
            if is_logits:
                # Invalid tokens get the most negative FINITE value, not -inf: a row with no valid token (or only -inf
                # valid logits) then spreads its mass over invalid tokens, which the final where(valid) drops, so it
                # contributes 0; in any other row they get exp(min - max) = 0 exactly. The one row softmax still
                # makes NaN (every token valid and -inf) must contribute 0 too: nansum.
                x.masked_fill_(~vm, torch.finfo(cdt).min)
                w += torch.nansum(torch.softmax(x, -1), (1, 2))
            else:
                x.masked_fill_(~vm, 0.0)
                z = x.sum(-1, keepdim=True)
                # A row with no mass, or with NaN/+inf mass, contributes 0: zero it (NaN * 0 would still be NaN).
                keep = (z > 0) & torch.isfinite(z)
                x.masked_fill_(~keep, 0.0)
                inv = torch.where(keep, 1.0 / z, torch.zeros_like(z))
                rows = x.shape[1] * T
                # sum over rows of p = x / z, as one batched mat-vec: [B, 1, rows] @ [B, rows, S]
                w += torch.bmm(inv.reshape(B, 1, rows), x.reshape(B, rows, S)).squeeze(1)
    out = torch.zeros((B, n_docs), dtype=cdt, device=dev)
    if n_docs > 0 and S > 0:
        out.scatter_add_(1, doc_index.clamp(min=0).to(torch.int64), torch.where(valid, w, torch.zeros_like(w)))
    return out / max(R, 1)


def reader_teacher_ref(attn: Tensor, doc_index: Tensor, *, is_logits: bool = True, attn_mask: Optional[Tensor] = None,
                       n_docs: Optional[int] = None) -> Tensor:
    """attn [B, L, H, T, S], [B, H, T, S] or [B, H, S] -> p_T [B, n] (all layers/steps given are averaged)."""
    if attn.dim() == 3:
        attn = attn[:, None, :, None, :]
    elif attn.dim() == 4:
        attn = attn[:, None]
    if n_docs is None:
        n_docs = int(doc_index.max().item()) + 1 if doc_index.numel() else 0
    return reader_teacher_fwd_ref(attn.detach(), doc_index, attn_mask, n_docs, is_logits)


# ---- distill_kl --------------------------------------------------------------------------------------------------------
def dense_teacher(teacher_probs: Tensor, teacher_cols: Tensor, M: int, dtype=None) -> Tensor:
    """Sparse teacher ([B, n] probabilities at [B, n] columns) as a dense [B, M] matrix."""
    B = teacher_probs.shape[0]
    dt = dtype or teacher_probs.dtype
    out = torch.zeros((B, M), dtype=dt, device=teacher_probs.device)
    return out.scatter_(1, teacher_cols.to(torch.int64), teacher_probs.to(dt))


def kl_rows_ref(student: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row KL and its gradient (T_b * softmax - t), computed in student's compute dtype. student, t: [B, M]."""
    cdt = _cdtype(student)
    s = student.to(cdt)
    t = t.to(cdt)
    logsm = torch.log_softmax(s, -1) if s.shape[-1] > 0 else s
    # log_softmax of an all -inf row is NaN; such a row's softmax is 0 everywhere.
    logsm = torch.where(torch.isnan(logsm) & torch.isneginf(s), torch.full_like(logsm, float("-inf")), logsm)
    pos = t > 0
    safe_t = torch.where(pos, t, torch.ones_like(t))
    terms = torch.where(pos, t * (torch.log(safe_t) - logsm), torch.zeros_like(t))
    loss = terms.sum(-1)
    grad = t.sum(-1, keepdim=True) * torch.exp(logsm) - t
    return loss, grad


def reduce_rows(loss_rows: Tensor, reduction: str, M: int) -> tuple[Tensor, float]:
    """Reduced loss and the scale d loss / d loss_rows (the same for every row)."""
    B = loss_rows.shape[0]
    if reduction == "none":
        return loss_rows, 1.0
    if reduction == "sum":
        return loss_rows.sum(), 1.0
    if reduction == "batchmean":
        return loss_rows.sum() / max(B, 1), 1.0 / max(B, 1)
    if reduction == "mean":
        return loss_rows.sum() / max(B * M, 1), 1.0 / max(B * M, 1)
    raise ValueError(f"reduction must be 'batchmean', 'sum', 'mean' or 'none', got {reduction!r}")


def normalized(t: Tensor) -> Tensor:
    z = t.sum(-1, keepdim=True)
    return t / torch.where(z > 0, z, torch.ones_like(z))


def distill_kl_ref(student: Tensor, teacher: Optional[Tensor] = None, *, teacher_probs: Optional[Tensor] = None,
                   teacher_cols: Optional[Tensor] = None, reduction: str = "batchmean",
                   normalize_teacher: bool = False) -> Tensor:
    """Plain-torch KL(teacher || softmax(student)), differentiable w.r.t. student by autograd (float64 gradcheck)."""
    cdt = _cdtype(student)
    if teacher is None:
        t = dense_teacher(teacher_probs.detach().to(cdt), teacher_cols, student.shape[-1], cdt)
    else:
        t = teacher.detach().to(cdt)
    if normalize_teacher:
        t = normalized(t)
    s = student.to(cdt)
    logsm = torch.log_softmax(s, -1)
    pos = t > 0
    safe_t = torch.where(pos, t, torch.ones_like(t))
    # where() twice: the unselected branch may be -inf/NaN, and must not leak into the gradient.
    safe_logsm = torch.where(pos, logsm, torch.zeros_like(logsm))
    terms = torch.where(pos, t * (torch.log(safe_t) - safe_logsm), torch.zeros_like(t))
    return reduce_rows(terms.sum(-1), reduction, student.shape[-1])[0]


# ---- the `torch` backend: launchers with the same contract as the kernels ----------------------------------------------
def _reader_teacher_fwd(attn, doc_index, attn_mask, n_docs, is_logits):
    """attn [B, L, H, T, S], doc_index int [B, S], attn_mask bool [B, S] or None -> fp32 [B, n_docs]."""
    return reader_teacher_fwd_ref(attn, doc_index, attn_mask, n_docs, is_logits)


def _distill_kl_fwd(student, teacher, teacher_probs, teacher_cols, normalize, grad_scale, compute_grad):
    """Per-row loss [B] (fp32; fp64 for fp64) and d loss_rows * grad_scale / d student ([B, M], student dtype; [0, M]
    when compute_grad is False). Teacher dense [B, M], or teacher_probs [B, n] at teacher_cols [B, n]."""
    cdt = _cdtype(student)
    M = student.shape[-1]
    if teacher is None:
        t = dense_teacher(teacher_probs.to(cdt), teacher_cols, M, cdt)
    else:
        t = teacher.to(cdt)
    if normalize:
        t = normalized(t)
    loss, grad = kl_rows_ref(student, t)
    if not compute_grad:
        return loss, student.new_empty((0, M))
    return loss, (grad * grad_scale).to(student.dtype)


class TorchReaderTeacher(ReaderTeacherLauncher):
    """The `torch` backend of reader_teacher: the spec."""

    def forward(self, attn, doc_index, attn_mask, n_docs, is_logits):
        return _reader_teacher_fwd(attn, doc_index, attn_mask, n_docs, is_logits)


class TorchDistillKl(DistillKlLauncher):
    """The `torch` backend of distill_kl (also the `cpu` backend's: small rows, torch is memory-bound already)."""

    def forward(self, student, teacher, teacher_probs, teacher_cols, normalize, grad_scale, compute_grad):
        return _distill_kl_fwd(student, teacher, teacher_probs, teacher_cols, normalize, grad_scale, compute_grad)


READER_TEACHER = TorchReaderTeacher()
DISTILL_KL = TorchDistillKl()
