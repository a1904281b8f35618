"""reatt-index: turn a trained ReAtt model into a token index of its corpus, and retrieve with it.

    reatt-index build  --model RUN/final --corpus corpus.jsonl --out INDEX [--kind exact|residual] [--nbits 4]
    reatt-index search --model RUN/final --index INDEX --questions q.jsonl --k 100 --out run.jsonl
    torchrun --nproc_per_node 8 -m reatt.index_cli build ...    # each rank encodes its own parts

``build`` encodes every passage with the bi-encoder layers only (blocks < B) and keeps the layer-B keys of the
retrieval head (bf16 autocast on GPU), in parts of ``--part-size`` passages: a killed build, rerun with the same
arguments, continues at the first unfinished part. ``search`` encodes each question the same way, searches with the
index's own pipeline (MaxSim sum over query tokens, no position bias, as ReAtt does at inference) and writes each
question's ranked ctxs in the JSONL format that ``reatt-train`` and ``reatt-eval`` read: one round's output is the
next round's training input (re-retrieval).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from .config import MAX_DOC_LEN, MAX_QUERY_LEN
from .data import doc_id
from .distributed import setup_distributed


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="reatt-index", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p):
        p.add_argument("--model", required=True, help="a model saved by reatt-train (OUT/final)")
        p.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (GPU when there is one)")
        p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto", help="bf16 autocast (auto: on GPU)")
        p.add_argument("--batch-size", type=int, default=256, help="passages or questions encoded per batch")
        p.add_argument("--no-progress", action="store_true", help="no tqdm bar")

    b = sub.add_parser("build", help="encode a corpus and write a token index (resumable)")
    common(b)
    b.add_argument("--corpus", required=True, help="JSONL of passages {id?, title?, text}")
    b.add_argument("--out", required=True, help="index directory (created; rerun to resume a killed build)")
    b.add_argument("--kind", choices=["exact", "residual"], default="exact",
                   help="exact: fp16 keys, exact MaxSim; residual: centroid + nbits per dimension (PLAID-style)")
    b.add_argument("--nbits", type=int, default=4, help="residual bits per dimension (1, 2, 4, 8)")
    b.add_argument("--n-centroids", default="auto", help="residual centroids (auto: from the token count)")
    b.add_argument("--part-size", type=int, default=100_000, help="passages per part (the unit of resumption)")
    b.add_argument("--max-doc-len", type=int, default=MAX_DOC_LEN, help="passage tokens (\"title: ... context: ...\")")
    b.add_argument("--seed", type=int, default=0, help="seed of the residual codec's sample and k-means")

    s = sub.add_parser("search", help="retrieve each question's top-k passages into reatt-train's JSONL")
    common(s)
    s.add_argument("--index", required=True, help="an index directory written by reatt-index build")
    s.add_argument("--questions", required=True,
                   help="JSONL with \"question\" (and \"answers\"; gold labels as ctxs with \"gold\": true or "
                        "\"gold_ids\" are carried over as \"gold\" on the retrieved ctxs)")
    s.add_argument("--k", type=int, default=100, help="passages per question")
    s.add_argument("--out", required=True, help="output JSONL (question, answers, ctxs ranked by score)")
    s.add_argument("--corpus", help="the corpus JSONL (default: the one the index was built from)")
    s.add_argument("--max-query-len", type=int, default=MAX_QUERY_LEN, help="question tokens (\"question: ...\")")
    s.add_argument("--index-device", default="cpu", help="where the index parts are loaded and searched (cpu, cuda)")
    s.add_argument("--nprobe", type=int, help="residual: cells probed per query token (default: the index's)")
    s.add_argument("--ncandidates", type=int, help="residual: documents reranked exactly (default: the index's)")
    return ap


def write_run(path: str, questions: list, corpus: list, scores, ids) -> None:
    """One JSON line per question: question, answers, gold_ids (when known) and ctxs ranked by score; each ctx is
    the corpus passage plus "score" (and "gold" when the question has gold labels). Written to a temp file, then
    renamed."""
    index_of = {doc_id(c): i for i, c in enumerate(corpus)}
    tmp = f"{path}.tmp-{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w") as f:
        for qrow, srow, irow in zip(questions, scores.tolist(), ids.tolist()):
            gold = set(qrow["gold_ids"])
            unknown = [g for g in gold if g not in index_of]
            if unknown:
                print(f"warning: gold ids not in the corpus: {unknown[:3]}", file=sys.stderr)
            ctxs = []
            for s, i in zip(srow, irow):
                if i < 0:
                    break
                # FiD's reader reads c['title'], c['text'], c['score'] and str(c['id']) of every ctx: always write them
                # (a passage without an id is named by its corpus line, 0-based, the index's doc id; its gold flag
                # still comes from the question's gold ids, matched against the passage as the corpus holds it).
                c = {"id": str(i), "title": "", **{k: v for k, v in corpus[i].items() if k != "gold"}}
                c["score"] = round(float(s), 6)
                if gold:
                    c["gold"] = doc_id(corpus[i]) in gold
                ctxs.append(c)
            row = {"question": qrow["question"], "answers": qrow["answers"], "ctxs": ctxs}
            if gold:
                row["gold_ids"] = sorted(gold)
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def main(argv: Optional[list] = None) -> int:
    """The console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    import torch

    from .retrieve import (build_index, file_digest, load_index, load_model, pick_device, read_corpus, read_questions,
                           search)

    rank, world, ddp_dev = setup_distributed()
    device = ddp_dev if world > 1 else pick_device(args.device)
    model = load_model(args.model, args.tokenizer, device)
    if args.cmd == "build":
        n_centroids = args.n_centroids if args.n_centroids == "auto" else int(args.n_centroids)
        meta = build_index(model, args.corpus, args.out, kind=args.kind, nbits=args.nbits, part_size=args.part_size,
                           batch_size=args.batch_size, max_len=args.max_doc_len, device=device, bf16=args.bf16,
                           n_centroids=n_centroids, model_dir=args.model, progress=not args.no_progress,
                           seed=args.seed)
        if rank == 0:
            print(f"index: {args.out} ({meta['n_docs']} passages in {meta['n_parts']} parts, {meta['kind']})")
    else:
        if args.k < 1:
            raise SystemExit(f"--k must be >= 1, got {args.k}")
        index, meta = load_index(args.index, device=args.index_device)
        corpus = read_corpus(args.corpus or meta["corpus"])
        if file_digest(args.corpus or meta["corpus"]) != meta["corpus_sha256"]:
            raise SystemExit(f"{args.corpus or meta['corpus']} is not the corpus the index was built from (sha256 "
                             f"differs): pass that corpus with --corpus")
        questions = read_questions(args.questions)
        params = {}
        if meta["kind"] == "residual":
            params = {k: v for k, v in (("nprobe", args.nprobe), ("ncandidates", args.ncandidates)) if v is not None}
        scores, ids = search(model, index, [q["question"] for q in questions], args.k, args.max_query_len, device,
                             args.batch_size, args.bf16, progress=not args.no_progress and rank == 0, **params)
        if rank == 0:
            write_run(args.out, questions, corpus, scores, ids)
            print(f"run: {args.out} ({len(questions)} questions x top {args.k})")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
