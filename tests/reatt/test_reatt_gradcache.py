"""GradCache in-batch negatives (reatt.gradcache.ibn_accum_step) against a float64 oracle written from the method:
K micro-batches (on 1 process, and on 2 gloo ranks) give the loss and the parameter gradients of ONE batch made of all
of them, to 1e-10 relative, with dropout on. The oracle runs every micro-batch forward WITH gradient (each under the
same RNG stream, so the same dropout masks), builds the big batch's student from the spec (MaxSim mean over query
tokens plus T5's relative-position bias at each document's own pair offset, scale exp(c) * softmax(w / tau)[head],
log_softmax over all documents), and back-propagates QA + lambda * KL once."""
from __future__ import annotations

import copy
import os
import socket

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from reatt.data import Collator, Example  # noqa: E402
from reatt.demo import generate, load_tokenizer  # noqa: E402
from reatt.gradcache import ibn_accum_step  # noqa: E402

from .test_reatt_model import _one_thread, make_model  # noqa: E402,F401  (the fixture applies here too)
from ..utils import spawn_with_timeout  # noqa: E402

N_DOCS = 3
SEED = 1234
REL = 1e-10


def _micro_batches(tok, k: int, per: int = 2, offset: int = 0) -> list:
    """k micro-batches of ``per`` questions: ragged query lengths (so pair offsets differ across queries), an empty
    document slot, answers of different lengths (so the QA token mean differs from the mean of micro-batch means)."""
    rows = generate(n_entities=12, pool=5, n_ctx=N_DOCS, n_train=40, n_dev=2, seed=5)[0]
    exs = [Example(r["question"], r["answers"], r["ctxs"]) for r in rows[offset : offset + k * per]]
    exs = copy.deepcopy(exs)
    exs[0].question += " of the river of the capital"
    exs[0].answers = [exs[0].answers[0] + " river capital"]
    if len(exs) > 3:
        exs[3].question += " the"
        exs[3].ctxs = exs[3].ctxs[:2]  # a missing third document: an empty slot
    col = Collator(tok, N_DOCS, 32, 32, 8)
    return [col(exs[i * per : (i + 1) * per]) for i in range(k)]


def _fp64_model(tok, seed=0):
    m = make_model(tok, dropout=0.1, seed=seed, use_fused_kernels=False)  # fp64: the torch reference ops
    return m.double().train()


def _bias(model, r: torch.Tensor) -> torch.Tensor:
    """T5's relative-position bias of the retrieval head at distances r (key minus query position)."""
    from transformers.models.t5.modeling_t5 import T5Attention

    a = model.t5.encoder.block[0].layer[0].SelfAttention
    bucket = T5Attention._relative_position_bucket(r, bidirectional=True, num_buckets=a.relative_attention_num_buckets,
                                                   max_distance=a.relative_attention_max_distance)
    return a.relative_attention_bias.weight[bucket, model.config.retrieval_head]


def oracle_loss(model, batches_per_rank: list, seeds: list, qa_reduction: str = "token"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, qa, kl) of the big batch made of every rank's micro-batches, differentiable, float64. QA: the token mean
    over the big batch ("token"), or the original's mean of the micro-batches' token means ("micro": its fid_run
    divides each micro-batch's QA loss by the number of accumulations, and DDP averages the ranks)."""
    parts = []
    for seed, mbs in zip(seeds, batches_per_rank):
        torch.manual_seed(seed)
        for b in mbs:
            parts.append(model.forward_parts(b["q_ids"], b["q_mask"], b["d_ids"], b["d_mask"], b["labels"]))
    n_tok = sum(p["n_tokens"] for p in parts)
    if qa_reduction == "micro":
        qa = sum(p["qa_loss"] for p in parts) / len(parts)
    else:
        qa = sum(p["qa_loss"] * p["n_tokens"] for p in parts) / n_tok
    queries, docs, teach = [], [], []
    for p in parts:
        B, n = p["teacher"].shape
        for a in range(B):
            qlen = int(p["q_mask"][a].sum())
            queries.append(p["q"][a][p["q_mask"][a]])
            teach.append(p["teacher"][a])
            for k in range(n):
                j = a * n + k
                docs.append((p["d"][j][p["d_mask"][j]], qlen))
    N, M = len(queries), len(docs)
    S = []
    for q in queries:
        row = []
        for dk, owner in docs:
            if dk.shape[0] == 0:
                row.append(torch.tensor(float("-inf"), dtype=torch.float64))
                continue
            i = torch.arange(q.shape[0])[:, None]
            j = torch.arange(dk.shape[0])[None, :]
            s = q @ dk.T + _bias(model, owner + j - i)
            row.append(s.max(1).values.mean())
        S.append(torch.stack(row))
    S = torch.stack(S)
    w = torch.softmax(model.head_logits / model.config.head_temperature, 0)[model.config.retrieval_head]
    scale = model.log_scale.exp() * w
    student = torch.where(torch.isinf(S), S, scale * S.masked_fill(torch.isinf(S), 0.0))
    logp = torch.log_softmax(student, 1)
    t = torch.zeros(N, M, dtype=torch.float64)
    n = N_DOCS
    for a in range(N):
        t[a, a * n : a * n + n] = teach[a]
    pos = t > 0
    kl = torch.where(pos, t * (torch.log(torch.where(pos, t, torch.ones_like(t))) - torch.where(pos, logp, 0.0)),
                     0.0).sum() / N
    return qa + model.config.kl_weight * kl, qa, kl


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


def _compare_grads(got: dict, ref_model) -> None:
    ref = {n: p.grad for n, p in ref_model.named_parameters() if p.grad is not None}
    assert ref, "the oracle produced no gradient"
    for n, g in ref.items():
        if g.norm() == 0:
            continue
        assert n in got, f"{n}: no gradient from ibn_accum_step"
        err = _rel_err(got[n], g)
        assert err <= REL, f"{n}: relative gradient error {err:.3g} > {REL}"
    for name in ("head_logits", "log_scale"):
        assert ref[name].norm() > 0, f"{name} got no gradient: the student's parameters would not learn"


@pytest.mark.parametrize("K", [1, 3])
def test_ibn_accum_equals_one_big_batch_fp64(K):
    tok = load_tokenizer()
    model = _fp64_model(tok)
    oracle = copy.deepcopy(model)
    mbs = _micro_batches(tok, K)
    torch.manual_seed(SEED)
    logs = ibn_accum_step(model, mbs)
    loss, qa, kl = oracle_loss(oracle, [mbs], [SEED])
    loss.backward()
    loss, qa, kl = float(loss.detach()), float(qa.detach()), float(kl.detach())
    assert abs(logs["loss"] - loss) <= REL * abs(loss)
    assert abs(logs["kl_loss"] - kl) <= REL * abs(kl) and kl > 0
    assert abs(logs["qa_loss"] - qa) <= REL * abs(qa)
    assert logs["n_queries"] == 2 * K
    _compare_grads({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, oracle)


def test_ibn_accum_qa_reduction_micro_is_the_originals_fp64():
    """--qa-reduction micro: QA is the mean of the K micro-batches' token means, as the original's fid_run
    (qa_loss_factor / accumulated['total']); the KL part is unchanged. The micro-batches hold different numbers of
    answer tokens, so the two reductions differ (checked)."""
    tok = load_tokenizer()
    model = _fp64_model(tok)
    model.config.qa_reduction = "micro"
    oracle = copy.deepcopy(model)
    mbs = _micro_batches(tok, 3)
    assert len({int((b["labels"] != -100).sum()) for b in mbs}) > 1
    torch.manual_seed(SEED)
    logs = ibn_accum_step(model, mbs)
    loss, qa, _ = oracle_loss(oracle, [mbs], [SEED], qa_reduction="micro")
    _, qa_token, _ = oracle_loss(copy.deepcopy(model), [mbs], [SEED])
    assert abs(float(qa) - float(qa_token)) > 1e-6 * abs(float(qa))
    loss.backward()
    assert abs(logs["qa_loss"] - float(qa)) <= REL * abs(float(qa))
    _compare_grads({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, oracle)


def test_ibn_accum_dropout_rng_replay_matters():
    """The re-run must replay the pre-pass's dropout masks: with a different RNG state in the re-run, the cached
    vectors of a micro-batch no longer equal its live ones and the gradient is off (this is what the 1e-10 test
    protects)."""
    import reatt.gradcache as gc

    tok = load_tokenizer()
    model = _fp64_model(tok)
    oracle = copy.deepcopy(model)
    mbs = _micro_batches(tok, 2)
    orig = gc._set_torch_rng_state
    try:
        gc._set_torch_rng_state = lambda state, dev: None  # no replay: the re-run draws fresh masks
        torch.manual_seed(SEED)
        ibn_accum_step(model, mbs)
    finally:
        gc._set_torch_rng_state = orig
    loss, _, _ = oracle_loss(oracle, [mbs], [SEED])
    loss.backward()
    got = model.t5.encoder.block[0].layer[0].SelfAttention.q.weight.grad
    ref = oracle.t5.encoder.block[0].layer[0].SelfAttention.q.weight.grad
    assert _rel_err(got, ref) > 1e-6


# ---- 2 gloo ranks ----------------------------------------------------------------------------------------------------
def _worker(rank, world, port, out_path):
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    done = False
    try:
        tok = load_tokenizer()
        model = _fp64_model(tok)
        mbs = _micro_batches(tok, 2, offset=4 * rank)
        torch.manual_seed(SEED + rank)
        logs = ibn_accum_step(model, mbs)
        if rank == 0:
            torch.save({"logs": logs, "grads": {n: p.grad.clone() for n, p in model.named_parameters()
                                                if p.grad is not None}}, out_path)
        dist.barrier()
        done = True
    finally:
        if done:
            os._exit(0)  # see tests/reatt/test_reatt_train.py: leave without the gloo teardown (torch deadlock)
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ibn_accum_two_gloo_ranks_equals_one_big_batch(tmp_path):
    out_path = str(tmp_path / "ibn.pt")
    spawn_with_timeout(_worker, (2, _free_port(), out_path), nprocs=2)
    res = torch.load(out_path)
    tok = load_tokenizer()
    oracle = _fp64_model(tok)
    loss, qa, kl = oracle_loss(oracle, [_micro_batches(tok, 2, offset=0), _micro_batches(tok, 2, offset=4)],
                               [SEED, SEED + 1])
    loss.backward()
    assert res["logs"]["n_queries"] == 8
    loss, kl = float(loss.detach()), float(kl.detach())
    assert abs(res["logs"]["loss"] - loss) <= REL * abs(loss)
    assert abs(res["logs"]["kl_loss"] - kl) <= REL * abs(kl)
    _compare_grads(res["grads"], oracle)
