"""A/B in turns: the ``cpu`` MaxSim backend of two checkouts on the bench_maxsim CPU shapes, in one session.

Why: a kernel change on a shared 2-core VM is judged against the code it replaces, measured on the same machine at the
same time, not against a figure from another day (the issue-22 rule: "measure today's code in the same run"). The two
checkouts cannot share one process (each has its own ``reatt_kernels._C``), so each round runs one subprocess per
side, in the order A B, then B A, and so on, on identical inputs (the corpora are built once and cached), and each
side's figure is the median over its rounds of the per-round p50. Use an even number of rounds.

Usage::

    python benchmarks/ab_maxsim_cpu.py --a /path/to/before --b . --rounds 3 \
        --out benchmarks/results/cpu/bench_maxsim_ab.json

``--a`` / ``--b``: repository roots whose ``reatt_kernels`` (with its built ``_C``) is imported (PYTHONPATH).
Cases (bench_maxsim's shapes): 1 query x 20k docs x 128 tokens fp32 (fixed), 16 queries on the same corpus, the ragged
packed corpus (48-128 tokens), and training fwd+bwd (8 x 800, Lq 32, Ld 200 ragged 100-200, d 64, bf16, mean,
pos_bias), and that training forward alone (``_fwd``, no autograd). ``_16of32``: the fixed cases with 16 of each query's
32 tokens valid, at random positions (holes), against the full query of the case without the suffix: what masked query
tokens cost. Times are wall-clock p50 of calls timed one by one, 2 threads (torch.get_num_threads()).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = ["cpu_fixed_1q_20k", "cpu_fixed_16q_20k", "cpu_ragged_1q_20k", "cpu_train_8x800", "cpu_train_8x800_fwd",
         "cpu_fixed_1q_20k_16of32", "cpu_fixed_16q_20k_16of32"]

# The child: imports reatt_kernels from its PYTHONPATH, times the cases on cached inputs, prints one JSON line.
CHILD = r'''
import json, os, sys, time, torch
import reatt_kernels as rk
from reatt_kernels.bench.datasets import clustered_corpus, clustered_queries
cache, cases, reps = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
torch.set_num_threads(int(os.environ.get("AB_THREADS", "2")))
def corpus(ragged):
    path = os.path.join(cache, f"corpus_{'ragged' if ragged else 'fixed'}.pt")
    if os.path.exists(path):
        return torch.load(path)
    out = clustered_corpus(n_docs=20000, dim=128, min_len=48 if ragged else 128, max_len=128, seed=0,
                           dtype=torch.float32)
    torch.save(out, path)
    return out
def p50(fn):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    ts.sort()
    return 1e3 * ts[len(ts) // 2]
res = {}
for case in cases:
    if case.startswith("cpu_train"):
        Bq, Lq, Nd, Ld, D = 8, 32, 800, 200, 64
        g = torch.Generator().manual_seed(2)
        q = torch.nn.functional.normalize(torch.randn(Bq, Lq, D, generator=g), dim=-1).bfloat16()
        d = torch.nn.functional.normalize(torch.randn(Nd, Ld, D, generator=g), dim=-1).bfloat16()
        d_len = torch.randint(Ld // 2, Ld + 1, (Nd,), generator=g)
        q_len = torch.randint(Lq // 2, Lq + 1, (Bq,), generator=g)
        dm = torch.arange(Ld)[None] < d_len[:, None]
        qm = torch.arange(Lq)[None] < q_len[:, None]
        pb = (0.1 * torch.randn(Lq + Ld, generator=g)).requires_grad_(True)
        grad = torch.randn(Bq, Nd, generator=g)
        q.requires_grad_(True); d.requires_grad_(True)
        if case.endswith("_fwd"):
            def fn():
                with torch.no_grad():
                    return rk.maxsim(q, d, qm, dm, pos_bias=pb, reduce="mean", backend="cpu")
        else:
            def fn():
                s = rk.maxsim(q, d, qm, dm, pos_bias=pb, reduce="mean", backend="cpu")
                return torch.autograd.grad(s, (q, d, pb), grad)
    else:
        ragged = "ragged" in case
        dt, off = corpus(ragged)
        nq = 16 if "_16q_" in case else 1
        q, _ = clustered_queries(dt, off, nq, q_len=32, seed=1)
        qm = None
        if case.endswith("_16of32"):
            g = torch.Generator().manual_seed(3)
            qm = torch.zeros(nq, 32, dtype=torch.bool)
            for a in range(nq):
                qm[a, torch.randperm(32, generator=g)[:16]] = True
        if ragged:
            fn = lambda q=q, dt=dt, off=off, qm=qm: rk.maxsim_packed(q, dt, off, qm, backend="cpu")
        else:
            dd = dt.view(20000, 128, 128)
            fn = lambda q=q, dd=dd, qm=qm: rk.maxsim(q, dd, qm, backend="cpu")
    res[case] = p50(fn)
res["_module"] = rk.__file__
print("AB_RESULT " + json.dumps(res))
'''


def _git(root: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _run_side(root: Path, cache: str, cases: list[str], reps: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root))
    # cwd: a neutral folder. `python -c` puts the working directory first on sys.path, so run from a checkout it
    # would import THAT checkout's reatt_kernels whatever PYTHONPATH says (both sides would be the same code).
    out = subprocess.run([sys.executable, "-c", CHILD, cache, ",".join(cases), str(reps)], env=env, cwd=cache,
                         capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("AB_RESULT "):
            res = json.loads(line[len("AB_RESULT "):])
            where = Path(res.pop("_module")).resolve()
            if root not in where.parents:
                raise RuntimeError(f"side {root} imported reatt_kernels from {where}, not from its own checkout")
            return res
    raise RuntimeError(f"the child for {root} printed no result (rc {out.returncode}):\n{out.stderr[-2000:]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True, type=Path, help="repository root of side A (before)")
    ap.add_argument("--b", required=True, type=Path, help="repository root of side B (after)")
    ap.add_argument("--rounds", type=int, default=4, help="rounds, alternately A B and B A (default 4)")
    ap.add_argument("--reps", type=int, default=7, help="timed calls per case per round (default 7)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    ap.add_argument("--out", type=Path, default=None, help="JSON file to write (default: print only)")
    args = ap.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad:
        ap.error(f"--cases: unknown {bad}; expected a subset of {CASES}")
    if args.rounds < 1 or args.reps < 1:
        ap.error("--rounds and --reps must be >= 1")
    for side in (args.a, args.b):
        if not (side / "reatt_kernels").is_dir():
            ap.error(f"{side} has no reatt_kernels package (expected a repository root with a built _C)")
    times = {"a": {c: [] for c in cases}, "b": {c: [] for c in cases}}
    with tempfile.TemporaryDirectory(prefix="reatt-ab-") as cache:
        for rnd in range(args.rounds):
            # The order flips every round (A B, B A, ...): the side that runs second was seen ~15 % slower on the
            # memory-bound 1-query case, whichever code it ran (an order effect of the machine, not of the code).
            order = (("a", args.a), ("b", args.b)) if rnd % 2 == 0 else (("b", args.b), ("a", args.a))
            for side, root in order:
                t0 = time.time()
                res = _run_side(root.resolve(), cache, cases, args.reps)
                for c in cases:
                    times[side][c].append(res[c])
                print(f"round {rnd + 1} {side}: " + ", ".join(f"{c} {res[c]:.2f} ms" for c in cases)
                      + f"  ({time.time() - t0:.0f} s)", flush=True)
    rows = []
    for c in cases:
        a, b = statistics.median(times["a"][c]), statistics.median(times["b"][c])
        rows.append(dict(case=c, provider="cpu", before_ms=a, after_ms=b, after_over_before=b / a,
                         before_rounds_ms=times["a"][c], after_rounds_ms=times["b"][c]))
    for r in rows:
        print(f"{r['case']:<20} before {r['before_ms']:8.2f} ms   after {r['after_ms']:8.2f} ms   "
              f"after/before {r['after_over_before']:.2f}")
    if args.out is not None:
        import torch

        payload = dict(
            benchmark="ab_maxsim_cpu", method="A/B in turns: one subprocess per side per round, in the order A B, B A, ..., "
            "identical cached inputs; each figure is the median over rounds of the per-round p50 of calls timed one by one",
            before=dict(root=str(args.a), git=_git(args.a, "rev-parse", "HEAD")),
            after=dict(root=str(args.b), git=_git(args.b, "rev-parse", "HEAD"),
                       dirty=bool(_git(args.b, "status", "--porcelain"))),
            cpu=_cpu_name(), torch=torch.__version__, threads=int(os.environ.get("AB_THREADS", "2")),
            rounds=args.rounds, reps=args.reps, rows=rows)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"saved {args.out}")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
