"""GradCache-style in-batch negatives over K micro-batches (``reatt-train --ibn-accum K``).

The paper's student softmax spans 64 queries x 100 documents (8 GPUs x 8 queries, with the original's
"accumulation for in-batch negatives" of 4). Plain gradient accumulation cannot give that on fewer GPUs: each
micro-batch would see only its own documents. Here, as in the original (the author's FiD fork, ``fid_run``):

1. A ``no_grad`` pre-pass runs the K micro-batches and caches, per micro-batch, the retrieval vectors (one head,
   d = 64 per token) of its queries and documents, their masks, each document's pair offset and the teacher. Under
   torch.distributed the caches are all-gathered, so every rank holds all ``world * K`` micro-batches. The RNG state
   before each micro-batch is saved.
2. The retrieval KL over ALL cached queries and documents is computed once on the cached vectors, made leaves:
   its backward gives dKL/dq and dKL/dk for every cached vector, and the full gradient of the scale exp(c), the head
   weights w and the position bias (the parameters the KL reaches directly), once.
3. Each micro-batch is re-run with gradient under its saved RNG state (same dropout masks, so its live vectors equal
   the cached ones), and ``lambda * (<q, dKL/dq> + <k, dKL/dk>) + its share of the QA loss`` is back-propagated: the
   KL's gradient reaches only this micro-batch's own q/k, and through them the encoder.

The result is the gradient of ONE batch ``world * K`` times larger (tests/reatt/test_reatt_gradcache.py checks it to 1e-10
in float64, dropout included, on one process and on 2 gloo ranks): QA is the token mean over all answer tokens of the
big batch, the KL the batch mean over all its queries. Peak activation memory is one micro-batch's; the cache adds
(Lq + n * Ld) * d floats per query.

Differences from the original (see the method table in docs/reatt.md). The original (``fid_run`` and
``qa_loss_factor /= accumulated['total']`` in its ``src/model.py``) back-propagates from every micro-batch the full
KL plus its own QA loss divided by K, and DDP averages the ranks: the encoder's q/k get the big batch's KL gradient at
the same lambda as here, QA is the mean of the micro-batches' token means (``qa_reduction="micro"`` reproduces it;
the default "token" is the big batch's token mean, equal when the micro-batches hold as many answer tokens), and c, w
and the position bias get K * world times their KL gradient (here exactly the big batch's).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .distributed import all_gather_nograd, all_reduce_max_int, is_distributed, rank_and_world


def _torch_rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_torch_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _pad_to(x: torch.Tensor, L: int, dim: int = 1, value=0) -> torch.Tensor:
    """Right-pad dim ``dim`` (1 or 2 from the end-aware layouts used here) to length L."""
    extra = L - x.shape[dim]
    if extra == 0:
        return x
    pad = [0, 0] * (x.dim() - dim - 1) + [0, extra]
    return F.pad(x, pad, value=value)


def _gather_same_shape(x: torch.Tensor, what: str) -> torch.Tensor:
    """all_gather along dim 0 after checking every rank holds the same shape (all_gather needs it)."""
    if not is_distributed():
        return x
    shape = torch.tensor(list(x.shape), device=x.device)
    lo, hi = shape.clone(), shape.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise ValueError(f"--ibn-accum: every rank must cache the same number of {what} per step (same batch size "
                         f"and --n-docs), got shapes between {lo.tolist()} and {hi.tolist()}")
    return all_gather_nograd(x)


def _all_reduce_grads(params: list, bucket_elems: int = 1 << 25) -> None:
    """Sum every parameter's .grad over ranks, through flat buckets of at most ``bucket_elems`` elements (128 MiB of
    fp32: one collective per bucket, never a full copy of a large model's gradients). Same order on every rank."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket, size = [], 0
    for i, p in enumerate(params):
        bucket.append(p)
        size += p.numel()
        if size >= bucket_elems or i == len(params) - 1:
            flat = torch.cat([q.grad.reshape(-1) for q in bucket])
            dist.all_reduce(flat)
            off = 0
            for q in bucket:
                q.grad.copy_(flat[off : off + q.numel()].view_as(q))
                off += q.numel()
            bucket, size = [], 0


def ibn_accum_step(model, micro_batches: Sequence[dict], autocast=None) -> dict:
    """Accumulate into ``.grad`` the gradient of ``QA + kl_weight * KL`` over all micro-batches (of all ranks).

    Args:
        model: a :class:`reatt.model.ReAttModel` in train mode (NOT wrapped in DDP: under torch.distributed the
            gradients are summed over ranks here, so the caller must not average them again).
        micro_batches: K collated batches (dicts with q_ids, q_mask, d_ids, d_mask, labels), the same K and the same
            shapes of n on every rank.
        autocast: a context-manager factory for the forwards (bf16 autocast), or None.
    Returns:
        dict of floats: "loss", "qa_loss", "kl_loss" (the big batch's values, the same on every rank), "n_queries"
        (queries in the student softmax, all ranks), "teacher_gold" (teacher mass on gold documents, when labelled).
    """
    from contextlib import nullcontext

    ac = autocast or nullcontext
    cfg = model.config
    lam = float(cfg.kl_weight)
    use_kl = lam != 0
    rank, world = rank_and_world()
    dev = next(model.parameters()).device
    K = len(micro_batches)
    if K == 0:
        raise ValueError("ibn_accum_step needs at least one micro-batch")
    qa_red = getattr(cfg, "qa_reduction", "token")
    if qa_red not in ("token", "micro"):
        raise ValueError(f"qa_reduction must be 'token' or 'micro', got {qa_red!r}")

    # ---- 1. pre-pass without gradient: cache q/k, masks, offsets, teachers; keep each micro-batch's RNG state ----
    # Without a KL (the QA-only warm-up) there is nothing to cache: each micro-batch runs once, in step 3.
    states, cache = [], []
    if use_kl:
        with torch.no_grad():
            for b in micro_batches:
                states.append(_torch_rng_state(dev))
                with ac():
                    p = model.forward_parts(b["q_ids"], b["q_mask"], b["d_ids"], b["d_mask"], b["labels"])
                cache.append(p)
        end_state = _torch_rng_state(dev)
    n_tok_local = sum(int((b["labels"] != -100).sum()) for b in micro_batches)
    n_tok = n_tok_local
    if world > 1:
        t = torch.tensor([n_tok_local], dtype=torch.float64, device=dev)
        dist.all_reduce(t)
        n_tok = int(t.item())
    n_tok = max(n_tok, 1)

    logs = {}
    grads_q = grads_d = None
    kl_value = 0.0
    if use_kl:
        # ---- 2. the KL over every cached query and document, once; its gradient w.r.t. the cached vectors --------
        Lq = all_reduce_max_int(max(p["q"].shape[1] for p in cache), dev)
        Ld = all_reduce_max_int(max(p["d"].shape[1] for p in cache), dev)
        Q = torch.cat([_pad_to(p["q"], Lq) for p in cache])
        QM = torch.cat([_pad_to(p["q_mask"], Lq, value=False) for p in cache])
        D = torch.cat([_pad_to(p["d"], Ld) for p in cache])
        DM = torch.cat([_pad_to(p["d_mask"], Ld, value=False) for p in cache])
        DQ = torch.cat([p["d_qlen"] for p in cache])
        T = torch.cat([p["teacher"] for p in cache])
        Q, QM = _gather_same_shape(Q, "query vectors"), _gather_same_shape(QM, "query masks")
        D, DM = _gather_same_shape(D, "document vectors"), _gather_same_shape(DM, "document masks")
        DQ, T = _gather_same_shape(DQ, "document offsets"), _gather_same_shape(T, "teacher rows")
        Q = Q.detach().requires_grad_(True)
        D = D.detach().requires_grad_(True)
        with ac():
            kl = model.student_kl(Q, QM, D, DM, DQ, T)
        # Every rank computes the same KL; the gradients are SUMMED over ranks below, so each rank back-propagates
        # 1/world of the part that reaches the parameters directly (scale, head weights, position bias).
        (kl * (lam / world)).backward()
        # (lam / world) * dKL / d(cached vectors): times world below, each rank's own rows get lam * dKL/dv in full.
        grads_q, grads_d = Q.grad, D.grad
        kl_value = float(kl.detach())
        logs["n_queries"] = int(Q.shape[0])
        gold = [b.get("gold") for b in micro_batches]
        if all(g is not None for g in gold):
            g = torch.cat([x.float() for x in gold]).to(dev)
            if bool(g.any()):
                tl = torch.cat([p["teacher"] for p in cache]).float()
                logs["teacher_gold"] = float((tl * g).sum(1).mean())
    del cache

    # ---- 3. re-run each micro-batch with gradient under its RNG state; push the cached gradients into its q/k ----
    qa_sum = 0.0
    q_row = d_row = 0  # this rank's first query / document row in the gathered cache
    if use_kl and world > 1:
        q_row = rank * (grads_q.shape[0] // world)
        d_row = rank * (grads_d.shape[0] // world)
    for k, b in enumerate(micro_batches):
        if use_kl:
            _set_torch_rng_state(states[k], dev)
        with ac():
            p = model.forward_parts(b["q_ids"], b["q_mask"], b["d_ids"], b["d_mask"], b["labels"], teacher=False)
        # "token": the big batch's QA loss is the mean over all its answer tokens, so this micro-batch's share is its
        # token sum. "micro" (the original): each micro-batch's token mean / (K * world).
        ct = torch.promote_types(p["q"].dtype, torch.float32)  # fp32 for bf16/fp32 forwards, fp64 for fp64
        qa = p["qa_loss"].to(ct)
        share = p["n_tokens"] / n_tok if qa_red == "token" else 1.0 / (K * world)
        # (HF's loss is NaN for a micro-batch without answer tokens: it then adds nothing, graph kept.)
        loss = qa * share if p["n_tokens"] else p["logits"].sum().to(ct) * 0.0
        qa_sum += float(loss.detach())
        if use_kl:
            nq, lq = p["q"].shape[:2]
            nd, ld = p["d"].shape[:2]
            gq = grads_q[q_row : q_row + nq, :lq].to(ct)
            gd = grads_d[d_row : d_row + nd, :ld].to(ct)
            # <v, dKL/dv> has gradient dKL/dv w.r.t. v: the chain rule continues into the encoder from here.
            surrogate = (p["q"].to(ct) * gq).sum() + (p["d"].to(ct) * gd).sum()
            loss = loss + (surrogate * world if world > 1 else surrogate)
            q_row += nq
            d_row += nd
        loss.backward()
    if use_kl:
        _set_torch_rng_state(end_state, dev)

    if world > 1:
        # Each rank holds its own micro-batches' share: the big batch's gradient is the sum over ranks.
        _all_reduce_grads([p for p in model.parameters() if p.requires_grad])
        t = torch.tensor([qa_sum], dtype=torch.float64, device=dev)
        dist.all_reduce(t)
        qa_sum = float(t.item())
    logs.update(qa_loss=qa_sum, kl_loss=kl_value, loss=qa_sum + lam * kl_value)
    return logs
