"""``reatt-bench``: the main job. MaxSim retrieval latency on real text (default) or on the synthetic generator, every
backend side by side with naive PyTorch and the default compressed index. The measurement helpers live in
:mod:`reatt_kernels.bench.util` (shared with the scripts in ``benchmarks/`` and the index benchmark, so a number printed
by any of them means the same thing).

The job:
1. loads the corpus.
   - real text (default): passages and questions encoded with all-MiniLM-L6-v2 (384-d token vectors, or
     ``--encoder DIR``; :mod:`reatt_kernels.bench.data`). The default, ``docstrings``, is the docstrings of the
     installed Python standard library, torch and numpy (about 330k token vectors; nothing to download), so the job
     runs wherever the project installs; ``--quick`` uses ``docstrings-small``. Named corpora: ``squad-dev`` and
     ``real-all`` (from a local copy of the bigbench 1.0.0 sdist), ``docstrings-large``, and the user's own
     ``beir:PATH`` or ``jsonl:PATH``. The first run encodes the corpus (``docstrings``: about 3 minutes on 2 cores),
     later runs load the cache. The queries are a seeded sample of ``--queries`` questions that have a gold passage;
     each is at most 32 tokens, with its mask. A corpus asked for by name whose source is missing exits 2 with the
     cause and the file that fixes it; when the default corpus cannot be encoded (no encoder anywhere) the job says
     why and runs on the synthetic corpus instead, so the default run never fails for a missing optional source.
   - ``--corpus synthetic``: the docs/baselines.md clustered corpus, built deterministically
     (:func:`reatt_kernels.bench.datasets.clustered_corpus`, packed, 48-128 tokens per document, d = 128; about 20k
     documents on CPU, 200k on a GPU; tqdm shows progress) and queries of 32 noisy tokens drawn from one document each
     (that document is the query's gold);
2. measures the machine's roofline in the same process (streaming bandwidth, and the compute ceiling: on CPU the
   bf16 dot-product or fp32 FMA peak of the C probes, on GPU a bf16 matmul; :func:`reatt_kernels.bench.util.roofline`);
3. times ``scores = maxsim_packed(q, corpus); scores.topk(k)`` with each backend in ``available_backends()``, where
   ``corpus = prepare_corpus(d_tokens, d_offsets)`` is made once before any timing (offsets validated once; its cost
   is each row's ``prepare_ms``; a search engine stores its corpus once, then searches it many times; the cpu kernel's
   bf16 screen is left off: it does not pay yet, see prepare_corpus), (a backend that cannot run is reported "n/a"
   with its reasons), next to naive PyTorch
   (pad to 128 + mask, ``einsum``, ``amax``, sum; chunked over documents: the docs/baselines.md baseline);
4. real text: builds the default index (``TokenIndex.build`` with its defaults, through the public API only) and times
   its search at the same batch sizes; then scores ``--queries`` questions with exact search and with the index:
   gold@k (a gold passage in the top k) for both, and the index's recall@k and eps-recall@k against exact
   (eps-recall: a returned passage counts when its exact score is within a relative 0.01 of the exact k-th score),
   and nDCG@10, recall@100 and MRR@10 against the corpus's relevance judgements
   (:mod:`reatt_kernels.bench.ir_metrics`; BEIR's qrels, or the gold passages of the other corpora);
5. prints a table, and saves JSON and a PNG plot under ``benchmarks/results/<device>/`` (or ``--out``).

``--index`` (synthetic) adds the compressed-index modes from ``reatt_kernels.bench.index.run(args)`` (needs faiss).

Roofline of one batch call: the documents are streamed once, so
``bytes = T * dim * itemsize`` (T real tokens; padding is not useful work) and ``FLOPs = 2 * (query tokens) * T * dim``
(query tokens: B * Lq, or the unmasked ones of real questions);
``floor = max(bytes / measured bandwidth, FLOPs / measured compute ceiling)`` and "% of roofline" is ``floor / p50``. The
index's row is held to the same floor (that of exact search over the full-precision vectors), so its "% of roofline"
above 100 means it beats the exact floor by not reading every vector.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from .data.fetch import SourceError
from .data.sources import DEFAULT as DEFAULT_CORPUS
from .util import (
    GIB,
    NAIVE_CHUNK_ELEMS,
    apply_roofline,
    best_roofline,
    compute_ceiling,
    env_info,
    floor_ms,
    format_table,
    naive_maxsim,
    resolve_device,
    results_dir,
    roofline,
    short_reason,
    sync,
    time_fn,
    write_json,
)


# ---- the main job -----------------------------------------------------------------------------------------------------

BACKEND_ORDER = ("torch", "cpu", "triton", "cuda")
QUICK_CORPUS = "docstrings-small"  # --quick without --corpus: seconds to encode
EPS = 0.01  # eps-recall's relative tolerance (ann-benchmarks' epsilon recall, as in the index benchmark)

COLUMNS = [
    ("backend", "backend", ""),
    ("docs", "docs", "d"),
    ("batch", "batch", "d"),
    ("ms_per_query_p50", "p50 ms/q", ".3f"),
    ("ms_per_query_p99", "p99 ms/q", ".3f"),
    ("qps", "QPS", ".1f"),
    ("GBps", "GB/s", ".1f"),
    ("pct_roofline", "% roofline", ".1f"),
    ("speedup_vs_naive", "x naive", ".2f"),
    ("recall_vs_naive", "recall@k", ".3f"),
    ("note", "note", ""),
]

# Real text adds the retrieval quality of each system, measured on --queries questions: against exact search, and
# against the corpus's relevance judgements.
REAL_COLUMNS = COLUMNS[:-1] + [("gold_at_k", "gold@k", ".3f"), ("recall_vs_exact", "recall@k vs exact", ".3f"),
                               ("eps_recall_vs_exact", "eps-recall@k", ".3f"), ("ndcg@10", "nDCG@10", ".3f"),
                               ("recall@100", "R@100", ".3f"), ("mrr@10", "MRR@10", ".3f"), ("note", "note", "")]


def _defaults(device: torch.device, quick: bool, corpus: str = "synthetic") -> dict:
    if corpus != "synthetic":
        # Real text: the encoder's vectors (dim None: its own width, 384 for MiniLM), batches 1 and 16 (issue 17), fp32
        # on CPU (the CPU kernels' fast path).
        return {"dim": None, "batch": "1,16", "dtype": "float16" if device.type == "cuda" else "float32",
                "queries": 50 if quick else 200, "backends": "cpu,triton,cuda"}
    if device.type == "cuda":
        return {"docs": 50_000 if quick else 200_000, "batch": "1,16", "dtype": "float16"}
    return {"docs": 2_000 if quick else 20_000, "batch": "1,4", "dtype": "float32"}


def _corpus_arg(value: str) -> str:
    """--corpus: "synthetic" or a name :func:`reatt_kernels.bench.data.sources.resolve` knows (checked before
    anything runs, so a typo is a usage error, exit 2)."""
    if value == "synthetic":
        return value
    from .data.sources import resolve

    try:
        resolve(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows a flag's default only when it has a real one (not None / False), and keeps the epilog's line breaks."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reatt-bench",
        description="MaxSim retrieval latency on real text (by default the docstrings of the installed Python "
        "standard library, torch and numpy, encoded with all-MiniLM-L6-v2 and cached on first use; nothing to "
        "download) or on a synthetic clustered corpus: every available reatt_kernels backend side by side with naive "
        "PyTorch and the default compressed index, with gold@k, the index's eps-recall against exact, and nDCG@10, "
        "recall@100 and MRR@10 against the relevance judgements. Prints a table; saves JSON and a PNG plot. "
        "docs/data.md lists the corpora, their sources and licences.",
        formatter_class=HelpFormatter,
        epilog="examples:\n"
        "  reatt-bench                        # docstrings (real text), batches 1,16, exact vs the default index\n"
        "  reatt-bench --quick                # docstrings-small: seconds to encode, short timing\n"
        "  reatt-bench --corpus beir:~/scifact          # your BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv)\n"
        "  reatt-bench --corpus jsonl:~/nq-dev.jsonl    # FiD/DPR JSONL (questions with answers and ctxs)\n"
        "  reatt-bench --corpus squad-dev     # needs bigbench-1.0.0.tar.gz in $REATT_DATA/dl (docs/data.md)\n"
        "  reatt-bench --corpus synthetic     # 20k clustered docs on CPU (200k on a GPU), batches 1,4 (GPU: 1,16)\n"
        "  reatt-bench --corpus synthetic --quick --index   # small and short, plus the compressed-index modes\n"
        "outputs: <out>/reatt_bench.json (env, roofline, formulas, one row per backend x batch) and reatt_bench.png",
    )
    p.add_argument("--device", default="auto", help="auto (cuda when a GPU is visible), cpu or cuda")
    p.add_argument("--corpus", default=None, type=_corpus_arg,
                   help=f"real text (reatt_kernels.bench.data; built and cached under $REATT_DATA on first use): "
                   f"{DEFAULT_CORPUS} (default; --quick: {QUICK_CORPUS}), docstrings-large, squad-dev, real-all, "
                   f"beir:PATH or jsonl:PATH; or synthetic, the clustered generator")
    p.add_argument("--encoder", default=None,
                   help="real text: a local Hugging Face or sentence-transformers model folder to encode with "
                   "(default: the pinned all-MiniLM-L6-v2)")
    p.add_argument("--queries", type=int, default=None,
                   help="real text: questions (with a gold passage) scored for gold@k and eps-recall (default 200; "
                   "--quick 50)")
    p.add_argument("--no-index", action="store_true", help="real text: skip the default index")
    p.add_argument("--docs", type=int, default=None,
                   help="synthetic: documents in the corpus (default: 20000 on CPU, 200000 on GPU; --quick: 2000 / "
                   "50000)")
    p.add_argument("--batch", default=None,
                   help="comma-separated query batch sizes, one measurement each (default: real text 1,16; synthetic "
                   "1,4 on CPU, 1,16 on GPU)")
    p.add_argument("--q-len", type=int, default=32, help="synthetic: tokens per query (real questions: at most 32)")
    p.add_argument("--dim", type=int, default=None,
                   help="token embedding dimension (default: synthetic 128; real text the encoder's, 384 for MiniLM; "
                   "a smaller value uses PCA vectors fitted on the corpus tokens)")
    p.add_argument("--min-len", type=int, default=48, help="synthetic: shortest document, tokens")
    p.add_argument("--max-len", type=int, default=128,
                   help="synthetic: longest document, tokens (naive pads to this; real text: the longest passage)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="corpus and query dtype (default: float32 on CPU, float16 on GPU)")
    p.add_argument("--topk", type=int, default=10, help="k of the top-k that every search returns")
    p.add_argument("--seed", type=int, default=0, help="corpus seed (queries use seed + 1)")
    p.add_argument("--backends", default=None,
                   help="comma-separated subset of torch,cpu,triton,cuda, or all (naive is always run unless "
                   "--no-naive; default: all on the synthetic corpus; on real text all but the torch reference, whose "
                   "batch-16 call takes many seconds on 2 cores and would break the 10-minute first run)")
    p.add_argument("--no-naive", action="store_true", help="skip the naive PyTorch baseline")
    p.add_argument("--reps", type=int, default=5, help="CPU: at least this many timed calls per measurement")
    p.add_argument("--budget-s", type=float, default=1.0, help="CPU: keep timing until this many seconds have passed")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--index", action="store_true",
                   help="synthetic: also run the compressed-index modes (reatt_kernels.bench.index.run), when available")
    p.add_argument("--quick", action="store_true", help="small corpus and short timing (the device check uses it)")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results/<device>/)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    return p


def _make_search(backend: str, q, corpus, topk: int, naive_inputs=None, q_mask=None):
    import reatt_kernels as rk

    k = min(topk, corpus.n_docs)
    if backend == "naive":
        d_pad, d_mask = naive_inputs
        # Masked query tokens are zero vectors (data.encode.pad_queries): each adds max_j 0 = 0 to a score, so the naive
        # baseline needs no query mask to give the masked scores.

        def fn():
            return naive_maxsim(q, d_pad, d_mask).topk(k, dim=1)
    else:

        def fn():
            return rk.maxsim_packed(q, corpus, None, q_mask, backend=backend).topk(k, dim=1)
    return fn


def _hit_at_1(idx: torch.Tensor, gold: Sequence) -> float:
    return sum(int(i) in set(g) for i, g in zip(idx[:, 0].tolist(), gold)) / max(1, len(gold))


def run_search(args, device: torch.device, d_tokens, d_offsets, queries, gold, roof: dict,
               q_mask: Optional[torch.Tensor] = None) -> list[dict]:
    """One row per (provider, batch). Providers that cannot run give a row with ``status = "n/a"`` and the reason.

    gold: per query, its gold document ids (a list each), or a tensor of one source document per query (synthetic).
    q_mask: bool [Q, Lq] for ragged real questions (None: every query token counts)."""
    if isinstance(gold, torch.Tensor):
        gold = [[int(g)] for g in gold.tolist()]
    import reatt_kernels as rk

    avail = rk.available_backends()
    wanted = BACKEND_ORDER if args.backends == "all" else tuple(b.strip() for b in args.backends.split(",") if b.strip())
    providers = ([] if args.no_naive else ["naive"]) + [b for b in BACKEND_ORDER if b in wanted]
    naive_inputs = None
    if "naive" in providers:
        from .datasets import pad_packed

        naive_inputs = pad_packed(d_tokens, d_offsets, max_len=args.max_len)
    # The corpus is stored once in the kernels' layout (validated offsets; the cpu kernel's bf16 screen where it runs),
    # as a search engine would, and every backend searches that.
    sync(device)
    t0 = time.perf_counter()
    corpus = rk.prepare_corpus(d_tokens, d_offsets)
    sync(device)
    prepare_ms = (time.perf_counter() - t0) * 1e3
    n_docs = d_offsets.numel() - 1
    T, D = d_tokens.shape
    rows = []
    for batch in args.batches:
        q = queries[:batch]
        qm = None if q_mask is None else q_mask[:batch]
        q_tokens = batch * q.shape[1] if qm is None else int(qm.sum())
        bytes_ = T * D * d_tokens.element_size() + q.numel() * q.element_size()
        flops = 2.0 * q_tokens * T * D
        fl_ms, bound = floor_ms(bytes_, flops, roof)
        ref_top = None
        naive_p50 = None
        for prov in providers:
            row = {"backend": prov, "docs": n_docs, "batch": batch, "tokens": T, "query_tokens": q_tokens,
                   "bytes": bytes_, "flops": flops, "floor_ms": fl_ms, "bound": bound}
            if prov != "naive":
                row["prepare_ms"] = prepare_ms
            status = avail.get(prov, "ok") if prov != "naive" else "ok"
            if prov == "triton" and device.type == "cpu":
                status = ["on CPU triton is the interpreter (tests only), not a benchmark provider"]
            if status != "ok":
                row.update(status="n/a", note=short_reason(status))
                rows.append(row)
                continue
            fn = _make_search(prov, q, corpus, args.topk, naive_inputs, qm)
            try:
                vals, idx = fn()  # first call: compile / autotune / fault in pages, and the result to check
                sync(device)
            except Exception as exc:  # a backend that rejects these inputs is "n/a", never a crash
                row.update(status="n/a", note=short_reason(exc))
                rows.append(row)
                continue
            t = time_fn(fn, device, quantiles=(0.5, 0.2, 0.8, 0.99), min_reps=args.reps, budget_s=args.budget_s,
                        warmup=0)
            row.update(status="ok", p50_ms=t["p50"], p20_ms=t["p20"], p80_ms=t["p80"], p99_ms=t["p99"], n=t["n"],
                       timing=t["method"])
            row["ms_per_query_p50"] = t["p50"] / batch
            row["ms_per_query_p99"] = t["p99"] / batch
            row["qps"] = batch / (t["p50"] * 1e-3)
            row["GBps"] = bytes_ / (t["p50"] * 1e-3) / 1e9
            row["TFLOPs"] = flops / (t["p50"] * 1e-3) / 1e12
            row["pct_roofline"] = 100.0 * fl_ms / t["p50"]
            idx = idx.cpu()
            row["hit_at_1"] = _hit_at_1(idx, gold[:batch])
            if prov == "naive":
                ref_top, naive_p50 = idx, t["p50"]
            if ref_top is not None:
                inter = [len(set(a.tolist()) & set(b.tolist())) / max(1, b.numel()) for a, b in zip(idx, ref_top)]
                row["recall_vs_naive"] = sum(inter) / len(inter)
            if naive_p50 is not None:
                row["speedup_vs_naive"] = naive_p50 / t["p50"]
            rows.append(row)
            print(f"  {prov:>6} batch {batch:>3}: p50 {t['p50']:.3f} ms  ({row['pct_roofline']:.1f}% of roofline)",
                  flush=True)
    return rows


# ---- real text: the corpus, the default index, retrieval quality ------------------------------------------------------

def sample_questions(ec, args, dtype: torch.dtype):
    """A seeded sample of the corpus's questions that have a gold passage, and the corpus in ``dtype``.

    Returns (d_tokens [T, dim] ``dtype``, d_offsets [N+1] int64, q [Qs, 32, dim] ``dtype``, q_mask [Qs, 32],
    gold: Qs lists of passage ids, qrels: Qs dicts {passage id: grade}, picked question indices)."""
    have = [i for i, g in enumerate(ec.gold) if g]
    if not have:
        raise SourceError(f"corpus {ec.name}: no question has a gold passage, so there is nothing to score")
    n = min(len(have), max(args.queries, max(args.batches)))
    g = torch.Generator().manual_seed(args.seed)
    pick = sorted(have[i] for i in torch.randperm(len(have), generator=g)[:n].tolist())
    q = ec.query_tokens[pick].to(dtype)
    q_mask = ec.query_mask[pick].clone()
    d_tokens = ec.doc_tokens.to(dtype) if ec.doc_tokens.dtype != dtype else ec.doc_tokens.clone()
    return (d_tokens, ec.doc_offsets.clone(), q, q_mask, [ec.gold[i] for i in pick], [ec.qrels[i] for i in pick],
            pick)


def build_default_index(ec, device):
    """``TokenIndex.build`` with its defaults on the fp16 corpus (the public API only, so the index's own defaults are
    what is measured) -> (index, build seconds)."""
    from reatt_kernels.index import TokenIndex

    t0 = time.perf_counter()
    index = TokenIndex.build(ec.doc_tokens.to(device), d_offsets=ec.doc_offsets.to(device))
    return index, time.perf_counter() - t0


def run_index_latency(args, device, index, q, q_mask, gold, exact_rows: list[dict]) -> list[dict]:
    """Rows "index" per batch: the default index's search, timed like the exact backends and held to the exact floor."""
    rows = []
    for batch in args.batches:
        ref = next((r for r in exact_rows if r["batch"] == batch), {})
        row = {"backend": "index", "docs": index.n_docs, "batch": batch, "tokens": index.n_tokens,
               "bytes": ref.get("bytes"), "flops": ref.get("flops"), "floor_ms": ref.get("floor_ms"),
               "bound": ref.get("bound"), "bytes_per_token": index.bytes_per_token,
               "note": f"{index.kind} index, defaults, {index.bytes_per_token:.0f} B/token"}

        def fn(b=batch):
            return index.search(q[:b], q_mask[:b], k=args.topk)

        _, idx = fn()
        t = time_fn(fn, device, quantiles=(0.5, 0.2, 0.8, 0.99), min_reps=args.reps, budget_s=args.budget_s, warmup=0)
        row.update(status="ok", p50_ms=t["p50"], p20_ms=t["p20"], p80_ms=t["p80"], p99_ms=t["p99"], n=t["n"],
                   timing=t["method"], ms_per_query_p50=t["p50"] / batch, ms_per_query_p99=t["p99"] / batch,
                   qps=batch / (t["p50"] * 1e-3), hit_at_1=_hit_at_1(idx.cpu(), gold[:batch]))
        if row["floor_ms"]:
            row["pct_roofline"] = 100.0 * row["floor_ms"] / t["p50"]
        naive = next((r for r in exact_rows if r["batch"] == batch and r["backend"] == "naive"
                      and r.get("status") == "ok"), None)
        if naive:
            row["speedup_vs_naive"] = naive["p50_ms"] / t["p50"]
        rows.append(row)
        print(f"   index batch {batch:>3}: p50 {t['p50']:.3f} ms", flush=True)
    return rows


def retrieval_quality(ids: torch.Tensor, exact_scores: torch.Tensor, gold: Sequence, k: int,
                      eps: float = EPS) -> dict:
    """Quality of returned ids [Q, k] (-1 = none) against the exact MaxSim scores [Q, N] and the gold lists.

    gold@k: a gold passage among the k. recall@k: |ids & exact top-k| / k. eps-recall@k: a returned passage counts when
    its exact score is >= s_k - eps |s_k| (s_k: the exact k-th score), so near-ties with the k-th do not count as
    misses."""
    k = min(k, exact_scores.shape[1])
    ids = ids[:, :k]
    top = exact_scores.topk(k, dim=1)
    s_k = top.values[:, -1:]
    valid = ids >= 0
    got = exact_scores.gather(1, ids.clamp(min=0))
    eps_ok = (got >= s_k - eps * s_k.abs()) & valid
    rec = [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(ids, top.indices)]
    gold_hit = [bool(set(a.tolist()) & set(g)) for a, g in zip(ids, gold)]
    return {"gold_at_k": sum(gold_hit) / max(1, len(gold)), "recall_vs_exact": sum(rec) / max(1, len(rec)),
            "eps_recall_vs_exact": float(eps_ok.double().mean())}


def real_quality(args, d_tokens, d_offsets, q, q_mask, gold, index, backend: str, qrels=None) -> dict:
    """Exact scores of the sampled questions against every passage (batches of 16), the exact top-k and the index's
    top-k -> {"exact": quality, "index": quality or None}; with ``qrels`` (per question {passage: grade}) each also
    gets nDCG@10, recall@100 and MRR@10 from a top-100 search (:func:`reatt_kernels.bench.ir_metrics.qrels_metrics`)."""
    import reatt_kernels as rk
    from .ir_metrics import qrels_metrics

    corpus = rk.prepare_corpus(d_tokens, d_offsets)  # once for every batch of questions
    scores = torch.cat([rk.maxsim_packed(q[s:s + 16], corpus, None, q_mask[s:s + 16], backend=backend).cpu()
                        for s in range(0, q.shape[0], 16)])
    n_docs = scores.shape[1]
    k = min(args.topk, n_docs)
    depth = min(100, n_docs)
    out = {"exact": retrieval_quality(scores.topk(k, dim=1).indices, scores, gold, k), "index": None}
    if qrels is not None:
        out["exact"].update(qrels_metrics(scores.topk(depth, dim=1).indices.tolist(), qrels, n_docs))
    if index is not None:
        ids = torch.cat([index.search(q[s:s + 16], q_mask[s:s + 16], k=k)[1].cpu() for s in range(0, q.shape[0], 16)])
        out["index"] = retrieval_quality(ids, scores, gold, k)
        if qrels is not None:
            deep = torch.cat([index.search(q[s:s + 16], q_mask[s:s + 16], k=depth)[1].cpu()
                              for s in range(0, q.shape[0], 16)])
            out["index"].update(qrels_metrics(deep.tolist(), qrels, n_docs))
    return out


def run_index(args, device, d_tokens, d_offsets, queries) -> tuple[list[dict], Optional[str]]:
    """Rows from ``reatt_kernels.bench.index.run(args)``, or an "n/a" reason."""
    import importlib

    try:
        index_bench = importlib.import_module("reatt_kernels.bench.index")
    except Exception as exc:
        return [], f"index: not available ({short_reason(exc)})"
    ns = argparse.Namespace(**vars(args))
    # The corpus and queries already built, so the index modes can reuse them instead of rebuilding.
    ns.device_obj, ns.corpus, ns.queries = device, (d_tokens, d_offsets), queries
    try:
        rows = index_bench.run(ns)
        return [dict(r) for r in (rows or [])], None
    except Exception as exc:
        return [], f"index: failed ({short_reason(exc)})"


def plot(rows: list[dict], path: Path, title: str) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        print(f"plot: matplotlib not available ({exc})")
        return None
    batches = sorted({r["batch"] for r in rows})
    provs = list(dict.fromkeys(r["backend"] for r in rows))
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 3.8), squeeze=False)
    for ax, b in zip(axes[0], batches):
        sub = {r["backend"]: r for r in rows if r["batch"] == b}
        xs, ys, errs, labels = [], [], [], []
        for i, p in enumerate(provs):
            r = sub.get(p)
            if r is None or r.get("status") != "ok":
                labels.append(f"{p}\n(n/a)")
                xs.append(i)
                ys.append(0)
                errs.append(0)
                continue
            xs.append(i)
            ys.append(r["ms_per_query_p50"])
            errs.append(max(0.0, r["ms_per_query_p99"] - r["ms_per_query_p50"]))
            labels.append(p)
        ax.bar(xs, ys, yerr=[[0] * len(errs), errs], color="tab:blue", capsize=3)
        fl = next((r["floor_ms"] / b for r in sub.values()), None)
        if fl:
            ax.axhline(fl, color="tab:red", ls="--", lw=1, label=f"roofline {fl:.3g} ms")
            ax.legend(fontsize=8)
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("ms per query (p50, bar to p99)")
        ax.set_title(f"batch {b}", fontsize=9)
        if any(y > 0 for y in ys):
            ax.set_yscale("log")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    t_job = time.perf_counter()
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch and any(not b.strip().isdigit() or int(b) < 1 for b in args.batch.split(",") if b.strip()):
        raise SystemExit("every --batch must be an integer >= 1")  # before a corpus is encoded, not after
    asked = args.corpus is not None
    args.corpus = args.corpus or (QUICK_CORPUS if args.quick else DEFAULT_CORPUS)
    info = env_info(device)
    print(f"reatt-bench on {info['device_name']} ({device.type}), torch {info['torch']}, triton {info['triton']}, "
          f"git {info['git_sha'][:12]}")
    print(f"backends: {info.get('backends')}")

    t0 = time.perf_counter()
    q_mask = ec = fallback = None
    if args.corpus != "synthetic":
        from .data.cache import load_corpus

        try:
            ec = load_corpus(args.corpus, dim=args.dim, encoder=args.encoder)
        except SourceError as e:
            if asked:  # the user named this corpus: its missing source is the answer, with the way to fix it
                print(f"error: corpus {args.corpus}: {e}", file=sys.stderr)
                return 2
            # The default run never fails for a missing optional source: it says why, then measures the generator.
            fallback = f"the default corpus {args.corpus} could not be built: {e}"
            print(f"\nWARNING: {fallback}\nWARNING: running on --corpus synthetic instead (the numbers below are "
                  f"NOT real text).\n", file=sys.stderr, flush=True)
            args.corpus = "synthetic"
    real = args.corpus != "synthetic"
    dflt = _defaults(device, args.quick, args.corpus)
    args.dim = args.dim if args.dim is not None else (ec.dim if real else 128)
    args.dtype = args.dtype or dflt["dtype"]
    args.backends = args.backends or dflt.get("backends", "all")
    args.batches = sorted({int(b) for b in (args.batch or dflt["batch"]).split(",") if b.strip()})
    if args.quick:
        args.budget_s = min(args.budget_s, 0.3)
    if not args.batches or min(args.batches) < 1:
        raise SystemExit("every --batch must be >= 1")
    dtype = getattr(torch, args.dtype)
    qrels = None
    if real:
        args.queries = args.queries if args.queries is not None else dflt["queries"]
        if args.queries < 1:
            raise SystemExit("--queries must be >= 1")
        try:
            d_tokens, d_offsets, queries, q_mask, gold, qrels, picked = sample_questions(ec, args, dtype)
        except SourceError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        lens = d_offsets[1:] - d_offsets[:-1]
        args.docs, args.q_len = ec.n_docs, queries.shape[1]
        args.min_len, args.max_len = int(lens.min()), int(lens.max())  # naive pads to the longest passage
        q_mask = q_mask.to(device)
    else:
        from .datasets import clustered_corpus, clustered_queries

        args.docs = args.docs if args.docs is not None else dflt["docs"]
        if args.docs < 1:
            raise SystemExit("--docs must be >= 1")
        d_tokens, d_offsets = clustered_corpus(n_docs=args.docs, dim=args.dim, min_len=args.min_len,
                                               max_len=args.max_len, seed=args.seed, dtype=dtype, progress=True)
        queries, gold = clustered_queries(d_tokens, d_offsets, max(args.batches), q_len=args.q_len, seed=args.seed + 1)
    d_tokens, d_offsets, queries = d_tokens.to(device), d_offsets.to(device), queries.to(device)
    build_s = time.perf_counter() - t0
    T = d_tokens.shape[0]
    what = f"{args.corpus} (real text, {len(gold)} questions sampled)" if real else "synthetic"
    print(f"corpus: {what}: {args.docs} docs, {T} tokens x {args.dim} {args.dtype} "
          f"({T * args.dim * d_tokens.element_size() / GIB:.2f} GiB), {'loaded' if real else 'built'} in "
          f"{build_s:.1f} s")

    roof = roofline(device, quick=args.quick)
    rate, ceiling = compute_ceiling(roof)
    print(f"roofline (measured now): {roof['bandwidth_GBps']:.1f} GB/s ({roof['bandwidth_method']}), "
          f"{rate:.3f} TFLOP/s ({ceiling}: {roof.get('dot_method') or roof['matmul_method']})")

    rows = run_search(args, device, d_tokens, d_offsets, queries, gold, roof, q_mask)
    quality = index_note = None
    if real:
        index = None
        if not args.no_index:
            try:
                index, index_s = build_default_index(ec, device)
                print(f"default index: {index!r}, built in {index_s:.1f} s")
                rows += run_index_latency(args, device, index, queries, q_mask, gold, rows)
            except Exception as exc:  # faiss missing, or an index that cannot build here: a note, never a crash
                index, index_note = None, f"index: n/a ({short_reason(exc)})"
                rows.append({"backend": "index", "batch": max(args.batches), "status": "n/a", "note": index_note})
                print(index_note)
        best = _best_exact(rows) or "auto"  # auto: dispatch picks a backend when no exact row ran
        quality = real_quality(args, d_tokens, d_offsets, queries, q_mask, gold, index, best, qrels)
        quality["exact_backend"] = best
        if index is not None:
            quality["index"]["build_s"] = index_s
            quality["index"]["bytes_per_token"] = index.bytes_per_token
        for r in rows:
            if r.get("status") == "ok":
                r.update(quality["index" if r["backend"] == "index" else "exact"])
    roof = best_roofline(roof, roofline(device, quick=args.quick))
    apply_roofline(rows, roof)
    print()
    print(format_table(rows, REAL_COLUMNS if real else COLUMNS))
    if quality:
        e, i = quality["exact"], quality["index"]
        print(f"\nquality on {len(gold)} questions, k = {args.topk}: exact gold@k {e['gold_at_k']:.3f}"
              + (f"; default index gold@k {i['gold_at_k']:.3f}, recall@k {i['recall_vs_exact']:.3f}, eps-recall@k "
                 f"{i['eps_recall_vs_exact']:.3f} against exact" if i else ""))
        for label, m in (("exact", e), ("default index", i)):
            if m and m.get("ndcg@10") is not None:
                r100 = "n/a" if m["recall@100"] is None else f"{m['recall@100']:.3f}"
                print(f"  {label} against the relevance judgements: nDCG@10 {m['ndcg@10']:.3f}, recall@100 {r100}, "
                      f"MRR@10 {m['mrr@10']:.3f}")
            elif m and m.get("qrels_note"):
                print(f"  {label}: nDCG@10 / recall@100 / MRR@10 n/a ({m['qrels_note']})")
    out_dir = results_dir(device, args.out)
    payload = _payload(args, device, info, T, build_s, roof, rows)
    if real:
        payload["corpus"] = {"kind": f"real text ({args.corpus}, reatt_kernels.bench.data)", "name": args.corpus,
                             "docs": args.docs, "tokens": T, "dim": args.dim, "dtype": args.dtype,
                             "lengths": [args.min_len, args.max_len], "load_s": build_s,
                             "questions_sampled": len(gold), "seed": args.seed,
                             "manifest": {k: ec.manifest.get(k) for k in ("description", "licence", "sources",
                                                                          "encoder", "options", "sizes")}}
        payload["quality"] = quality
        payload["formulas"]["quality"] = retrieval_quality.__doc__.split("\n\n", 1)[1].strip()
        from . import ir_metrics

        payload["formulas"]["qrels_metrics"] = ir_metrics.__doc__.strip()
    elif fallback:
        payload["corpus"]["fallback"] = fallback
    # Saved before the (slower) index modes, so a timeout there keeps the search results.
    payload["run"] = _run_cost(t_job)
    print(f"job so far: {payload['run']['wall_s']:.0f} s wall, {payload['run']['cpu_s']:.0f} s CPU, load average "
          f"{payload['run']['load_avg']}")
    json_path = write_json(out_dir / "reatt_bench.json", payload)
    print(f"\nsaved {json_path}")
    if not args.no_plot:
        title = (f"MaxSim search on {args.corpus} (real text): {args.docs} passages, {T} tokens x {args.dim} "
                 f"{args.dtype}, {len(gold)} real questions | {info['device_name']}" if real else
                 f"exact MaxSim search, {args.docs} clustered docs x {args.min_len}-{args.max_len} tok x "
                 f"{args.dim} {args.dtype}, Lq {args.q_len} | {info['device_name']}")
        png = plot(rows, out_dir / "reatt_bench.png", title)
        if png:
            print(f"saved {png}")

    if args.index and not real:
        index_rows, index_note = run_index(args, device, d_tokens, d_offsets, queries)
        print()
        if index_note:
            print(index_note)
        elif index_rows:
            keys = list(dict.fromkeys(k for r in index_rows for k in r))
            print(format_table(index_rows, [(k, k, ".4g") for k in keys]))
        payload["index"] = {"rows": index_rows, "note": index_note}
        write_json(json_path, payload)
        print(f"saved {json_path} (with the index rows)")
    return 0


def _run_cost(t0: float) -> dict:
    """Wall and CPU seconds since ``t0`` (CPU: this process, user + system), with the load average: on a shared machine
    the CPU seconds are what the job costs, the wall time is what it got."""
    import os
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"wall_s": time.perf_counter() - t0, "cpu_s": ru.ru_utime + ru.ru_stime, "load_avg": load}


def _best_exact(rows: list[dict]) -> Optional[str]:
    """The fastest exact backend measured at the largest batch (it scores the quality questions)."""
    ok = [r for r in rows if r.get("status") == "ok" and r["backend"] in BACKEND_ORDER]
    if not ok:
        return None
    top = max(r["batch"] for r in ok)
    return min((r for r in ok if r["batch"] == top), key=lambda r: r["p50_ms"])["backend"]


def _payload(args, device, info, T, build_s, roof, rows) -> dict:
    return {
        "job": "reatt-bench",
        "op": "maxsim_packed + topk (exact search)",
        "env": info,
        "config": {k: v for k, v in vars(args).items() if k not in ("batch",)},
        "corpus": {"kind": "clustered (reatt_kernels.bench.datasets.clustered_corpus)", "docs": args.docs, "tokens": T,
                   "dim": args.dim, "lengths": [args.min_len, args.max_len], "dtype": args.dtype,
                   "build_s": build_s, "seed": args.seed},
        "roofline": roof,
        "formulas": {
            "bytes": "T * dim * itemsize + B * Lq * dim * itemsize (documents streamed once per batch call)",
            "flops": "2 * B * Lq * T * dim (useful dot products; naive also computes the padding)",
            "floor_ms": "max(bytes / bandwidth, flops / compute ceiling), both measured in this run (best of the "
                        "measurements at its start and end; CPU ceiling: dot_TFLOPs, the bf16 dot-product peak where "
                        "the CPU has AVX512_BF16, else fp32 FMA; GPU: matmul_TFLOPs)",
            "pct_roofline": "100 * floor_ms / p50_ms",
            "ms_per_query": "batch-call time / batch",
            "qps": "batch / p50 of the batch call",
            "speedup_vs_naive": "naive p50 / provider p50 (same batch)",
            "recall_vs_naive": "top-k overlap with the naive top-k (exact backends: 1.0 up to ties)",
            "naive": "pad to max_len + mask, einsum, amax over document tokens, sum over query tokens, chunked "
                     f"({NAIVE_CHUNK_ELEMS.get(device.type)} score elements per chunk)",
        },
        "rows": rows,
        "index": None,
    }


if __name__ == "__main__":
    sys.exit(main())
