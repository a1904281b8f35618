"""Input normalisation for :class:`~reatt_kernels.index.TokenIndex`: every input form (a list of [L_i, D] tensors,
packed tokens with offsets, an iterator of chunks) becomes a stream of (tokens [t, D], lengths [n]) chunks; the k-means
sample drawn from each form; and the ragged-row gather and the top-k merge that the index's stages and parts share."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Optional

import torch
from torch import Tensor


def _chunks(vectors, d_offsets: Optional[Tensor], chunk_tokens: int) -> Iterator[tuple[Tensor, Tensor]]:
    if isinstance(vectors, Tensor):
        if d_offsets is None:
            raise ValueError("packed input needs d_offsets (int64 [Nd + 1]); pass a list of [L_i, dim] tensors instead")
        if vectors.dim() != 2:
            raise ValueError(f"packed d_tokens must be [T, dim], got shape {tuple(vectors.shape)}")
        off = d_offsets.cpu()
        n = off.numel() - 1
        b0 = 0
        while b0 < n:
            # as many documents as fit in chunk_tokens (at least one)
            b1 = int(torch.searchsorted(off, off[b0] + chunk_tokens, right=True)) - 1
            b1 = min(n, max(b1, b0 + 1))
            yield vectors[int(off[b0]):int(off[b1])], (off[b0 + 1:b1 + 1] - off[b0:b1])
            b0 = b1
        return
    buf: list[Tensor] = []
    n_buf = 0
    for item in vectors:
        if isinstance(item, tuple):  # a packed chunk (tokens, offsets)
            if buf:
                yield torch.cat(buf), torch.tensor([x.shape[0] for x in buf])
                buf, n_buf = [], 0
            yield from _chunks(item[0], item[1], chunk_tokens)
            continue
        docs = item if isinstance(item, (list, tuple)) else [item]
        for x in docs:
            if not isinstance(x, Tensor) or x.dim() != 2:
                raise ValueError(f"each document must be a [L_i, dim] tensor, got "
                                 f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
            buf.append(x)
            n_buf += x.shape[0]
            if n_buf >= chunk_tokens:
                yield torch.cat(buf), torch.tensor([x.shape[0] for x in buf])
                buf, n_buf = [], 0
    if buf:
        yield torch.cat(buf), torch.tensor([x.shape[0] for x in buf])


def _as_stream(vectors):
    """Lists stay lists (sized, random access); iterators are wrapped so each document is seen once."""
    if isinstance(vectors, (list, Tensor)):
        return vectors
    if isinstance(vectors, Iterable):
        return iter(vectors)
    raise TypeError(f"vectors must be a list of [L_i, dim] tensors, packed d_tokens (with d_offsets) or an iterator "
                    f"of chunks, got {type(vectors).__name__}")


def _stream_tokens(stream) -> Optional[int]:
    """Tokens of a list or packed input (known before it is read); None for an iterator."""
    if isinstance(stream, Tensor):
        return stream.shape[0]
    if isinstance(stream, list):
        return sum(x.shape[0] for x in stream)
    return None


def _training_sample(stream, d_offsets, it, buffered, sample_tokens, seed):
    """k-means sample: random documents across the corpus when it has random access (list / packed), else the
    first ``sample_tokens`` tokens of the stream (kept in ``buffered`` to be encoded afterwards).

    The fp32 sample is the build's largest block (its memory budget's "one chunk"), so it is written in place, a
    block of rows at a time: never a list of pieces plus their concatenation, nor a half-precision copy beside the
    fp32 one (each doubled the build's peak)."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(stream, Tensor):
        T = stream.shape[0]
        rows = None if T <= sample_tokens else torch.randperm(T, generator=g)[:sample_tokens].sort().values
        n = T if rows is None else rows.numel()
        out = torch.empty((n, stream.shape[1]), dtype=torch.float32)
        for r0 in range(0, n, 1 << 13):  # small blocks: the allocator keeps freed temporaries in the RSS
            src = stream[r0:r0 + (1 << 13)] if rows is None else stream[rows[r0:r0 + (1 << 13)].to(stream.device)]
            out[r0:r0 + src.shape[0]] = src.float().cpu()
        return out, buffered, T
    if isinstance(stream, list):
        T = sum(x.shape[0] for x in stream)
        order = torch.randperm(len(stream), generator=g).tolist()
        picked, n = [], 0
        for i in order:
            if n >= sample_tokens:
                break
            picked.append(i)
            n += stream[i].shape[0]
        return _stack_f32([stream[i] for i in picked]), buffered, T
    n = sum(c[0].shape[0] for c in buffered)
    for ch in it:
        buffered.append(ch)
        n += ch[0].shape[0]
        if n >= sample_tokens:
            break
    return _stack_f32([c[0] for c in buffered], limit=sample_tokens), buffered, n


def _stack_f32(parts, limit: Optional[int] = None) -> Tensor:
    """The rows of ``parts`` (tensors [L_i, D], any float dtype and device) in one fp32 CPU tensor, written in place;
    at most ``limit`` rows."""
    if not parts:
        return torch.zeros(0, 1)
    n = sum(x.shape[0] for x in parts)
    n = n if limit is None else min(n, limit)
    out = torch.empty((n, parts[0].shape[1]), dtype=torch.float32)
    r = 0
    for x in parts:
        take = min(x.shape[0], n - r)
        if take <= 0:
            break
        out[r:r + take] = x[:take].float().cpu()
        r += take
    return out


def _ragged_rows(offsets: Tensor, docs: Tensor) -> tuple[Tensor, Tensor]:
    """Token rows of ``docs`` back to back, and each row's position in ``docs`` (segment id)."""
    lens = offsets[docs + 1] - offsets[docs]
    n = int(lens.sum())
    seg = torch.repeat_interleave(torch.arange(docs.numel(), device=docs.device), lens, output_size=n)
    starts = offsets[docs] - (torch.cumsum(lens, 0) - lens)
    return torch.arange(n, device=docs.device) + starts[seg], seg


def merge_topk(scores: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k along dim 1 of scores [Bq, M] with ids [Bq, M] (e.g. per-part or per-shard results side by side); pads to
    k columns with (-inf, -1), and a -inf score always carries id -1."""
    Bq, M = scores.shape
    if M < k:
        scores = torch.cat([scores, scores.new_full((Bq, k - M), float("-inf"))], 1)
        ids = torch.cat([ids, ids.new_full((Bq, k - M), -1)], 1)
    s, pos = torch.topk(scores, k, dim=1)
    i = torch.gather(ids, 1, pos)
    return s, torch.where(torch.isinf(s) & (s < 0), torch.full_like(i, -1), i)
