"""reatt-train: train ReAtt (retriever + reader in one T5) from question-answer pairs alone.

    reatt-train --demo                                   # toy QA on CPU, random init, prints the learning curve
    reatt-train --train train.jsonl --eval dev.jsonl --model /path/t5-base --out runs/x --steps 20000
    torchrun --nproc_per_node 8 -m reatt.train ...       # DDP; in-batch negatives span every rank
    torchrun --nproc_per_node 8 -m reatt.train --preset nq-large --model DIR ...   # the paper's NQ run (docs/reatt.md)

The loss is QA cross-entropy + kl_weight * KL(reader teacher || retriever). No retrieval labels are used: a ctx's
"gold" field (if any) is read only by evaluation (retrieval top-k accuracy of the gold document).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from .config import MAX_DOC_LEN, MAX_QUERY_LEN, ReAttConfig
from .data import (Collator, Example, ShardSampler, build_corpus, count_jsonl, doc_id, load_jsonl,
                   sort_ctxs_by_score)
from .distributed import rank_and_world, setup_distributed
from .eval import em_score
from .gradcache import ibn_accum_step
from .model import ReAttModel, tiny_t5_config


# ---- arguments -------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="reatt-train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("data")
    g.add_argument("--train", help="training JSONL (FiD/ReAtt format: question, answers, ctxs[{title, text}])")
    g.add_argument("--eval", help="evaluation JSONL (same format); its gold ctxs (\"gold\": true) score retrieval")
    g.add_argument("--corpus", help="JSONL of {id?, title, text} documents for retrieval evaluation and re-retrieval "
                                    "(default: every ctx of --train and --eval)")
    g.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    g.add_argument("--n-docs", type=int, default=10, help="documents per question (first n ctxs)")
    g.add_argument("--target", choices=["random", "first"], default="random",
                   help="training target: one answer drawn at random per use (the original's random.choice), or "
                        "always answers[0]")
    g.add_argument("--ctx-order", choices=["score", "file"], default="score",
                   help="score: sort each question's ctxs by descending \"score\" before taking the first n (the "
                        "original's sort_data; questions whose ctxs lack scores keep the file order); file: as given")
    g.add_argument("--max-query-len", type=int, default=MAX_QUERY_LEN, help="query tokens (\"question: ...\")")
    g.add_argument("--max-doc-len", type=int, default=MAX_DOC_LEN, help="document tokens (\"title: ... context: ...\")")
    g.add_argument("--max-answer-len", type=int, default=32, help="answer tokens")
    g = ap.add_argument_group("model")
    g.add_argument("--model", help="local T5 checkpoint directory (offline); omit for a random tiny T5")
    g.add_argument("--tiny", default="d_model=64,num_layers=4,num_decoder_layers=2,num_heads=2,d_ff=128",
                   help="random T5 shape when --model is absent (comma-separated T5Config fields)")
    g.add_argument("--retrieval-layer", type=int, help="B: encoder block of the retriever (default: preset / half)")
    g.add_argument("--retrieval-head", type=int, help="retrieval head of block B (default: preset / 0)")
    g.add_argument("--kl-weight", type=float, default=8.0, help="weight of KL(teacher || retriever)")
    g.add_argument("--no-in-batch-negatives", action="store_true", help="score each query only on its own docs")
    g.add_argument("--no-train-pos-bias", action="store_true", help="detach the retrieval head's position bias")
    g.add_argument("--teacher", choices=["reader", "uniform"], default="reader",
                   help="ablation: 'uniform' replaces the reader's attention by a uniform teacher over each "
                        "query's docs")
    g.add_argument("--teacher-docs-only", action="store_true",
                   help="alternative teacher: count only document tokens, each head renormalised over them (default: "
                        "the original's softmax over all encoder tokens, each pair's query tokens included)")
    g.add_argument("--head-temperature", type=float, default=0.001, help="tau of the learned head weights")
    g.add_argument("--backend", default="auto", help="kernel backend of the fused ops: auto, cpu, triton, cuda")
    g.add_argument("--reference-ops", action="store_true", help="use the plain-torch reference ops (backend=torch)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute encoder blocks in backward")
    g.add_argument("--dropout", type=float, help="override T5's dropout rate")
    g = ap.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=8, help="questions per micro-batch per rank")
    g.add_argument("--accum", type=int, default=1, help="gradient accumulation micro-batches per step")
    g.add_argument("--ibn-accum", type=int, default=1,
                   help="GradCache in-batch negatives: K micro-batches per step share ONE student softmax (all their "
                        "documents, on every rank), with the gradient of one batch K times larger and the activation "
                        "memory of one micro-batch (the original's accumulation_for_ibn)")
    g.add_argument("--qa-reduction", choices=["token", "micro"], default="token",
                   help="with --ibn-accum: the QA loss as the token mean over the big batch (token), or the mean of "
                        "the micro-batches' token means as the original's fid_run (micro)")
    g.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not on norms/biases)")
    g.add_argument("--warmup", type=int, default=100, help="linear warmup steps (then linear decay to 0)")
    g.add_argument("--warmup-ratio", type=float, default=0.0,
                   help="warmup as a fraction of --steps (overrides --warmup when > 0; the paper: 0.1)")
    g.add_argument("--kl-warmup", type=int, default=0,
                   help="curriculum: ramp the KL weight linearly from 0 over the first N steps (0: full from the "
                        "start)")
    g.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping (0: off)")
    g.add_argument("--bf16", choices=["auto", "on", "off"], default="auto", help="bf16 autocast (auto: on GPU)")
    g.add_argument("--seed", type=int, default=0, help="seed of the init, the data order and dropout")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; demo: 1)")
    g = ap.add_argument_group("evaluation, re-retrieval, checkpoints")
    g.add_argument("--out", default="runs/reatt", help="output directory (checkpoints, metrics.jsonl)")
    g.add_argument("--eval-every", type=int, default=500, help="evaluate every N steps (0: only at the end)")
    g.add_argument("--eval-max", type=int, default=1000, help="evaluate on at most N questions")
    g.add_argument("--eval-batch-size", type=int, default=16,
                   help="questions per evaluation batch (reading and own-ctx scoring; sharded over ranks)")
    g.add_argument("--top-k", default="1,5,20", help="retrieval top-k accuracies to report")
    g.add_argument("--eval-retrieved", action="store_true", help="also report EM when reading the retrieved top n")
    g.add_argument("--reretrieve-every", type=int, default=0,
                   help="every N steps: index the corpus with the current bi-encoder (exact TokenIndex, sharded "
                        "across ranks) and refresh each training question's ctxs with its top n-docs")
    g.add_argument("--reretrieve-at-start", action="store_true",
                   help="refresh training ctxs with the loaded model before the first step (between rounds)")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists")
    g.add_argument("--stop-after", type=int, default=0,
                   help="stop this invocation after N steps with a checkpoint, as a preempted job would (0: off)")
    g.add_argument("--time-budget", type=float, default=0.0, help="stop after this many minutes (0: no limit)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    g = ap.add_argument_group("presets")
    g.add_argument("--preset", choices=sorted(PRESETS),
                   help="named hyper-parameters of a paper run (docs/reatt.md); flags given explicitly win. nq-large: " +
                        ", ".join(f"{k}={v}" for k, v in PRESETS["nq-large"].items()))
    g = ap.add_argument_group("demo")
    g.add_argument("--demo", action="store_true",
                   help="toy open-domain QA from random init on CPU (generated data + tokenizer); prints and plots "
                        "gold-document top-1 retrieval accuracy and EM")
    g.add_argument("--plot", help="PNG path for the learning curve (demo default: OUT/demo.png; skipped with a "
                                  "notice when matplotlib is not installed)")
    return ap


# lr 5e-4, not 2e-3: at 2e-3 the tiny reader never learns to copy the answer out of the documents within 10 min
# (QA loss stays at the no-reading floor ln(12)/2, EM ~0.2); at 3e-4..1e-3 it crosses the floor by step ~900 and,
# at 5e-4, reads (EM > 0.9) by step ~1600 (measured on the earlier demo task, whose distractors held answers of their
# own; on the current one it reads by step ~500: benchmarks/results/cpu/reatt_demo_ablation.json).
DEMO_DEFAULTS = dict(n_docs=4, batch_size=16, lr=5e-4, warmup=50, steps=3000, eval_every=100, kl_weight=8.0,
                     max_query_len=16, max_doc_len=16, max_answer_len=4, time_budget=10.0, eval_retrieved=True,
                     weight_decay=0.0,
                     # 8 heads of 16: a tiny T5 learns to copy from its input several times faster than with 2-4
                     # heads of 64 (measured on this task); retrieval vectors are then 16-d.
                     tiny="d_model=128,num_layers=4,num_decoder_layers=2,num_heads=8,d_kv=16,d_ff=256")


# The paper's NQ run with T5-large (the author's FiD fork, train_reader_large.sh): 8 GPUs x 8 queries x 100 documents,
# the 8 per GPU as 4 GradCache micro-batches of 2 (accumulation_for_ibn 4), so one student softmax spans 64 x 100
# documents. 250 tokens per (query, document) pair: the original truncates the pair jointly; here 50 query + 200
# document tokens (NQ questions are far below 50). Layer 12, head 6 come from the T5-large architecture preset (or the
# saved model of the previous round).
PRESETS = {
    "nq-large": dict(lr=5e-5, n_docs=100, max_query_len=50, max_doc_len=200, max_answer_len=50, kl_weight=8.0,
                     retrieval_layer=12, retrieval_head=6, warmup_ratio=0.1, clip=1.0, weight_decay=0.01,
                     batch_size=2, ibn_accum=4, steps=8000, gradient_checkpointing=True),
}


def _given_flags(ap: argparse.ArgumentParser, argv: list) -> set:
    """Destinations of the flags given explicitly on the command line (``--flag v`` or ``--flag=v``)."""
    given = set()
    for a in ap._actions:
        if any(o == x or x.startswith(o + "=") for o in a.option_strings for x in argv):
            given.add(a.dest)
    return given


def apply_defaults(args, ap: argparse.ArgumentParser, argv: list, defaults: dict) -> None:
    """Set each of ``defaults`` on ``args`` unless its flag was given explicitly."""
    given = _given_flags(ap, argv)
    for k, v in defaults.items():
        if k not in given:
            setattr(args, k, v)


def _parse_tiny(s: str) -> dict:
    out = {}
    for kv in filter(None, s.split(",")):
        k, v = kv.split("=")
        out[k.strip()] = float(v) if "." in v else int(v)
    return out


# ---- checkpoints -----------------------------------------------------------------------------------------------------
def atomic_save(obj, path: str) -> None:
    """torch.save to a temp file in the same directory, fsync, then rename: a crash leaves the old file intact."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_ckpt_")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ---- optimisation ----------------------------------------------------------------------------------------------------
def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, warmup: int, steps: int):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "layer_norm" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)

    def schedule(step):
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def check_step_args(args) -> None:
    """Combinations the step cannot honour, as clear errors (not silent fallbacks)."""
    if args.ibn_accum < 1:
        raise SystemExit(f"reatt-train: --ibn-accum must be >= 1, got {args.ibn_accum}")
    if args.accum < 1:
        raise SystemExit(f"reatt-train: --accum must be >= 1, got {args.accum}")
    if args.ibn_accum > 1 and args.accum > 1:
        raise SystemExit("reatt-train: use --ibn-accum K or --accum K, not both (--ibn-accum already accumulates K "
                         "micro-batches, and shares their documents as negatives)")
    if args.ibn_accum > 1 and args.kl_weight == 0:
        # The QA-only warm-up (e.g. --preset nq-large --kl-weight 0): without a KL, in-batch negatives mean nothing and
        # GradCache's no-grad pre-pass would cost a forward per micro-batch for nothing (~25 %). The same K
        # micro-batches per step, as plain accumulation.
        print(f"reatt-train: --kl-weight 0: --ibn-accum {args.ibn_accum} runs as --accum {args.ibn_accum} (no KL, so no "
              "GradCache pre-pass)", file=sys.stderr)
        args.accum, args.ibn_accum = args.ibn_accum, 1


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (what DDP's constructor does)."""
    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, 0)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ---- evaluation and re-retrieval (through reatt.retrieve: the same index code as reatt-index) ----------------------
def _corpus_search(model: ReAttModel, questions, corpus, k: int, args, device, distributed: bool = False):
    """Top-k corpus indices [Nq, k] per question: an exact TokenIndex (ShardedIndex across ranks when
    ``distributed``) built batch by batch from the bi-encoder keys, searched by MaxSim sum without position bias."""
    from .retrieve import build_memory_index, search

    index = build_memory_index(model, corpus, args.max_doc_len, device, distributed=distributed)
    _, ids = search(model, index, questions, k, args.max_query_len, device)
    return ids


def _shard(items: list, rank: int, world: int) -> list:
    """This rank's share of an evaluation list: items rank, rank + world, ... (every rank gets a near-equal share)."""
    return items[rank::world]


def _sum_over_ranks(values: list, device) -> list:
    """Element-wise sum of a list of numbers over ranks (float64; the values themselves when not distributed)."""
    from .distributed import is_distributed

    if not is_distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def own_docs_hits(model: ReAttModel, tok, examples, args, device) -> tuple[int, int]:
    """(hits, questions): gold top-1 among each question's own ctxs (first n_docs), by the inference score (MaxSim
    sum, no bias), over the questions that have a gold ctx there."""
    col = Collator(tok, args.n_docs, args.max_query_len, args.max_doc_len, args.max_answer_len)
    hits = total = 0
    bs = args.eval_batch_size
    for i in range(0, len(examples), bs):
        b = to_device(col(examples[i : i + bs]), device)
        B, n, Ld = b["d_ids"].shape
        q, qm = model.encode_query_ids(b["q_ids"], b["q_mask"])
        d, dm = model.encode_document_ids(b["d_ids"].view(B * n, Ld), b["d_mask"].view(B * n, Ld))
        s = model.score(q.float(), qm, d.float(), dm).view(B, B, n)[torch.arange(B), torch.arange(B)]  # [B, n]
        has = b["gold"].any(1)
        best = s.argmax(1)
        hits += int((b["gold"][torch.arange(B), best] & has).sum())
        total += int(has.sum())
    return hits, total


@torch.no_grad()
def evaluate(model: ReAttModel, tok, examples, corpus, corpus_index, args, device) -> dict:
    """Collective under torch.distributed (call it on every rank; every rank gets the same dict).

    - ``em``: EM reading the given ctxs (each rank reads its share of the questions; the counts are summed);
    - ``retrieval_own_top1``: gold top-1 among the given ctxs (questions with a gold ctx; sharded the same way);
    - ``retrieval_top{k}``: gold top-k over the corpus (questions with gold ids), ``answer_top{k}``: DPR answer
      containment top-k over the corpus (every question: data without gold ids too). The corpus is a ShardedIndex
      across ranks (each rank encodes 1/world of it), searched by every rank for all questions;
    - ``em_retrieved`` (``--eval-retrieved``): EM reading the retrieved top n_docs, sharded.
    Reading runs ``--eval-batch-size`` questions at a time with greedy decoding on a KV cache."""
    from .eval import has_answer, passage_text

    model.eval()
    rank, world = rank_and_world()
    exs = examples[: args.eval_max]
    ks = [int(k) for k in str(args.top_k).split(",") if k]
    res = {}
    col = Collator(tok, args.n_docs, args.max_query_len, args.max_doc_len, args.max_answer_len)
    bs = args.eval_batch_size

    def em_hits(batch_exs):
        hits = 0.0
        for i in range(0, len(batch_exs), bs):
            part = batch_exs[i : i + bs]
            b = to_device(col(part), device)
            gen = model.generate_answers(b["q_ids"], b["q_mask"], b["d_ids"], b["d_mask"],
                                         max_new_tokens=args.max_answer_len)
            preds = tok.batch_decode(gen, skip_special_tokens=True)
            hits += sum(em_score(p, e.answers) for p, e in zip(preds, part))
        return hits

    mine = _shard(exs, rank, world)
    with_gold = [e for e in exs if e.gold_ids]
    own_hits, own_total = own_docs_hits(model, tok, [e for e in mine if e.gold_ids], args, device) if with_gold \
        else (0, 0)
    em_sum, own_hits, own_total = _sum_over_ranks([em_hits(mine), own_hits, own_total], device)
    res["em"] = em_sum / max(1, len(exs))
    if with_gold:
        res["retrieval_own_top1"] = own_hits / max(1, own_total)
    top = _corpus_search(model, [e.question for e in exs], corpus, max(ks + [args.n_docs]), args, device,
                         distributed=world > 1)
    ids = [[doc_id(corpus[j]) for j in row.tolist() if j >= 0] for row in top]
    if with_gold:
        for k in ks:
            res[f"retrieval_top{k}"] = float(np.mean([bool(set(e.gold_ids) & set(r[:k]))
                                                      for e, r in zip(exs, ids) if e.gold_ids]))
        res["retrieval_chance_top1"] = 1.0 / max(1, len(corpus))
    first = [next((j for j, c in enumerate(row.tolist()) if c >= 0 and has_answer(e.answers, passage_text(corpus[c]))),
                  None) for e, row in zip(exs, top)]
    for k in ks:
        res[f"answer_top{k}"] = float(np.mean([p is not None and p < k for p in first])) if exs else 0.0
    if args.eval_retrieved:
        from .data import Example

        rexs = [Example(e.question, e.answers, [corpus[j] for j in row[: args.n_docs].tolist() if j >= 0],
                        e.line, e.gold_ids) for e, row in zip(exs, top)]
        res["em_retrieved"] = _sum_over_ranks([em_hits(_shard(rexs, rank, world))], device)[0] / max(1, len(rexs))
    model.train()
    return res


@torch.no_grad()
def reretrieve(model: ReAttModel, tok, examples, corpus, args, device) -> None:
    """Refresh every training question's ctxs with its top n_docs corpus documents (exact index; under DDP every
    rank encodes its slice of the corpus into a shard of a ShardedIndex)."""
    model.eval()
    questions = [e.question for e in examples]
    rank, world = rank_and_world()
    first = 0
    if world > 1:
        # Each rank holds its share of the questions; the ShardedIndex search is collective over the same queries,
        # so every rank searches all of them (against its shard of the corpus) and keeps its own rows.
        parts = [None] * world
        dist.all_gather_object(parts, questions)
        first = sum(len(p) for p in parts[:rank])
        questions = [q for p in parts for q in p]
    top = _corpus_search(model, questions, corpus, args.n_docs, args, device, distributed=True)
    top = top[first : first + len(examples)]
    for e, row in zip(examples, top):
        e.ctxs = [corpus[j] for j in row.tolist() if j >= 0]
    model.train()


# ---- the loop --------------------------------------------------------------------------------------------------------
def reatt_config_for(args, t5_config=None) -> ReAttConfig:
    """The ReAttConfig of this run: architecture fields (layer, head, tau) from the saved model of the previous round
    when ``--model`` holds one, else from the flags, else from the original's preset for the T5's shape (an error
    naming --retrieval-layer/--retrieval-head otherwise); training choices always from this run's flags."""
    from .config import ARCH_FIELDS, CONFIG_NAME

    train_kw = dict(kl_weight=args.kl_weight, in_batch_negatives=not args.no_in_batch_negatives,
                    train_pos_bias=not args.no_train_pos_bias, backend=args.backend,
                    use_fused_kernels=not args.reference_ops, teacher=args.teacher,
                    teacher_includes_query=not args.teacher_docs_only, qa_reduction=args.qa_reduction)
    flags = {"retrieval_layer": args.retrieval_layer, "retrieval_head": args.retrieval_head,
             "head_temperature": args.head_temperature}
    if args.model and os.path.exists(os.path.join(args.model, CONFIG_NAME)):
        saved = ReAttConfig.load(args.model)
        given = _given_flags(build_parser(), getattr(args, "_argv", []))
        clash = [f"--{f.replace('_', '-')} {flags[f]} (saved: {getattr(saved, f)})" for f in ARCH_FIELDS
                 if flags[f] is not None and flags[f] != getattr(saved, f)
                 and (f != "head_temperature" or f in given)]
        if clash:
            raise SystemExit(f"reatt-train: {args.model} holds a ReAttModel whose retriever differs from "
                             f"{', '.join(clash)}: its saved head weights belong to the saved retriever; drop those "
                             "flags to continue from it")
        return ReAttConfig(**{**{f: getattr(saved, f) for f in ARCH_FIELDS}, **train_kw})
    if t5_config is None:  # random tiny T5: B = half the encoder, head 0 unless given
        return ReAttConfig(retrieval_layer=args.retrieval_layer if args.retrieval_layer is not None
                           else args._num_layers // 2,
                           retrieval_head=args.retrieval_head or 0, head_temperature=args.head_temperature,
                           **train_kw)
    try:
        return ReAttConfig.for_architecture(t5_config.num_layers, t5_config.num_heads,
                                            retrieval_layer=args.retrieval_layer, retrieval_head=args.retrieval_head,
                                            head_temperature=args.head_temperature, **train_kw)
    except ValueError as e:
        raise SystemExit(f"reatt-train: --model {args.model}: {e}") from None


def build_model(args, tok, device) -> ReAttModel:
    if args.model:
        from transformers import T5Config

        tcfg = T5Config.from_pretrained(args.model, local_files_only=True)
        rc = reatt_config_for(args, tcfg)
        extra = {"dropout_rate": args.dropout} if args.dropout is not None else {}
        model = ReAttModel.from_pretrained(args.model, reatt_config=rc, **extra)
        model.tokenizer = tok
    else:
        shape = _parse_tiny(args.tiny)
        if args.dropout is not None:
            shape["dropout_rate"] = args.dropout
        tcfg = tiny_t5_config(vocab_size=len(tok), **shape)
        args._num_layers = tcfg.num_layers
        rc = reatt_config_for(args)
        model = ReAttModel.from_config(tcfg, rc, tokenizer=tok, seed=args.seed)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model.to(device)


def _plot(history: list, path: str, title: str) -> bool:
    """Learning curve PNG. matplotlib is optional (the "bench" extra): without it, one notice and no plot."""
    try:
        import matplotlib
    except ImportError:
        print(f"note: matplotlib is not installed, so no plot was written to {path} (pip install matplotlib)",
              file=sys.stderr)
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("retrieval_top1", "gold-doc top-1 retrieval (full corpus)"), ("em", "EM (given ctxs)"),
                       ("em_retrieved", "EM (reading retrieved top-n)")):
        if any(key in h for h in history):
            ax.plot(steps, [h.get(key, float("nan")) for h in history], marker=".", label=label)
    if history and "retrieval_chance_top1" in history[0]:
        ax.axhline(history[0]["retrieval_chance_top1"], color="gray", ls=":", label="retrieval chance")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def train(args) -> list:
    """Run training; returns the evaluation history (a list of metric dicts)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = setup_distributed()
    main_proc = rank == 0
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    from transformers import AutoTokenizer

    tok_dir = args.tokenizer or args.model
    if tok_dir is None:
        raise SystemExit("reatt-train: pass --tokenizer (or --model with tokenizer files), or --demo")
    tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    if args.train is None:
        raise SystemExit("reatt-train: --train is required (or --demo)")
    # Each rank streams and keeps only its share of the training file (examples rank, rank + world, ...).
    train_exs = load_jsonl(args.train, rank=rank, world=world)
    n_train = count_jsonl(args.train) if world > 1 else len(train_exs)
    eval_exs = load_jsonl(args.eval) if args.eval else []
    if args.ctx_order == "score":
        sort_ctxs_by_score(train_exs)
        sort_ctxs_by_score(eval_exs)
    if args.corpus:
        corpus = []
        with open(args.corpus) as f:
            for ln, raw in enumerate(f, 1):
                if raw.strip():
                    c = json.loads(raw)
                    if "text" not in c:
                        raise SystemExit(f"{args.corpus}:{ln}: missing field 'text'")
                    corpus.append(c)
    else:
        corpus, _ = build_corpus(train_exs + eval_exs)
        if world > 1:  # every rank needs the same corpus (its shard of the index, re-retrieval): the union of shares
            parts = [None] * world
            dist.all_gather_object(parts, corpus)
            corpus, _ = build_corpus([Example("", [""], p) for p in parts])
    corpus_index = {doc_id(c): i for i, c in enumerate(corpus)}

    model = build_model(args, tok, device)
    check_step_args(args)
    qa_only = args.kl_weight == 0
    if qa_only:
        # The QA-only warm-up: no teacher, no student. The student's own parameters get no gradient at all, so they
        # are frozen (DDP requires every trainable parameter to receive one).
        model.head_logits.requires_grad_(False)
        model.log_scale.requires_grad_(False)
    if args.warmup_ratio > 0:
        args.warmup = int(round(args.warmup_ratio * args.steps))
    opt, sched = make_optimizer(model, args.lr, args.weight_decay, args.warmup, args.steps)
    col = Collator(tok, args.n_docs, args.max_query_len, args.max_doc_len, args.max_answer_len, target=args.target)
    sampler = ShardSampler(len(train_exs), args.batch_size, args.seed, rank, world, n_train)
    use_bf16 = args.bf16 == "on" or (args.bf16 == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext

    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    step, history, reretrieved = 0, [], False
    if args.resume and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        step, history = ck["step"], ck.get("history", [])
        if ck.get("ctx_ids") is not None:  # saved in global order: this rank's share is rank, rank + world, ...
            for e, ids in zip(train_exs, ck["ctx_ids"][rank::world]):
                e.ctxs = [corpus[corpus_index[i]] for i in ids]
            reretrieved = True
        set_rng_state(ck["rng"][rank] if isinstance(ck["rng"], list) else ck["rng"])
        if main_proc:
            print(f"resumed from {ckpt_path} at step {step}", file=sys.stderr)

    ddp = model
    if world > 1 and args.ibn_accum > 1:
        broadcast_parameters(model)  # GradCache steps sum the gradients over ranks themselves: no DDP wrapper
    elif world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    model.train()
    metrics_path = os.path.join(args.out, "metrics.jsonl")

    def save(step_now):
        rngs = [None] * world
        ctx_ids = [[doc_id(c) for c in e.ctxs] for e in train_exs] if reretrieved else None
        if world > 1:
            dist.all_gather_object(rngs, rng_state())
            if reretrieved:  # back to the file's order: example r + world * j is rank r's j-th
                parts = [None] * world
                dist.all_gather_object(parts, ctx_ids)
                ctx_ids = [None] * n_train
                for r, p in enumerate(parts):
                    ctx_ids[r::world] = p
        else:
            rngs = [rng_state()]
        if main_proc:
            atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                         "step": step_now, "rng": rngs, "history": history, "args": vars(args),
                         "ctx_ids": ctx_ids},
                        ckpt_path)
        if world > 1:
            dist.barrier()

    def log(rec):
        if main_proc:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def run_eval(step_now, t_train):
        if not eval_exs:
            return
        # Every rank evaluates its share (collective): no rank idles at a barrier while rank 0 evaluates alone.
        te = time.time()
        res = evaluate(model, tok, eval_exs, corpus, corpus_index, args, device)
        rec = {"step": step_now, "train_seconds": round(t_train, 1), "eval_seconds": round(time.time() - te, 1),
               **res}
        history.append(rec)
        if main_proc:
            log({"type": "eval", **rec})
            parts = [f"{k} {v:.3f}" for k, v in res.items() if k != "retrieval_chance_top1"]
            print(f"[eval] step {step_now:5d}  {t_train:6.1f}s  " + "  ".join(parts), flush=True)

    pbar = None
    if main_proc and not args.no_progress:
        from tqdm import tqdm

        pbar = tqdm(total=args.steps, initial=step, desc="reatt-train", dynamic_ncols=True, file=sys.stderr)
    t_train, t0, step0 = 0.0, time.time(), step
    if step == 0 and args.reretrieve_at_start and not reretrieved:
        reretrieve(model, tok, train_exs, corpus, args, device)  # round k+1 reads what round k's retriever finds
        reretrieved = True
    if step == 0 and args.eval_every:
        run_eval(0, 0.0)
    while step < args.steps:
        if args.reretrieve_every and step > 0 and step % args.reretrieve_every == 0:
            reretrieve(model, tok, train_exs, corpus, args, device)
            reretrieved = True
        ts = time.time()
        if args.kl_warmup:
            model.config.kl_weight = args.kl_weight * min(1.0, step / args.kl_warmup)
        logs = {"loss": 0.0, "qa_loss": 0.0, "kl_loss": 0.0}
        if args.ibn_accum > 1:
            micro = [to_device(col([train_exs[i] for i in sampler.batch(step * args.ibn_accum + k)]),
                               device) for k in range(args.ibn_accum)]
            logs.update(ibn_accum_step(model, micro, autocast=autocast))
        for micro in range(args.accum if args.ibn_accum <= 1 else 0):
            idx = sampler.batch(step * args.accum + micro)
            batch = to_device(col([train_exs[i] for i in idx]), device)
            sync = micro == args.accum - 1 or world == 1
            ctx = ddp.no_sync() if (world > 1 and not sync) else nullcontext()
            with ctx, autocast():
                out = ddp(**batch, compute_kl=not qa_only)
                loss = out["loss"] / args.accum
            with ctx:
                loss.backward()
            for k in ("loss", "qa_loss", "kl_loss"):
                logs[k] += float(out[k].detach()) / args.accum
            if "teacher" in out and batch["gold"].any():
                # Diagnostics only: teacher mass and student top-1 on the gold document (labels never reach the loss).
                g = batch["gold"].float()
                tg = float((out["teacher"] * g).sum(1).mean()) / args.accum
                logs["teacher_gold"] = logs.get("teacher_gold", 0.0) + tg
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip) if args.clip > 0 else torch.tensor(0.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        t_train += time.time() - ts
        rec = {"type": "train", "step": step, **{k: round(v, 5) for k, v in logs.items()},
               "grad_norm": round(float(gnorm), 4), "lr": sched.get_last_lr()[0],
               "scale": round(float(model.student_scale().detach()), 4)}
        log(rec)
        if pbar is not None:
            pbar.update(1)
            pbar.set_postfix(loss=f"{logs['loss']:.3f}", qa=f"{logs['qa_loss']:.3f}", kl=f"{logs['kl_loss']:.3f}")
        out_of_time = bool(args.time_budget and (time.time() - t0) > args.time_budget * 60)
        if args.stop_after and step - step0 >= args.stop_after and step < args.steps:
            save(step)
            if pbar is not None:
                pbar.close()
            return history
        if args.time_budget and world > 1:  # every rank must take the same decision
            flag = torch.tensor([1 if out_of_time else 0], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            out_of_time = bool(flag.item())
        if args.eval_every and step % args.eval_every == 0 and step < args.steps and not out_of_time:
            run_eval(step, t_train)
        if args.save_every and step % args.save_every == 0:
            save(step)
        if out_of_time:
            if main_proc:
                print(f"time budget of {args.time_budget} min reached at step {step}", file=sys.stderr)
            break
    if pbar is not None:
        pbar.close()
    run_eval(step, t_train)
    save(step)
    if main_proc:
        model.save_pretrained(os.path.join(args.out, "final"))
        if args.plot and history:
            if _plot(history, args.plot, f"ReAtt toy QA from random init ({step} steps, {t_train / 60:.1f} min CPU)"):
                print(f"plot: {args.plot}")
    return history


def main(argv: Optional[list] = None) -> int:
    """The console script; returns the exit status."""
    ap = build_parser()
    args = ap.parse_args(argv)
    args._argv = list(argv if argv is not None else sys.argv[1:])
    if args.preset:
        apply_defaults(args, ap, args._argv, PRESETS[args.preset])
    if args.demo:
        from .demo import write_demo

        given = {a.dest for a in ap._actions if any(o in (argv if argv is not None else sys.argv[1:])
                                                     for o in a.option_strings)}
        for k, v in DEMO_DEFAULTS.items():
            if k not in given:
                setattr(args, k, v)
        paths = write_demo(os.path.join(args.out, "data"))
        args.train, args.eval, args.tokenizer = paths["train"], paths["dev"], paths["tokenizer"]
        args.corpus = args.corpus or paths["corpus"]
        if args.plot is None:
            args.plot = os.path.join(args.out, "demo.png")  # never into the repository's committed results
        if args.threads is None:
            # One thread: the model is tiny, and on a shared 2-core machine two torch threads spin against other
            # processes (measured: 4.5 s/step with 2 threads under load vs 0.2 s/step with 1).
            args.threads = 1
    hist = train(args)
    if args.demo and hist:
        print("\nstep  train_s  gold@1(own docs)  gold@1(corpus)  EM(given)  EM(retrieved)")
        for h in hist:
            print(f"{h['step']:5d}  {h['train_seconds']:7.1f}  {h.get('retrieval_own_top1', float('nan')):16.3f}  "
                  f"{h.get('retrieval_top1', float('nan')):14.3f}  {h['em']:9.3f}  "
                  f"{h.get('em_retrieved', float('nan')):13.3f}")
    if dist.is_initialized():
        # Drain every rank's pending gloo/NCCL work before teardown: destroying a group while its worker thread is
        # still releasing finished work can deadlock on the GIL (seen with gloo in the DDP test).
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
