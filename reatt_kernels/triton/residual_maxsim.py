r"""Triton fused decompress + MaxSim (``residual_maxsim``): score queries against candidate documents straight from
residual codes. Semantics: :mod:`reatt_kernels.reference.residual_maxsim`.

One program per (candidate column c, query a). It loads the query once ([BLOCK_Q, BLOCK_D] fp32 in registers), then
walks the document BLOCK_T tokens at a time: gathers the tokens' centroid rows and packed bucket bytes, decodes the
tile in registers (v = centroid + weights[d, bucket]) and takes ``max_t q . v`` with one ``tl.dot``. Decompressed
vectors never reach memory.

Per token: 4 B (code) + D * nbits / 8 B (buckets) read from HBM, plus the centroid row (D * 4 B, hot in L2 for
popular centroids) and the weight table (D * 2^nbits * 4 B, L1/L2-resident). FLOPs: 2 * Lq * D per (query, token).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._alloc import empty


@triton.jit
def _residual_maxsim_fwd_kernel(
    q_ptr, qm_ptr, cent_ptr, w_ptr, codes_ptr, packed_ptr, off_ptr, cand_ptr, out_ptr,
    Lq, D, Nc,
    stride_qb, stride_ql, stride_mb, stride_c, stride_w, stride_p, stride_cb, stride_ob,
    NBITS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    c = tl.program_id(0)
    a = tl.program_id(1).to(tl.int64)
    b = tl.load(cand_ptr + a * stride_cb + c)
    is_valid = b >= 0
    bb = tl.where(is_valid, b, 0)
    t_start = tl.load(off_ptr + bb)
    t_end = tl.where(is_valid, tl.load(off_ptr + bb + 1), t_start)

    offs_i = tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    mask_i = offs_i < Lq
    mask_d = offs_d < D
    q = tl.load(q_ptr + a * stride_qb + offs_i[:, None] * stride_ql + offs_d[None, :],
                mask=mask_i[:, None] & mask_d[None, :], other=0.0)
    qm = tl.load(qm_ptr + a * stride_mb + offs_i, mask=mask_i, other=0) != 0
    # Which byte and bit of the packed row hold dimension d.
    byte_d = (offs_d * NBITS) // 8
    shift_d = (offs_d * NBITS) % 8
    best = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    for t0 in range(t_start, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < t_end
        m2 = mask_t[:, None] & mask_d[None, :]
        code = tl.load(codes_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
        cent = tl.load(cent_ptr + code[:, None] * stride_c + offs_d[None, :], mask=m2, other=0.0)
        byte = tl.load(packed_ptr + offs_t[:, None] * stride_p + byte_d[None, :], mask=m2, other=0).to(tl.int32)
        bucket = (byte >> shift_d[None, :]) & ((1 << NBITS) - 1)
        w = tl.load(w_ptr + offs_d[None, :] * stride_w + bucket, mask=m2, other=0.0)
        v = cent + w  # [BLOCK_T, BLOCK_D] decoded in registers
        s = tl.dot(q, tl.trans(v), input_precision="ieee")  # [BLOCK_Q, BLOCK_T]
        s = tl.where(mask_t[None, :], s, float("-inf"))
        best = tl.maximum(best, tl.max(s, axis=1))
    score = tl.sum(tl.where(qm, best, 0.0), axis=0)
    score = tl.where(is_valid, score, float("-inf"))
    tl.store(out_ptr + a * stride_ob + c, score)


def _residual_maxsim_not_supported_reasons(tensors, dim=0, **facts):
    if dim > 1024:
        return [f"dim {dim} > 1024 (one tile holds the whole vector)"]
    return []


def _residual_maxsim_fwd(q, q_mask, centroids, weights, codes, packed, d_offsets, cand, nbits):
    Bq, Lq, D = q.shape
    Nc = cand.shape[1]
    out = empty((Bq, Nc), torch.float32, q.device)
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    BLOCK_Q = max(16, triton.next_power_of_2(Lq))
    BLOCK_D = max(16, triton.next_power_of_2(D))
    # The interpreter pays per loop step, so take a big token tile there; on GPU 32 tokens keep registers in check.
    BLOCK_T = 64 if interp else 32
    packed_ = packed if packed.numel() else packed.new_zeros((1, max(1, packed.shape[1])))
    codes_ = codes if codes.numel() else codes.new_zeros((1,))
    qm = q_mask.view(torch.uint8)
    _residual_maxsim_fwd_kernel[(Nc, Bq)](
        q, qm, centroids, weights, codes_, packed_, d_offsets, cand, out,
        Lq, D, Nc,
        q.stride(0), q.stride(1), qm.stride(0), centroids.stride(0), weights.stride(0), packed_.stride(0),
        cand.stride(0), out.stride(0),
        NBITS=nbits, BLOCK_Q=BLOCK_Q, BLOCK_D=BLOCK_D, BLOCK_T=BLOCK_T,
        num_warps=4,
    )
    return out
