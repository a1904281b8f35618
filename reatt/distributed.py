"""In-batch negatives across ranks: an all_gather whose backward returns every rank's gradient for the local slice.

The common "keep the gradient for the local slice" trick (gather without grad, put the local tensor back in its slot)
drops the gradient that *other* ranks' losses send to this rank's documents. Summing the gathered gradient over ranks
before slicing (all_reduce in the backward) restores it, so that DDP's gradient average equals, exactly, the gradient
of the same loss computed in one process on the global batch (tests/reatt/test_reatt_train.py checks this).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup_distributed() -> tuple[int, int, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL with CUDA, else gloo) -> (rank, world, device).

    The one place where reatt-train and reatt-index initialise torch.distributed; device: this rank's GPU
    (LOCAL_RANK) when CUDA is available, else the CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = rank_and_world()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def barrier() -> None:
    """dist.barrier() under torch.distributed with world > 1; nothing otherwise."""
    if is_distributed():
        dist.barrier()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        world = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        # Every rank holds d(its own loss)/d(all gathered rows); the sum over ranks is d(global loss)/d(rows).
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[n, ...] on each rank (same shape everywhere) -> [world * n, ...], rank r's rows at r*n .. r*n+n-1.

    Differentiable: the backward sums the gathered gradient over ranks and returns this rank's slice."""
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """Plain all_gather along dim 0 (masks, ids); no gradient."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


def all_reduce_max_int(v: int, device) -> int:
    if not is_distributed():
        return v
    t = torch.tensor([v], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
