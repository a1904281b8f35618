"""The harness of the op benchmarks in ``benchmarks/bench_*.py`` (was ``reatt_kernels/bench/harness.py``).

The measurement primitives live in :mod:`reatt_kernels.bench.util` (the ``reatt-bench`` main job and the index
benchmark use the same ones) and are re-exported here; this module adds the glue every benchmark script needs:

- :func:`base_parser`: the common flags ``--quick``, ``--out DIR``, ``--device``;
- :func:`measure`: one provider on one case -> a result row (p50/p20/p80 ms, GB/s and TFLOP/s from explicit byte and
  FLOP counts, % of the roofline measured in the same run, peak memory, or "n/a" with the reason);
- :func:`run_pytest_benchmark`: the same call under the pytest-benchmark ``benchmark`` fixture;
- :func:`save`: JSON to ``benchmarks/results/<device>/<name>.json`` with the environment (device name, torch/triton
  versions, git sha) and the roofline;
- :func:`plot_rows`: a PNG bar chart (log scale) of p50 per provider and case.

A script imports it as ``from reatt_kernels.bench.harness import ...`` (no ``sys.path`` edits).
Benchmarks never assert: a failing provider is a row with ``status = "n/a"``.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .main import HelpFormatter  # noqa: F401  (re-exported)
from .util import (  # noqa: F401  (re-exported)
    GIB,
    MIB,
    apply_roofline,
    best_roofline,
    NAIVE_CHUNK_ELEMS,
    device_name,
    device_slug,
    env_info,
    floor_ms,
    format_table,
    git_sha,
    naive_maxsim,
    peak_memory,
    resolve_device,
    results_dir,
    roofline,
    short_reason,
    sync,
    time_fn,
    write_json,
)

QUANTILES = (0.5, 0.2, 0.8)

ROW_COLUMNS = [
    ("case", "case", ""),
    ("provider", "provider", ""),
    ("mode", "mode", ""),
    ("p50_ms", "p50 ms", ".3f"),
    ("p20_ms", "p20 ms", ".3f"),
    ("p80_ms", "p80 ms", ".3f"),
    ("GBps", "GB/s", ".1f"),
    ("TFLOPs", "TFLOP/s", ".3f"),
    ("floor_ms", "floor ms", ".3f"),
    ("bound", "bound", ""),             # "memory" or "compute (<ceiling>)": the limit floor_ms comes from
    ("pct_roofline", "% roof", ".1f"),
    ("speedup_vs_naive", "x naive", ".2f"),
    ("peak_mem_MiB", "peak MiB", ".1f"),
    ("max_abs_diff_vs_naive", "|diff|", ".1e"),
    ("note", "note", ""),
]


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes and short timing (the device check uses it)")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results/<device>/)")
    p.add_argument("--device", default="auto", help="auto (cuda when a GPU is visible), cpu or cuda")
    return p


def measure(fn: Optional[Callable[[], object]], device: torch.device, roof: dict, *, n_bytes: float, flops: float,
            reason: Optional[str] = None, memory: bool = True, min_reps: int = 5, budget_s: float = 1.0,
            quantiles: Sequence[float] = QUANTILES, check: Optional[Callable[[object], float]] = None,
            **labels) -> dict:
    """Time one provider and return its row.

    Args:
        fn: the call to time (no arguments), or None when ``reason`` says why the provider cannot run.
        roof: :func:`roofline` of this run. n_bytes, flops: the explicit counts for GB/s, TFLOP/s and the floor.
        check: applied to the first call's output; its value is stored as ``max_abs_diff_vs_naive`` (a sanity
            figure, never asserted: a fast provider with wrong results should stand out in the JSON).
        labels: copied into the row (case, provider, mode, shape, ...).
    Returns:
        a dict with ``status`` ("ok" / "n/a"), p50/p20/p80 (ms), GBps, TFLOPs, floor_ms, pct_roofline, peak memory.
    """
    row = dict(labels)
    row.update(bytes=n_bytes, flops=flops)
    fl, bound = floor_ms(n_bytes, flops, roof)
    row.update(floor_ms=fl, bound=bound)
    if fn is None:
        row.update(status="n/a", note=short_reason(reason or "not available"))
        return row
    try:
        first = fn()  # first call: compile / autotune / page faults; an error here makes the row n/a
        sync(device)
        if check is not None:
            try:
                row["max_abs_diff_vs_naive"] = float(check(first))
            except Exception as exc:
                row["max_abs_diff_vs_naive"] = None
                row["check_error"] = short_reason(exc)
        del first
        t = time_fn(fn, device, quantiles, min_reps=min_reps, budget_s=budget_s, warmup=0)
    except Exception as exc:
        row.update(status="n/a", note=short_reason(exc))
        return row
    for q in quantiles:
        key = f"p{round(q * 100):d}"
        row[f"{key}_ms"] = t[key]
    row.update(status="ok", n=t["n"], timing=t["method"])
    p50 = t["p50"]
    row["GBps"] = n_bytes / (p50 * 1e-3) / 1e9 if n_bytes else None
    row["TFLOPs"] = flops / (p50 * 1e-3) / 1e12 if flops else None
    row["pct_roofline"] = 100.0 * fl / p50 if fl else None
    if memory:
        try:
            m = peak_memory(fn, device)
            row["peak_mem_bytes"] = m["bytes"]
            row["peak_mem_MiB"] = m["bytes"] / MIB if m["bytes"] is not None else None
            row["peak_mem_method"] = m["method"]
        except Exception as exc:
            row["peak_mem_bytes"] = None
            row["peak_mem_method"] = f"failed: {short_reason(exc)}"
    return row


def add_speedups(rows: list[dict], baseline: str = "naive", key: str = "case") -> None:
    """``speedup_vs_naive = naive p50 / provider p50`` within each case (None when either is n/a)."""
    base = {r[key]: r.get("p50_ms") for r in rows if r.get("provider") == baseline and r.get("status") == "ok"}
    for r in rows:
        b = base.get(r.get(key))
        r["speedup_vs_naive"] = b / r["p50_ms"] if b and r.get("status") == "ok" and r.get("p50_ms") else None


def run_pytest_benchmark(benchmark, fn: Callable[[], object], device: torch.device, rounds: int = 5, **extra) -> None:
    """Time ``fn`` with the pytest-benchmark fixture (GPU calls are synchronised so wall time is kernel time)."""

    def call():
        out = fn()
        sync(device)
        return out

    call()  # compile / autotune outside the timed rounds
    for k, v in extra.items():
        benchmark.extra_info[k] = v
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)


def save(name: str, device: torch.device, payload: dict, out: Optional[str] = None) -> Path:
    """Write ``<out or benchmarks/results/<device>>/<name>.json`` with ``env`` filled in; returns the path."""
    payload = dict(payload)
    payload.setdefault("env", env_info(device))
    return write_json(results_dir(device, out) / f"{name}.json", payload)


def plot_rows(rows: list[dict], path: Path, title: str, value: str = "p50_ms", ylabel: str = "ms (p50)") -> Optional[Path]:
    """One panel per case, one bar per provider (n/a providers labelled); log scale; a dashed line at the floor."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        print(f"plot: matplotlib not available ({exc})")
        return None
    cases = list(dict.fromkeys(r["case"] for r in rows))
    if not cases:
        return None
    ncol = min(3, len(cases))
    nrow = (len(cases) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.0 * ncol, 3.6 * nrow), squeeze=False)
    for ax in axes.flat[len(cases):]:
        ax.set_visible(False)
    for ax, case in zip(axes.flat, cases):
        sub = [r for r in rows if r["case"] == case]
        ys = [r.get(value) if r.get("status") == "ok" else 0 for r in sub]
        labels = [r["provider"] + ("" if r.get("status") == "ok" else "\n(n/a)") for r in sub]
        ax.bar(range(len(sub)), [y or 0 for y in ys], color="tab:blue")
        fl = sub[0].get("floor_ms")
        if fl and value == "p50_ms":
            ax.axhline(fl, color="tab:red", ls="--", lw=1, label=f"roofline {fl:.3g} ms")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(sub)))
        ax.set_xticklabels(labels, fontsize=7, rotation=20)
        ax.set_title(case, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        if any(y for y in ys):
            ax.set_yscale("log")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def case_main(description: str, providers, run, argv=None, case_names=None) -> int:
    """The shared command line of the per-op benchmark scripts: ``[--quick] [--out] [--device] [--cases]
    [--providers]``, then ``run(device, quick, cases, providers, out)``.

    ``case_names(device, quick)`` (optional) lists the valid cases. An unknown case or provider is a usage error
    (exit 2, naming it and the valid ones) before anything runs: otherwise the run would measure nothing and still
    write its results file over the committed one."""
    p = base_parser(description)
    p.add_argument("--cases", default=None, help="comma-separated case names (default: all for the device)")
    p.add_argument("--providers", default=None, help=f"comma-separated subset of {','.join(providers)}")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    cases = [c for c in args.cases.split(",") if c] if args.cases else None
    chosen = [x for x in args.providers.split(",") if x] if args.providers else None
    bad = [x for x in chosen or [] if x not in providers]
    if bad:
        p.error(f"--providers: unknown {bad}; expected a subset of {list(providers)}")
    if cases and case_names is not None:
        valid = list(case_names(device, args.quick))
        bad = [c for c in cases if c not in valid]
        if bad:
            p.error(f"--cases: unknown {bad} for device {device.type}{' with --quick' if args.quick else ''}; "
                    f"expected a subset of {valid}")
    run(device, args.quick, cases, chosen, args.out)
    return 0


def pytest_device() -> torch.device:
    """Device of the pytest-benchmark entry points: the GPU when one is visible."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_quick() -> bool:
    """``REATT_BENCH_QUICK=1`` picks the quick shapes under pytest-benchmark."""
    return os.environ.get("REATT_BENCH_QUICK", "0") not in ("", "0")
