"""Deterministic synthetic token corpora (the docs/baselines.md clustered corpus), shared by benchmarks, the main job and tests.

Documents are built from ``n_centroids`` random unit centroids plus noise: each document draws a handful of "topics"
(centroids), and each of its tokens is one of them plus Gaussian noise, renormalised. Each query is ``q_len`` noisy
tokens taken from one document, so its own document is the expected top hit. Everything is generated from a seed with
a private ``torch.Generator``, chunk by chunk (bounded memory, tqdm progress bar).
"""
from __future__ import annotations

import math

import torch


def clustered_corpus(
    n_docs: int = 50_000,
    dim: int = 128,
    min_len: int = 48,
    max_len: int = 128,
    n_centroids: int = 8192,
    topics_per_doc: int = 8,
    noise: float = 0.35,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    chunk_docs: int = 4096,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed clustered corpus.

    Returns:
        d_tokens [T, dim] (``dtype``, unit-norm rows), d_offsets int64 [n_docs + 1]; lengths uniform in
        [min_len, max_len] (set both equal for fixed-length documents).
    """
    if n_docs < 0 or dim < 1 or min_len < 0 or max_len < min_len:
        raise ValueError(f"bad corpus sizes: n_docs={n_docs}, dim={dim}, min_len={min_len}, max_len={max_len}")
    g = torch.Generator().manual_seed(seed)
    centroids = torch.nn.functional.normalize(torch.randn(n_centroids, dim, generator=g), dim=-1)
    lens = torch.randint(min_len, max_len + 1, (n_docs,), generator=g)
    offsets = torch.zeros(n_docs + 1, dtype=torch.int64)
    offsets[1:] = lens.cumsum(0)
    T = int(offsets[-1])
    out = torch.empty((T, dim), dtype=dtype)
    it = range(0, n_docs, chunk_docs)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="building corpus", unit="chunk", total=math.ceil(n_docs / max(chunk_docs, 1)))
    sigma = noise / math.sqrt(dim)
    for b0 in it:
        b1 = min(n_docs, b0 + chunk_docs)
        t0, t1 = int(offsets[b0]), int(offsets[b1])
        topics = torch.randint(0, n_centroids, (b1 - b0, topics_per_doc), generator=g)
        doc_of_tok = torch.repeat_interleave(torch.arange(b1 - b0), lens[b0:b1])
        pick = torch.randint(0, topics_per_doc, (t1 - t0,), generator=g)
        base = centroids[topics[doc_of_tok, pick]]
        tok = base + sigma * torch.randn((t1 - t0, dim), generator=g) * math.sqrt(dim)
        out[t0:t1] = torch.nn.functional.normalize(tok, dim=-1).to(dtype)
    return out, offsets


def clustered_queries(
    d_tokens: torch.Tensor,
    d_offsets: torch.Tensor,
    n_queries: int,
    q_len: int = 32,
    noise: float = 0.2,
    seed: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries of ``q_len`` noisy tokens, each taken from one random non-empty document.

    Returns:
        q [n_queries, q_len, dim] (d_tokens.dtype, unit-norm), source doc ids int64 [n_queries].
    """
    g = torch.Generator().manual_seed(seed)
    lens = d_offsets[1:] - d_offsets[:-1]
    nonempty = torch.nonzero(lens > 0).flatten()
    if nonempty.numel() == 0:
        raise ValueError("the corpus has no non-empty document to draw queries from")
    docs = nonempty[torch.randint(0, nonempty.numel(), (n_queries,), generator=g)]
    dim = d_tokens.shape[1]
    rows = d_offsets[docs][:, None] + (torch.rand((n_queries, q_len), generator=g) * lens[docs][:, None]).long()
    base = d_tokens[rows].float()
    q = base + noise / math.sqrt(dim) * torch.randn(base.shape, generator=g) * math.sqrt(dim)
    return torch.nn.functional.normalize(q, dim=-1).to(d_tokens.dtype), docs


def pad_packed(d_tokens: torch.Tensor, d_offsets: torch.Tensor, max_len: int | None = None):
    """Packed -> padded: ([Nd, Lmax, dim], bool mask [Nd, Lmax]). For naive baselines that need padding."""
    lens = d_offsets[1:] - d_offsets[:-1]
    L = int(lens.max()) if max_len is None and lens.numel() else (max_len or 0)
    Nd = lens.numel()
    ar = torch.arange(L, device=d_tokens.device)
    mask = ar[None, :] < lens[:, None]
    rows = (d_offsets[:-1, None] + ar[None, :]).masked_fill(~mask, 0).clamp(max=max(d_tokens.shape[0] - 1, 0))
    out = d_tokens[rows] if d_tokens.shape[0] else d_tokens.new_zeros((Nd, L, d_tokens.shape[1]))
    out = out.masked_fill(~mask[..., None], 0)
    return out, mask
