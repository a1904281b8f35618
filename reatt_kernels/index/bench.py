"""Index benchmark: build time, bytes per token, recall@10/@100 against exact search, and per-query latency at batch 1
and 64 (p50/p99) with the per-stage breakdown, for the exact index and the residual index over an nprobe /
ncandidates sweep. Side by side with fast-plaid when it is installed ("n/a" otherwise).

``run(args) -> list[dict]`` is what ``reatt-bench --index`` calls (args may carry ``device_obj``, ``corpus`` =
(d_tokens, d_offsets) and ``queries`` to reuse); ``benchmarks/bench_index.py`` is the stand-alone script (JSON + PNG).

Default corpus: the ANCHORS clustered corpus (48-128 tokens, d = 128, 8192 topics); 50k documents on a GPU. On CPU
(2 shared cores) the corpus is cut to ``--index-docs`` documents (default 4000; 1500 with --quick) and k-means uses at
most 1024 centroids, so the run fits in a few minutes: those figures are not the ANCHORS 50k ones.
"""
from __future__ import annotations

import argparse
import time
from typing import Optional

import torch

from .codec import default_n_centroids
from .token_index import TokenIndex

QUANTILES = (0.5, 0.99)


def _recall(ids: torch.Tensor, ref: torch.Tensor, n: int) -> float:
    ids, ref = ids[:, :n].cpu(), ref[:, :n].cpu()
    hits = sum(len(set(ids[a].tolist()) & set(ref[a].tolist()) - {-1}) for a in range(ids.shape[0]))
    return hits / float(n * ids.shape[0])


def _latency(index: TokenIndex, q: torch.Tensor, batch: int, device, params: dict, budget_s: float) -> dict:
    """p50/p99 ms per query at this batch size, plus the mean per-stage ms per query."""
    from ..bench import time_fn

    n_batches = max(1, q.shape[0] // batch)
    state = {"i": 0}

    def fn():
        b = state["i"] % n_batches
        state["i"] += 1
        return index.search(q[b * batch:(b + 1) * batch], k=100, **params)

    t = time_fn(fn, device, QUANTILES, min_reps=max(3, min(n_batches, 16)), budget_s=budget_s)
    stages: dict[str, float] = {}
    reps = min(n_batches, 3)
    for b in range(reps):
        index.search(q[b * batch:(b + 1) * batch], k=100, timings=True, **params)
        for k, v in index.last_timings.items():
            stages[k] = stages.get(k, 0.0) + v * 1e3 / (reps * batch)
    return {"p50_ms_per_query": t["p50"] / batch, "p99_ms_per_query": t["p99"] / batch,
            "stages_ms_per_query": {k: round(v, 4) for k, v in stages.items()}, "timing": t.get("method")}


def _fast_plaid_row() -> dict:
    try:
        import fast_plaid  # noqa: F401
    except Exception as exc:
        return {"system": "fast-plaid", "status": "n/a", "reason": f"not installed ({type(exc).__name__})"}
    return {"system": "fast-plaid", "status": "n/a", "reason": "installed, but no runner written for it here"}


def run(args) -> list[dict]:
    """Rows: one per (system/config, batch). See the module docstring for the corpus sizes."""
    from ..bench import resolve_device
    from ..datasets import clustered_corpus, clustered_queries

    device = getattr(args, "device_obj", None) or resolve_device(getattr(args, "device", "auto"))
    quick = bool(getattr(args, "quick", False))
    on_gpu = device.type == "cuda"
    n_docs = getattr(args, "index_docs", None) or (50_000 if on_gpu else (1500 if quick else 4000))
    corpus = getattr(args, "corpus", None)
    if corpus is not None and corpus[1].numel() - 1 >= n_docs:
        d_tokens, d_offsets = corpus
        d_offsets = d_offsets[:n_docs + 1].cpu()
        d_tokens = d_tokens[:int(d_offsets[-1])]
    else:
        d_tokens, d_offsets = clustered_corpus(n_docs=n_docs, seed=0, progress=not quick)
    d_tokens = d_tokens.to(device=device, dtype=torch.float16)
    d_offsets = d_offsets.to(device)
    n_q = 64 if quick or not on_gpu else 256
    q, _ = clustered_queries(d_tokens.cpu(), d_offsets.cpu(), n_q, seed=1)
    q = q.to(device)
    budget = 0.5 if quick else (1.0 if on_gpu else 2.0)
    batches = [b for b in (1, 64) if b <= n_q]
    rows: list[dict] = []
    common = {"docs": n_docs, "tokens": int(d_offsets[-1]), "dim": d_tokens.shape[1], "device": str(device)}

    t0 = time.perf_counter()
    exact = TokenIndex.build(d_tokens, d_offsets=d_offsets, kind="exact", device=device, progress=False)
    build_exact = time.perf_counter() - t0
    ref_s, ref_i = exact.search(q, k=100)
    for b in batches:
        row = {"system": "reatt exact", "kind": "exact", "method": "full", "batch": b, "status": "ok",
               "build_s": build_exact, "bytes_per_token": exact.bytes_per_token, "recall@10": 1.0,
               "recall@100": 1.0, **common}
        row.update(_latency(exact, q, b, device, {}, budget))
        rows.append(row)
        print(f"  exact full b{b}: {row['p50_ms_per_query']:.3f} ms/query", flush=True)

    nbits_list = [4] if quick else [2, 4]
    if quick:
        sweep = [(4, 256), (8, 1024)]
    elif on_gpu:  # fast-plaid's defaults are n_ivf_probe=8, n_full_scores=4096: bracket them
        sweep = [(4, 1024), (8, 2048), (8, 4096), (16, 8192), (32, 16384)]
    else:
        sweep = [(2, 256), (4, 512), (8, 1024), (16, 2048)]
    for nbits in nbits_list:
        t0 = time.perf_counter()
        n_cent = "auto" if on_gpu else min(1024, default_n_centroids(int(d_offsets[-1])))
        index = TokenIndex.build(d_tokens, d_offsets=d_offsets, kind="residual", nbits=nbits, n_centroids=n_cent,
                                 device=device, progress=False, kmeans_iters=10 if on_gpu else 6,
                                 sample_tokens=(1 << 18) if on_gpu else (1 << 16))
        sync_build = time.perf_counter() - t0
        _, xi = index.search(q, k=100, exhaustive=True)
        for nprobe, ncand in sweep:
            params = {"nprobe": nprobe, "ncandidates": ncand}
            _, ri = index.search(q, k=100, **params)
            for b in batches:
                row = {"system": f"reatt residual {nbits}-bit", "kind": "residual", "nbits": nbits,
                       "n_centroids": int(index.codec.centroids.shape[0]), "batch": b, "status": "ok",
                       "build_s": sync_build, "bytes_per_token": index.bytes_per_token,
                       "index_bytes_per_token": index.nbytes() / max(1, index.n_tokens),
                       "recall@10": _recall(ri, ref_i, 10), "recall@100": _recall(ri, ref_i, 100),
                       "recall@10_exhaustive": _recall(xi, ref_i, 10), **params, **common}
                row.update(_latency(index, q, b, device, params, budget))
                rows.append(row)
                print(f"  residual {nbits}b nprobe {nprobe} ncand {ncand} b{b}: {row['p50_ms_per_query']:.3f} "
                      f"ms/query, recall@10 {row['recall@10']:.3f} @100 {row['recall@100']:.3f}", flush=True)
    rows.append({**_fast_plaid_row(), **common})
    return rows


def plot(rows: list[dict], path) -> Optional[str]:
    """Latency (batch 1 and 64, p50 ms/query) against recall@10 over the nprobe/ncandidates sweep."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        print(f"plot: matplotlib not available ({exc})")
        return None
    batches = sorted({r["batch"] for r in rows if "batch" in r})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for system in dict.fromkeys(r["system"] for r in rows if r.get("batch") == b):
            sub = [r for r in rows if r.get("batch") == b and r["system"] == system]
            xs = [r["recall@10"] for r in sub]
            ys = [r["p50_ms_per_query"] for r in sub]
            ax.plot(xs, ys, "o-" if len(sub) > 1 else "s", label=system)
            for r in sub:
                if "nprobe" in r:
                    ax.annotate(f"{r['nprobe']}/{r['ncandidates']}", (r["recall@10"], r["p50_ms_per_query"]),
                                fontsize=6)
        ax.set_xlabel("recall@10 vs exact")
        ax.set_ylabel("p50 ms per query")
        ax.set_yscale("log")
        ax.set_title(f"batch {b} ({rows[0].get('device', '')}, {rows[0].get('docs')} docs)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Token index benchmark (exact and residual; recall, latency, bytes)")
    p.add_argument("--quick", action="store_true", help="small corpus, short timing")
    p.add_argument("--device", default="auto", help="auto (cuda when a GPU is visible), cpu or cuda")
    p.add_argument("--index-docs", type=int, default=None, help="documents (default: 50000 GPU, 4000 CPU, 1500 quick)")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results/<device>/)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; on a shared, oversubscribed machine 1 thread "
                        "avoids thread-pool stalls that inflate small ops 10-100x)")
    return p


def main(argv=None) -> int:
    from ..bench import env_info, resolve_device, results_dir, write_json

    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    args.device_obj = device
    t0 = time.perf_counter()
    rows = run(args)
    out = results_dir(device, args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"env": env_info(device), "wall_s": time.perf_counter() - t0, "rows": rows,
               "notes": __doc__.split("\n\n", 2)[2].strip()}
    path = write_json(out / "bench_index.json", payload)
    png = plot([r for r in rows if r.get("status") == "ok"], out / "bench_index.png")
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    return 0
