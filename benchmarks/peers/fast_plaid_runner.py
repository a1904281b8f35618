"""Run fast-plaid (the peer) on the corpus and queries that benchmarks/bench_index.py wrote, inside fast-plaid's own
venv (see fast_plaid_venv.sh), and print one JSON object on stdout's last line.

Input folder (written by ``reatt_kernels.bench.index.write_peer_inputs``):
    tokens.npy   fp16 [T, D]   unit-norm document tokens, packed
    offsets.npy  int64 [N + 1] document boundaries (document i is tokens[offsets[i]:offsets[i + 1]], id i)
    queries.npy  fp16 [Q, Lq, D]
    query_mask.npy  bool [Q, Lq] (optional): each query is searched with its valid tokens only, as our index searches
                 it (no zero padding rows, which fast-plaid would score and probe with)
    meta.json    {"fingerprint": ...} (identifies the corpus, so a built index can be reused)

Output JSON: {"system", "version", "torch", "build_s", "reused_index", "index_bytes", "bytes_per_token", "n_tokens",
"configs": [{"n_ivf_probe", "n_full_scores", "ids" [Q][k], "scores" [Q][k], "ms_per_query" [Q]}]}.
Latency is per query at batch 1 (one search call per query), after one warm-up call per configuration.

This file imports only numpy, torch and fast_plaid: it never imports reatt_kernels (a different torch).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inputs", required=True, help="folder with tokens.npy, offsets.npy, queries.npy, meta.json")
    p.add_argument("--index", required=True, help="fast-plaid index folder (built here, or reused if it matches)")
    p.add_argument("--nbits", type=int, default=4)
    p.add_argument("--configs", default='[[8, 4096]]', help="JSON list of [n_ivf_probe, n_full_scores]")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--reuse", action="store_true",
                   help="reuse an index built earlier from the same corpus (build_s is then the recorded one)")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    import fast_plaid
    from fast_plaid import search as fp_search

    try:
        from importlib.metadata import version
        fp_version = version("fast-plaid")
    except Exception:  # noqa: BLE001
        fp_version = getattr(fast_plaid, "__version__", "unknown")

    tokens = np.load(os.path.join(args.inputs, "tokens.npy"), mmap_mode="r")
    offsets = np.load(os.path.join(args.inputs, "offsets.npy"))
    queries = torch.from_numpy(np.load(os.path.join(args.inputs, "queries.npy")).astype(np.float32))
    mask_path = os.path.join(args.inputs, "query_mask.npy")
    qmask = torch.from_numpy(np.load(mask_path)) if os.path.exists(mask_path) else None

    def query(a):  # [1, n_valid, D]: the valid tokens only
        return queries[a:a + 1] if qmask is None else queries[a:a + 1][:, qmask[a]]
    with open(os.path.join(args.inputs, "meta.json")) as f:
        fingerprint = json.load(f)["fingerprint"]
    stamp_path = os.path.join(args.index, "reatt_stamp.json")
    key = {"fingerprint": fingerprint, "nbits": args.nbits, "version": fp_version}

    reused = False
    if args.reuse and os.path.exists(stamp_path):
        with open(stamp_path) as f:
            stamp = json.load(f)
        if stamp.get("key") == key:
            reused, build_s = True, float(stamp["build_s"])
    if reused:
        index = fp_search.FastPlaid(index=args.index, device=args.device)
    else:
        if os.path.exists(args.index):
            shutil.rmtree(args.index)
        # fast-plaid takes a list of [L_i, D] tensors; fp32 copies of the documents (its k-means converts to fp16).
        docs = [torch.from_numpy(np.asarray(tokens[offsets[i]:offsets[i + 1]], dtype=np.float32))
                for i in range(len(offsets) - 1)]
        t0 = time.perf_counter()
        index = fp_search.FastPlaid(index=args.index, device=args.device)
        index.create(documents_embeddings=docs, nbits=args.nbits)  # defaults: kmeans_niters 4, its own k rule
        build_s = time.perf_counter() - t0
        del docs
        with open(stamp_path, "w") as f:
            json.dump({"key": key, "build_s": build_s}, f)
    index_bytes = _dir_bytes(args.index)

    out = {"system": "fast-plaid", "version": fp_version, "torch": torch.__version__, "build_s": build_s,
           "reused_index": reused, "index_bytes": index_bytes, "n_tokens": int(offsets[-1]),
           "bytes_per_token": index_bytes / max(1, int(offsets[-1])), "threads": args.threads,
           "queries_unpadded": qmask is not None, "configs": []}
    for n_probe, n_full in json.loads(args.configs):
        kw = dict(top_k=args.k, n_ivf_probe=int(n_probe), n_full_scores=int(n_full), show_progress=False)
        index.search(queries_embeddings=query(0), **kw)  # warm-up (loads the index, first-call costs)
        ids, scores, ms = [], [], []
        for a in range(queries.shape[0]):
            t0 = time.perf_counter()
            res = index.search(queries_embeddings=query(a), **kw)[0]
            if args.device == "cuda":
                torch.cuda.synchronize()
            ms.append((time.perf_counter() - t0) * 1e3)
            ids.append([int(d) for d, _ in res] + [-1] * (args.k - len(res)))
            scores.append([float(s) for _, s in res] + [float("-inf")] * (args.k - len(res)))
        out["configs"].append({"n_ivf_probe": int(n_probe), "n_full_scores": int(n_full), "ids": ids,
                               "scores": scores, "ms_per_query": ms})
        print(f"fast-plaid n_ivf_probe {n_probe} n_full_scores {n_full}: "
              f"{sorted(ms)[len(ms) // 2]:.1f} ms/query (p50)", file=sys.stderr, flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
