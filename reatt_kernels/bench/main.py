"""``reatt-bench``: the main job. Exact MaxSim retrieval latency on an embedded synthetic corpus, every backend side by
side with naive PyTorch, re-exporting the measurement helpers of :mod:`reatt_kernels.bench.util` (their one home, shared with
the scripts in ``benchmarks/`` and the index benchmark, so a number printed by any of them means the same thing).

The job:
1. builds the docs/baselines.md clustered corpus deterministically (:func:`reatt_kernels.bench.datasets.clustered_corpus`, packed,
   48-128 tokens per document, d = 128; about 20k documents on CPU, 200k on a GPU; tqdm shows progress) and a batch of
   queries (32 noisy tokens drawn from one document each);
2. measures the machine's roofline in the same process (streaming bandwidth and matmul FLOP/s);
3. times ``scores = maxsim_packed(q, d_tokens, d_offsets); scores.topk(k)`` with each backend in
   ``available_backends()`` (a backend that cannot run is reported "n/a" with its reasons), next to naive PyTorch
   (pad to 128 + mask, ``einsum``, ``amax``, sum; chunked over documents: the docs/baselines.md baseline);
4. prints a table, and saves JSON and a PNG plot under ``benchmarks/results/<device>/`` (or ``--out``).

``--index`` adds the compressed-index modes from ``reatt_kernels.bench.index.run(args)`` (needs faiss).

Roofline of one batch call: the documents are streamed once, so
``bytes = T * dim * itemsize`` (T real tokens; padding is not useful work) and ``FLOPs = 2 * B * Lq * T * dim``;
``floor = max(bytes / measured bandwidth, FLOPs / measured matmul rate)`` and "% of roofline" is ``floor / p50``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

# The measurement helpers live in reatt_kernels.bench.util (shared with the index benchmark); re-exported here.
from .util import (  # noqa: F401
    GIB,
    MIB,
    NAIVE_CHUNK_ELEMS,
    _json_default,
    _malloc_trim,
    _qname,
    _rss_bytes,
    apply_roofline,
    best_roofline,
    device_name,
    device_slug,
    env_info,
    floor_ms,
    format_table,
    git_sha,
    naive_maxsim,
    peak_memory,
    repo_root,
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


def _defaults(device: torch.device, quick: bool) -> dict:
    if device.type == "cuda":
        return {"docs": 50_000 if quick else 200_000, "batch": "1,16", "dtype": "float16"}
    return {"docs": 2_000 if quick else 20_000, "batch": "1,4", "dtype": "float32"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows a flag's default only when it has a real one (not None / False), and keeps the epilog's line breaks."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reatt-bench",
        description="Exact MaxSim retrieval latency on a deterministic synthetic clustered corpus: every available "
        "reatt_kernels backend side by side with naive PyTorch. Prints a table; saves JSON and a PNG plot.",
        formatter_class=HelpFormatter,
        epilog="examples:\n"
        "  reatt-bench                        # 20k docs on CPU (200k on a GPU), batches 1,4 (GPU: 1,16)\n"
        "  reatt-bench --quick --index        # small and short, plus the compressed-index modes\n"
        "  reatt-bench --docs 50000 --batch 1,64 --backends cpu --out /tmp/r\n"
        "outputs: <out>/reatt_bench.json (env, roofline, formulas, one row per backend x batch) and reatt_bench.png",
    )
    p.add_argument("--device", default="auto", help="auto (cuda when a GPU is visible), cpu or cuda")
    p.add_argument("--docs", type=int, default=None,
                   help="documents in the corpus (default: 20000 on CPU, 200000 on GPU; --quick: 2000 / 50000)")
    p.add_argument("--batch", default=None,
                   help="comma-separated query batch sizes, one measurement each (default: 1,4 on CPU, 1,16 on GPU)")
    p.add_argument("--q-len", type=int, default=32, help="tokens per query")
    p.add_argument("--dim", type=int, default=128, help="token embedding dimension")
    p.add_argument("--min-len", type=int, default=48, help="shortest document, tokens")
    p.add_argument("--max-len", type=int, default=128, help="longest document, tokens (naive pads to this)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="corpus and query dtype (default: float32 on CPU, float16 on GPU)")
    p.add_argument("--topk", type=int, default=10, help="k of the top-k that every search returns")
    p.add_argument("--seed", type=int, default=0, help="corpus seed (queries use seed + 1)")
    p.add_argument("--backends", default="all",
                   help="comma-separated subset of torch,cpu,triton,cuda (naive is always run unless --no-naive)")
    p.add_argument("--no-naive", action="store_true", help="skip the naive PyTorch baseline")
    p.add_argument("--reps", type=int, default=5, help="CPU: at least this many timed calls per measurement")
    p.add_argument("--budget-s", type=float, default=1.0, help="CPU: keep timing until this many seconds have passed")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--index", action="store_true",
                   help="also run the compressed-index modes (reatt_kernels.bench.index.run), when available")
    p.add_argument("--quick", action="store_true", help="small corpus and short timing (the device check uses it)")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results/<device>/)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    return p


def _make_search(backend: str, q, d_tokens, d_offsets, topk: int, naive_inputs=None):
    import reatt_kernels as rk

    k = min(topk, d_offsets.numel() - 1)
    if backend == "naive":
        d_pad, d_mask = naive_inputs

        def fn():
            return naive_maxsim(q, d_pad, d_mask).topk(k, dim=1)
    else:

        def fn():
            return rk.maxsim_packed(q, d_tokens, d_offsets, backend=backend).topk(k, dim=1)
    return fn


def run_search(args, device: torch.device, d_tokens, d_offsets, queries, src_docs, roof: dict) -> list[dict]:
    """One row per (provider, batch). Providers that cannot run give a row with ``status = "n/a"`` and the reason."""
    import reatt_kernels as rk

    avail = rk.available_backends()
    wanted = BACKEND_ORDER if args.backends == "all" else tuple(b.strip() for b in args.backends.split(",") if b.strip())
    providers = ([] if args.no_naive else ["naive"]) + [b for b in BACKEND_ORDER if b in wanted]
    naive_inputs = None
    if "naive" in providers:
        from .datasets import pad_packed

        naive_inputs = pad_packed(d_tokens, d_offsets, max_len=args.max_len)
    n_docs = d_offsets.numel() - 1
    T, D = d_tokens.shape
    rows = []
    for batch in args.batches:
        q = queries[:batch]
        bytes_ = T * D * d_tokens.element_size() + q.numel() * q.element_size()
        flops = 2.0 * batch * args.q_len * T * D
        fl_ms, bound = floor_ms(bytes_, flops, roof)
        ref_top = None
        naive_p50 = None
        for prov in providers:
            row = {"backend": prov, "docs": n_docs, "batch": batch, "tokens": T, "bytes": bytes_, "flops": flops,
                   "floor_ms": fl_ms, "bound": bound}
            status = avail.get(prov, "ok") if prov != "naive" else "ok"
            if prov == "triton" and device.type == "cpu":
                status = ["on CPU triton is the interpreter (tests only), not a benchmark provider"]
            if status != "ok":
                row.update(status="n/a", note=short_reason(status))
                rows.append(row)
                continue
            fn = _make_search(prov, q, d_tokens, d_offsets, args.topk, naive_inputs)
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
            row["hit_at_1"] = float((idx[:, 0] == src_docs[:batch]).float().mean())
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
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dflt = _defaults(device, args.quick)
    args.docs = args.docs if args.docs is not None else dflt["docs"]
    args.dtype = args.dtype or dflt["dtype"]
    args.batches = sorted({int(b) for b in (args.batch or dflt["batch"]).split(",") if b.strip()})
    if args.quick:
        args.budget_s = min(args.budget_s, 0.3)
    if args.docs < 1 or not args.batches or min(args.batches) < 1:
        raise SystemExit("--docs and every --batch must be >= 1")
    dtype = getattr(torch, args.dtype)
    info = env_info(device)
    print(f"reatt-bench on {info['device_name']} ({device.type}), torch {info['torch']}, triton {info['triton']}, "
          f"git {info['git_sha'][:12]}")
    print(f"backends: {info.get('backends')}")

    from .datasets import clustered_corpus, clustered_queries

    t0 = time.perf_counter()
    d_tokens, d_offsets = clustered_corpus(n_docs=args.docs, dim=args.dim, min_len=args.min_len, max_len=args.max_len,
                                           seed=args.seed, dtype=dtype, progress=True)
    queries, src_docs = clustered_queries(d_tokens, d_offsets, max(args.batches), q_len=args.q_len, seed=args.seed + 1)
    d_tokens, d_offsets, queries = d_tokens.to(device), d_offsets.to(device), queries.to(device)
    build_s = time.perf_counter() - t0
    T = d_tokens.shape[0]
    print(f"corpus: {args.docs} docs, {T} tokens x {args.dim} {args.dtype} "
          f"({T * args.dim * d_tokens.element_size() / GIB:.2f} GiB), built in {build_s:.1f} s")

    roof = roofline(device, quick=args.quick)
    print(f"roofline (measured now): {roof['bandwidth_GBps']:.1f} GB/s ({roof['bandwidth_method']}), "
          f"{roof['matmul_TFLOPs']:.3f} TFLOP/s ({roof['matmul_method']})")

    rows = run_search(args, device, d_tokens, d_offsets, queries, src_docs, roof)
    roof = best_roofline(roof, roofline(device, quick=args.quick))
    apply_roofline(rows, roof)
    print()
    print(format_table(rows, COLUMNS))
    out_dir = results_dir(device, args.out)
    payload = _payload(args, device, info, T, build_s, roof, rows)
    # Saved before the (slower) index modes, so a timeout there keeps the search results.
    json_path = write_json(out_dir / "reatt_bench.json", payload)
    print(f"\nsaved {json_path}")
    if not args.no_plot:
        png = plot(rows, out_dir / "reatt_bench.png",
                   f"exact MaxSim search, {args.docs} clustered docs x {args.min_len}-{args.max_len} tok x "
                   f"{args.dim} {args.dtype}, Lq {args.q_len} | {info['device_name']}")
        if png:
            print(f"saved {png}")

    if args.index:
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
            "floor_ms": "max(bytes / bandwidth, flops / matmul rate), both measured in this run (best of the "
                        "measurements at its start and end)",
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
