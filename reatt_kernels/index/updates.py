"""Updates of a :class:`~reatt_kernels.index.TokenIndex`: the append stream that ``build`` and ``add`` share, tombstone
deletes, and compaction. The payload encodes each chunk and keeps its own arrays (:mod:`.payload`); this module
grows them, and keeps the arrays every kind shares (``offsets``, ``doc_ids``, ``deleted``, ``next_id``)."""
from __future__ import annotations

from itertools import chain
from typing import Optional, Sequence

import torch
from torch import Tensor

from .calibration import exact_chunk_scores
from .inputs import _as_stream, _chunks, _ragged_rows


def append_stream(ix, buffered, it, doc_ids, progress, desc, total_tokens: Optional[int] = None,
                  truth_queries=None):
    """Encode and append every chunk. ``truth_queries``: (q, q_mask, sources) pseudo-queries whose exact MaxSim
    against each appended document is computed from the original vectors as they pass (kept for calibrate())."""
    from tqdm.auto import tqdm

    p = ix.payload
    T0 = ix.n_tokens
    cap = T0 + (total_tokens or 0)
    # Grow the payload arrays to their final size once (or by 1.25x when the total is unknown) and write each
    # encoded chunk in place: no list of chunks, no final concatenation (which would double the peak).
    bufs = [_grow(t, T0, cap) for t in p.rows()]
    T = T0
    pieces_len = []
    sides = []  # the payload's side record of each chunk (residual: its inverted-list entries)
    n_docs = 0
    N0 = ix.offsets.numel() - 1
    bar = tqdm(desc=desc, unit="tok", unit_scale=True, disable=not progress)
    truth = []
    for tokens, lens in chain(buffered, it):
        if tokens.shape[1] != ix.dim:
            raise ValueError(f"document dim {tokens.shape[1]} != index dim {ix.dim}")
        tokens = tokens.to(ix.device)
        n = tokens.shape[0]
        if T + n > bufs[0].shape[0]:
            cap = max(T + n, int(bufs[0].shape[0] * 1.25) + (1 << 16))
            bufs = [_grow(t, T, cap) for t in bufs]
        lens = lens.to(device=ix.device, dtype=torch.int64)
        if truth_queries is not None:
            truth.append(exact_chunk_scores(truth_queries, tokens, lens))
        rows, side = p.encode(tokens, lens, N0 + n_docs)
        for buf, r in zip(bufs, rows):
            buf[T:T + n] = r
        sides.append(side)
        T += n
        pieces_len.append(lens)
        n_docs += lens.numel()
        bar.update(n)
    bar.close()
    if truth_queries is not None and truth:
        ix._calib_truth = (truth_queries, torch.cat(truth, 1))
    # (grown without a known total, the arrays keep up to 25% spare rows behind these views rather than pay for
    # a copy at the peak)
    lens = torch.cat(pieces_len) if pieces_len else torch.zeros(0, dtype=torch.int64, device=ix.device)
    if doc_ids is None:
        ids = torch.arange(ix.next_id, ix.next_id + n_docs, dtype=torch.int64, device=ix.device)
    else:
        ids = torch.as_tensor(doc_ids, dtype=torch.int64).to(ix.device).flatten()
        if ids.numel() != n_docs:
            raise ValueError(f"doc_ids has {ids.numel()} entries for {n_docs} documents")
        if ids.numel() and int(ids.min()) < 0:
            raise ValueError("doc_ids must be >= 0 (-1 marks an empty result slot)")
        both = torch.cat([ix.doc_ids, ids])
        if torch.unique(both).numel() != both.numel():
            raise ValueError("doc_ids must be unique (and not already in the index)")
    new_off = ix.offsets[-1] + torch.cumsum(lens, 0)
    ix.offsets = torch.cat([ix.offsets, new_off])
    ix.doc_ids = torch.cat([ix.doc_ids, ids])
    ix.deleted = torch.cat([ix.deleted, torch.zeros(n_docs, dtype=torch.bool, device=ix.device)])
    if ids.numel():
        ix.next_id = max(ix.next_id, int(ids.max()) + 1)
    p.commit([buf[:T] for buf in bufs], sides)


def _grow(t: Tensor, used: int, cap: int) -> Tensor:
    """``t`` with room for ``cap`` rows (its first ``used`` rows kept); ``t`` itself when it is big enough."""
    if t.shape[0] >= cap:
        return t
    out = torch.empty((cap,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    out[:used] = t[:used]
    return out


def add(ix, vectors, doc_ids: Optional[Sequence[int]], d_offsets: Optional[Tensor], progress: bool) -> Tensor:
    """``TokenIndex.add``: encode with the existing codec and append; the new documents' ids (int64 [n])."""
    ix.payload.check_appendable()
    n0 = ix.doc_ids.numel()
    append_stream(ix, [], _chunks(_as_stream(vectors), d_offsets, 1 << 16), doc_ids, progress, "adding")
    return ix.doc_ids[n0:].clone()


def delete(ix, doc_ids) -> int:
    """``TokenIndex.delete``: tombstone; how many live documents were deleted."""
    ids = torch.as_tensor(doc_ids, dtype=torch.int64).to(ix.device).flatten()
    hit = torch.isin(ix.doc_ids, ids) & ~ix.deleted
    ix.deleted |= hit
    ix.payload.drop_caches()
    return int(hit.sum())


def compact(ix) -> None:
    """``TokenIndex.compact``: drop tombstoned documents' tokens; the payload rebuilds what it derives from them."""
    keep = ~ix.deleted
    if bool(keep.all()):
        return
    lens = (ix.offsets[1:] - ix.offsets[:-1])[keep]
    rows, _ = _ragged_rows(ix.offsets, torch.nonzero(keep).flatten())
    ix.offsets = torch.zeros(lens.numel() + 1, dtype=torch.int64, device=ix.device)
    ix.offsets[1:] = torch.cumsum(lens, 0)
    ix.doc_ids = ix.doc_ids[keep]
    ix.deleted = ix.deleted[keep]
    ix.payload.compact(ix, rows)
