"""``reatt-bench``: the main job. Exact MaxSim retrieval latency on an embedded synthetic corpus, every backend side by
side with naive PyTorch, plus the measurement helpers the benchmark scripts share (benchmarks/common.py re-exports
them, so a number printed by ``reatt-bench`` and one printed by ``benchmarks/bench_*.py`` mean the same thing).

The job:
1. builds the ANCHORS clustered corpus deterministically (:func:`reatt_kernels.datasets.clustered_corpus`, packed,
   48-128 tokens per document, d = 128; about 20k documents on CPU, 200k on a GPU; tqdm shows progress) and a batch of
   queries (32 noisy tokens drawn from one document each);
2. measures the machine's roofline in the same process (streaming bandwidth and matmul FLOP/s);
3. times ``scores = maxsim_packed(q, d_tokens, d_offsets); scores.topk(k)`` with each backend in
   ``available_backends()`` (a backend that cannot run is reported "n/a" with its reasons), next to naive PyTorch
   (pad to 128 + mask, ``einsum``, ``amax``, sum; chunked over documents: the ANCHORS baseline);
4. prints a table, and saves JSON and a PNG plot under ``benchmarks/results/<device>/`` (or ``--out``).

``--index`` adds the compressed-index modes from ``reatt_kernels.index.bench.run(args)`` when that module exists.

Roofline of one batch call: the documents are streamed once, so
``bytes = T * dim * itemsize`` (T real tokens; padding is not useful work) and ``FLOPs = 2 * B * Lq * T * dim``;
``floor = max(bytes / measured bandwidth, FLOPs / measured matmul rate)`` and "% of roofline" is ``floor / p50``.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

# ---- measurement helpers (shared with benchmarks/common.py) -----------------------------------------------------------

MIB = 1 << 20
GIB = 1 << 30

# Naive chunking: bound the fp32/fp16 token-pair score tensor (Bq x docs x Lq x Ld). On CPU this is ANCHORS' "chunks
# of 2000 docs" for one 32-token query against 128-token documents; on a GPU 2^28 elements (512 MiB in fp16).
NAIVE_CHUNK_ELEMS = {"cpu": 2000 * 32 * 128, "cuda": 1 << 28}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda when a GPU is visible, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but torch sees no CUDA GPU")
    return dev


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return model


def device_slug(device: torch.device) -> str:
    """Results folder name: ``cpu``, or the GPU name slugified (``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``)."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-") or "cuda"


def repo_root() -> Path:
    """The checkout holding this package (editable install), else the working directory."""
    here = Path(__file__).resolve().parents[1]
    return here if (here / "pyproject.toml").exists() else Path.cwd()


def results_dir(device: torch.device, out: Optional[str] = None) -> Path:
    path = Path(out) if out else repo_root() / "benchmarks" / "results" / device_slug(device)
    path.mkdir(parents=True, exist_ok=True)
    return path


def git_sha() -> str:
    try:
        root = repo_root()
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except Exception:
        return "unknown"


def env_info(device: torch.device) -> dict:
    """Everything a number needs to be reproduced: hardware, versions, sha, threads, time."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:
        triton_version = f"n/a ({type(exc).__name__})"
    info = {
        "device": device.type,
        "device_name": device_name(device),
        "device_slug": device_slug(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "git_sha": git_sha(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(cuda=torch.version.cuda, sm_count=props.multi_processor_count,
                    gpu_mem_gib=round(props.total_memory / GIB, 1), capability=f"{props.major}.{props.minor}")
    try:
        from reatt_kernels import _ext, available_backends

        info["backends"] = available_backends()
        info["build_info"] = _ext.build_info()
    except Exception as exc:  # the helpers must work even when the package is half built
        info["backends"] = f"error: {exc}"
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, quantiles: Sequence[float] = (0.5, 0.2, 0.8), *,
            min_reps: int = 5, max_reps: int = 200, budget_s: float = 1.0, warmup: int = 1) -> dict:
    """Time ``fn`` and return ``{"p50": ms, "p20": ms, ...}`` for each quantile, plus ``n`` and ``method``.

    GPU: ``triton.testing.do_bench(fn, quantiles=...)`` (it flushes L2 between calls and times with CUDA events).
    CPU: ``warmup`` untimed calls, then calls timed one by one with ``time.perf_counter`` until at least ``min_reps``
    calls and ``budget_s`` seconds (at most ``max_reps`` calls); quantiles over those calls (linear interpolation).
    """
    qs = list(quantiles)
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            vals = do_bench(fn, quantiles=qs)
            vals = vals if isinstance(vals, (list, tuple)) else [vals]
            out = {_qname(q): float(v) for q, v in zip(qs, vals)}
            out.update(n=None, method="triton.testing.do_bench (CUDA events, L2 flushed)")
            return out
        except ImportError:
            pass  # fall through: CUDA events by hand
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    t_start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - t_start < budget_s):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    t = torch.tensor(times, dtype=torch.float64)
    out = {_qname(q): float(torch.quantile(t, q)) for q in qs}
    out.update(n=len(times), method="time.perf_counter per call" if device.type == "cpu" else "CUDA events per call")
    return out


def _qname(q: float) -> str:
    return f"p{round(q * 100):d}"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


def peak_memory(fn: Callable[[], object], device: torch.device) -> dict:
    """Extra memory one call of ``fn`` needs at its peak (inputs already allocated are not counted; outputs are).

    GPU: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` before the call.
    CPU: resident set size sampled every 0.5 ms by a thread, peak minus the RSS before the call, after
    ``malloc_trim(0)`` so memory that glibc kept from an earlier call is returned first (otherwise a reused heap
    would hide the allocation). Linux only; ``None`` elsewhere.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        return {"bytes": int(peak), "method": "torch.cuda.max_memory_allocated - memory_allocated before"}
    if not os.path.exists("/proc/self/statm"):
        fn()
        return {"bytes": None, "method": "n/a (no /proc/self/statm)"}
    _malloc_trim()
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        fn()
    finally:
        stop.set()
        th.join()
    peak[0] = max(peak[0], _rss_bytes())
    return {"bytes": int(peak[0] - base), "method": "RSS delta: peak sampled every 0.5 ms minus RSS before (after malloc_trim)"}


def roofline(device: torch.device, quick: bool = False) -> dict:
    """Measure this machine's ceilings in this process.

    GPU: device-to-device copy of 1 GiB (bandwidth counts read + write bytes) and a bf16 8192^3 matmul (do_bench p50).
    CPU: a streaming ``sum`` over 256 MiB of fp32 (bytes read) and an fp32 2048^3 matmul (FLOPs = 2 n^3), each the
    fastest of >= 5 calls; also a bf16 matmul, recorded for information.
    """
    if device.type == "cuda":
        n_bytes = GIB
        src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=device).normal_()
        dst = torch.empty_like(src)
        t_copy = time_fn(lambda: dst.copy_(src), device)
        rd = time_fn(lambda: src.sum(), device)
        del src, dst
        n = 8192
        a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
        b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
        t_mm = time_fn(lambda: a @ b, device)
        del a, b
        torch.cuda.empty_cache()
        return {
            "bandwidth_GBps": 2 * n_bytes / (t_copy["p50"] * 1e-3) / 1e9,
            "bandwidth_method": "device-to-device copy of 1 GiB, (read + write bytes) / p50",
            "read_bandwidth_GBps": n_bytes / (rd["p50"] * 1e-3) / 1e9,
            "matmul_TFLOPs": 2 * n**3 / (t_mm["p50"] * 1e-3) / 1e12,
            "matmul_method": "bf16 8192^3 matmul, 2 n^3 / p50",
        }
    # On a CPU the ceiling is the fastest call (p0): other processes only ever slow a call down.
    n_el = (256 * MIB) // 4
    x = torch.rand(n_el, dtype=torch.float32)
    t_sum = time_fn(lambda: x.sum(), device, quantiles=(0.0,), min_reps=5, budget_s=0.3 if quick else 1.0)
    del x
    n = 1024 if quick else 2048
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    t_mm = time_fn(lambda: a @ b, device, quantiles=(0.0,), min_reps=5, budget_s=0.3 if quick else 1.0)
    # For information only (the floor uses fp32): kernels that screen in bf16 and rescore exactly in fp32 (the C++
    # MaxSim does) can beat the fp32 ceiling, and this is the rate they are bounded by.
    a16, b16 = a.bfloat16(), b.bfloat16()
    t_mm16 = time_fn(lambda: a16 @ b16, device, quantiles=(0.0,), min_reps=5, budget_s=0.3 if quick else 1.0)
    return {
        "bandwidth_GBps": 256 * MIB / (t_sum["p0"] * 1e-3) / 1e9,
        "bandwidth_method": "streaming fp32 sum over 256 MiB, bytes read / fastest of >= 5 calls",
        "matmul_TFLOPs": 2 * n**3 / (t_mm["p0"] * 1e-3) / 1e12,
        "matmul_method": f"fp32 {n}^3 matmul, 2 n^3 / fastest of >= 5 calls ({torch.get_num_threads()} threads)",
        "matmul_bf16_TFLOPs": 2 * n**3 / (t_mm16["p0"] * 1e-3) / 1e12,
    }


def best_roofline(*roofs: dict) -> dict:
    """The highest of several roofline measurements (e.g. at the start and the end of a run on a shared machine)."""
    best = dict(roofs[0])
    for key in ("bandwidth_GBps", "read_bandwidth_GBps", "matmul_TFLOPs", "matmul_bf16_TFLOPs"):
        vals = [r[key] for r in roofs if r.get(key) is not None]
        if vals:
            best[key] = max(vals)
    best["measurements"] = [{k: r.get(k) for k in ("bandwidth_GBps", "matmul_TFLOPs")} for r in roofs]
    best["combined"] = f"max over {len(roofs)} measurements (start and end of the run)"
    return best


def apply_roofline(rows: list[dict], roof: dict, time_key: str = "p50_ms") -> None:
    """(Re)compute ``floor_ms``, ``bound`` and ``pct_roofline`` of rows that carry ``bytes`` and ``flops``."""
    for r in rows:
        if r.get("bytes") is None or r.get("flops") is None:
            continue
        fl, bound = floor_ms(r["bytes"], r["flops"], roof)
        r["floor_ms"], r["bound"] = fl, bound
        if r.get("status") == "ok" and r.get(time_key):
            r["pct_roofline"] = 100.0 * fl / r[time_key]


def floor_ms(n_bytes: float, flops: float, roof: dict) -> tuple[float, str]:
    """Roofline time for moving ``n_bytes`` and doing ``flops`` on this machine, and which one binds."""
    t_mem = n_bytes / (roof["bandwidth_GBps"] * 1e9) * 1e3
    t_flop = flops / (roof["matmul_TFLOPs"] * 1e12) * 1e3
    return (t_mem, "memory") if t_mem >= t_flop else (t_flop, "compute")


def naive_maxsim(q: torch.Tensor, d_pad: torch.Tensor, d_mask: Optional[torch.Tensor] = None,
                 chunk_elems: Optional[int] = None) -> torch.Tensor:
    """The ANCHORS naive baseline: ``einsum``, mask, ``amax`` over document tokens, sum over query tokens.

    Args:
        q: [Bq, Lq, D]. d_pad: [Nd, Ld, D] (same dtype). d_mask: bool [Nd, Ld] or None.
        chunk_elems: bound on Bq * docs * Lq * Ld per chunk (default: :data:`NAIVE_CHUNK_ELEMS` for the device).
    Returns:
        [Bq, Nd] scores in fp32 (accumulated in q's dtype, as a naive user would get).
    """
    Bq, Lq, _ = q.shape
    Nd, Ld, _ = d_pad.shape
    limit = chunk_elems or NAIVE_CHUNK_ELEMS.get(q.device.type, 1 << 26)
    step = max(1, limit // max(1, Bq * Lq * Ld))
    out = torch.empty((Bq, Nd), dtype=torch.float32, device=q.device)
    for b0 in range(0, Nd, step):
        b1 = min(Nd, b0 + step)
        s = torch.einsum("aid,bjd->abij", q, d_pad[b0:b1])
        if d_mask is not None:
            s.masked_fill_(~d_mask[None, b0:b1, None, :], float("-inf"))
        out[:, b0:b1] = s.amax(-1).float().sum(-1)
    return out


def write_json(path: Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=_json_default)
        f.write("\n")
    return path


def _json_default(o):
    if isinstance(o, torch.dtype):
        return str(o).replace("torch.", "")
    if isinstance(o, (torch.device, Path)):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist() if o.numel() <= 64 else f"<tensor {tuple(o.shape)} {o.dtype}>"
    return str(o)


def format_table(rows: list[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """``columns``: (key, header, format spec); a missing or None value prints as ``n/a`` (``note``: blank)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        line = []
        for key, _, fmt in columns:
            v = r.get(key)
            if v is None:
                line.append("" if key == "note" else "n/a")
            elif isinstance(v, (int, float)) and fmt:
                line.append(format(v, fmt))
            else:
                line.append(str(v))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    # Text columns (no format spec) align left, numbers right; the last column is not padded.
    left = [not fmt for _, _, fmt in columns]
    lines = ["  ".join(c.ljust(w) if left[j] else c.rjust(w) for j, (c, w) in enumerate(zip(line, widths))).rstrip()
             for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def short_reason(exc_or_reasons) -> str:
    """One line for an "n/a" cell: an exception or a list of reasons, trimmed."""
    if isinstance(exc_or_reasons, BaseException):
        text = f"{type(exc_or_reasons).__name__}: {exc_or_reasons}"
    elif isinstance(exc_or_reasons, (list, tuple)):
        text = "; ".join(str(r) for r in exc_or_reasons)
    else:
        text = str(exc_or_reasons)
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


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
                   help="also run the compressed-index modes (reatt_kernels.index.bench.run), when available")
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
        from reatt_kernels.datasets import pad_packed

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
    """Rows from ``reatt_kernels.index.bench.run(args)``, or an "n/a" reason."""
    import importlib

    try:
        index_bench = importlib.import_module("reatt_kernels.index.bench")
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

    from reatt_kernels.datasets import clustered_corpus, clustered_queries

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
        "corpus": {"kind": "clustered (reatt_kernels.datasets.clustered_corpus)", "docs": args.docs, "tokens": T,
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
