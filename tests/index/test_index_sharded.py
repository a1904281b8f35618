"""ShardedIndex over torch.distributed: 2 CPU processes (gloo, localhost) give the same top-k as one index over the
union of their shards, for the exact and the residual kinds."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist


from reatt_kernels.bench.datasets import clustered_corpus, clustered_queries
from reatt_kernels.index import ShardedIndex, TokenIndex

from ..utils import spawn_with_timeout

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        d, off = clustered_corpus(n_docs=120, dim=16, min_len=4, max_len=12, n_centroids=32, noise=0.15, seed=5)
        q, _ = clustered_queries(d, off, 5, q_len=6, noise=0.1, seed=6)
        docs = [d[int(off[i]):int(off[i + 1])] for i in range(120)]
        mine = [i for i in range(120) if i % WORLD == rank]  # interleaved shards
        results = {}
        for kind in ("exact", "residual"):
            sh = ShardedIndex.build([docs[i] for i in mine], doc_ids=mine, kind=kind, nbits=4, n_centroids=16,
                                    progress=False)
            # no pruning, so each shard's list is its exact top-k under the shared scoring function
            params = {"nprobe": 16, "ncandidates": 1000} if kind == "residual" else {}
            s, i = sh.search(q, k=7, **params)
            single = TokenIndex.build(docs, kind=kind, nbits=4, codec=sh.shard.codec, progress=False)
            s1, i1 = single.search(q, k=7, **params)
            results[kind] = (torch.equal(i, i1), (s - s1).abs().max().item())
            sh.delete([int(i1[0, 0])])
            s2, i2 = sh.search(q, k=7, **params)
            results[kind + "_deleted"] = not bool((i2 == i1[0, 0]).any())
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sharded_equals_single_index(tmp_path):
    spawn_with_timeout(_worker, (_free_port(), str(tmp_path)), nprocs=WORLD)
    for rank in range(WORLD):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        for kind in ("exact", "residual"):
            same, diff = res[kind]
            assert same, f"rank {rank} {kind}: merged ids differ from the single index"
            assert diff <= 1e-5, f"rank {rank} {kind}: scores differ by {diff}"
            assert res[kind + "_deleted"], f"rank {rank} {kind}: a deleted document came back"
