"""Indexes made of several :class:`TokenIndex` parts, searched as one and merged by score with :func:`merge_topk`.

- :class:`PartIndex`: several parts in this process (an index written in parts, e.g. by ``reatt-index build``).
- :class:`ShardedIndex`: one shard per torch.distributed rank (a ``TokenIndex`` or a ``PartIndex``).

Each rank searches its own shard; the per-rank top-k lists (scores from the same scoring function, so comparable)
are all-gathered and merged by score. For residual shards the codec (centroids, cutoffs, weights) is trained once on
rank 0 and broadcast, so every shard scores exactly like one index over the union of the shards would.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .codec import ResidualCodec
from .token_index import TokenIndex, merge_topk


def _comm_device(group) -> torch.device:
    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def _broadcast_codec(codec: Optional[ResidualCodec], dim: int, nbits: int, group) -> ResidualCodec:
    dev = _comm_device(group)
    n = torch.tensor([codec.centroids.shape[0] if codec is not None else 0], dtype=torch.int64, device=dev)
    src = dist.get_global_rank(group, 0) if group is not None else 0
    dist.broadcast(n, src=src, group=group)
    C, K = int(n), 1 << nbits
    if codec is None:
        codec = ResidualCodec(torch.zeros(C, dim), torch.zeros(dim, K - 1), torch.zeros(dim, K), nbits)
    parts = [codec.centroids.to(dev).contiguous(), codec.cutoffs.to(dev).contiguous(),
             codec.weights.to(dev).contiguous()]
    for p in parts:
        dist.broadcast(p, src=src, group=group)
    return ResidualCodec(parts[0].cpu(), parts[1].cpu(), parts[2].cpu(), nbits)


class PartIndex:
    """Several ``TokenIndex`` parts searched as one: each part's top-k, merged by score (the parts share one scoring
    function, so their scores compare). Has ``TokenIndex.search``'s signature, so it can be a ``ShardedIndex``'s shard.
    Document ids must be unique across the parts."""

    def __init__(self, parts: Sequence[TokenIndex]):
        self.parts = list(parts)

    @property
    def n_docs(self) -> int:
        return sum(p.n_docs for p in self.parts)

    def search(self, q: Tensor, q_mask: Optional[Tensor] = None, k: int = 10, **params) -> tuple[Tensor, Tensor]:
        """q [Bq, Lq, D] (or [Lq, D]) -> (scores [Bq, k], ids [Bq, k]) over every part, (-inf, -1) padded."""
        if not self.parts:
            Bq = q.shape[0] if q.dim() == 3 else 1
            return merge_topk(torch.zeros((Bq, 0)), torch.zeros((Bq, 0), dtype=torch.int64), k)
        res = [p.search(q, q_mask, k, **dict(params)) for p in self.parts]
        return merge_topk(torch.cat([r[0].cpu() for r in res], 1), torch.cat([r[1].cpu() for r in res], 1), k)


class ShardedIndex:
    """A distributed index: this rank's shard (a ``TokenIndex`` or a ``PartIndex``) plus the process group to merge
    results over."""

    def __init__(self, shard, group=None):
        if not dist.is_initialized():
            raise RuntimeError("ShardedIndex needs torch.distributed to be initialised (init_process_group)")
        self.shard, self.group = shard, group

    @classmethod
    def build(cls, local_vectors, *, doc_ids: Sequence[int], kind: str = "residual", nbits: int = 4,
              codec: Optional[ResidualCodec] = None, group=None, **kw) -> "ShardedIndex":
        """Collective: every rank passes its own documents and their global ``doc_ids`` (unique across ranks).
        Residual: rank 0 trains the codec on its documents (unless ``codec`` is given) and broadcasts it."""
        if kind == "residual":
            rank = dist.get_rank(group)
            if codec is None and rank == 0:
                codec = TokenIndex.build(local_vectors, kind="residual", nbits=nbits, progress=False,
                                         **{k: v for k, v in kw.items() if k in ("n_centroids", "sample_tokens",
                                                                                 "seed", "d_offsets", "dim")}).codec
            dim = kw.get("dim") or (local_vectors[0].shape[-1] if isinstance(local_vectors, list)
                                    else local_vectors.shape[-1])
            codec = _broadcast_codec(codec, dim, nbits, group)
        shard = TokenIndex.build(local_vectors, kind=kind, nbits=nbits, codec=codec, doc_ids=doc_ids, **kw)
        return cls(shard, group)

    def search(self, q: Tensor, q_mask: Optional[Tensor] = None, k: int = 10, **params) -> tuple[Tensor, Tensor]:
        """Collective: every rank passes the same queries; every rank gets the merged (scores [Bq, k], ids [Bq, k])."""
        s, i = self.shard.search(q, q_mask, k, **params)
        dev = _comm_device(self.group)
        world = dist.get_world_size(self.group)
        s_all = [torch.empty_like(s, device=dev) for _ in range(world)]
        i_all = [torch.empty_like(i, device=dev) for _ in range(world)]
        dist.all_gather(s_all, s.to(dev).contiguous(), group=self.group)
        dist.all_gather(i_all, i.to(dev).contiguous(), group=self.group)
        return merge_topk(torch.cat(s_all, 1), torch.cat(i_all, 1), k)

    def add(self, vectors, doc_ids: Sequence[int], **kw) -> Tensor:
        """Local: add documents to this rank's shard (global ids, unique across ranks)."""
        return self.shard.add(vectors, doc_ids, **kw)

    def delete(self, doc_ids) -> int:
        """Local on each rank (ids not in this shard are ignored); call it on every rank with the same ids."""
        return self.shard.delete(doc_ids)

    def save(self, directory) -> None:
        """Each rank saves its shard to ``<directory>/shard-<rank>`` (atomically, as TokenIndex.save)."""
        self.shard.save(Path(directory) / f"shard-{dist.get_rank(self.group)}")

    @classmethod
    def load(cls, directory, group=None, **kw) -> "ShardedIndex":
        return cls(TokenIndex.load(Path(directory) / f"shard-{dist.get_rank(group)}", **kw), group)
