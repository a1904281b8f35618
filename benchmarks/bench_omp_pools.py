#!/usr/bin/env python
"""Two OpenMP runtimes in one process: do faiss's and torch's thread pools slow each other down on 2 cores?

faiss-cpu's wheel bundles its own libgomp (renamed, so it never merges with another); torch loads its libgomp.so.1,
which reatt_kernels._C then shares (same soname). An index build runs faiss (k-means) and torch (the assignment
matmuls, the quantiles) one after the other, and libgomp's idle threads spin for a while after each parallel region
before they sleep (GOMP_SPINCOUNT), which could steal a core from the other pool at every hand-over.

This measures, in one process, best of ``--reps`` each, interleaved:
- ``kmeans_alone``: faiss k-means on a build-sized sample, right after a sleep (both pools idle and asleep);
- ``kmeans_after_torch``: the same k-means immediately after a torch matmul (torch's threads still spinning);
- ``handover_pairs``: 200 alternations of a small faiss search and a small torch matmul, against the same 200 of each
  run back to back without alternation (the worst case of hand-overs).
and writes the libgomp copies loaded (``/proc/self/maps``). Ratios near 1 say the pools do not fight; the result
JSON (``--out``) is what docs/index.md quotes. Run it alone on a quiet machine (../shared/tools/quiet -- ...).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch


def loaded_openmp() -> list[str]:
    libs = set()
    with open("/proc/self/maps") as fh:
        for line in fh:
            if "gomp" in line or "libomp" in line or "iomp" in line:
                libs.add(line.split()[-1])
    return sorted(libs)


def cpu_name() -> str:
    """'<model name>, family <f> model <m>' of the first CPU (/proc/cpuinfo)."""
    info = {}
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if ":" in line:
                k, v = (x.strip() for x in line.split(":", 1))
                info.setdefault(k, v)
            elif info:
                break
    return f"{info.get('model name', '?')}, family {info.get('cpu family', '?')} model {info.get('model', '?')}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--sample", type=int, default=1 << 16)
    p.add_argument("--centroids", type=int, default=1024)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import faiss

    import reatt_kernels  # noqa: F401  (its _C shares torch's libgomp)

    faiss.omp_set_num_threads(args.threads)
    g = np.random.default_rng(0)
    x = g.standard_normal((args.sample, args.dim)).astype(np.float32)
    a = torch.randn(2048, args.dim)
    b = torch.randn(args.dim, 4096)

    def kmeans():
        km = faiss.Kmeans(args.dim, args.centroids, niter=4, seed=0, verbose=False, max_points_per_centroid=1 << 30)
        km.train(x)

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    alone, after = [], []
    for _ in range(args.reps):
        time.sleep(0.5)  # both pools asleep
        alone.append(timed(kmeans))
        _ = a @ b  # torch's pool busy, then spinning
        after.append(timed(kmeans))
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(x[:4096])
    qx = x[:64]
    small_a, small_b = torch.randn(256, args.dim), torch.randn(args.dim, 256)

    def alternating():
        for _ in range(200):
            flat.search(qx, 10)
            _ = small_a @ small_b

    def separate():
        for _ in range(200):
            flat.search(qx, 10)
        for _ in range(200):
            _ = small_a @ small_b

    alt, sep = [], []
    for _ in range(args.reps):
        alt.append(timed(alternating))
        sep.append(timed(separate))
    out = {"openmp_runtimes_loaded": loaded_openmp(), "threads": args.threads, "reps": args.reps,
           "kmeans_alone_s": min(alone), "kmeans_after_torch_s": min(after),
           "kmeans_ratio_after_over_alone": min(after) / min(alone),
           "handover_alternating_s": min(alt), "handover_separate_s": min(sep),
           "handover_ratio": min(alt) / min(sep), "load_avg": os.getloadavg(),
           "shape": {"dim": args.dim, "sample": args.sample, "centroids": args.centroids},
           "cpu": cpu_name()}
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
