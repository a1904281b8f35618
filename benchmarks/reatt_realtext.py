"""ReAtt on real questions at CPU scale (issue 20): does the reader's attention teach retrieval on real text?

Data (``reatt_kernels.bench.data``: the ``real-all`` corpus, from a local copy of the pinned bigbench 1.0.0 sdist in
``$REATT_DATA/dl``; docs/data.md says where to get it):
- train: SQuADShifts questions (new_wiki, nyt, reddit, amazon), each with its own gold paragraph plus ``--n-docs - 1``
  BM25 distractors (``bm25s``) from the same source, in a seeded random order (no scores: the reader cannot learn a
  position for the gold paragraph);
- dev: ``--n-dev`` held-out SQuAD v1.1 dev questions (no SQuAD-dev article is seen in training); retrieval over ALL
  2600 SQuAD-dev paragraphs (DPR 100-word chunks): R@1/5/20 of the gold paragraph; reading: EM/F1 of FiD over the
  retrieved top ``--n-docs`` (and over gold + BM25 distractors, "given").

Model: the demo-sized T5 from random init (no pretrained T5 can be had here), a BPE tokenizer trained on the training
text with ``tokenizers``. Arms: ``reader`` (ReAtt's teacher), ``uniform`` (a uniform teacher over each question's
documents), ``nokl`` (QA only). References: BM25 and MiniLM (all-MiniLM-L6-v2 token vectors) MaxSim on the same dev
questions and corpus.

    python benchmarks/reatt_realtext.py --out runs/realtext --minutes 20 --seeds 0,1      # the issue's budget
    python benchmarks/reatt_realtext.py --out runs/realtext --minutes 5 --seeds 0          # what docs/reatt.md ran
    python benchmarks/reatt_realtext.py --out runs/realtext --summarize-only               # tables and curves again

Writes OUT/data (JSONL, tokenizer), OUT/<arm>-s<seed>/ (reatt-train runs), OUT/realtext.{json,md,png}; with
``--results DIR`` also copies the JSON/MD/PNG there (e.g. benchmarks/results/cpu).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHIFTS = ("new_wiki", "nyt", "reddit", "amazon")
ARMS = {"reader": [], "uniform": ["--teacher", "uniform"], "nokl": ["--kl-weight", "0"]}
TINY = "d_model=128,num_layers=4,num_decoder_layers=2,num_heads=8,d_kv=16,d_ff=256"
KS = (1, 5, 20)


def _read_jsonl(path) -> list:
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def _write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def real_text() -> tuple[list, list, Path]:
    """(passages, questions, squad-dev corpus dir) of the ``real-all`` corpus (built and cached by
    :mod:`reatt_kernels.bench.data.cache`: SQuAD dev, SQuADShifts, NQ text as FiD JSONL)."""
    from reatt_kernels.bench.data.cache import build_text, corpus_dir

    passages, questions, _ = build_text("real-all")
    return passages, questions, corpus_dir("squad-dev")


def _source(pid: str) -> str:
    return pid.split(":", 1)[0]


def bm25_topk(passages: list, queries: list, k: int) -> list:
    """Top-k passage indices per query by BM25 (bm25s, English stop words)."""
    import bm25s

    ret = bm25s.BM25()
    ret.index(bm25s.tokenize([f"{p.get('title', '')} {p['text']}" for p in passages], stopwords="en",
                             show_progress=False), show_progress=False)
    idx, _ = ret.retrieve(bm25s.tokenize(queries, stopwords="en", show_progress=False), k=min(k, len(passages)),
                          show_progress=False)
    return idx.tolist()


def with_distractors(q: dict, gold: dict, ranked: list, pool: list, n: int, rng: random.Random) -> dict:
    ctxs = [dict(gold, gold=True)] + [pool[j] for j in ranked if pool[j]["id"] != gold["id"]][: n - 1]
    rng.shuffle(ctxs)
    return {"question": q["question"], "answers": q["answers"], "gold_ids": [gold["id"]],
            "ctxs": [{"id": c["id"], "title": c.get("title", ""), "text": c["text"],
                      **({"gold": True} if c.get("gold") else {})} for c in ctxs]}


def train_tokenizer(texts, out_dir: str, vocab: int):
    """Byte-level BPE on the training text; T5's special ids (pad 0, eos 1, unk 2) and "$A </s>"."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "</s>", "<unk>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out_dir)
    return fast


def prepare(a, out: Path) -> dict:
    """Write train/dev/corpus JSONL and the tokenizer to OUT/data (once; reused when present)."""
    data = out / "data"
    paths = {k: str(data / f"{k}.jsonl") for k in ("train", "dev", "dev_all", "corpus")}
    paths["tokenizer"] = str(data / "tokenizer")
    if (data / "done.json").exists():
        return json.loads((data / "done.json").read_text())
    data.mkdir(parents=True, exist_ok=True)
    passages, questions, _ = real_text()
    rng = random.Random(a.data_seed)
    by_src = {}
    for p in passages:
        by_src.setdefault(_source(p["id"]), []).append(p)
    pid = {p["id"]: p for p in passages}
    train, dev = [], []
    for q in questions:
        g = (q.get("gold_ids") or [None])[0]
        if g is None or g not in pid:
            continue
        (train if _source(g) in SHIFTS else dev if _source(g) == "squad-dev" else []).append(q)
    rng.shuffle(train)
    train = train[: a.n_train]
    rng.shuffle(dev)
    dev = dev[: a.n_dev]
    rows = []
    for src in SHIFTS:
        qs = [q for q in train if _source(q["gold_ids"][0]) == src]
        if not qs:
            continue
        pool = by_src[src]
        top = bm25_topk(pool, [q["question"] for q in qs], a.n_docs + 2)
        rows += [with_distractors(q, pid[q["gold_ids"][0]], r, pool, a.n_docs, rng) for q, r in zip(qs, top)]
    rng.shuffle(rows)
    _write_jsonl(paths["train"], rows)
    corpus = by_src["squad-dev"]
    _write_jsonl(paths["corpus"], [{"id": p["id"], "title": p.get("title", ""), "text": p["text"]} for p in corpus])
    top = bm25_topk(corpus, [q["question"] for q in dev], max(KS) + a.n_docs)
    _write_jsonl(paths["dev"], [with_distractors(q, pid[q["gold_ids"][0]], r, corpus, a.n_docs, rng)
                                for q, r in zip(dev, top)])
    _write_jsonl(paths["dev_all"], [{"question": q["question"], "answers": q["answers"], "gold_ids": q["gold_ids"],
                                     "id": q["id"], "bm25": [corpus[j]["id"] for j in r[: max(KS)]]}
                                    for q, r in zip(dev, top)])
    texts = [f"{c['title']} {c['text']}" for r in rows for c in r["ctxs"]] + \
            [r["question"] for r in rows] + [a for r in rows for a in r["answers"]]
    train_tokenizer(texts, paths["tokenizer"], a.vocab)
    info = {**paths, "n_train": len(rows), "n_dev": len(dev), "n_corpus": len(corpus),
            "train_sources": {s: sum(_source(r["gold_ids"][0]) == s for r in rows) for s in SHIFTS}}
    (data / "done.json").write_text(json.dumps(info, indent=1))
    return info


def recall(ranked: list, gold: list) -> dict:
    return {f"R@{k}": sum(bool(set(g) & set(r[:k])) for r, g in zip(ranked, gold)) / max(1, len(gold)) for k in KS}


def references(info: dict) -> dict:
    """BM25 and MiniLM MaxSim R@k over the dev corpus, for the same dev questions."""
    import numpy as np
    import torch

    from reatt_kernels.index import TokenIndex

    dev = _read_jsonl(info["dev_all"])
    gold = [q["gold_ids"] for q in dev]
    res = {"bm25": recall([q["bm25"] for q in dev], gold)}
    _, _, sq = real_text()
    ids = [p["id"] for p in _read_jsonl(sq / "passages.jsonl")]
    qrow = {q["id"]: i for i, q in enumerate(_read_jsonl(sq / "questions.jsonl"))}
    rows = [qrow[q["id"]] for q in dev]
    d = torch.from_numpy(np.load(sq / "doc_tokens_384.npy", mmap_mode="r")[:].astype(np.float32))
    off = torch.from_numpy(np.load(sq / "doc_offsets.npy"))
    qv = torch.from_numpy(np.load(sq / "query_tokens_384.npy", mmap_mode="r")[rows].astype(np.float32))
    qm = torch.from_numpy(np.load(sq / "query_mask.npy")[rows])
    index = TokenIndex.build(d, d_offsets=off, kind="exact", progress=False)
    _, top = index.search(qv, qm, k=max(KS))
    res["minilm_maxsim"] = recall([[ids[j] for j in r if j >= 0] for r in top.tolist()], gold)
    return res


def run_arm(a, info: dict, arm: str, seed: int, out: Path) -> Path:
    run = out / f"{arm}-s{seed}"
    if (run / "final" / "reatt_config.json").exists():
        return run
    if run.exists():
        shutil.rmtree(run)
    # --eval-every 0: no evaluation inside training (final_reading measures the end point): the budget goes to steps.
    ev = ["--eval", info["dev"], "--corpus", info["corpus"]] if a.eval_every else []
    cmd = [sys.executable, "-m", "reatt.train", "--train", info["train"], *ev, "--tokenizer", info["tokenizer"], "--tiny", TINY, "--n-docs", str(a.n_docs),
           "--batch-size", str(a.batch_size), "--lr", str(a.lr), "--warmup", "100", "--weight-decay", "0",
           "--steps", "100000", "--time-budget", str(a.minutes), "--eval-every", str(a.eval_every),
           "--eval-max", str(a.n_dev), "--eval-retrieved", "--eval-batch-size", "16", "--top-k", "1,5,20",
           "--max-query-len", "32", "--max-doc-len", str(a.max_doc_len), "--max-answer-len", "16",
           "--ctx-order", "file", "--threads", str(a.threads), "--seed", str(seed), "--out", str(run),
           "--no-progress", *ARMS[arm]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                      os.environ.get("PYTHONPATH")]))}
    run.mkdir(parents=True)
    (run / "command.txt").write_text(" ".join(cmd) + "\n")
    with open(run / "log.txt", "w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=True)
    return run


def final_reading(info: dict, run: Path, a) -> dict:
    """EM/F1 of the final model reading its own top n retrieved dev passages, and the given gold + distractors."""
    import torch

    from reatt.eval import reading_metrics
    from reatt.retrieve import build_memory_index, load_model, read_corpus, search

    torch.set_num_threads(a.threads)
    model = load_model(str(run / "final"), device="cpu")
    corpus = read_corpus(info["corpus"])
    dev = _read_jsonl(info["dev"])
    index = build_memory_index(model, corpus, a.max_doc_len, "cpu")
    _, top = search(model, index, [q["question"] for q in dev], max(KS + (a.n_docs,)), 32, "cpu")
    ranked = [[corpus[j]["id"] for j in r if j >= 0] for r in top.tolist()]
    rec = recall(ranked, [q["gold_ids"] for q in dev])
    retrieved = [{**q, "ctxs": [corpus[j] for j in r[: a.n_docs] if j >= 0]} for q, r in zip(dev, top.tolist())]
    kw = dict(max_query_len=32, max_doc_len=a.max_doc_len, max_answer_len=16)
    r = reading_metrics(model, retrieved, a.n_docs, "cpu", **kw)
    g = reading_metrics(model, dev, a.n_docs, "cpu", **kw)
    return {**rec, "em": r["em"], "f1": r["f1"], "em_given": g["em"], "f1_given": g["f1"]}


def summarize(a, info: dict, out: Path) -> dict:
    refs = json.loads((out / "references.json").read_text()) if (out / "references.json").exists() else {}
    arms = {}
    for run in sorted(out.glob("*-s*")):
        if not (run / "final").exists():
            continue
        hist = [r for r in map(json.loads, open(run / "metrics.jsonl")) if r["type"] == "eval"]
        losses = [r for r in map(json.loads, open(run / "metrics.jsonl")) if r["type"] == "train"]
        steps = [r for r in map(json.loads, open(run / "metrics.jsonl")) if r["type"] == "train"]
        fin = json.loads((run / "final_reading.json").read_text()) if (run / "final_reading.json").exists() else {}
        last = hist[-1] if hist else {}
        arms[run.name] = {"steps": len(steps), "train_minutes": round(last["train_seconds"] / 60, 1) if last else a.minutes,
                          **{f"R@{k}": last.get(f"retrieval_top{k}") for k in KS}, **fin,
                          "loss_curve": [{k: r.get(k) for k in ("step", "qa_loss", "kl_loss")} for r in losses],
                          "curve": [{k: h.get(k) for k in ("step", "train_seconds", "retrieval_top1", "retrieval_top5",
                                                           "retrieval_top20", "em", "em_retrieved")} for h in hist]}
    res = {"data": {k: info[k] for k in ("n_train", "n_dev", "n_corpus", "train_sources")}, "references": refs,
           "arms": arms, "budget": {"minutes_per_arm": a.minutes, "threads": a.threads}, "load_avg": os.getloadavg()}
    lines = ["| run | steps | train min | R@1 | R@5 | R@20 | EM (retrieved) | F1 (retrieved) | EM (given) | F1 (given) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    for name, r in refs.items():
        lines.append(f"| {name} (reference) | - | - | {fmt(r['R@1'])} | {fmt(r['R@5'])} | {fmt(r['R@20'])} | - | - | - "
                     "| - |")
    for name, r in arms.items():
        lines.append(f"| {name} | {r['steps']} | {r['train_minutes']} | {fmt(r['R@1'])} | {fmt(r['R@5'])} | "
                     f"{fmt(r['R@20'])} | {fmt(r.get('em'))} | {fmt(r.get('f1'))} | {fmt(r.get('em_given'))} | "
                     f"{fmt(r.get('f1_given'))} |")
    res["table"] = "\n".join(lines)
    (out / "realtext.json").write_text(json.dumps(res, indent=1))
    (out / "realtext.md").write_text(res["table"] + "\n")
    _plot(res, out / "realtext.png")
    if a.results:
        os.makedirs(a.results, exist_ok=True)
        for f in ("realtext.json", "realtext.md", "realtext.png"):
            if (out / f).exists():
                shutil.copy(out / f, Path(a.results) / f"reatt_{f}")
    return res


def _plot(res: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"note: matplotlib is not installed, so no plot was written to {path}")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in res["arms"].items():
        lc = r.get("loss_curve", [])
        axes[0].plot([c["step"] for c in lc], [c["qa_loss"] for c in lc], lw=0.8, label=name)
        if any(c["kl_loss"] for c in lc):
            axes[1].plot([c["step"] for c in lc], [c["kl_loss"] for c in lc], lw=0.8, label=name)
    axes[0].set_title("QA loss (training batches)", fontsize=9)
    axes[1].set_title("retrieval KL (training batches)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {list(ARMS)}")
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds")
    ap.add_argument("--minutes", type=float, default=20.0, help="training minutes per arm and seed")
    ap.add_argument("--n-train", type=int, default=20000, help="training questions (SQuADShifts) at most")
    ap.add_argument("--n-dev", type=int, default=300, help="held-out SQuAD-dev questions")
    ap.add_argument("--n-docs", type=int, default=4, help="documents per question (gold + BM25 distractors)")
    ap.add_argument("--batch-size", type=int, default=8, help="questions per step")
    ap.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    ap.add_argument("--max-doc-len", type=int, default=160, help="document tokens")
    ap.add_argument("--vocab", type=int, default=8000, help="BPE vocabulary size")
    ap.add_argument("--eval-every", type=int, default=150, help="evaluation every N steps")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the question sample and ctx order")
    ap.add_argument("--results", help="also copy realtext.{json,md,png} here (as reatt_realtext.*)")
    ap.add_argument("--summarize-only", action="store_true", help="only rewrite the table and the curves")
    a = ap.parse_args()
    out = Path(a.out)
    t0 = time.time()
    info = prepare(a, out)
    print(f"data: {info['n_train']} train, {info['n_dev']} dev, {info['n_corpus']} dev paragraphs "
          f"({time.time() - t0:.0f} s)", flush=True)
    if not a.summarize_only:
        if not (out / "references.json").exists():
            (out / "references.json").write_text(json.dumps(references(info), indent=1))
        for seed in [int(s) for s in a.seeds.split(",")]:
            for arm in a.arms.split(","):
                run = run_arm(a, info, arm, seed, out)
                if not (run / "final_reading.json").exists():
                    (run / "final_reading.json").write_text(json.dumps(final_reading(info, run, a)))
                print(f"{run.name}: done ({(time.time() - t0) / 60:.1f} min)", flush=True)
    res = summarize(a, info, out)
    print(res["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
