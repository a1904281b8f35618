r"""MaxSim in Triton: a fused, FlashAttention-style forward and an argmax-driven backward.

Semantics are those of :mod:`reatt_kernels.reference.maxsim` (THE spec); the launcher contract is the one at the top of
:mod:`reatt_kernels.ops.maxsim`. Shapes below: q [Bq, Lq, D]; d padded [Nd, Ld, D] (+ d_mask) or packed [T, D] with
int64 offsets [Nd + 1]; grouped = padded with doc b owned by query b // n (output column b % n).

Design note
===========
Forward (``_maxsim_fwd_kernel``). One program owns a block of *rows* and a contiguous range of documents. A row is a
(query a, query token i) pair; a block holds QB queries x M_TOK tokens (M_TOK = next power of two of Lq, at most 128;
longer queries are split into token chunks whose partial sums are added afterwards). The q block is loaded once and
stays resident in registers. The program streams its documents tile by tile (BLOCK_N tokens x D), computes the
[M, BLOCK_N] scores with ``tl.dot`` (fp16/bf16 on tensor cores with fp32 accumulation; fp32 with
``input_precision="ieee"`` so fp32 tolerances hold), adds the position bias, masks, and folds each tile into a running
max and argmax held in registers (strict ``>`` across tiles + ``tie_break_left`` inside a tile = ties to the lowest j).
At the end of a document it reduces its rows per query (a [QB, M_TOK] reshape + sum) and writes one fp32 score per
(query, doc) and the int32 argmax per row. Nothing of size Bq x Nd x Lq x Ld ever exists in memory.

Two regimes on the GPU (H100: 3.0 TB/s HBM, ~700 TFLOP/s bf16 dense):

* few queries vs many documents is HBM-bound. 1 query x 200k docs x 128 tok x 128 dim fp16 reads 6.55 GB of documents
  once and does 2 * 32 * 128 * 128 = 1.05 MFLOP per 32 KiB document: 32 FLOP/byte, far under the ~230 FLOP/byte ridge.
  So each document tile is read exactly once (a single query block: QB covers all queries), q stays resident, and each
  program walks up to 64 consecutive documents (``docs_per_prog``, so the grid is ~3k programs, many waves of 132 SMs)
  while q is re-read from L2 once per program (8 KiB per 64 docs = 2 MiB: < 0.1% extra traffic). Padded documents
  are walked as ONE flat loop over (document, tile) steps, which is the loop Triton's software pipeliner overlaps
  (cp.async, 3 stages), so the next document streams in while the current one is reduced. At d = 128, 32 query rows,
  a whole 128-token document per tile: 32 KiB per load, 99 registers, 75 KiB shared memory, 2 CTAs of 8 warps per SM,
  i.e. up to 4 x 32 KiB in flight per SM, well above the ~20 KiB per SM that Little's law asks for at 3 TB/s. Floor:
  6.55 GB / 2.94 TB/s = 2.2 ms; the issue's 3.1 ms (docs/baselines.md: 2.3 ms) needs 70-95% of HBM.
* many queries vs many documents is compute-bound. 64 q x 6400 docs x Lq 32 x Ld 200 x d 64 is 335 GFLOP (0.5 ms at
  700 TFLOP/s) against 164 MB of documents. A program then takes QB = 4 queries (M = 128 rows, wgmma), so every
  document tile loaded into shared memory feeds a 128 x 64 x D tensor-core dot: 2 * 128 = 256 FLOP per byte loaded,
  and the 16 query blocks re-read each tile from L2, not HBM, because consecutive program ids share the document range.
  fp32 inputs use "ieee" dots (FMA units, operands in registers), so their blocks shrink to 32 rows x 32 tokens.
  The position bias is a gather, pos_bias[clamp(n_a + j - i)], one L1-resident load per score element: for a
  128 x 64 tile that is 8192 loads (~256 LSU cycles per SM), about as many cycles as the 128 x 64 x 64 wgmma itself,
  so with pos_bias the training forward may be load-unit-bound (est. up to ~2x slower than without; unmeasured).

Masked query tokens. The launchers pass ``qperm`` int32 [Bq, Lq], each query's valid token indices first (in order),
then its masked ones (a stable argsort of the mask: a device op, no sync), and every kernel reads its rows through
it: row p of a query is its token qperm[a, p], valid iff p < n_a. The bias distance n_a + j - i and every store use
that original index i. So a query's valid tokens fill its first token chunk(s): a forward program whose rows are all
masked (a token chunk past every n_a of its queries, or queries with no valid token) reads no document and writes 0
partial scores and -1 argmax; the dq and dbias programs of such a chunk skip their column loops (zero partials), and
the deterministic dd kernel loops over each query's n_a valid tokens only. Inside a live program the masked rows still
occupy their rows of the ``tl.dot`` (a dot has a fixed M): the packing removes whole tiles, not single rows.

Backward (argmax only; no token-pair scores are recomputed), w[a, c] = grad[a, c] (/ n_a for mean):

* ``_maxsim_bwd_dq_kernel`` gathers dq[a, i] = sum_c w[a, c] * d[doc(a, c), argmax[a, c, i]]. One program owns one
  query's token chunk and a chunk of columns and takes BLOCK_C columns per step (~128 gathered rows in flight: the
  argmax -> row gather is a chain of two dependent loads, so bytes in flight set the bandwidth). Partial dq (fp32) go
  to a [chunks, Bq, Lq, D] buffer summed in a fixed order: dq is deterministic in both modes. Bytes: Bq*C*Lq*(4 + D*elt)
  = 64*6400*32*(4+128) = 1.7 GB for the training shape (0.6 ms at HBM speed; much of it hits L2).
  In the atomic mode (``deterministic=False``) the same loop scatters w * q[a, i] into an fp32 dd buffer with
  ``tl.atomic_add`` (Bq*C*Lq*D fp32 atomics: 0.84e9 for the training shape), cast to d's dtype at the end. Memory:
  the fp32 buffer (328 MB for the training shape) on top of dd itself (164 MB).
* ``_maxsim_bwd_dd_kernel`` (``deterministic=True``) owns one document tile (BLOCK_N tokens) and loops over the
  queries that score it in a fixed order: dd[b, j] = sum_a w[a, b] * onehot(argmax[a, b, :] == j) @ q[a]. The one-hot
  [BLOCK_N, Lq] matrix is exact in every dtype, so the tensor-core dot sums exact products in fp32, and w is applied in
  fp32 afterwards. It costs the forward's FLOPs (2 * Bq*Lq*T*D) but no atomics and no fp32 dd buffer (dd is written
  once, in d's dtype), and it is bitwise reproducible. For the training shape: 335 GFLOP on tensor cores plus one
  4 KiB re-read of q[a] from L2 per (128-token tile, query) = 3.3 GB of L2 traffic. It may well beat the atomics
  there (benchmark both); it is also the low-memory mode (no fp32 dd buffer).
* ``_maxsim_bwd_dbias_kernel``: dpos_bias as a weighted histogram of the winning distances, [M_TOK, NB] fp32 counters
  per program in registers (NB = live bins, <= Lq + Ld), partials summed in a fixed order: deterministic in both
  modes. Reads only the argmax (4 B per (query, column, token)).

GPU configurations were checked without a GPU by compiling every kernel for sm_90 at the target shapes (registers,
spills, wgmma vs mma.sync, cp.async pipelining; tests/kernels/test_maxsim_triton.py::test_maxsim_triton_compiles_for_sm90
keeps them compiling), not by timing them: the numbers above are design estimates.

64-bit offsets everywhere: every index that multiplies a stride is cast to int64 first (1 query x 200k docs x 128 x
128 is 3.3e9 elements > 2^31). Dims up to 256 are padded to a power of two with masked loads (dim 7, 33 work).

Under ``TRITON_INTERPRET=1`` (CPU tests) the cost is programs x loop steps, so the launchers use one program for all
queries and as many documents as possible with big tiles, and upcast operands to fp32 before ``tl.dot`` (the
interpreter multiplies the raw bits of fp16/bf16 operands).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .._alloc import empty
from .._utils import deterministic_algorithms

MAX_DIM = 256  # q/d tiles hold the whole (padded) dim; larger dims would spill registers
MAX_TOK = 128  # query tokens per row block; longer queries are split into token chunks
MAX_HIST = 8192  # (query token x distance bin) fp32 counters of the dpos_bias histogram: 32 registers/thread at 8 warps


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _np2(x: int) -> int:
    return triton.next_power_of_2(max(int(x), 1))


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _num_sms(device: torch.device) -> int:
    return _num_sms_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _num_sms_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# ---- forward -----------------------------------------------------------------------------------------------------------
@triton.jit
def _maxsim_fwd_kernel(
    q_ptr, d_ptr, qperm_ptr, dmask_ptr, off_ptr, bias_ptr, nq_ptr, scores_ptr, argmax_ptr,
    Bq, Lq, Ld, D, C, R, Nd, group_size, docs_per_prog, n_qblocks, n_tchunks,
    stride_qb, stride_ql, stride_qd,
    stride_db, stride_dl, stride_dd,
    stride_mb, stride_ml,
    QB: tl.constexpr, M_TOK: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, TILES: tl.constexpr,
    PACKED: tl.constexpr, GROUPED: tl.constexpr, HAS_DMASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    MEAN: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """scores[t, a, c] (token chunk t's partial sum) and argmax[a, c, i] for one row block x one document range.

    Per document tile: reads BLOCK_N * D * elt bytes (+ BLOCK_N mask bytes), does 2 * M * BLOCK_N * D FLOPs
    (M = QB * M_TOK rows), plus M * BLOCK_N bias gathers from an L1-resident [R] table when HAS_BIAS.
    """
    M: tl.constexpr = QB * M_TOK
    pid = tl.program_id(0)
    # Row block fastest: programs launched together share a document range, so a document tile comes from HBM once
    # and from L2 for the other row blocks.
    qblk = pid % n_qblocks
    dchunk = pid // n_qblocks
    tchunk = qblk % n_tchunks
    a0 = (qblk // n_tchunks) * QB
    i0 = tchunk * M_TOK

    rows = tl.arange(0, M)
    a = a0 + rows // M_TOK  # query of each row
    pk = i0 + rows % M_TOK  # packed position of each row: valid tokens first
    row_ok = (a < Bq) & (pk < Lq)
    a64 = tl.cast(a, tl.int64)
    na = tl.load(nq_ptr + a64, mask=a < Bq, other=0)  # valid tokens of each row's query (n_a)
    i = tl.load(qperm_ptr + a64 * Lq + pk.to(tl.int64), mask=row_ok, other=0)  # its ORIGINAL token index
    i64 = i.to(tl.int64)
    valid = row_ok & (pk < na)
    # A program whose rows are all masked reads no document (its scores are 0 and its argmax -1).
    live = tl.max(valid.to(tl.int32), axis=0) > 0

    k = tl.arange(0, D_PAD)
    k_ok = k < D
    k64 = k.to(tl.int64)
    qt = tl.load(q_ptr + a64[:, None] * stride_qb + i64[:, None] * stride_ql + k64[None, :] * stride_qd,
                 mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    if UPCAST:
        qt = qt.to(tl.float32)

    # Document range of this program.
    if GROUPED:
        n_chunks_per_q = tl.cdiv(group_size, docs_per_prog)
        owner = a0  # QB == 1 when grouped
        c_lo = (dchunk % n_chunks_per_q) * docs_per_prog
        c_hi = tl.minimum(c_lo + docs_per_prog, group_size)
        b_lo = owner * group_size + c_lo
        b_hi = owner * group_size + c_hi
        col_base = owner * group_size
    else:
        b_lo = dchunk * docs_per_prog
        b_hi = tl.minimum(b_lo + docs_per_prog, Nd)
        col_base = 0

    cols = tl.arange(0, BLOCK_N)
    if PACKED:
        for b in range(b_lo, b_hi):
            b64 = tl.cast(b, tl.int64)
            m = tl.full([M], float("-inf"), tl.float32)
            am = tl.full([M], -1, tl.int32)
            start = tl.load(off_ptr + b64)
            length = (tl.load(off_ptr + b64 + 1) - start).to(tl.int32)
            # Ragged documents: the tile loop stops at each document's own length (no work on padding).
            for j0 in range(0, tl.where(live, length, 0), BLOCK_N):
                j = j0 + cols
                j_ok = j < length
                dt = tl.load(d_ptr + (start + j.to(tl.int64))[None, :] * stride_dl + k64[:, None] * stride_dd,
                             mask=j_ok[None, :] & k_ok[:, None], other=0.0)
                m, am = _maxsim_fwd_tile(qt, dt, j0, j, j_ok, i, na, bias_ptr, R, m, am, HAS_BIAS, UPCAST, IEEE)
            _maxsim_fwd_finish(m, am, valid, row_ok, a0, a64, i64, b - col_base, tchunk, nq_ptr, scores_ptr, argmax_ptr,
                               Bq, Lq, C, QB, M_TOK, MEAN)
    else:
        # One flat loop over (document, tile) steps rather than nested loops: it is the loop the software pipeliner
        # overlaps, so the next document's tiles load while this one is reduced (nested loops over a 1-2 tile
        # document would pipeline nothing), and unrolling tiles would multiply the registers held live.
        m = tl.full([M], float("-inf"), tl.float32)
        am = tl.full([M], -1, tl.int32)
        n_steps = tl.where(live, (b_hi - b_lo) * TILES, 0)
        for step in range(0, n_steps):
            tile = step % TILES
            b = b_lo + step // TILES
            b64 = tl.cast(b, tl.int64)
            first = tile == 0
            m = tl.where(first, float("-inf"), m)
            am = tl.where(first, -1, am)
            j0 = tile * BLOCK_N
            j = j0 + cols
            in_doc = j < Ld
            j64 = j.to(tl.int64)
            j_ok = in_doc
            if HAS_DMASK:
                j_ok = j_ok & (tl.load(dmask_ptr + b64 * stride_mb + j64 * stride_ml, mask=in_doc, other=0) != 0)
            dt = tl.load(d_ptr + b64 * stride_db + j64[None, :] * stride_dl + k64[:, None] * stride_dd,
                         mask=in_doc[None, :] & k_ok[:, None], other=0.0)
            m, am = _maxsim_fwd_tile(qt, dt, j0, j, j_ok, i, na, bias_ptr, R, m, am, HAS_BIAS, UPCAST, IEEE)
            if tile == TILES - 1:
                _maxsim_fwd_finish(m, am, valid, row_ok, a0, a64, i64, b - col_base, tchunk, nq_ptr, scores_ptr,
                                   argmax_ptr, Bq, Lq, C, QB, M_TOK, MEAN)
        # The documents of a program with no valid row (no step above ran): 0 partial scores, -1 argmax.
        for b in range(tl.where(live, b_hi, b_lo), b_hi):
            _maxsim_fwd_finish(m, am, valid, row_ok, a0, a64, i64, b - col_base, tchunk, nq_ptr, scores_ptr,
                               argmax_ptr, Bq, Lq, C, QB, M_TOK, MEAN)


@triton.jit
def _maxsim_fwd_tile(qt, dt, j0, j, j_ok, i, na, bias_ptr, R, m, am, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
                     IEEE: tl.constexpr):
    """Fold one document tile (dt: [D_PAD, BLOCK_N], token positions j) into the running max / argmax of the rows."""
    if UPCAST:
        dt = dt.to(tl.float32)
    if IEEE:
        s = tl.dot(qt, dt, input_precision="ieee")
    else:
        s = tl.dot(qt, dt)
    if HAS_BIAS:
        # r = clamp(n_a + j - i, 0, R - 1): a gather from the [R] table, which stays in L1.
        r = tl.minimum(tl.maximum(na[:, None] + j[None, :] - i[:, None], 0), R - 1)
        s += tl.load(bias_ptr + r)
    s = tl.where(j_ok[None, :], s, float("-inf"))
    tmax = tl.max(s, axis=1)
    targ = tl.argmax(s, axis=1, tie_break_left=True).to(tl.int32)  # lowest j among equal values in this tile
    upd = tmax > m  # strict: an equal value in a later tile never beats the earlier (lower) j
    m = tl.where(upd, tmax, m)
    am = tl.where(upd, targ + j0, am)
    return m, am


@triton.jit
def _maxsim_fwd_finish(m, am, valid, row_ok, a0, a64, i64, col, tchunk, nq_ptr, scores_ptr, argmax_ptr, Bq, Lq, C,
                       QB: tl.constexpr, M_TOK: tl.constexpr, MEAN: tl.constexpr):
    """Reduce a finished document's rows per query and store its scores and argmax."""
    # Masked query tokens add nothing; an empty document leaves m = -inf on valid rows, so its score is -inf
    # (and a query with no valid token sums nothing: 0).
    contrib = tl.where(valid, m, 0.0)
    score = tl.sum(tl.reshape(contrib, [QB, M_TOK]), axis=1)
    qa = a0 + tl.arange(0, QB)
    if MEAN:
        nqa = tl.load(nq_ptr + qa.to(tl.int64), mask=qa < Bq, other=1)
        score = score / tl.maximum(nqa, 1).to(tl.float32)
    col64 = tl.cast(col, tl.int64)
    tl.store(scores_ptr + tl.cast(tchunk, tl.int64) * Bq * C + qa.to(tl.int64) * C + col64, score, mask=qa < Bq)
    tl.store(argmax_ptr + (a64 * C + col64) * Lq + i64, tl.where(valid, am, -1), mask=row_ok)


def _pos_bias_f32(pos_bias):
    return pos_bias.to(torch.float32).contiguous()


def _u8(mask):
    return mask.view(torch.uint8)


def _qperm(q_mask):
    """int32 [Bq, Lq]: each query's valid token indices in order, then its masked ones (the kernels' row order)."""
    return torch.argsort((~q_mask).to(torch.int8), dim=1, stable=True).to(torch.int32).contiguous()


def _nonempty(d):
    """A zero-size d has no valid pointer to pass; every load of it is masked off, so one dummy element stands in."""
    return d if d.numel() > 0 else torch.zeros((1,) * d.dim(), dtype=d.dtype, device=d.device)


def _fwd_config(Bq, Lq, Ld_tile, D_PAD, n_docs_per_q, grouped, dtype, interp, device):
    """(QB, M_TOK, BLOCK_N, docs_per_prog, num_warps, num_stages) for this problem.

    GPU choices were checked offline by compiling for sm_90 (registers, spills, wgmma vs mma, cp.async pipelining;
    see the design note), not timed: no GPU was available when they were written.
    """
    M_TOK = min(_np2(Lq), MAX_TOK)
    if grouped:
        M_TOK = max(M_TOK, 16)  # tl.dot needs M >= 16 and a grouped block holds a single query
        QB = 1
    if interp:
        # Cost is programs x loop steps: every query in one block (up to 256 rows), whole documents per tile,
        # all documents in one program.
        if not grouped:
            QB = max(1, min(_np2(Bq), 256 // M_TOK))
        BLOCK_N = max(16, min(_np2(Ld_tile), 256))
        return QB, M_TOK, BLOCK_N, max(1, n_docs_per_q), 4, 1
    fp32 = dtype == torch.float32
    if not grouped:
        # HBM regime (few query rows): one block holds all queries so each document is read from HBM exactly once.
        # Compute regime: 128 rows per block (4 queries of 32 tokens): a 128 x BLOCK_N x D wgmma per loaded tile.
        # fp32 ("ieee") dots run on FMA units with both operands in registers: keep them at 32 x 32.
        QB = max(1, min(_np2(Bq), max(1, (32 if fp32 else 128) // M_TOK)))
        QB = max(QB, 16 // M_TOK)
    M = QB * M_TOK
    # HBM regime: a whole 128-token document per tile (one 32 KiB load at d = 128). Compute regime: M = 128 rows x
    # 64 tokens, a 32 KiB fp32 score tile (32 registers per thread with 8 warps) next to the resident q block.
    BLOCK_N = 128 if (M <= 64 and D_PAD <= 128) else 64
    if D_PAD >= 256 or fp32:
        BLOCK_N = 32
    BLOCK_N = max(16, min(BLOCK_N, _np2(Ld_tile)))
    n_qblocks = _cdiv(Bq, QB) * _cdiv(Lq, M_TOK) if not grouped else Bq * _cdiv(Lq, M_TOK)
    # Several waves of programs over the SMs, but enough documents per program to amortise loading q.
    n_sm = _num_sms(device)
    target = 8 * n_sm
    docs_per_prog = max(1, min(64, _cdiv(n_docs_per_q * n_qblocks, target)))
    # sm_90 compiles: 8 warps keep every configuration above under ~150 registers without spills (4 warps spill
    # with the bias gather at M = 32 x 128 tokens).
    num_warps = 8 if (M * BLOCK_N >= 4096 or D_PAD >= 128) else 4
    num_stages = 3 if D_PAD <= 128 else 2
    return QB, M_TOK, BLOCK_N, docs_per_prog, num_warps, num_stages


def _maxsim_fwd(q, d, q_mask, d_mask, d_offsets, pos_bias, group_size, mean):
    """Scores fp32 [Bq, C] and argmax int32 [Bq, C, Lq] (launcher contract of reatt_kernels.ops.maxsim)."""
    Bq, Lq, D = q.shape
    packed = d_offsets is not None
    grouped = group_size > 0
    Nd = d_offsets.shape[0] - 1 if packed else d.shape[0]
    C = group_size if grouped else Nd
    dev = q.device
    interp = _interpret() or dev.type == "cpu"
    if packed:
        lens = d_offsets[1:] - d_offsets[:-1]
        # Only the interpreter needs the longest document (to size one tile per document); the GPU path never syncs.
        Ld_tile = int(lens.max().item()) if (interp and Nd > 0) else 128
        Ld = 0
    else:
        Ld = d.shape[1]
        Ld_tile = Ld
    D_PAD = max(16, _np2(D))
    QB, M_TOK, BLOCK_N, docs_per_prog, num_warps, num_stages = _fwd_config(
        Bq, Lq, Ld_tile, D_PAD, C, grouped, q.dtype, interp, dev)
    n_tchunks = _cdiv(Lq, M_TOK)
    n_qblocks = (Bq if grouped else _cdiv(Bq, QB)) * n_tchunks
    n_dchunks = _cdiv(C, docs_per_prog)

    if not packed and Ld == 0:
        # Documents without token slots: -inf for every query with a valid token, 0 for the others; nothing to launch.
        nq = q_mask.sum(1)
        scores = torch.zeros((Bq, 1), dtype=torch.float32, device=dev).masked_fill((nq > 0)[:, None], float("-inf"))
        return scores.expand(Bq, C).contiguous(), torch.full((Bq, C, Lq), -1, dtype=torch.int32, device=dev)
    scores = empty((Bq, C), torch.float32, dev) if n_tchunks == 1 else empty((n_tchunks, Bq, C), torch.float32, dev)
    argmax = empty((Bq, C, Lq), torch.int32, dev)
    qmask = _u8(q_mask.contiguous())
    nq = q_mask.sum(1, dtype=torch.int32)
    qperm = _qperm(q_mask)
    bias = _pos_bias_f32(pos_bias) if pos_bias is not None else nq  # dummy pointer when there is no bias
    dmask = _u8(d_mask) if d_mask is not None else qmask
    off = d_offsets if packed else nq
    if packed:
        s_db, s_dl, s_dd = 0, d.stride(0), d.stride(1)
    else:
        s_db, s_dl, s_dd = d.stride(0), d.stride(1), d.stride(2)
    s_mb, s_ml = (dmask.stride(0), dmask.stride(1)) if d_mask is not None and d_mask.numel() > 0 else (0, 0)
    if d_mask is not None and d_mask.numel() == 0:
        dmask = qmask
    grid = (n_qblocks * n_dchunks,)
    _maxsim_fwd_kernel[grid](
        q, _nonempty(d), qperm, dmask, off, bias, nq, scores, argmax,
        Bq, Lq, Ld, D, C, pos_bias.shape[0] if pos_bias is not None else 1, Nd, group_size, docs_per_prog,
        n_qblocks, n_tchunks,
        q.stride(0), q.stride(1), q.stride(2),
        s_db, s_dl, s_dd,
        s_mb, s_ml,
        QB=QB, M_TOK=M_TOK, BLOCK_N=BLOCK_N, D_PAD=D_PAD, TILES=_cdiv(Ld, BLOCK_N),
        PACKED=packed, GROUPED=grouped, HAS_DMASK=d_mask is not None, HAS_BIAS=pos_bias is not None,
        MEAN=mean, UPCAST=interp, IEEE=(q.dtype == torch.float32 or interp),
        num_warps=num_warps, num_stages=num_stages,
    )
    if n_tchunks > 1:
        scores = scores.sum(0)  # token chunks of long queries, added in a fixed order
    return scores, argmax


# ---- backward ----------------------------------------------------------------------------------------------------------
@triton.jit
def _maxsim_bwd_dq_kernel(
    grad_ptr, q_ptr, d_ptr, off_ptr, argmax_ptr, nq_ptr, qperm_ptr, dqp_ptr, dd32_ptr,
    Bq, Lq, Ld, D, C, group_size, cols_per_prog, n_tchunks,
    stride_gb, stride_gc,
    stride_qb, stride_ql, stride_qd,
    stride_db, stride_dl, stride_dd,
    BLOCK_C: tl.constexpr, M_TOK: tl.constexpr, D_PAD: tl.constexpr,
    PACKED: tl.constexpr, GROUPED: tl.constexpr, MEAN: tl.constexpr, ATOMIC_DD: tl.constexpr,
):
    """Partial dq[chunk, a, i, :] (a gather through the argmax) and, in the atomic mode, the dd scatter, for one
    query token chunk x one column chunk.

    A step takes BLOCK_C columns at once (rows = BLOCK_C x M_TOK): the argmax -> gather chain is two dependent
    memory round trips, so a step's bytes in flight (rows x D x elt, 16 KiB at 128 rows x d 64 bf16) set the
    achieved bandwidth. Per (query, column, token): 4 B argmax + D x elt gathered; the atomic mode adds D fp32 atomics.
    """
    R: tl.constexpr = BLOCK_C * M_TOK
    pid = tl.program_id(0)
    n_qprog = Bq * n_tchunks
    qprog = pid % n_qprog
    cchunk = pid // n_qprog
    a = qprog // n_tchunks
    i0 = (qprog % n_tchunks) * M_TOK
    rows = tl.arange(0, R)
    cr = rows // M_TOK  # column offset of each row inside a step (rows are column-major: c * M_TOK + i)
    pk = i0 + rows % M_TOK  # packed position: valid tokens first
    a64 = tl.cast(a, tl.int64)
    na = tl.load(nq_ptr + a64)
    row_ok = pk < na  # a masked row's argmax entries are never read: its dq stays 0
    i = tl.load(qperm_ptr + a64 * Lq + pk.to(tl.int64), mask=pk < Lq, other=0)  # original token index
    i64 = i.to(tl.int64)
    k = tl.arange(0, D_PAD)
    k_ok = k < D
    k64 = k.to(tl.int64)
    if ATOMIC_DD:
        # Kept in the input dtype (half the registers of fp32); rows repeat q[a, i] once per column of a step.
        qt = tl.load(q_ptr + a64 * stride_qb + i64[:, None] * stride_ql + k64[None, :] * stride_qd,
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    acc = tl.zeros([M_TOK, D_PAD], tl.float32)
    c_lo = cchunk * cols_per_prog
    c_hi = tl.minimum(c_lo + cols_per_prog, C)
    c_hi = tl.where(i0 < na, c_hi, c_lo)  # a token chunk with no valid row: no column step (its partial dq is 0)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        c = c0 + cr
        c_ok = c < c_hi
        c64 = c.to(tl.int64)
        g = tl.load(grad_ptr + a64 * stride_gb + c64 * stride_gc, mask=c_ok, other=0.0)
        if MEAN:
            g = g / tl.maximum(na, 1).to(tl.float32)
        if GROUPED:
            doc = a64 * group_size + c64
        else:
            doc = c64
        am = tl.load(argmax_ptr + (a64 * C + c64) * Lq + i64, mask=c_ok & row_ok, other=-1)
        ok = am >= 0  # -1: masked query token, empty document, or a padding row of this step
        am64 = tl.maximum(am, 0).to(tl.int64)
        if PACKED:
            row = tl.load(off_ptr + doc, mask=ok, other=0) + am64  # token row in [T, D]
            dptr = d_ptr + row[:, None] * stride_dl + k64[None, :] * stride_dd
        else:
            row = doc * Ld + am64  # token row of the contiguous dd buffer [Nd * Ld, D]
            dptr = d_ptr + doc[:, None] * stride_db + am64[:, None] * stride_dl + k64[None, :] * stride_dd
        drow = tl.load(dptr, mask=ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        contrib = tl.where(ok[:, None], g[:, None] * drow, 0.0)
        acc += tl.sum(tl.reshape(contrib, [BLOCK_C, M_TOK, D_PAD]), axis=0)
        if ATOMIC_DD:
            tl.atomic_add(dd32_ptr + row[:, None] * D + k64[None, :], g[:, None] * qt.to(tl.float32),
                          mask=ok[:, None] & k_ok[None, :], sem="relaxed")
    dq_p = i0 + tl.arange(0, M_TOK)
    dq_rows = tl.load(qperm_ptr + a64 * Lq + dq_p.to(tl.int64), mask=dq_p < Lq, other=0)  # back to the token order
    tl.store(dqp_ptr + ((cchunk.to(tl.int64) * Bq + a64) * Lq + dq_rows.to(tl.int64)[:, None]) * D + k64[None, :], acc,
             mask=(dq_p < Lq)[:, None] & k_ok[None, :])


@triton.jit
def _maxsim_bwd_dbias_kernel(
    grad_ptr, argmax_ptr, nq_ptr, qperm_ptr, dbp_ptr,
    Bq, Lq, C, R, cols_per_prog, n_tchunks,
    stride_gb, stride_gc,
    M_TOK: tl.constexpr, NB: tl.constexpr, MEAN: tl.constexpr,
):
    """Partial dpos_bias[pid, :] for one query token chunk x one column chunk: a weighted histogram of the winning
    distances r = clamp(n_a + argmax - i, 0, R - 1), kept as [M_TOK, NB] fp32 counters in registers and reduced over
    rows once at the end (no atomics, so it is deterministic). Per (query, column): M_TOK argmax ints read (4 B each,
    contiguous) and M_TOK x NB compares."""
    pid = tl.program_id(0)
    n_qprog = Bq * n_tchunks
    qprog = pid % n_qprog
    cchunk = pid // n_qprog
    a = qprog // n_tchunks
    p0 = (qprog % n_tchunks) * M_TOK
    pk = p0 + tl.arange(0, M_TOK)  # packed position: valid tokens first
    a64 = tl.cast(a, tl.int64)
    na = tl.load(nq_ptr + a64)
    row_ok = pk < na  # masked rows: no entry read
    i = tl.load(qperm_ptr + a64 * Lq + pk.to(tl.int64), mask=pk < Lq, other=0)  # original token index
    i64 = i.to(tl.int64)
    bins = tl.arange(0, NB)
    hist = tl.zeros([M_TOK, NB], tl.float32)
    c_lo = cchunk * cols_per_prog
    c_hi = tl.minimum(c_lo + cols_per_prog, C)
    c_hi = tl.where(p0 < na, c_hi, c_lo)  # a token chunk with no valid row reads nothing
    for c in range(c_lo, c_hi):
        c64 = tl.cast(c, tl.int64)
        g = tl.load(grad_ptr + a64 * stride_gb + c64 * stride_gc)
        if MEAN:
            g = g / tl.maximum(na, 1).to(tl.float32)
        am = tl.load(argmax_ptr + (a64 * C + c64) * Lq + i64, mask=row_ok, other=-1)
        r = tl.minimum(tl.maximum(na + am - i, 0), R - 1)
        hit = (am >= 0)[:, None] & (r[:, None] == bins[None, :])
        hist += tl.where(hit, g, 0.0)
    tl.store(dbp_ptr + pid.to(tl.int64) * NB + bins, tl.sum(hist, axis=0))


@triton.jit
def _maxsim_bwd_dd_kernel(
    grad_ptr, q_ptr, off_ptr, argmax_ptr, nq_ptr, qperm_ptr, dd_ptr,
    Bq, Lq, Ld, D, C, group_size, n_tiles,
    stride_gb, stride_gc,
    stride_qb, stride_ql, stride_qd,
    BLOCK_N: tl.constexpr, LQ_T: tl.constexpr, D_PAD: tl.constexpr,
    PACKED: tl.constexpr, GROUPED: tl.constexpr, MEAN: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """Deterministic dd for one document tile: dd[b, j] = sum_a w[a, b] * (onehot(argmax[a, b, :] == j) @ q[a]),
    queries in a fixed order, written once in dd's dtype.

    Per (tile, query): reads Lq argmax ints + Lq * D q elements (L2-resident), 2 * BLOCK_N * Lq * D tensor-core FLOPs.
    """
    pid = tl.program_id(0)
    b = pid // n_tiles
    b64 = tl.cast(b, tl.int64)
    tile = pid % n_tiles
    j = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, D_PAD)
    k_ok = k < D
    k64 = k.to(tl.int64)
    if PACKED:
        start = tl.load(off_ptr + b64)
        length = (tl.load(off_ptr + b64 + 1) - start).to(tl.int32)
        row = start + j.to(tl.int64)
    else:
        length = Ld
        row = b64 * Ld + j.to(tl.int64)
    j_ok = j < length
    if GROUPED:
        a_lo = b // group_size
        a_hi = a_lo + 1
        col = (b % group_size).to(tl.int64)
    else:
        a_lo = 0
        a_hi = Bq
        col = b64
    # A tile past the end of a short packed document: nothing to do, nothing to write.
    a_hi = tl.where(tile * BLOCK_N >= length, a_lo, a_hi)
    acc = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    for a in range(a_lo, a_hi):
        a64 = tl.cast(a, tl.int64)
        g = tl.load(grad_ptr + a64 * stride_gb + col * stride_gc)
        na = tl.load(nq_ptr + a64)
        if MEAN:
            g = g / tl.maximum(na, 1).to(tl.float32)
        part = tl.zeros([BLOCK_N, D_PAD], tl.float32)
        # The query's n_a valid tokens only (packed first by qperm): masked tokens cost no one-hot dot.
        for i0 in range(0, na, LQ_T):
            pk = i0 + tl.arange(0, LQ_T)
            i_ok = pk < na
            i64 = tl.load(qperm_ptr + a64 * Lq + pk.to(tl.int64), mask=i_ok, other=0).to(tl.int64)
            am = tl.load(argmax_ptr + (a64 * C + col) * Lq + i64, mask=i_ok, other=-1)
            qt = tl.load(q_ptr + a64 * stride_qb + i64[:, None] * stride_ql + k64[None, :] * stride_qd,
                         mask=i_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:
                qt = qt.to(tl.float32)
            onehot = (j[:, None] == am[None, :]).to(qt.dtype)  # exact in every dtype; -1 never matches
            if IEEE:
                part += tl.dot(onehot, qt, input_precision="ieee")
            else:
                part += tl.dot(onehot, qt)
        acc += g * part  # w applied in fp32 after the exact one-hot sum
    tl.store(dd_ptr + row[:, None] * D + k64[None, :], acc.to(dd_ptr.dtype.element_ty),
             mask=j_ok[:, None] & k_ok[None, :])


def _bwd_config(Bq, Lq, C, ld_max, D_PAD, NB, dtype, interp, device):
    """Launch parameters of the three backward kernels (a dict). GPU choices checked by sm_90 compiles, not timed."""
    cfg = {}
    # dq kernel (no dot): rows are independent gathers; ~128 rows per step (BLOCK_C columns x M_TOK tokens).
    cfg["M_TOK"] = min(_np2(Lq), MAX_TOK if interp else (32 if D_PAD <= 128 else 16))
    rows = 512 if interp else (128 if D_PAD <= 64 else (64 if D_PAD <= 128 else 32))
    cfg["BLOCK_C"] = max(1, rows // cfg["M_TOK"])
    # dbias kernel: its [M_TOK, NB] counters live in registers.
    cfg["M_TOK_B"] = min(_np2(Lq), MAX_TOK, max(1, MAX_HIST // NB))
    # The one-hot dot's K (tl.dot needs K >= 16); longer queries loop over token chunks inside the dd kernel.
    cfg["LQ_T"] = max(16, min(_np2(Lq), MAX_TOK if interp else 64))
    if interp:
        cfg["BLOCK_C"] = min(cfg["BLOCK_C"], _np2(C))
        cfg.update(n_cchunks=1, n_cchunks_b=1, warps=4, BLOCK_N=max(16, min(_np2(ld_max), 256)))
        return cfg
    # Enough programs for a few waves over the SMs, few enough that the partial dq / dbias buffers stay small.
    n_sm = _num_sms(device)
    dq_cap = max(1, min(512, (1 << 24) // max(1, Bq * Lq * D_PAD)))  # partial dq buffer <= 64 MiB
    cfg["n_cchunks"] = max(1, min(_cdiv(4 * n_sm, Bq * _cdiv(Lq, cfg["M_TOK"])), _cdiv(C, 4 * cfg["BLOCK_C"]), dq_cap))
    cfg["n_cchunks_b"] = max(1, min(_cdiv(4 * n_sm, Bq * _cdiv(Lq, cfg["M_TOK_B"])), _cdiv(C, 16), 512))
    # dd: 128-token tiles halve the L2 re-reads of q[a] (one per tile and query) against 64-token tiles; fp32
    # ("ieee") dots hold both operands in registers, so they get 32-token tiles.
    BLOCK_N = 32 if dtype == torch.float32 else (128 if D_PAD <= 128 else 64)
    cfg.update(warps=8, BLOCK_N=max(16, min(_np2(ld_max), BLOCK_N)))
    return cfg


def _chunks(C, n_chunks):
    cols = _cdiv(C, n_chunks)
    return cols, _cdiv(C, cols)


def _maxsim_bwd(grad, q, d, q_mask, d_offsets, argmax, n_bias, group_size, mean, deterministic):
    """dq like q, dd like d (contiguous, input dtypes), dbias fp32 [n_bias] (launcher contract of ops.maxsim)."""
    Bq, Lq, D = q.shape
    C = argmax.shape[1]
    packed = d_offsets is not None
    grouped = group_size > 0
    dev = q.device
    interp = _interpret() or dev.type == "cpu"
    Nd = d_offsets.shape[0] - 1 if packed else d.shape[0]
    Ld = 0 if packed else d.shape[1]
    ntok = d.shape[0] if packed else Nd * Ld
    D_PAD = max(16, _np2(D))
    nq = q_mask.sum(1, dtype=torch.int32)
    qperm = _qperm(q_mask)
    grad = grad.to(torch.float32)
    ld_max = Ld
    if packed:
        ld_max = int((d_offsets[1:] - d_offsets[:-1]).max().item()) if Nd > 0 else 0
    # Distances r = clamp(n_a + j - i, 0, R - 1) never exceed Lq + Ld_max - 1: only those bins need a counter.
    n_bins = min(n_bias, Lq + ld_max) if n_bias > 0 else 0
    NB = _np2(n_bins) if n_bins > 0 else 1
    kernel_bias = n_bins > 0 and NB <= MAX_HIST
    cfg = _bwd_config(Bq, Lq, C, ld_max, D_PAD, NB, q.dtype, interp, dev)
    off = d_offsets if packed else nq
    if packed:
        s_db, s_dl, s_dd = 0, d.stride(0), d.stride(1)
    else:
        s_db, s_dl, s_dd = d.stride(0), d.stride(1), d.stride(2)

    # dq (+ the atomic dd scatter).
    n_tchunks = _cdiv(Lq, cfg["M_TOK"])
    cols_per_prog, n_cchunks = _chunks(C, cfg["n_cchunks"])
    dqp = empty((n_cchunks, Bq, Lq, D), torch.float32, dev)
    atomic = not deterministic and ntok > 0
    dd32 = torch.zeros((ntok, D), dtype=torch.float32, device=dev) if atomic else dqp
    _maxsim_bwd_dq_kernel[(Bq * n_tchunks * n_cchunks,)](
        grad, q, _nonempty(d), off, argmax, nq, qperm, dqp, dd32,
        Bq, Lq, Ld, D, C, group_size, cols_per_prog, n_tchunks,
        grad.stride(0), grad.stride(1),
        q.stride(0), q.stride(1), q.stride(2),
        s_db, s_dl, s_dd,
        BLOCK_C=cfg["BLOCK_C"], M_TOK=cfg["M_TOK"], D_PAD=D_PAD,
        PACKED=packed, GROUPED=grouped, MEAN=mean, ATOMIC_DD=atomic,
        num_warps=cfg["warps"],
    )
    dq = (dqp.sum(0) if n_cchunks > 1 else dqp[0]).to(q.dtype)  # chunks added in a fixed order

    # dd.
    if deterministic:
        dd = empty(d.shape, d.dtype, dev)
        if ntok > 0 and Nd > 0:
            BLOCK_N = cfg["BLOCK_N"]
            n_tiles = max(1, _cdiv(ld_max, BLOCK_N))
            _maxsim_bwd_dd_kernel[(Nd * n_tiles,)](
                grad, q, off, argmax, nq, qperm, dd,
                Bq, Lq, Ld, D, C, group_size, n_tiles,
                grad.stride(0), grad.stride(1),
                q.stride(0), q.stride(1), q.stride(2),
                BLOCK_N=BLOCK_N, LQ_T=cfg["LQ_T"], D_PAD=D_PAD,
                PACKED=packed, GROUPED=grouped, MEAN=mean, UPCAST=interp,
                IEEE=(q.dtype == torch.float32 or interp),
                num_warps=cfg["warps"],
            )
    elif atomic:
        dd = dd32.to(d.dtype).reshape(d.shape)
    else:
        dd = torch.zeros(d.shape, dtype=d.dtype, device=dev)

    # dpos_bias.
    if n_bias == 0:
        dbias = torch.zeros((0,), dtype=torch.float32, device=dev)
    elif kernel_bias:
        M_TOK_B = cfg["M_TOK_B"]
        n_tchunks_b = _cdiv(Lq, M_TOK_B)
        cols_b, n_cchunks_b = _chunks(C, cfg["n_cchunks_b"])
        n_prog = Bq * n_tchunks_b * n_cchunks_b
        dbp = empty((n_prog, NB), torch.float32, dev)
        _maxsim_bwd_dbias_kernel[(n_prog,)](
            grad, argmax, nq, qperm, dbp,
            Bq, Lq, C, n_bias, cols_b, n_tchunks_b,
            grad.stride(0), grad.stride(1),
            M_TOK=M_TOK_B, NB=NB, MEAN=mean,
            num_warps=cfg["warps"],
        )
        dbias = torch.zeros((n_bias,), dtype=torch.float32, device=dev)
        dbias[:n_bins] = dbp.sum(0)[:n_bins]  # per-program histograms added in a fixed order
    else:
        dbias = _dbias_torch(grad, q_mask, nq, argmax, n_bias, mean)
    return dq, dd, dbias


def _dbias_torch(grad, q_mask, nq, argmax, n_bias, mean):
    """dpos_bias when the kernel's histogram would not fit in registers (M_TOK x live bins > MAX_HIST): materialises
    [Bq, C, Lq] indices once and uses torch's deterministic index_add."""
    Bq, C, Lq = argmax.shape
    w = grad / nq.clamp(min=1).to(torch.float32)[:, None] if mean else grad
    valid = argmax >= 0
    r = (nq[:, None, None] + argmax - torch.arange(Lq, device=argmax.device)[None, None, :]).clamp(0, n_bias - 1)
    W = w[:, :, None].expand(Bq, C, Lq)
    out = torch.zeros((n_bias,), dtype=torch.float32, device=grad.device)
    with deterministic_algorithms():
        out.index_add_(0, r[valid].long(), W[valid])
    return out


def _maxsim_not_supported_reasons(tensors, dim=None, layout=None, n_q=None, **facts):
    """Why the Triton kernels cannot run these inputs (``tensors`` are TensorSpecs; facts from the public API)."""
    reasons = []
    if dim is not None and dim > MAX_DIM:
        reasons.append(f"dim {dim} > {MAX_DIM} (the Triton kernels hold the whole padded dim in one tile)")
    t = next((t for t in tensors if t is not None), None)
    if t is not None and t.device == "cuda" and not _interpret():
        major, _ = torch.cuda.get_device_capability()
        if major < 8 and any(x is not None and x.dtype == torch.bfloat16 for x in tensors):
            reasons.append(f"bf16 tl.dot needs compute capability >= 8.0, this GPU is sm_{major}x")
    return reasons
