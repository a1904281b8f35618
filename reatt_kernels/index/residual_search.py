"""The residual search plan of a :class:`~reatt_kernels.index.TokenIndex` (its :class:`~.residual.ResidualPayload`).

Search pipelines (``index.search(q, q_mask, k, **params) -> (scores [Bq, k], doc_ids [Bq, k])``; the exact index's
are in :mod:`.exact`):

residual, ``method="plaid"`` (PLAID's candidate generation; the default unless calibration chose scan):
    (1) ``centroid_scores``: the table ``q . centroids^T`` (fp32 [Bq, C, LP], one matmul: ``centroid_score_table``);
    (2) ``candidates``: every live document when the probe would reach most of them anyway (the usual case up to
        about a million documents), else the inverted lists of the ``nprobe`` best cells of each valid query token;
    (3) ``approx``: PLAID's centroid interaction ``sum_i max_{t in doc} table[code_t, i]`` over *all* codes of each
        candidate (the ``centroid_interaction`` op: 4 bytes and one table row per token), keeping ``ncandidates``;
    (4) ``decompress_rerank``: the fused decompress + MaxSim op ``residual_maxsim`` on those few documents only (the cpu
        kernel reads the centroid part from the same table), then ``topk``.
    On a CPU index with the cpu kernel (:func:`_fused`), after the table (and the probe, when it runs) one
    ``plaid_search`` call (``ops/plaid_search.py``, csrc/plaid_search) does the interaction, the selection, the rerank
    and the top-k; elsewhere (a GPU index, another backend, more than 64 valid query tokens) the stages run as the
    separate ops above.
residual, ``method="scan"``: ``residual_maxsim`` over every live document (decompressed MaxSim from the codes), for
    corpora whose clusters do not predict MaxSim (build-time calibration picks it; see :mod:`.calibration`).
    Everything stays on the index's device (GPU-resident on CUDA). ``index.last_timings`` holds per-stage seconds
    of the last search when it was called with ``timings=True``.

Results always have k columns: when fewer than k live documents qualify, the tail is ``-inf`` with id ``-1``.

Each function takes the index (``ix``: its ``offsets``, ``deleted``, ``doc_ids``, ``calibration``) and reads the codes
from ``ix.payload``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..ops.centroid_interaction import centroid_interaction, centroid_score_table
from ..ops.plaid_search import pack_query_tokens, plaid_score_table, plaid_search_prepared
from ..ops.residual_maxsim import residual_maxsim  # the public op (reatt_kernels.residual_maxsim)
from .inputs import merge_topk
from .payload import _Timer

# Residual search defaults; each was measured on the real-text corpora (docs/index.md has the tables):
# - method "auto": the index's calibrated choice (``index.calibration["method"]``): "plaid", or "scan" when the
#   centroid interaction does not predict MaxSim on this corpus (build-time pseudo-queries, TokenIndex.calibrate).
# - nprobe "auto": score every live document by centroid interaction unless the probe's inverted-list hits
#   (valid query tokens x PROBE_CELLS x mean list length) would be under half the documents. On real text with
#   PLAID's centroid count the 8-cell probe of a 32-token query reaches most documents of a 25k-passage corpus, and
#   the probe's union costs more than the 4 bytes per token the interaction reads.
# - ncandidates "auto": documents decompressed and reranked = ceil(rerank_factor x k), rerank_factor from the
#   build-time calibration (the rank under centroid interaction that keeps CALIBRATION_TARGET of the exact top-k of
#   held-out pseudo-queries; TokenIndex.calibrate). No constant here was fitted on a corpus the benchmarks report.
#   Earlier defaults copied fast-plaid's *parameter values* (n_ivf_probe 8, n_full_scores 4096) but not its pipeline:
#   fast-plaid decompresses only n_full_scores / 4 documents, we decompressed all 4096 (71 % of a 5.7k-passage corpus).
DEFAULTS = {"method": "auto", "nprobe": "auto", "ncandidates": "auto"}
PROBE_CELLS = 8  # cells per query token when the probe runs (PLAID / fast-plaid's n_ivf_probe)
DEFAULT_RERANK_FACTOR = 8.0  # uncalibrated index: rerank 8 k documents


def _pack_valid_tokens(q: Tensor, q_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Move each query's valid tokens to the front and drop the columns no query uses: q [Bq, L', D], mask [Bq, L'].

    MaxSim sums over valid tokens, so their order is free. Real questions are short (squad-dev: 12.5 valid of 32), and
    every later stage costs per column: the table is C x LP floats (LP = L' rounded up to 16: 256 KiB instead of 512
    KiB at C = 4096, the difference between L2 and L3 hits for each token of the centroid interaction), and the
    rerank kernel computes every column's dot products."""
    n_valid = q_mask.sum(1)
    width = max(1, int(n_valid.max())) if q_mask.numel() else 1
    if width == q.shape[1] and bool(q_mask.all()):
        return q, q_mask
    order = torch.argsort((~q_mask).to(torch.int8), dim=1, stable=True)[:, :width]  # valid first, in order
    qp = torch.gather(q, 1, order[..., None].expand(-1, -1, q.shape[2]))
    mp = torch.arange(width, device=q.device)[None, :] < n_valid[:, None]
    return qp.masked_fill(~mp[..., None], 0.0), mp


def search_plaid(ix, q, q_mask, k, nprobe, ncand, backend, timer, allow=None):
    """The plaid path. q [Bq, Lq, D] and q_mask bool [Bq, Lq] on the index's device, allow bool [Bq, N] or None ->
    (scores fp32 [Bq, k], ids int64 [Bq, k])."""
    p = ix.payload
    Bq = q.shape[0]
    N = ix.offsets.numel() - 1
    dev = ix.device
    if N == 0 or p.codec is None:
        empty = torch.zeros((Bq, 0), device=dev)
        return merge_topk(empty, empty.long(), k)
    ncand = ncandidates(ix, k, ncand)
    if _fused(ix, q_mask, backend) and Bq > 1:
        # The kernel's table and interaction cost scale with the batch's LP (its longest query, rounded up to 16):
        # a 9-token query batched with a 20-token one would pay for 32 columns instead of 16. So a batch runs as one
        # call per LP class; each class still shares the table matmul and decodes each chosen document once.
        lp_class = (q_mask.sum(1).clamp(min=1) + 15) // 16
        classes = torch.unique(lp_class)
        if classes.numel() > 1:
            out_s = torch.empty((Bq, k), dtype=torch.float32, device=dev)
            out_i = torch.empty((Bq, k), dtype=torch.int64, device=dev)
            for c in classes.tolist():
                rows = (lp_class == c).nonzero().flatten()
                s, i = search_plaid(ix, q[rows], q_mask[rows], k, nprobe, ncand, backend, timer,
                                    None if allow is None else allow[rows])
                out_s[rows], out_i[rows] = s, i
            return out_s, out_i
    if _fused(ix, q_mask, backend):
        # one C++ call for stages 3-5 (csrc/plaid_search): the codes were validated at build / load, and the kernel
        # bounds-checks what it reads, so no per-call pass over the corpus
        qp, n_valid, LP = pack_query_tokens(q, q_mask)
        table = plaid_score_table(qp, p.codec.centroids)
        timer.stop("centroid_scores")
        cand = None
        npr = _use_probe(ix, q_mask, nprobe)
        if npr > 0:
            pm = torch.arange(LP, device=dev)[None, :] < n_valid[:, None]
            cand = _probe(ix, table.transpose(1, 2), pm, npr, 1 << 62, timer)
        st = torch.zeros(3, dtype=torch.float64) if timer.enabled else None
        scores, rows = plaid_search_prepared(table, qp, n_valid, p.codec.weights, p.codes, p.packed,
                                             ix.offsets, p.nbits, k=k, ncandidates=ncand, live=~ix.deleted,
                                             allow=allow, cand=cand, stage_seconds=st, backend="cpu")
        timer.stop("plaid_search")
        if st is not None:
            for name, v in zip(("kernel_approx", "kernel_select", "kernel_rerank_topk"), st.tolist()):
                timer.times[name] = timer.times.get(name, 0.0) + v  # summed over the LP classes of a batch
        ids = torch.where(rows >= 0, ix.doc_ids[rows.clamp(min=0)], torch.full_like(rows, -1))
        return scores, ids
    qf, q_mask = _pack_valid_tokens(q.float(), q_mask)
    table = centroid_score_table(qf, p.codec.centroids, q_mask)
    timer.stop("centroid_scores")
    cand = _plaid_candidates(ix, qf, q_mask, table, nprobe, ncand, backend, timer, allow)
    scores = residual_maxsim(qf, p.codec.centroids, p.codec.weights, p.codes32(), p.packed,
                             ix.offsets, cand, p.nbits, q_mask, backend=backend, centroid_scores=table)
    timer.stop("decompress_rerank")
    ids = torch.where(cand >= 0, ix.doc_ids[cand.clamp(min=0)], torch.full_like(cand, -1))
    out = merge_topk(scores, ids, k)
    timer.stop("topk")
    return out


def _fused(ix, q_mask: Tensor, backend: str) -> bool:
    """Whether the search runs as one plaid_search call (CPU index, cpu kernel, at most 64 valid query tokens)."""
    from .. import _ext

    return (ix.device.type == "cpu" and backend in ("auto", "cpu") and _ext.has("plaid_search_cpu")
            and (q_mask.numel() == 0 or int(q_mask.sum(1).max()) <= 64))


def _plaid_candidates(ix, q, q_mask, table, nprobe, ncand, backend, timer, allow=None) -> Tensor:
    """Stages 2-3: candidate documents, then the ``ncand`` best by centroid interaction. int64 [Bq, M], -1 pad."""
    p = ix.payload
    Bq = q.shape[0]
    npr = _use_probe(ix, q_mask, nprobe)
    if npr > 0:
        S = table[:, :, :q.shape[1]].transpose(1, 2)  # [Bq, Lq, C] view
        cand = _probe(ix, S, q_mask, npr, 1 << 62, timer)  # the whole union (no pruning here)
        approx = centroid_interaction(table, p.codes32(), ix.offsets, cand, q_mask, backend=backend)
    else:  # every live document is a candidate: no candidate list is built
        cand = None
        approx = centroid_interaction(table, p.codes32(), ix.offsets, None, q_mask, backend=backend)
    approx = approx.masked_fill(ix.deleted[cand.clamp(min=0)] if cand is not None else ix.deleted[None],
                                float("-inf"))
    if allow is not None:
        approx = approx.masked_fill(~(torch.gather(allow, 1, cand.clamp(min=0)) if cand is not None else allow),
                                    float("-inf"))
    m = min(ncand, approx.shape[1])
    top_s, pos = torch.topk(approx, m, dim=1)
    kept = pos if cand is None else torch.gather(cand, 1, pos)
    kept = torch.where(torch.isinf(top_s) & (top_s < 0), torch.full_like(kept, -1), kept)
    timer.stop("approx")
    return kept if Bq else kept.reshape(0, m)


def _use_probe(ix, q_mask: Tensor, nprobe) -> int:
    """Cells per query token to probe, or 0 to score every live document by centroid interaction."""
    p = ix.payload
    if nprobe == "auto":
        # Probe only when its inverted-list hits would stay under half of the documents: otherwise the union
        # is most of the corpus, and building it costs more than the interaction's 4 bytes per token.
        C = p.codec.centroids.shape[0]
        mean_list = p.ivf_docs.numel() / max(1, C)
        tokens = int(q_mask.sum(1).max()) if q_mask.numel() else 0
        return PROBE_CELLS if tokens * PROBE_CELLS * mean_list < 0.5 * ix.n_docs else 0
    if not isinstance(nprobe, int) or nprobe < 0:
        raise ValueError(f"nprobe must be 'auto' or an int >= 0, got {nprobe!r}")
    return nprobe


def _probe(ix, S: Tensor, q_mask: Tensor, nprobe: int, ncand: int, timer: "_Timer") -> Tensor:
    """Stages 1-2 for the whole batch, without a Python loop over queries.

    (1) Each valid query token i probes its ``nprobe`` best cells; the inverted lists of those cells give
        (query, document, i, score) hits.
    (2) Centroid interaction restricted to the probed cells: ``approx(a, b) = sum_i max(floor_i, max over b's
        hits for token i of <q_i, centroid>)``, where ``floor_i`` (token i's nprobe-th best centroid score) is an
        upper bound for any cell it did not probe. Costs O(hits), not O(candidate tokens). Each query keeps its
        ``ncand`` best documents.
    Returns cand int64 [Bq, M] (local document indices, -1 padded).
    """
    p = ix.payload
    Bq, Lq, C = S.shape
    N = ix.offsets.numel() - 1
    dev = S.device
    npr = min(int(nprobe), C)
    vals, cells = torch.topk(S, npr, dim=-1)  # [Bq, Lq, nprobe]
    floor = torch.where(q_mask, vals[..., -1], torch.zeros_like(vals[..., -1]))  # [Bq, Lq]
    timer.stop("probe")
    a_idx, i_idx = torch.nonzero(q_mask, as_tuple=True)
    cs, vs = cells[a_idx, i_idx].reshape(-1), vals[a_idx, i_idx].reshape(-1)  # one entry per (a, i, probe)
    ai = (a_idx * Lq + i_idx).repeat_interleave(npr)
    lens = p.ivf_offsets[cs + 1] - p.ivf_offsets[cs]
    n = int(lens.sum())
    seg = torch.repeat_interleave(torch.arange(cs.numel(), device=dev), lens, output_size=n)
    pos = torch.arange(n, device=dev) - (torch.cumsum(lens, 0) - lens)[seg] + p.ivf_offsets[cs][seg]
    doc = p.ivf_docs[pos].long()
    ai, v = ai[seg], vs[seg]
    live = ~ix.deleted[doc]
    doc, ai, v = doc[live], ai[live], v[live]
    a_of = ai // Lq
    key = a_of * max(N, 1) + doc
    if Bq * N <= (1 << 26):
        # dense mark + prefix map: the (query, doc) pairs in sorted order without sorting the hits
        mark = torch.zeros(Bq * N, dtype=torch.bool, device=dev)
        mark[key] = True
        uniq = torch.nonzero(mark).flatten()
        slot = torch.zeros(Bq * N, dtype=torch.int64, device=dev)
        slot[uniq] = torch.arange(uniq.numel(), device=dev)
        inv = slot[key]
    else:
        uniq, inv = torch.unique(key, return_inverse=True)  # (query, doc) pairs, sorted by query
    ua, ud = uniq // max(N, 1), uniq % max(N, 1)
    timer.stop("candidates")
    U = uniq.numel()
    best = floor[ua]  # [U, Lq]: start at each token's floor, then raise to the probed hits
    best.view(-1).scatter_reduce_(0, inv * Lq + (ai % Lq), v, reduce="amax")
    approx = best.sum(1)
    counts = torch.bincount(ua, minlength=Bq)
    start = torch.cumsum(counts, 0) - counts
    # order each query's candidates by approx score (descending) and keep the first ncand
    o1 = torch.argsort(approx, descending=True, stable=True)
    order = o1[torch.argsort(ua[o1], stable=True)]  # lexicographic: query, then approx descending
    rank = torch.arange(U, device=dev) - start[ua[order]]
    keep = order[rank < ncand]
    kept = torch.minimum(counts, torch.full_like(counts, int(ncand)))
    M = int(kept.max()) if Bq else 0
    cand = torch.full((Bq, max(M, 1)), -1, dtype=torch.int64, device=dev)
    ka = ua[keep]
    col = torch.arange(keep.numel(), device=dev) - (torch.cumsum(kept, 0) - kept)[ka]
    cand[ka, col] = ud[keep]
    timer.stop("approx")
    return cand


def ncandidates(ix, k: int, ncand) -> int:
    """Documents the plaid path decompresses: ``ncand``, or for "auto" ceil(rerank_factor x k) (calibrated)."""
    if ncand == "auto":
        factor = float(ix.calibration.get("rerank_factor", DEFAULT_RERANK_FACTOR))
        return max(k, int(math.ceil(factor * k)))
    if not isinstance(ncand, int) or ncand < 1:
        raise ValueError(f"ncandidates must be 'auto' or an int >= 1, got {ncand!r}")
    return ncand


def candidates(ix, q: Tensor, q_mask: Tensor, k: int, nprobe, ncand) -> Tensor:
    """The documents the plaid path would decompress for top-``k`` (stages 1-3, untimed): int64 [Bq, M], -1 padded."""
    p = ix.payload
    qf, q_mask = _pack_valid_tokens(q.float(), q_mask)
    table = centroid_score_table(qf, p.codec.centroids, q_mask)
    return _plaid_candidates(ix, qf, q_mask, table, nprobe, ncandidates(ix, k, ncand), "auto",
                             _Timer(ix.device, False))


def search_scan(ix, q, q_mask, k, backend, timer, allow=None):
    """The scan path: shapes as :func:`search_plaid`."""
    p = ix.payload
    Bq = q.shape[0]
    N = ix.offsets.numel() - 1
    if N == 0 or p.codec is None:
        empty = torch.zeros((Bq, 0), device=ix.device)
        return merge_topk(empty, empty.long(), k)
    s = scan_scores(ix, *_pack_valid_tokens(q.float(), q_mask), backend)
    if allow is not None:
        s = s.masked_fill(~allow, float("-inf"))
    timer.stop("scan")
    out = merge_topk(s, ix.doc_ids[None, :].expand_as(s), k)
    timer.stop("topk")
    return out


def scan_scores(ix, qf: Tensor, q_mask: Tensor, backend: str = "auto", table: Optional[Tensor] = None) -> Tensor:
    """Decompressed MaxSim of every query against every document (deleted ones -inf): fp32 [Bq, N]."""
    p = ix.payload
    N = ix.offsets.numel() - 1
    if table is None:
        table = centroid_score_table(qf, p.codec.centroids, q_mask)
    cand = torch.arange(N, device=ix.device)[None].expand(qf.shape[0], N).contiguous()
    s = residual_maxsim(qf, p.codec.centroids, p.codec.weights, p.codes32(), p.packed, ix.offsets,
                        cand, p.nbits, q_mask, backend=backend, centroid_scores=table)
    return s.masked_fill(ix.deleted[None], float("-inf"))
