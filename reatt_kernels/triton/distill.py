r"""Triton kernels for attention distillation: the reader teacher and the KL with its gradient in the forward.

Semantics: :mod:`reatt_kernels.reference.distill` (the spec). Launchers follow the contract in
:mod:`reatt_kernels.ops.distill`.

reader_teacher
--------------
One program owns query ``b``, BLOCK_R attention rows (a row = one (layer, head, step)) and BLOCK_N documents, and
streams the rows' S logits once, flash-attention style: an online softmax (running max ``m`` and sum ``z`` per row)
whose "values" are the one-hot document matrix ``onehot[s, k] = (doc_index[b, s] == k)``, so the per-document sums are
one ``tl.dot`` per tile on the tensor cores::

    acc[r, k] = sum_s exp(x[r, s] - m[r]) * onehot[s, k]        p_T[b, k] = mean_r acc[r, k] / z[r]

Bytes: the input once (B * R * S * elt) plus doc_index once per (row block, doc block); no fp32 copy, no [B, L, H, T, S]
temporary; the output is a [B, row_blocks, n] fp32 partial (summed by the launcher). FLOPs: 2 * B * R * S * BLOCK_N on
the tensor cores (plus ~4 per element for the softmax), so the kernel stays memory-bound for n <= 128; beyond 128
documents each further block of 128 re-reads the input. When B * row_blocks is below the SM count (ReAtt: B x 16 heads
in one row block), S is split across programs that write their partial (m, z, acc) and a combine kernel merges them
with the usual log-sum-exp rescaling (workspace: B * splits * R * (n + 2) fp32).

distill_kl
----------
One program per row: pass 1 reads the student row once for an online log-sum-exp (plus the teacher row sum); pass 2
reads it again (from L2 for the rows we see in ReAtt: M <= a few 10k) and writes the gradient ``(T * softmax - t) *
grad_scale`` and accumulates the loss. For the sparse teacher, pass 2 writes ``T * softmax * scale`` and a final loop
over the n teacher columns adds their loss terms and rewrites the gradient there as ``(T * p - t) * scale``, recomputed in
fp32 so that each element is rounded once (same program, after a barrier, so no atomics). Bytes: 2 reads + 1 write of [B, M] (+ the teacher).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .._alloc import empty

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


# ---- reader_teacher ----------------------------------------------------------------------------------------------------
@triton.jit
def _reader_teacher_fwd_kernel(
    attn_ptr, doc_ptr, mask_ptr, part_ptr, ws_m_ptr, ws_z_ptr, ws_acc_ptr,
    R, H, T, S, n_docs, n_split, s_per_split,
    stride_ab, stride_al, stride_ah, stride_at, stride_as,
    stride_db, stride_ds, stride_mb, stride_ms,
    stride_pb, stride_pr,
    HAS_MASK: tl.constexpr, IS_LOGITS: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
    SPLIT_S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1) // n_split
    pid_s = tl.program_id(1) % n_split
    pid_n = tl.program_id(2)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    # row = (l * H + h) * T + t; 64-bit offsets: B * L * H * T * S may exceed 2^31.
    l_i = (rows // (H * T)).to(tl.int64)
    h_i = ((rows // T) % H).to(tl.int64)
    t_i = (rows % T).to(tl.int64)
    row_off = b * stride_ab + l_i * stride_al + h_i * stride_ah + t_i * stride_at
    docs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    s_lo = pid_s * s_per_split  # this program's token range (all of S unless SPLIT_S)
    s_hi = tl.minimum(S, s_lo + s_per_split)

    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    z = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_N), tl.float32)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < s_hi
        di = tl.load(doc_ptr + b * stride_db + s * stride_ds, mask=s_ok, other=-1).to(tl.int32)
        valid = s_ok & (di >= 0)
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + b * stride_mb + s * stride_ms, mask=s_ok, other=0) != 0)
        ld_mask = row_ok[:, None] & valid[None, :]
        x = tl.load(attn_ptr + row_off[:, None] + s[None, :].to(tl.int64) * stride_as, mask=ld_mask, other=0.0)
        if IS_LOGITS:
            xf = tl.where(ld_mask, x.to(tl.float32), float("-inf"))
            m_new = tl.maximum(m, tl.max(xf, 1))
            # A row with no valid token so far keeps m = -inf; shift by 0 then so exp(-inf) = 0, never NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)
            e = tl.exp(xf - m_safe[:, None])
            z = z * alpha + tl.sum(e, 1)
            acc = acc * alpha[:, None]
            m = m_new
            e_dot = e.to(DOT_DTYPE)  # in [0, 1]: fp16 keeps 11 bits, the one-hot side is exact
        else:
            z = z + tl.sum(x.to(tl.float32), 1)
            e_dot = x.to(DOT_DTYPE)  # probabilities used as given: exact products with the one-hot
        onehot = (di[:, None] == docs[None, :]).to(DOT_DTYPE)
        if IEEE:
            acc += tl.dot(e_dot, onehot, input_precision="ieee")
        else:
            acc += tl.dot(e_dot, onehot)
    if SPLIT_S:
        # Partial online-softmax state of this token range, combined by _reader_teacher_combine_kernel:
        # ws_m, ws_z [B, n_split, R]; ws_acc [B, n_split, R, n_docs] (contiguous).
        ws_row = (b * n_split + pid_s) * R + rows
        tl.store(ws_m_ptr + ws_row, m, mask=row_ok)
        tl.store(ws_z_ptr + ws_row, z, mask=row_ok)
        tl.store(ws_acc_ptr + ws_row[:, None] * n_docs + docs[None, :], acc,
                 mask=row_ok[:, None] & (docs < n_docs)[None, :])
    else:
        # A row with no valid token, no mass, or a NaN/+inf at a valid token (z NaN or inf) contributes 0.
        keep = (z > 0) & (z < float("inf"))
        zs = tl.where(keep, z, 1.0)
        p = tl.where(keep[:, None], acc / zs[:, None], 0.0)
        part = tl.sum(p, 0)
        tl.store(part_ptr + b * stride_pb + pid_r * stride_pr + docs, part, mask=docs < n_docs)


@triton.jit
def _reader_teacher_combine_kernel(
    ws_m_ptr, ws_z_ptr, ws_acc_ptr, part_ptr,
    R, n_docs, n_split,
    stride_pb, stride_pr,
    IS_LOGITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Merge the n_split partial (m, z, acc) of each row (log-sum-exp rescaling), then p = acc / z summed over rows.
    Bytes: n_split * R * (n + 2) * 4 per query: small next to the attention it summarises."""
    b = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1)
    pid_n = tl.program_id(2)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    docs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    doc_ok = docs < n_docs
    m_star = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    if IS_LOGITS:
        for i in range(0, n_split):
            m_i = tl.load(ws_m_ptr + (b * n_split + i) * R + rows, mask=row_ok, other=float("-inf"))
            m_star = tl.maximum(m_star, m_i)
    m_safe = tl.where(m_star == float("-inf"), 0.0, m_star)
    z = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_N), tl.float32)
    for i in range(0, n_split):
        ws_row = (b * n_split + i) * R + rows
        z_i = tl.load(ws_z_ptr + ws_row, mask=row_ok, other=0.0)
        a_i = tl.load(ws_acc_ptr + ws_row[:, None] * n_docs + docs[None, :],
                      mask=row_ok[:, None] & doc_ok[None, :], other=0.0)
        if IS_LOGITS:
            m_i = tl.load(ws_m_ptr + ws_row, mask=row_ok, other=float("-inf"))
            sc = tl.exp(m_i - m_safe)  # a split with no valid token has m_i = -inf: weight 0
            z += z_i * sc
            acc += a_i * sc[:, None]
        else:
            z += z_i
            acc += a_i
    keep = (z > 0) & (z < float("inf"))  # as in the one-pass kernel: NaN/inf/no mass -> the row contributes 0
    zs = tl.where(keep, z, 1.0)
    p = tl.where(keep[:, None], acc / zs[:, None], 0.0)
    tl.store(part_ptr + b * stride_pb + pid_r * stride_pr + docs, tl.sum(p, 0), mask=doc_ok)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _reader_teacher_launch(attn, doc_index, attn_mask, n_docs, is_logits, split_s=None):
    """The launcher, with the number of token splits exposed for tests (None: one program per (query, row block, doc
    block) when that fills the GPU; else S is split so the grid covers about two waves, e.g. ReAtt's B 64 x 16 rows)."""
    B, L, H, T, S = attn.shape
    R = L * H * T
    if _INTERPRET:
        # The interpreter's cost is programs x loop steps: one program per query, one step for small S.
        BLOCK_R = max(16, min(_next_pow2(R), 64))
        BLOCK_S = max(16, min(_next_pow2(S), 1024))
        BLOCK_N = max(16, _next_pow2(n_docs))
        num_warps = 4
    else:
        BLOCK_R = 16 if R <= 16 else 32
        BLOCK_S = 128 if attn.element_size() == 2 else 64
        BLOCK_N = max(16, min(_next_pow2(n_docs), 128))
        num_warps = 4
    if _INTERPRET and split_s is not None:
        BLOCK_S = max(16, min(BLOCK_S, _next_pow2(triton.cdiv(S, split_s))))
    fp32_dot = _INTERPRET or attn.dtype == torch.float32
    if fp32_dot:
        dot_dtype = tl.float32
    elif is_logits or attn.dtype == torch.float16:
        dot_dtype = tl.float16
    else:
        dot_dtype = tl.bfloat16
    n_rb = triton.cdiv(R, BLOCK_R)
    n_nb = triton.cdiv(n_docs, BLOCK_N)
    n_tiles = triton.cdiv(S, BLOCK_S)
    if split_s is None:
        split_s = 1
        if attn.is_cuda:
            programs = B * n_rb * n_nb
            sms = _sm_count(attn.device.index if attn.device.index is not None else torch.cuda.current_device())
            if programs < sms:  # too few programs to keep every SM streaming: split S (at least 8 tiles each)
                split_s = max(1, min(triton.cdiv(2 * sms, programs), n_tiles // 8))
    split_s = max(1, min(int(split_s), n_tiles))
    s_per_split = triton.cdiv(n_tiles, split_s) * BLOCK_S
    split_s = triton.cdiv(S, s_per_split)
    part = empty((B, n_rb, n_docs), torch.float32, attn.device)
    if split_s > 1:
        ws_m = empty((B, split_s, R), torch.float32, attn.device)
        ws_z = empty((B, split_s, R), torch.float32, attn.device)
        ws_acc = empty((B, split_s, R, n_docs), torch.float32, attn.device)
    else:
        ws_m = ws_z = ws_acc = part  # unused
    mask = attn_mask.view(torch.uint8) if attn_mask is not None else None
    grid = (B, n_rb * split_s, n_nb)
    _reader_teacher_fwd_kernel[grid](
        attn, doc_index, mask if mask is not None else doc_index, part, ws_m, ws_z, ws_acc,
        R, H, T, S, n_docs, split_s, s_per_split,
        *attn.stride(),
        doc_index.stride(0), doc_index.stride(1),
        mask.stride(0) if mask is not None else 0, mask.stride(1) if mask is not None else 0,
        part.stride(0), part.stride(1),
        HAS_MASK=mask is not None, IS_LOGITS=bool(is_logits), DOT_DTYPE=dot_dtype,
        IEEE=bool(fp32_dot and not _INTERPRET), SPLIT_S=split_s > 1,
        BLOCK_R=BLOCK_R, BLOCK_S=BLOCK_S, BLOCK_N=BLOCK_N, num_warps=num_warps,
    )
    if split_s > 1:
        _reader_teacher_combine_kernel[(B, n_rb, n_nb)](
            ws_m, ws_z, ws_acc, part, R, n_docs, split_s, part.stride(0), part.stride(1),
            IS_LOGITS=bool(is_logits), BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N, num_warps=num_warps,
        )
    return part.sum(1).div_(R) if n_rb > 1 else part[:, 0].div_(R)


def _reader_teacher_fwd(attn, doc_index, attn_mask, n_docs, is_logits):
    """attn [B, L, H, T, S] (any strides), doc_index int [B, S], attn_mask bool [B, S] or None -> fp32 [B, n_docs]."""
    return _reader_teacher_launch(attn, doc_index, attn_mask, n_docs, is_logits)


# ---- distill_kl --------------------------------------------------------------------------------------------------------
@triton.jit
def _distill_kl_fwd_kernel(
    s_ptr, t_ptr, tp_ptr, tc_ptr, loss_ptr, grad_ptr,
    M, n,
    stride_sb, stride_sm, stride_tb, stride_tm, stride_pb, stride_pn, stride_cb, stride_cn, stride_gb, stride_gm,
    grad_scale,
    SPARSE: tl.constexpr, NORMALIZE: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + b * stride_sb
    g_row = grad_ptr + b * stride_gb
    # pass 1: per-lane online log-sum-exp of the student (and the dense teacher's row sum)
    m_v = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    z_v = tl.zeros((BLOCK_M,), tl.float32)
    tsum_v = tl.zeros((BLOCK_M,), tl.float32)
    for m0 in range(0, M, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        ok = cols < M
        x = tl.load(s_row + cols.to(tl.int64) * stride_sm, mask=ok, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_v, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        z_v = z_v * tl.exp(m_v - m_safe) + tl.exp(x - m_safe)
        m_v = m_new
        if not SPARSE:
            tsum_v += tl.load(t_ptr + b * stride_tb + cols.to(tl.int64) * stride_tm, mask=ok, other=0.0).to(tl.float32)
    mx = tl.max(m_v, 0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    z = tl.sum(z_v * tl.exp(m_v - mx_safe), 0)
    lse = mx_safe + tl.log(z)  # -inf for an all -inf row
    lse_ok = lse > float("-inf")
    if SPARSE:
        tsum = tl.sum(tl.zeros((BLOCK_N,), tl.float32), 0)
        for n0 in range(0, n, BLOCK_N):
            k = n0 + tl.arange(0, BLOCK_N)
            tsum += tl.sum(tl.load(tp_ptr + b * stride_pb + k * stride_pn, mask=k < n, other=0.0).to(tl.float32), 0)
    else:
        tsum = tl.sum(tsum_v, 0)
    if NORMALIZE:
        inv_t = 1.0 / tl.where(tsum > 0, tsum, 1.0)
        t_mass = tl.where(tsum > 0, 1.0, 0.0)  # a row with no teacher mass stays at 0: gradient 0, loss 0
    else:
        inv_t = 1.0
        t_mass = tsum
    # pass 2: gradient T * softmax - t (times grad_scale), and the dense loss terms t * (log t - (x - lse))
    loss_v = tl.zeros((BLOCK_M,), tl.float32)
    for m0 in range(0, M, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        ok = cols < M
        x = tl.load(s_row + cols.to(tl.int64) * stride_sm, mask=ok, other=float("-inf")).to(tl.float32)
        p = tl.where(lse_ok, tl.exp(x - lse), 0.0)
        if SPARSE:
            g = t_mass * p
        else:
            t = tl.load(t_ptr + b * stride_tb + cols.to(tl.int64) * stride_tm, mask=ok, other=0.0).to(tl.float32)
            t = t * inv_t
            pos = t > 0
            # where() inside too: 0 * (-inf) in the unselected lanes would be NaN (harmless, but noisy)
            loss_v += tl.where(pos, t * (tl.log(tl.where(pos, t, 1.0)) - (tl.where(pos, x, 0.0) - lse)), 0.0)
            g = t_mass * p - t
        if COMPUTE_GRAD:
            tl.store(g_row + cols.to(tl.int64) * stride_gm, (g * grad_scale).to(grad_ptr.dtype.element_ty), mask=ok)
    loss = tl.sum(loss_v, 0)
    if SPARSE:
        # The gradient row above must be visible to every thread before the teacher columns patch it.
        tl.debug_barrier()
        for n0 in range(0, n, BLOCK_N):
            k = n0 + tl.arange(0, BLOCK_N)
            k_ok = k < n
            t = tl.load(tp_ptr + b * stride_pb + k * stride_pn, mask=k_ok, other=0.0).to(tl.float32) * inv_t
            c = tl.load(tc_ptr + b * stride_cb + k * stride_cn, mask=k_ok, other=0).to(tl.int64)
            xs = tl.load(s_row + c * stride_sm, mask=k_ok, other=0.0).to(tl.float32)
            pos = t > 0
            loss += tl.sum(tl.where(pos, t * (tl.log(tl.where(pos, t, 1.0)) - (tl.where(pos, xs, 0.0) - lse)), 0.0), 0)
            if COMPUTE_GRAD:
                # Recompute T * softmax in fp32 rather than reading back the value stored above: that one is already
                # rounded to the student's dtype, and T * p - t cancels (p ~ t), so its rounding error would be
                # relative to T * p, not to the result (up to 30% of small bf16 gradients).
                g = t_mass * tl.where(lse_ok, tl.exp(xs - lse), 0.0)
                tl.store(g_row + c * stride_gm, ((g - t) * grad_scale).to(grad_ptr.dtype.element_ty), mask=k_ok)
    tl.store(loss_ptr + b, loss)


def _distill_kl_fwd(student, teacher, teacher_probs, teacher_cols, normalize, grad_scale, compute_grad):
    """Per-row loss fp32 [B] and grad [B, M] (student dtype, times grad_scale; [0, M] when not compute_grad)."""
    B, M = student.shape
    sparse = teacher is None
    loss = empty((B,), torch.float32, student.device)
    grad = empty((B, M) if compute_grad else (0, M), student.dtype, student.device)
    if _INTERPRET:
        BLOCK_M = max(16, min(_next_pow2(M), 4096))
    else:
        BLOCK_M = max(128, min(_next_pow2(M), 2048))
    n = teacher_probs.shape[1] if sparse else 0
    BLOCK_N = max(16, min(_next_pow2(n), 1024))
    t = teacher if not sparse else student  # unused pointer when sparse
    tp = teacher_probs if sparse else student
    tc = teacher_cols if sparse else student
    g_strides = grad.stride() if compute_grad else (0, 0)
    _distill_kl_fwd_kernel[(B,)](
        student, t, tp, tc, loss, grad if compute_grad else loss,
        M, n,
        student.stride(0), student.stride(1), t.stride(0), t.stride(1), tp.stride(0), tp.stride(1),
        tc.stride(0), tc.stride(1), g_strides[0], g_strides[1],
        float(grad_scale),
        SPARSE=sparse, NORMALIZE=bool(normalize), COMPUTE_GRAD=bool(compute_grad),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=8 if BLOCK_M >= 2048 else 4,
    )
    return loss, grad
