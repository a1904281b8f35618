"""Index benchmark: is the compressed index worth using? Exact search, the residual index and fast-plaid (the peer) on
the same corpus and queries, scored with the same metrics, in one table and one recall-vs-latency plot.

Metrics (per configuration, over the queries; k = 10):
- ``recall@10``: fraction of exact search's top 10 that the system returns in its top 10.
- ``eps-recall@10`` (ann-benchmarks' epsilon recall): a returned document counts when its *exact* MaxSim score is
  within a relative eps = 0.01 of the exact 10th score, ``s >= s10 - 0.01 |s10|``. Near-ties with the 10th document
  are as good an answer as the 10th itself, which plain recall does not credit.
- ``gold@10``: a gold document of the query is in the top 10 (real text: the chunk holding the answer; synthetic: the
  document the query was made from). Exact search's own figure is the ceiling, printed beside it.
- ``ms/query``: p50 wall time of one ``search`` call per query (batch 1), each query once after a warm-up;
  ``ms/query b16``: wall time of a 16-query ``search`` call divided by 16 (median over the batches).
- ``B/token``: every byte of the index (payload, offsets, ids, inverted lists, codec; fast-plaid: its folder on disk)
  per token.
- build: wall seconds; peak RSS of the build above the process's RSS before it (the corpus already resident).

Corpora (``--corpus``):
- ``squad-dev`` / ``real-all``: real text (issue 17; :mod:`reatt_kernels.bench.corpora`): MiniLM token vectors (384-d
  fp16) of Wikipedia passage chunks and real questions with gold chunks. One section: exact, our default (calibrated),
  our other methods (plaid at fixed rerank sizes, scan, the old defaults' parameter values) and fast-plaid (defaults
  and n_ivf_probe 16 / n_full_scores 8192).
- ``synthetic`` (default): the stress sections below, on the docs/baselines.md clustered generator.

Synthetic sections (CPU defaults; ``--quick`` shrinks all of them):
1. headline: ``--docs`` (100,000) documents of the docs/baselines.md clustered corpus (per-dimension noise 0.124, token-centroid
   cosine about 0.58): exact (fp16, ``cpu`` backend), the residual index over an nprobe / ncandidates sweep, and the
   per-stage profile of the default configuration.
2. peer: ``--peer-docs`` (20,000) documents of the same corpus: exact, residual and fast-plaid, both at their defaults
   (and a larger setting each), same nbits. fast-plaid runs in its own venv (``benchmarks/peers/``); "n/a" without it.
3. noise sweep: ``--sweep-docs`` (20,000) documents at noise 0.043 / 0.124 / 0.35 (token-centroid cosine about 0.9 /
   0.58 / 0.24): where the compressed index stops paying.

Built indexes are cached under ``--cache`` (keyed by a fingerprint of the corpus and the build settings) with their
build time and peak RSS, so a rerun measures search without rebuilding; the JSON says when a build was reused.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from reatt_kernels.index import DEFAULTS, TokenIndex
from .util import device_name, env_info, peak_memory, repo_root, resolve_device, results_dir, write_json

K = 10
EPS = 0.01
HEADLINE_NOISE = 0.124
SWEEP_NOISES = (0.043, 0.124, 0.35)  # token-centroid cosine about 0.9, 0.58, 0.24 at d = 128
PEER_VENV_ENV = "REATT_FAST_PLAID_VENV"
PEER_VENV_DEFAULT = Path.home() / ".cache" / "reatt" / "fast-plaid-venv"


# ---- metrics ------------------------------------------------------------------------------------------------------
def quality(ids: torch.Tensor, exact_scores: torch.Tensor, gold, k: int = K, eps: float = EPS) -> dict:
    """recall@k, eps-recall@k and gold@k of returned ids [Q, >= k] (-1 = no result) against the exact MaxSim scores
    of every document, exact_scores [Q, N] (fp32), and each query's gold: int64 [Q] (one document each) or a list of
    lists of document indices (a query with several gold chunks succeeds on any of them)."""
    ids = ids[:, :k].cpu().long()
    S = exact_scores.cpu()
    top_s, top_i = torch.topk(S, k, dim=1)
    s_k = top_s[:, -1:]
    valid = ids >= 0
    got = torch.gather(S, 1, ids.clamp(min=0))
    hit = (ids[:, :, None] == top_i[:, None, :]).any(-1) & valid
    eps_ok = (got >= s_k - eps * s_k.abs()) & valid
    if isinstance(gold, torch.Tensor):
        gold_ok = (ids == gold.cpu()[:, None]).any(1)
    else:
        gold_ok = torch.tensor([bool(set(ids[a].tolist()) & set(g)) for a, g in enumerate(gold)])
    return {f"recall@{k}": float(hit.double().mean()), f"eps_recall@{k}": float(eps_ok.double().mean()),
            f"gold@{k}": float(gold_ok.double().mean())}


def exact_all_scores(index: TokenIndex, q: torch.Tensor, q_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MaxSim of every query against every document of an exact index: fp32 [Q, N] (the metrics' ground truth)."""
    from reatt_kernels import maxsim_packed

    out = [maxsim_packed(q[a:a + 8].to(index.tokens.dtype), index.tokens, index.offsets,
                         None if q_mask is None else q_mask[a:a + 8], backend="auto").float()
           for a in range(0, q.shape[0], 8)]
    return torch.cat(out)


# ---- timing -------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_queries(search, q: torch.Tensor, q_mask: Optional[torch.Tensor] = None, batch: int = 16) -> dict:
    """One ``search(q[a:a+1], q_mask[a:a+1])`` per query after one warm-up call: p50 / p90 ms per query, and the
    results; then ``batch``-query calls: ``ms_b16`` = median batch time / batch (0 batches when fewer queries)."""
    if q_mask is None:
        q_mask = torch.ones(q.shape[:2], dtype=torch.bool, device=q.device)
    search(q[:1], q_mask[:1])
    ms, ids = [], []
    for a in range(q.shape[0]):
        _sync(q.device)
        t0 = time.perf_counter()
        _, i = search(q[a:a + 1], q_mask[a:a + 1])
        _sync(q.device)
        ms.append((time.perf_counter() - t0) * 1e3)
        ids.append(i)
    ms_sorted = sorted(ms)
    out = {"ms_p50": ms_sorted[len(ms) // 2], "ms_p90": ms_sorted[min(len(ms) - 1, int(0.9 * len(ms)))],
           "ids": torch.cat(ids)}
    bt = []
    for a in range(0, q.shape[0] - batch + 1, batch):
        _sync(q.device)
        t0 = time.perf_counter()
        search(q[a:a + batch], q_mask[a:a + batch])
        _sync(q.device)
        bt.append((time.perf_counter() - t0) * 1e3 / batch)
    if bt:
        out["ms_b16"] = sorted(bt)[len(bt) // 2]
    return out


def stage_profile(index: TokenIndex, q: torch.Tensor, q_mask: torch.Tensor, params: dict) -> dict:
    """Mean ms per query of each residual stage (batch 1), with the work each stage does and the rate it achieves.

    Work per query: centroid_scores 2 Lq C D FLOPs; approx (centroid interaction): one 4-byte code and one table row
    per candidate token; decompress_rerank: the kept documents' tokens x (4 + D nbits / 8) bytes and 2 Lq D FLOPs
    each."""
    stages: dict[str, float] = {}
    n_q = q.shape[0]
    Lq = q.shape[1]
    for a in range(n_q):
        index.search(q[a:a + 1], q_mask[a:a + 1], k=K, timings=True, **params)
        for s, v in index.last_timings.items():
            stages[s] = stages.get(s, 0.0) + v * 1e3 / n_q
    lens = index.offsets[1:] - index.offsets[:-1]
    n_s = min(n_q, 8)
    cand_docs = rerank_tokens = 0
    if params.get("method", "auto") != "scan" and index.calibration.get("method", "plaid") != "scan":
        for a in range(n_s):
            c = index.candidates(q[a:a + 1], q_mask[a:a + 1], k=K, nprobe=params.get("nprobe", DEFAULTS["nprobe"]),
                                 ncandidates=params.get("ncandidates", DEFAULTS["ncandidates"]))
            c = c[c >= 0]
            cand_docs += c.numel()
            rerank_tokens += int(lens[c].sum())
    C, D = index.codec.centroids.shape
    tok = rerank_tokens / n_s
    work = {
        "centroid_scores": {"GFLOP": 2 * Lq * C * D / 1e9},
        "approx": {"tokens": index.n_tokens, "MB": index.n_tokens * 4 / 1e6},
        "decompress_rerank": {"docs": cand_docs / n_s, "tokens": tok, "MB": tok * index.bytes_per_token / 1e6,
                              "GFLOP": 2 * Lq * D * tok / 1e9},
        "scan": {"tokens": index.n_tokens, "MB": index.n_tokens * index.bytes_per_token / 1e6,
                 "GFLOP": 2 * Lq * D * index.n_tokens / 1e9},
    }
    out = {}
    for s, ms in stages.items():
        row = {"ms": round(ms, 3)}
        for unit, v in work.get(s, {}).items():
            row[unit] = round(v, 4)
            if unit == "GFLOP" and ms > 0:
                row["GFLOP/s"] = round(v / (ms / 1e3), 2)
            if unit == "MB" and ms > 0:
                row["GB/s"] = round(v / 1e3 / (ms / 1e3), 3)
        out[s] = row
    return out


# ---- corpora and cached builds ------------------------------------------------------------------------------------
def make_corpus(n_docs: int, noise: float, n_queries: int):
    """The clustered corpus of docs/baselines.md at this noise, and its queries (fp16): (tokens, offsets, q, gold)."""
    from .datasets import clustered_corpus, clustered_queries

    d, off = clustered_corpus(n_docs=n_docs, noise=noise, seed=0)
    q, gold = clustered_queries(d, off, n_queries, seed=1)
    return d, off, q, gold


def fingerprint(tokens: np.ndarray, offsets: np.ndarray, queries: np.ndarray) -> str:
    """Identifies a corpus + queries (offsets and queries in full, every 997th token row)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(offsets).tobytes())
    h.update(np.ascontiguousarray(queries).tobytes())
    h.update(np.ascontiguousarray(tokens[::997]).tobytes())
    return h.hexdigest()[:16]


def build_residual(tokens, offsets, nbits: int, cache: Optional[Path], fp: str,
                   device=torch.device("cpu")) -> tuple[TokenIndex, dict]:
    """The residual index with build stats {build_s, peak_rss_bytes, reused}; loaded from ``cache`` when it holds one
    built from this corpus with these settings."""
    key = f"residual{nbits}-{fp}-{device.type}"
    if cache is not None:
        path = cache / key
        stats_path = path / "build_stats.json"
        if stats_path.exists():
            try:
                index = TokenIndex.load(path, device=device, mmap=False)
                stats = json.loads(stats_path.read_text())
                return index, {**stats, "reused": True}
            except Exception as exc:  # noqa: BLE001  (a stale cache entry is rebuilt)
                print(f"  cache entry {path} unusable ({exc}); rebuilding", flush=True)
    box = {}
    import faiss  # noqa: F401  (the library's own load is not the build's memory)

    def build():
        t0 = time.perf_counter()
        box["index"] = TokenIndex.build(tokens, d_offsets=offsets, kind="residual", nbits=nbits, progress=False,
                                        device=device)
        _sync(device)
        box["s"] = time.perf_counter() - t0

    mem = peak_memory(build, device)
    index = box["index"]
    # "One chunk": the largest block of corpus rows the build holds in fp32 at once. That is the k-means training
    # sample (default_sample_tokens rows: 64 per centroid, at least 2^18, at most the corpus), not the 2^16-row
    # encoding chunk.
    from reatt_kernels.index.codec import default_sample_tokens

    chunk_bytes = default_sample_tokens(index.n_tokens, index.codec.centroids.shape[0]) * index.dim * 4
    stats = {"build_s": box["s"], "peak_rss_bytes": mem["bytes"], "index_bytes": index.nbytes(),
             "n_centroids": int(index.codec.centroids.shape[0]), "calibration": index.calibration,
             "chunk_bytes": chunk_bytes, "n_tokens": index.n_tokens,
             "s_per_Mtok": box["s"] / (index.n_tokens / 1e6), "load_avg_after": os.getloadavg()[0]}
    if mem["bytes"] is not None:
        stats["rss_budget_bytes"] = 1.5 * index.nbytes() + chunk_bytes
        stats["rss_within_budget"] = mem["bytes"] <= stats["rss_budget_bytes"]
    if cache is not None:
        index.save(cache / key)
        (cache / key / "build_stats.json").write_text(json.dumps(stats))
    return index, {**stats, "reused": False}


# ---- the peer -----------------------------------------------------------------------------------------------------
def peer_python(venv: Optional[str]) -> tuple[Optional[str], str]:
    """fast-plaid's venv python, or (None, why not). When this environment imports fast_plaid itself (the GPU
    machine's image has torch 2.11), it runs with this python."""
    if venv is None and os.environ.get(PEER_VENV_ENV) is None:
        import importlib.util

        if importlib.util.find_spec("fast_plaid") is not None:
            return sys.executable, "this environment"
    v = Path(venv or os.environ.get(PEER_VENV_ENV) or PEER_VENV_DEFAULT)
    py = v / "bin" / "python"
    if not py.exists():
        return None, f"no fast-plaid venv at {v} (create it: benchmarks/peers/fast_plaid_venv.sh {v})"
    return str(py), str(v)


def run_peer(py: str, tokens, offsets, q, fp: str, work: Path, nbits: int, configs, threads: int,
             device: torch.device) -> dict:
    """Write the corpus for the runner, run it in fast-plaid's venv, return its JSON (or {"error": ...})."""
    inp = work / f"peer-inputs-{fp}"
    inp.mkdir(parents=True, exist_ok=True)
    if not (inp / "meta.json").exists():
        np.save(inp / "tokens.npy", tokens.cpu().numpy())
        np.save(inp / "offsets.npy", offsets.cpu().numpy())
        np.save(inp / "queries.npy", q.cpu().numpy())
        (inp / "meta.json").write_text(json.dumps({"fingerprint": fp}))
    runner = repo_root() / "benchmarks" / "peers" / "fast_plaid_runner.py"
    cmd = [py, str(runner), "--inputs", str(inp), "--index", str(work / f"fast-plaid-{nbits}-{fp}"),
           "--nbits", str(nbits), "--configs", json.dumps(configs), "--k", str(K), "--threads", str(threads),
           "--reuse", "--device", device.type]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": f"runner exit {proc.returncode}: {proc.stderr.strip()[-400:]}"}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t0
    return out


# ---- one corpus ---------------------------------------------------------------------------------------------------
def bench_corpus(label: str, n_docs: int, noise: float, args, sweep, peer: bool) -> list[dict]:
    """Synthetic rows: the docs/baselines.md clustered corpus at this noise (see :func:`bench_vectors`)."""
    print(f"[{label}] corpus: {n_docs} docs, noise {noise}", flush=True)
    tokens, offsets, q, gold = make_corpus(n_docs, noise, args.queries)
    info = {"corpus": "synthetic", "docs": n_docs, "noise": noise}
    return bench_vectors(label, tokens, offsets, q, None, gold, args, sweep, peer, info)


def bench_real(name: str, args) -> list[dict]:
    """Real-text rows (issue 17's corpora): exact, our default and other methods, fast-plaid."""
    from .corpora import load_corpus

    ec = load_corpus(name)
    n_q = min(args.queries, ec.query_tokens.shape[0])
    # a fixed random subset of the questions that have a gold chunk (a few straddle a chunk boundary and have none)
    has_gold = [i for i, g in enumerate(ec.gold) if g]
    pick = sorted(torch.randperm(len(has_gold), generator=torch.Generator().manual_seed(0))[:n_q].tolist())
    sel = torch.tensor([has_gold[i] for i in pick])
    q = torch.as_tensor(np.asarray(ec.query_tokens[sel.numpy()]))
    q_mask = torch.as_tensor(np.asarray(ec.query_mask[sel.numpy()]))
    golds = [list(ec.gold[int(i)]) for i in sel]
    tokens = torch.as_tensor(np.asarray(ec.doc_tokens))
    offsets = torch.as_tensor(np.asarray(ec.doc_offsets))
    print(f"[{name}] {offsets.numel() - 1} passages, {tokens.shape[0]} tokens, {n_q} questions", flush=True)
    configs = [dict(DEFAULTS), {"method": "plaid", "ncandidates": 32}, {"method": "plaid", "ncandidates": 128},
               {"method": "plaid", "nprobe": 8, "ncandidates": 4096}, {"method": "scan"}]
    info = {"corpus": name, "docs": offsets.numel() - 1, "noise": None}
    return bench_vectors(name, tokens, offsets, q, q_mask, golds, args, configs, peer=not args.no_peer, info=info)


def bench_vectors(label: str, tokens, offsets, q, q_mask, gold, args, sweep, peer: bool, info: dict) -> list[dict]:
    """Rows for one corpus: exact, the residual configurations (the default first), fast-plaid when asked."""
    T = int(offsets[-1])
    if q_mask is None:
        q_mask = torch.ones(q.shape[:2], dtype=torch.bool)
    qz = q.masked_fill(~q_mask[..., None], 0)  # zero rows past the mask: fast-plaid has no mask (0 adds 0)
    fp = fingerprint(tokens.numpy(), offsets.numpy(), qz.numpy())
    dev = args.device_obj
    backend = "cpu" if dev.type == "cpu" else "auto"
    common = {"section": label, **info, "tokens": T, "queries": q.shape[0]}
    rows = []

    t0 = time.perf_counter()
    exact = TokenIndex.build(tokens, d_offsets=offsets, kind="exact", progress=False, device=dev)
    _sync(dev)
    build_exact = time.perf_counter() - t0
    peer_tokens = tokens if peer else None  # the runner reads the corpus from files written from this copy
    del tokens  # on CPU the exact index holds the only other copy from here on
    q, q_mask = q.to(dev), q_mask.to(dev)
    S = exact_all_scores(exact, q, q_mask)
    # The exact baseline gets the padded queries: the maxsim kernels pack each query's valid tokens, so it pays for
    # those only (tests/kernels/test_maxsim_qmask.py: padded and sliced queries give bitwise the same scores on cpu).
    t = time_queries(lambda x, m: exact.search(x, m, k=K, backend=backend), q, q_mask)
    ref = quality(t["ids"], S, gold)
    rows.append({**common, "system": f"exact (fp16, {backend} backend)", "config": "full MaxSim",
                 "build_s": build_exact, "bytes_per_token": exact.nbytes() / T, **ref, "ms_p50": t["ms_p50"],
                 "ms_p90": t["ms_p90"], "ms_b16": t.get("ms_b16")})
    exact_ms, exact_gold = t["ms_p50"], ref[f"gold@{K}"]
    print(f"  exact: {t['ms_p50']:.1f} ms/query, gold@10 {exact_gold:.3f}", flush=True)

    residual, stats = build_residual(exact.tokens, exact.offsets, args.nbits, args.cache, fp, dev)
    print(f"  residual {args.nbits}-bit build: {stats['build_s']:.1f} s ({stats['s_per_Mtok']:.1f} s/Mtok"
          f"{', reused from cache' if stats['reused'] else ''}), peak RSS "
          f"{(stats['peak_rss_bytes'] or 0) / 2**20:.0f} MiB vs budget "
          f"{stats.get('rss_budget_bytes', 0) / 2**20:.0f} MiB (1.5 x index + one chunk); calibration "
          f"{residual.calibration}", flush=True)
    for params in sweep:
        t = time_queries(lambda x, m: residual.search(x, m, k=K, backend=backend, **params), q, q_mask)
        m = quality(t["ids"], S, gold)
        is_default = params == DEFAULTS
        row = {**common, "system": f"residual {args.nbits}-bit" + (", default" if is_default else ""),
               "config": _cfg(params, residual, is_default), "default": is_default, **params,
               "build_s": stats["build_s"], "build": stats, "peak_rss_mib": (stats.get("peak_rss_bytes") or 0) / 2**20,
               "bytes_per_token": residual.nbytes() / T, **m, "ms_p50": t["ms_p50"], "ms_p90": t["ms_p90"],
               "ms_b16": t.get("ms_b16"), f"exact_gold@{K}": exact_gold, "speedup_vs_exact": exact_ms / t["ms_p50"]}
        if is_default:
            row["profile"] = stage_profile(residual, q, q_mask, params)
        rows.append(row)
        print(f"  residual {row['config']}: {t['ms_p50']:.1f} ms/query ({exact_ms / t['ms_p50']:.1f}x exact), "
              f"recall {m['recall@10']:.3f} eps-recall {m['eps_recall@10']:.3f} gold {m['gold@10']:.3f}", flush=True)
    del residual

    if peer:
        py, where = peer_python(args.peer_venv)
        if getattr(args, "no_peer", False):
            py, where = None, "skipped (--no-peer)"
        if py is None:
            rows.append({**common, "system": "fast-plaid", "status": "n/a", "reason": where})
            print(f"  fast-plaid: n/a ({where})", flush=True)
        else:
            # its defaults (n_ivf_probe, n_full_scores), and the larger setting unless --peer-defaults-only
            configs = [[8, 4096]] if getattr(args, "peer_defaults_only", False) else [[8, 4096], [16, 8192]]
            res = run_peer(py, peer_tokens, offsets, qz, fp, args.cache or Path(args.out) / "work", args.nbits,
                           configs, torch.get_num_threads(), dev)
            if "error" in res:
                rows.append({**common, "system": "fast-plaid", "status": "n/a", "reason": res["error"]})
                print(f"  fast-plaid: failed ({res['error']})", flush=True)
            for c in res.get("configs", []):
                ids = torch.tensor(c["ids"])
                m = quality(ids, S, gold)
                ms = sorted(c["ms_per_query"])
                p50 = ms[len(ms) // 2]
                rows.append({**common, "system": f"fast-plaid {res['version']}",
                             "config": f"n_ivf_probe {c['n_ivf_probe']}, n_full_scores {c['n_full_scores']}",
                             "default": [c["n_ivf_probe"], c["n_full_scores"]] == configs[0],
                             "n_ivf_probe": c["n_ivf_probe"], "n_full_scores": c["n_full_scores"],
                             "build_s": res["build_s"], "build": {"reused": res["reused_index"]},
                             "bytes_per_token": res["bytes_per_token"], **m, "ms_p50": p50,
                             "ms_p90": ms[min(len(ms) - 1, int(0.9 * len(ms)))], f"exact_gold@{K}": exact_gold,
                             "speedup_vs_exact": exact_ms / p50, "torch": res["torch"]})
                print(f"  fast-plaid {rows[-1]['config']}: {p50:.1f} ms/query, recall {m['recall@10']:.3f} "
                      f"eps-recall {m['eps_recall@10']:.3f} gold {m['gold@10']:.3f}", flush=True)
    return rows


def _cfg(params: dict, index: Optional[TokenIndex] = None, is_default: bool = False) -> str:
    if params.get("exhaustive") or params.get("method") == "scan":
        return "scan (every document from the codes)"
    if is_default and index is not None:
        cal = index.calibration
        ncand = index._ncandidates(K, "auto")
        return (f"defaults: method {cal.get('method', 'plaid')}, ncandidates {ncand} (calibrated rerank factor "
                f"{cal.get('rerank_factor', '-')})")
    return ", ".join(f"{k} {v}" for k, v in params.items())


def run(args) -> list[dict]:
    """All sections (see the module docstring); rows carry a ``section`` label. ``reatt-bench --index`` calls this
    with its own args: then only the headline section runs, at ``--index-docs`` documents (default 2000)."""
    quick = bool(getattr(args, "quick", False))
    if not hasattr(args, "sections"):  # called by reatt-bench --index
        args = argparse.Namespace(**vars(args))
        args.sections, args.docs = "headline", getattr(args, "index_docs", None) or 2000
        args.queries, args.nbits, args.cache, args.peer_venv = 20, 4, None, None
        args.corpus, args.no_peer = "synthetic", True
        args.device_obj = getattr(args, "device_obj", None) or resolve_device("auto")
    if getattr(args, "corpus", "synthetic") != "synthetic":
        return bench_real(args.corpus, args)
    scan = {"method": "scan"}
    if quick:
        sweep = [dict(DEFAULTS), {"method": "plaid", "ncandidates": 64}, scan]
    else:
        sweep = [dict(DEFAULTS), {"method": "plaid", "ncandidates": 128}, {"method": "plaid", "ncandidates": 1024},
                 {"method": "plaid", "nprobe": 8, "ncandidates": 4096}, scan]
    rows = []
    for section in args.sections.split(","):
        if section == "headline":
            rows += bench_corpus("headline", args.docs, HEADLINE_NOISE, args, sweep, peer=False)
        elif section == "peer":
            rows += bench_corpus("peer", args.peer_docs, HEADLINE_NOISE, args,
                                 [dict(DEFAULTS), {"method": "plaid", "nprobe": 8, "ncandidates": 4096}, scan],
                                 peer=not args.no_peer)
        elif section == "sweep":
            for noise in SWEEP_NOISES:
                rows += bench_corpus(f"noise {noise}", args.sweep_docs, noise, args, [dict(DEFAULTS), scan],
                                     peer=False)
        else:
            raise ValueError(f"unknown section {section!r} (headline, peer, sweep)")
    return rows


# ---- report -------------------------------------------------------------------------------------------------------
COLUMNS = [("section", "section", ""), ("system", "system", ""), ("config", "config", ""), ("build_s", "build s", ".1f"),
           ("peak_rss_mib", "build peak RSS MiB", ".0f"), ("ms_p50", "ms/query", ".1f"), ("ms_b16", "ms/query b16", ".1f"),
           ("speedup_vs_exact", "x exact", ".2f"),
           ("bytes_per_token", "B/token", ".1f"), ("recall@10", "recall@10", ".3f"),
           ("eps_recall@10", "eps-recall@10", ".3f"), ("gold@10", "gold@10", ".3f"),
           ("exact_gold@10", "exact gold@10", ".3f")]


def table(rows: list[dict]) -> str:
    """A markdown table of the rows ("n/a" rows say why)."""
    out = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = []
        for key, _, fmt in COLUMNS:
            v = r.get(key)
            if r.get("status") == "n/a" and key == "config":
                v = f"n/a: {r.get('reason', '')}"
            cells.append("" if v is None else (format(v, fmt) if fmt and isinstance(v, (int, float)) else str(v)))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def profile_table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        if "profile" not in r:
            continue
        out.append(f"per-stage profile, {r['section']}, {r['system']} {r['config']} ({r['docs']} docs, batch 1):")
        total = sum(v["ms"] for v in r["profile"].values())
        for s, v in r["profile"].items():
            extra = ", ".join(f"{k} {x}" for k, x in v.items() if k != "ms")
            out.append(f"  {s:<18} {v['ms']:8.2f} ms ({100 * v['ms'] / max(total, 1e-9):4.1f}%)  {extra}")
        b = r.get("build", {})
        if b.get("peak_rss_bytes") is not None:
            out.append(f"  build: {b['build_s']:.1f} s = {b['s_per_Mtok']:.1f} s per million tokens; peak RSS "
                       f"{b['peak_rss_bytes'] / 2**20:.0f} MiB, budget {b['rss_budget_bytes'] / 2**20:.0f} MiB "
                       f"(1.5 x index {b['index_bytes'] / 2**20:.0f} MiB + one chunk {b['chunk_bytes'] / 2**20:.0f} "
                       f"MiB, the k-means sample in fp32): {'within' if b['rss_within_budget'] else 'OVER'}"
                       f"{' (recorded when built; reused from cache)' if b.get('reused') else ''}")
    return "\n".join(out)


def plot(rows: list[dict], path) -> Optional[str]:
    """ann-benchmarks style: eps-recall@10 (x) against ms/query (y, log), one line per system and section."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        print(f"plot: matplotlib not available ({exc})")
        return None
    rows = [r for r in rows if r.get("status") != "n/a" and "ms_p50" in r]
    sections = list(dict.fromkeys(r["section"] for r in rows))
    fig, axes = plt.subplots(1, len(sections), figsize=(5.5 * len(sections), 4.2), squeeze=False)
    for ax, sec in zip(axes[0], sections):
        sub = [r for r in rows if r["section"] == sec]
        for system in dict.fromkeys(r["system"] for r in sub):
            pts = sorted((r for r in sub if r["system"] == system), key=lambda r: r["ms_p50"])
            xs = [r["eps_recall@10"] for r in pts]
            ys = [r["ms_p50"] for r in pts]
            ax.plot(xs, ys, "o-" if len(pts) > 1 else "s", label=system)
            for r in pts:
                lab = (f"{r['n_ivf_probe']}/{r['n_full_scores']}" if "n_ivf_probe" in r else
                       str(r.get("ncandidates", r.get("method", ""))))
                if lab:
                    ax.annotate(lab, (r["eps_recall@10"], r["ms_p50"]), fontsize=6)
        ax.set_xlabel("eps-recall@10 (eps = 0.01)")
        ax.set_ylabel("p50 ms per query (batch 1)")
        ax.set_yscale("log")
        what = f"noise {sub[0]['noise']}" if sub[0].get("noise") is not None else "real text"
        ax.set_title(f"{sec}: {sub[0]['docs']} docs, {what}", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Index benchmark: exact vs residual vs fast-plaid (recall, eps-recall, "
                                "gold success, latency, bytes, build)")
    p.add_argument("--corpus", default="synthetic", choices=["synthetic", "squad-dev", "real-all"],
                   help="real text (squad-dev, real-all: reatt_kernels.bench.corpora) or the synthetic sections")
    p.add_argument("--quick", action="store_true", help="small corpora (2000 docs), 20 queries")
    p.add_argument("--sections", default="headline,peer,sweep", help="comma list of headline, peer, sweep")
    p.add_argument("--docs", type=int, default=None, help="headline documents (default 100000; quick 2000)")
    p.add_argument("--peer-docs", type=int, default=None, help="peer section documents (default 20000; quick 2000)")
    p.add_argument("--sweep-docs", type=int, default=None, help="noise sweep documents (default 20000; quick 2000)")
    p.add_argument("--queries", type=int, default=None, help="queries (default 60, real text 150; quick 20)")
    p.add_argument("--nbits", type=int, default=4)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the GPU configuration: scripts/device_check.sh)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (fast-plaid gets the same)")
    p.add_argument("--peer-venv", default=None, help=f"fast-plaid venv (default ${PEER_VENV_ENV} or {PEER_VENV_DEFAULT})")
    p.add_argument("--no-peer", action="store_true", help="skip fast-plaid (its row says so)")
    p.add_argument("--peer-defaults-only", action="store_true",
                   help="fast-plaid at its defaults only (not also n_ivf_probe 16 / n_full_scores 8192)")
    p.add_argument("--cache", default=None, help="folder for built indexes (reused when corpus and settings match)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/cpu/)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    q = args.quick
    args.docs = args.docs or (2000 if q else 100_000)
    args.peer_docs = args.peer_docs or (2000 if q else 20_000)
    args.sweep_docs = args.sweep_docs or (2000 if q else 20_000)
    args.queries = args.queries or (20 if q else 60 if args.corpus == "synthetic" else 150)
    args.cache = Path(args.cache) if args.cache else None
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    args.device_obj = device
    out = results_dir(device, args.out)
    args.out = str(out)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    rows = run(args)
    load1 = os.getloadavg()
    name = "bench_index_quick" if q else "bench_index" if args.corpus == "synthetic" else f"bench_index_{args.corpus}"
    data = {"kind": "real" if args.corpus != "synthetic" else "synthetic", "corpus": args.corpus,
            "queries": args.queries}
    payload = {"env": env_info(device), "device": str(device), "threads": args.threads, "data": data,
               "wall_s": time.perf_counter() - t0,
               "load_avg_start": load0, "load_avg_end": load1, "args": {k: str(v) for k, v in vars(args).items()},
               "rows": rows, "notes": __doc__}
    path = write_json(out / f"{name}.json", payload)
    png = plot(rows, out / f"{name}.png")
    text = table(rows) + "\n\n" + profile_table(rows)
    (out / f"{name}.md").write_text(f"{device_name(device)}, {args.threads} threads; load average (1 min) {load0[0]:.1f} at start, "
                                    f"{load1[0]:.1f} at end\n\n{text}\n")
    print(text)
    print(f"wrote {path}, {out / (name + '.md')}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
