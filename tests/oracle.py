r"""The float64 oracle: every op's semantics re-derived from the spec docstrings, for the tests to judge every backend.

Written from the docstrings of ``reatt_kernels/reference/maxsim.py``, ``reference/distill.py`` and
``index/reference.py`` (the spec), deliberately without importing anything from ``reatt_kernels``: the ``torch``
backend *is* the reference code, so checking it against itself would prove nothing. The style differs on purpose
(per-query loops, explicit first-index tie breaking, explicit gradient formulas instead of autograd), so a bug shared
by the reference and a kernel has no second copy here.

Each function returns the exact value (float64, computed on the same already-rounded inputs the kernel saw) and an
error *magnitude*: the sum of the absolute values of the terms a float32 evaluation would accumulate. Every kernel
accumulates in fp32, so its error is at most a few fp32 ulps times that magnitude (the error model lives in
``tests/utils.py``). Magnitudes of linear maps (sums, the MaxSim backward) are the same map applied to absolute values;
for exp/log they are first-order condition numbers.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

F64 = torch.float64


def f64(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach().to(device="cpu", dtype=F64)


def _cpu(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach().cpu()


# ---- MaxSim --------------------------------------------------------------------------------------------------------
def _query_docs(layout: str, d: Tensor, d_mask: Optional[Tensor], d_offsets: Optional[Tensor], a: int):
    """The documents query ``a`` is scored against, as a padded block.

    Returns tokens [C, Lmax, D] (f64), valid bool [C, Lmax] and flat int64 [C, Lmax]: the row of each token in
    ``d.reshape(-1, D)`` (where its gradient goes), -1 on padding. ``j`` is the token's position in its document.
    """
    D = d.shape[-1]
    if layout == "padded":
        Nd, Ld = d.shape[0], d.shape[1]
        valid = d_mask.clone() if d_mask is not None else torch.ones(Nd, Ld, dtype=torch.bool)
        flat = torch.arange(Nd * Ld).reshape(Nd, Ld)
        return d, valid, flat
    if layout == "grouped":
        _, n, Ld, _ = d.shape
        valid = d_mask[a].clone() if d_mask is not None else torch.ones(n, Ld, dtype=torch.bool)
        flat = (a * n + torch.arange(n))[:, None] * Ld + torch.arange(Ld)[None, :]
        return d[a], valid, flat
    assert layout == "packed"
    off = [int(x) for x in d_offsets]
    Nd = len(off) - 1
    lens = [off[b + 1] - off[b] for b in range(Nd)]
    Lmax = max(lens, default=0)
    toks = torch.zeros(Nd, Lmax, D, dtype=F64)
    valid = torch.zeros(Nd, Lmax, dtype=torch.bool)
    flat = torch.full((Nd, Lmax), -1, dtype=torch.int64)
    for b in range(Nd):
        toks[b, : lens[b]] = d[off[b] : off[b + 1]]
        valid[b, : lens[b]] = True
        flat[b, : lens[b]] = torch.arange(off[b], off[b + 1])
    return toks, valid, flat


def maxsim_oracle(layout: str, q: Tensor, d: Tensor, q_mask: Optional[Tensor] = None, d_mask: Optional[Tensor] = None,
                  d_offsets: Optional[Tensor] = None, pos_bias: Optional[Tensor] = None, reduce: str = "sum",
                  grad: Optional[Tensor] = None) -> dict:
    """MaxSim in float64 for one public layout ("padded", "packed" or "grouped"; shapes as in the public API).

    score(a, b) = sum_{i valid} max_{j valid} (q[a,i] . d[b,j] + pos_bias[clamp(n_a + j - i, 0, R - 1)]); "mean"
    divides by n_a. Ties go to the lowest j. An empty document scores -inf (0 for a query with no valid token).

    Returns a dict: ``score`` [Bq, C], ``argmax`` int64 [Bq, C, Lq] (-1 for masked query tokens / empty documents),
    ``mag`` [Bq, C]. With ``grad`` [Bq, C] (entries of -inf scores are ignored): ``dq`` [Bq, Lq, D], ``dd`` (d's
    shape), ``dbias`` [R] and their magnitudes ``mag_dq``, ``mag_dd``, ``mag_dbias``.
    """
    q, d, pb = f64(q), f64(d), f64(pos_bias)
    Bq, Lq, D = q.shape
    qm = _cpu(q_mask) if q_mask is not None else torch.ones(Bq, Lq, dtype=torch.bool)
    dm, off = _cpu(d_mask), _cpu(d_offsets)
    C = d.shape[1] if layout == "grouped" else (off.numel() - 1 if layout == "packed" else d.shape[0])
    score = torch.zeros(Bq, C, dtype=F64)
    mag = torch.zeros(Bq, C, dtype=F64)
    argmax = torch.full((Bq, C, Lq), -1, dtype=torch.int64)
    g = f64(grad)
    if g is not None:
        dq = torch.zeros(Bq, Lq, D, dtype=F64)
        mag_dq = torch.zeros_like(dq)
        dd = torch.zeros(d.numel() // max(D, 1), D, dtype=F64)
        mag_dd = torch.zeros_like(dd)
        R = pb.numel() if pb is not None else 0
        dbias = torch.zeros(R, dtype=F64)
        mag_dbias = torch.zeros(R, dtype=F64)
        n_dq, n_dd, n_dbias = torch.zeros(Bq, Lq, 1, dtype=F64), torch.zeros(dd.shape[0], 1, dtype=F64), torch.zeros(R)
    for a in range(Bq):
        toks, valid, flat = _query_docs(layout, d, dm, off, a)
        Lmax = toks.shape[1]
        n_a = int(qm[a].sum())
        i = torch.arange(Lq)[:, None]
        j = torch.arange(Lmax)[None, :]
        s = torch.einsum("id,cjd->cij", q[a], toks)  # [C, Lq, Lmax]
        s_abs = torch.einsum("id,cjd->cij", q[a].abs(), toks.abs())
        if pb is not None:
            r = (n_a + j - i).clamp(0, pb.numel() - 1)  # [Lq, Lmax]
            s = s + pb[r]
            s_abs = s_abs + pb[r].abs()
        s = s.masked_fill(~valid[:, None, :], float("-inf"))
        best = s.amax(-1) if Lmax > 0 else torch.full((C, Lq), float("-inf"), dtype=F64)
        # Lowest j among the maxima, stated directly (not trusting any library's argmax tie rule).
        cand = torch.where(s == best[..., None], j.expand_as(s), torch.full_like(s, Lmax, dtype=torch.int64))
        am = cand.amin(-1) if Lmax > 0 else torch.zeros(C, Lq, dtype=torch.int64)
        has_winner = torch.isfinite(best) & qm[a][None, :]
        am = torch.where(has_winner, am, torch.full_like(am, -1))
        argmax[a] = am
        contrib = torch.where(qm[a][None, :], best, torch.zeros_like(best))
        score[a] = contrib.sum(-1)
        if Lmax > 0:
            # The largest |terms| over all valid j, not only the winner's: a kernel may pick another j of a near-tie,
            # and its value is then within that j's rounding error of the maximum.
            a_best = s_abs.masked_fill(~valid[:, None, :], 0.0).amax(-1)
            mag[a] = torch.where(has_winner, a_best, torch.zeros_like(a_best)).sum(-1)
        if reduce == "mean":
            score[a] /= max(n_a, 1)
            mag[a] /= max(n_a, 1)
        if g is None:
            continue
        for c in range(C):
            w = float(g[a, c]) if math.isfinite(float(score[a, c])) else 0.0
            if reduce == "mean":
                w /= max(n_a, 1)
            for ii in range(Lq):
                jj = int(am[c, ii])
                if jj < 0:
                    continue
                row = int(flat[c, jj])
                dq[a, ii] += w * toks[c, jj]
                mag_dq[a, ii] += abs(w) * toks[c, jj].abs()
                n_dq[a, ii] += 1
                dd[row] += w * q[a, ii]
                mag_dd[row] += abs(w) * q[a, ii].abs()
                n_dd[row] += 1
                if R:
                    rr = min(max(n_a + jj - ii, 0), R - 1)
                    dbias[rr] += w
                    mag_dbias[rr] += abs(w)
                    n_dbias[rr] += 1
    out = dict(score=score, argmax=argmax, mag=mag)
    if g is not None:
        # Gradients are long fp32 sums (dbias[R - 1] may collect every clamped pair): their rounding error grows like
        # sqrt(number of terms) x sum |terms| x u in practice (n x ... in the worst case), so the magnitude carries it.
        mag_dq *= n_dq.clamp(min=1).sqrt()
        mag_dd *= n_dd.clamp(min=1).sqrt()
        mag_dbias *= n_dbias.clamp(min=1).sqrt()
        out.update(dq=dq, mag_dq=mag_dq, dd=dd.reshape(d.shape), mag_dd=mag_dd.reshape(d.shape), dbias=dbias,
                   mag_dbias=mag_dbias)
    return out


# ---- reader_teacher ------------------------------------------------------------------------------------------------
def reader_teacher_oracle(attn: Tensor, doc_index: Tensor, attn_mask: Optional[Tensor], n_docs: int,
                          is_logits: bool) -> tuple[Tensor, Tensor]:
    """p_T [B, n_docs] and its magnitude, for attn [B, L, H, T, S].

    p = softmax over the valid tokens (is_logits) or attn renormalised over them; a row with no valid token (or no
    mass) contributes 0; p_T[b, k] = mean over the L*H*T rows of the mass on document k's tokens.
    """
    x = f64(attn)
    B, L, H, T, S = x.shape
    valid = _cpu(doc_index) >= 0
    if attn_mask is not None:
        valid = valid & _cpu(attn_mask)
    v = valid[:, None, None, None, :].expand_as(x)
    if is_logits:
        live = v & (x > float("-inf"))
        m = torch.where(live, x, torch.full_like(x, float("-inf"))).amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.where(live, torch.exp(x - m), torch.zeros_like(x))
        z = e.sum(-1, keepdim=True)
        p = torch.where(z > 0, e / z, torch.zeros_like(e))
        # exp(x - m) / z: relative error ~ u (|x - m| + |log z| + a few) per element
        cond = torch.where(live, (x - m).abs() + torch.log(z.clamp(min=1e-300)).abs() + 2, torch.zeros_like(x))
        p_mag = p * cond
    else:
        e = torch.where(v, x, torch.zeros_like(x))
        z = e.sum(-1, keepdim=True)
        p = torch.where(z > 0, e / z, torch.zeros_like(e))
        p_mag = 2 * p
    R = max(L * H * T, 1)
    out = torch.zeros(B, n_docs, dtype=F64)
    mag = torch.zeros(B, n_docs, dtype=F64)
    doc = _cpu(doc_index).long()
    for k in range(n_docs):
        sel = (doc == k) & valid  # [B, S]
        out[:, k] = (p * sel[:, None, None, None, :]).sum((1, 2, 3, 4)) / R
        mag[:, k] = (p_mag * sel[:, None, None, None, :]).sum((1, 2, 3, 4)) / R
    return out, mag


# ---- distill_kl ----------------------------------------------------------------------------------------------------
def dense_teacher_oracle(teacher_probs: Tensor, teacher_cols: Tensor, M: int) -> Tensor:
    tp, tc = f64(teacher_probs), _cpu(teacher_cols).long()
    t = torch.zeros(tp.shape[0], M, dtype=F64)
    for b in range(tp.shape[0]):
        for k in range(tp.shape[1]):
            t[b, int(tc[b, k])] = tp[b, k]
    return t


def kl_oracle(student: Tensor, teacher: Tensor, reduction: str = "batchmean", normalize: bool = False,
              grad_out=1.0, student_err: Optional[Tensor] = None) -> dict:
    """KL(t || softmax(student)) per row, reduced; and d(reduced loss)/d student times ``grad_out``.

    loss[b] = sum_{j: t>0} t (log t - log_softmax(s)_j); d loss[b] / d s_j = T_b softmax_j - t_j (T_b = sum_j t).
    "batchmean" = sum / B, "sum", "mean" = sum / (B * M), "none" = [B]. ``student_err`` [B, M] (optional) is an
    absolute error already carried by the student (in fp32 ulps x magnitude units), propagated to first order.
    Returns loss, grad, mag_loss, mag_grad.
    """
    s, t = f64(student), f64(teacher)
    B, M = s.shape
    if normalize:
        z = t.sum(-1, keepdim=True)
        t = torch.where(z > 0, t / z, t)
    m = s.amax(-1, keepdim=True)
    e = torch.exp(s - m)  # exp(-inf) = 0: a -inf logit carries no probability
    zsum = e.sum(-1, keepdim=True)
    lse = m + torch.log(zsum)
    p = e / zsum
    pos = t > 0
    logp = torch.where(pos, s - lse, torch.zeros_like(s))
    logt = torch.log(torch.where(pos, t, torch.ones_like(t)))
    rows = torch.where(pos, t * (logt - logp), torch.zeros_like(t)).sum(-1)
    T = t.sum(-1, keepdim=True)
    grad_rows = T * p - t
    scale = {"batchmean": 1.0 / max(B, 1), "sum": 1.0, "mean": 1.0 / max(B * M, 1), "none": 1.0}[reduction]
    # first-order error of log_softmax_j: u (|s_j - m| + |log z| + 2); of p_j: the same, relative
    cond = torch.where(p > 0, (s - m).abs(), torch.zeros_like(s)) + m.abs() + torch.log(zsum).abs() + 2
    mag_rows = torch.where(pos, t * (logt.abs() + cond + (s - m).abs().nan_to_num(0.0)), torch.zeros_like(t)).sum(-1)
    mag_grad = T * p * cond + t
    if student_err is not None:
        err = torch.where(torch.isfinite(s), student_err, torch.zeros_like(s))
        mag_rows = mag_rows + (grad_rows.abs() * err).sum(-1)
        mag_grad = mag_grad + T * p * (err + (p * err).sum(-1, keepdim=True))
    go = f64(torch.as_tensor(grad_out))
    if reduction == "none":
        loss, mag_loss = rows, mag_rows
        gscale = go.reshape(-1, 1) if go.dim() else go
    else:
        loss, mag_loss = rows.sum() * scale, mag_rows.sum() * scale
        gscale = go * scale
    return dict(loss=loss, grad=grad_rows * gscale, mag_loss=mag_loss, mag_grad=mag_grad * gscale.abs())


def retrieval_distill_oracle(q, d, teacher, *, q_mask=None, d_mask=None, d_offsets=None, pos_bias=None, scale=1.0,
                             reduce="mean", teacher_cols=None) -> dict:
    """ReAtt's retriever loss: student = scale * MaxSim(q, all in-batch documents) (-inf stays -inf), then the
    batchmean KL against the sparse teacher [B, n] (columns default to a*n .. a*n+n-1), with the chain rule written
    out. Errors of the scores propagate to first order into the loss and gradient magnitudes.

    Returns loss, dq, dd, dbias, dscale and their magnitudes (mag_*)."""
    layout = "packed" if d_offsets is not None else "padded"
    fwd = maxsim_oracle(layout, q, d, q_mask, d_mask, d_offsets, pos_bias, reduce)
    sc = float(scale)
    scores = fwd["score"]
    B, Nd = scores.shape
    n = teacher.shape[1]
    cols = teacher_cols if teacher_cols is not None else torch.arange(B)[:, None] * n + torch.arange(n)[None, :]
    t = dense_teacher_oracle(teacher, cols, Nd)
    finite = torch.isfinite(scores)
    zero = torch.zeros_like(scores)
    student = torch.where(finite, sc * scores, scores)
    student_mag = torch.where(finite, sc * fwd["mag"] + student.abs(), zero)
    kl = kl_oracle(student, t, "batchmean", student_err=student_mag)
    dstudent = torch.where(finite, kl["grad"], zero)
    dscore = sc * dstudent
    # the backward through the argmax with the exact weights, and with the weights' magnitudes (same argmax)
    bwd = maxsim_oracle(layout, q, d, q_mask, d_mask, d_offsets, pos_bias, reduce, grad=dscore)
    gmag = dscore.abs() + sc * torch.where(finite, kl["mag_grad"], zero)
    bmag = maxsim_oracle(layout, q, d, q_mask, d_mask, d_offsets, pos_bias, reduce, grad=gmag)
    fs = torch.where(finite, scores, zero)
    return dict(loss=kl["loss"], mag_loss=kl["mag_loss"], dq=bwd["dq"], dd=bwd["dd"], dbias=bwd["dbias"],
                mag_dq=bmag["mag_dq"], mag_dd=bmag["mag_dd"], mag_dbias=bmag["mag_dbias"],
                dscale=(dstudent * fs).sum(),
                mag_dscale=(torch.where(finite, kl["mag_grad"], zero) * fs.abs() + dstudent.abs() * fwd["mag"]
                            + (dstudent * fs).abs()).sum())


# ---- residual_maxsim -----------------------------------------------------------------------------------------------
def residual_decode_oracle(centroids, weights, codes, packed, nbits: int) -> tuple[Tensor, Tensor]:
    """v_t[d] = centroids[codes[t], d] + weights[d, bucket], bucket = (packed[t, d*nbits//8] >> (d*nbits)%8) & mask.
    Returns v [T, D] and |centroid| + |weight| (its magnitude)."""
    cent, w = f64(centroids), f64(weights)
    codes, packed = _cpu(codes).long(), _cpu(packed).long()
    T, D = codes.shape[0], cent.shape[1]
    dims = torch.arange(D)
    byte = packed[:, (dims * nbits) // 8]  # [T, D]
    bucket = (byte >> ((dims * nbits) % 8)[None, :]) & ((1 << nbits) - 1)
    c = cent[codes]
    r = w[dims[None, :].expand(T, D), bucket]
    return c + r, c.abs() + r.abs()


def residual_maxsim_oracle(q, q_mask, centroids, weights, codes, packed, d_offsets, cand,
                           nbits: int) -> tuple[Tensor, Tensor]:
    """score(a, c) = sum_{i valid} max_{t in doc cand[a, c]} q[a, i] . v_t; -inf for padding (cand < 0) and for an
    empty document (0 when the query has no valid token). Returns scores [Bq, Nc] and their magnitudes."""
    q = f64(q)
    Bq, Lq, D = q.shape
    qm = _cpu(q_mask) if q_mask is not None else torch.ones(Bq, Lq, dtype=torch.bool)
    v, vmag = residual_decode_oracle(centroids, weights, codes, packed, nbits)
    off = [int(x) for x in _cpu(d_offsets)]
    cand = _cpu(cand)
    Nc = cand.shape[1]
    out = torch.full((Bq, Nc), float("-inf"), dtype=F64)
    mag = torch.zeros(Bq, Nc, dtype=F64)
    for a in range(Bq):
        for c in range(Nc):
            b = int(cand[a, c])
            if b < 0:
                continue
            if not bool(qm[a].any()):
                out[a, c] = 0.0
                continue
            if off[b + 1] == off[b]:
                continue
            s = q[a] @ v[off[b]:off[b + 1]].T  # [Lq, len]
            s_abs = q[a].abs() @ vmag[off[b]:off[b + 1]].T
            best, jbest = s.max(-1)
            out[a, c] = best[qm[a]].sum()
            mag[a, c] = s_abs.amax(-1)[qm[a]].sum()
    return out, mag


# ---- centroid interaction (reatt_kernels/reference/centroid_interaction.py's docstring) --------------------------------
def centroid_interaction_oracle(table, q_mask, codes, d_offsets, cand) -> tuple[Tensor, Tensor]:
    """ci(a, c) = sum_{i valid} max_{t in doc cand[a, c]} table[a, codes[t], i]; cand None = every document in order;
    -inf for padding (cand < 0) and for an empty document, 0 when the query has no valid token. Returns the scores
    [Bq, Nc] and their magnitudes (sums of |max|)."""
    tab = f64(table)
    Bq, C, L = tab.shape
    qm = _cpu(q_mask)
    Lq = qm.shape[1]
    off = [int(x) for x in _cpu(d_offsets)]
    codes = [int(x) for x in _cpu(codes)]
    Nd = len(off) - 1
    cand = torch.arange(Nd)[None].expand(Bq, Nd) if cand is None else _cpu(cand)
    Nc = cand.shape[1]
    out = torch.full((Bq, Nc), float("-inf"), dtype=F64)
    mag = torch.zeros(Bq, Nc, dtype=F64)
    for a in range(Bq):
        valid = [i for i in range(Lq) if bool(qm[a, i])]
        for c in range(Nc):
            b = int(cand[a, c])
            if b < 0:
                continue
            if not valid:
                out[a, c] = 0.0
                continue
            if off[b + 1] == off[b]:
                continue
            total, m = 0.0, 0.0
            for i in valid:
                best = max(float(tab[a, codes[t], i]) for t in range(off[b], off[b + 1]))
                total += best
                m += abs(best)
            out[a, c] = total
            mag[a, c] = m
    return out, mag


# ---- plaid_search (reatt_kernels/reference/plaid_search.py's docstring) ------------------------------------------------
def plaid_search_oracle(q, q_mask, centroids, weights, codes, packed, d_offsets, nbits: int, k: int, ncand: int,
                        live=None, allow=None, cand=None) -> dict:
    """For every query a and document b: approx[a, b] = sum_{valid i} max_t q_ai . c_{code_t} (centroid interaction)
    and exact[a, b] = sum_{valid i} max_t q_ai . (c_{code_t} + r_t) (the decompressed MaxSim), both float64 with their
    magnitudes (mag; rmag: sum_i max_t sum_d |q_id| |r_td|, the residual half's); eligible[a, b] (live, allowed,
    among the candidates); and the spec's answer: the ncand eligible
    documents with approx > -inf, best first by (approx, then lower row), reranked by exact, the k best by (exact, then
    lower row) -> docs [Bq, k] and scores [Bq, k], (-1, -inf) padded."""
    q = f64(q)
    Bq, Lq, D = q.shape
    qm = _cpu(q_mask) if q_mask is not None else torch.ones(Bq, Lq, dtype=torch.bool)
    cent = f64(centroids)
    v, vmag = residual_decode_oracle(centroids, weights, codes, packed, nbits)
    cvec = cent[_cpu(codes).long()]
    off = [int(x) for x in _cpu(d_offsets)]
    Nd = len(off) - 1
    approx = torch.full((Bq, Nd), float("-inf"), dtype=F64)
    exact = torch.full((Bq, Nd), float("-inf"), dtype=F64)
    mag = torch.zeros(Bq, Nd, dtype=F64)
    rmag = torch.zeros(Bq, Nd, dtype=F64)  # sum_i max_t sum_d |q_id| |r_td|: the residual half's magnitude
    rabs = (v - cvec).abs()
    eligible = torch.zeros(Bq, Nd, dtype=torch.bool)
    for a in range(Bq):
        cands = range(Nd) if cand is None else [int(b) for b in _cpu(cand)[a] if int(b) >= 0]
        for b in cands:
            if (live is not None and not bool(live[b])) or (allow is not None and not bool(allow[a, b])):
                continue
            eligible[a, b] = True
            if not bool(qm[a].any()):
                approx[a, b] = exact[a, b] = 0.0
                continue
            if off[b + 1] == off[b]:
                continue
            qa = q[a][qm[a]]
            approx[a, b] = (qa @ cvec[off[b]:off[b + 1]].T).max(-1).values.sum()
            exact[a, b] = (qa @ v[off[b]:off[b + 1]].T).max(-1).values.sum()
            mag[a, b] = (qa.abs() @ vmag[off[b]:off[b + 1]].T).amax(-1).sum()
            rmag[a, b] = (qa.abs() @ rabs[off[b]:off[b + 1]].T).amax(-1).sum()
    docs = torch.full((Bq, k), -1, dtype=torch.int64)
    scores = torch.full((Bq, k), float("-inf"), dtype=F64)
    for a in range(Bq):
        pool = [b for b in range(Nd) if eligible[a, b] and approx[a, b] > float("-inf")]
        kept = sorted(pool, key=lambda b: (-float(approx[a, b]), b))[:ncand]
        kept = [b for b in kept if exact[a, b] > float("-inf")]
        best = sorted(kept, key=lambda b: (-float(exact[a, b]), b))[:k]
        for r, b in enumerate(best):
            docs[a, r], scores[a, r] = b, exact[a, b]
    return dict(approx=approx, exact=exact, mag=mag, rmag=rmag, eligible=eligible, docs=docs, scores=scores)


# ---- PyLate's ColBERT scores (reatt_kernels.compat.pylate) -----------------------------------------------------------
def pylate_maxsim_oracle(queries, documents, pairs, grads=None) -> dict:
    """PyLate 1.6.0's ``colbert_scores`` semantics in float64, written from its code (``pylate/scores/colbert.py``:
    einsum, multiply by the float masks, max over document tokens, sum over query tokens), one pair at a time.

    For a query (q [Lq, D], weights wq [Lq] or None) and a document (d [Ld, D], wd [Ld] or None)::

        s[i, j] = (q[i] . d[j]) * wq[i] * wd[j]          score = sum_i max_j s[i, j]     (first j on ties)

    over *every* i and j: a masked token (weight 0) scores 0 and takes part in the max. Ragged inputs are given as
    they are (each item its own length), so no padding exists here.

    Args:
        queries: list of (q [Lq_a, D], wq [Lq_a] or None); documents: list of (d [Ld_b, D], wd or None).
        pairs: list of (a, b): the scores to compute, in output order.
        grads: None, or [P] upstream gradients of the P scores.
    Returns:
        dict: ``score`` [P], ``mag`` [P] (sum of |terms| of the winning dot products); with ``grads``: ``dq`` and
        ``dd`` (lists like ``queries`` / ``documents``) and their magnitudes ``mag_dq``, ``mag_dd``.
    """
    Q = [(f64(q), f64(w) if w is not None else torch.ones(q.shape[0], dtype=F64)) for q, w in queries]
    Dc = [(f64(d), f64(w) if w is not None else torch.ones(d.shape[0], dtype=F64)) for d, w in documents]
    P = len(pairs)
    score, mag = torch.zeros(P, dtype=F64), torch.zeros(P, dtype=F64)
    g = f64(grads) if grads is not None else None
    dq = [torch.zeros_like(q) for q, _ in Q]
    dd = [torch.zeros_like(d) for d, _ in Dc]
    mdq = [torch.zeros_like(q) for q, _ in Q]
    mdd = [torch.zeros_like(d) for d, _ in Dc]
    for p, (a, b) in enumerate(pairs):
        q, wq = Q[a]
        d, wd = Dc[b]
        for i in range(q.shape[0]):
            best, jbest = None, -1
            for j in range(d.shape[0]):
                s = float((q[i] * d[j]).sum()) * float(wq[i]) * float(wd[j])
                if best is None or s > best:
                    best, jbest = s, j
            if jbest < 0:
                continue
            score[p] += best
            w = float(wq[i]) * float(wd[jbest])
            mag[p] += abs(w) * float((q[i] * d[jbest]).abs().sum())
            if g is not None and w != 0.0:
                dq[a][i] += g[p] * w * d[jbest]
                dd[b][jbest] += g[p] * w * q[i]
                mdq[a][i] += abs(float(g[p]) * w) * d[jbest].abs()
                mdd[b][jbest] += abs(float(g[p]) * w) * q[i].abs()
    out = {"score": score, "mag": mag}
    if g is not None:
        out.update(dq=dq, dd=dd, mag_dq=mdq, mag_dd=mdd)
    return out
