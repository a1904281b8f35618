"""Measurement helpers shared by every benchmark: the ``reatt-bench`` main job (:mod:`reatt_kernels.bench.main`), the
index benchmark (:mod:`reatt_kernels.bench.index`) and the scripts in ``benchmarks/``, so a number printed by any of them
means the same thing. This module imports no benchmark (one home for the helpers: no import cycle between the benchmarks).
"""
from __future__ import annotations

import ctypes
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

# ---- measurement helpers (shared with reatt_kernels/bench/harness.py) -----------------------------------------------------------

MIB = 1 << 20
GIB = 1 << 30

# Naive chunking: bound the fp32/fp16 token-pair score tensor (Bq x docs x Lq x Ld). On CPU this is docs/baselines.md's "chunks
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
    here = Path(__file__).resolve().parents[2]
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
        from reatt_kernels import available_backends, build_info

        info["backends"] = available_backends()
        info["build_info"] = build_info()
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


# The compute ceiling each CPU probe kind stands for, as named in a row's ``bound``.
DOT_NAMES = {"bf16dp": "bf16 dot-product", "fma32": "fp32 FMA"}


def cpu_probes(n_threads: int, n_bytes: int, seconds: float) -> dict:
    """This CPU's hardware ceilings, from the probes in ``csrc/roofline_cpu.cpp`` (``reatt_kernels._C``).

    Returns ``dot_TFLOPs`` (the bf16 dot-product peak, ``vdpbf16ps``, when the CPU has AVX512_BF16, else the fp32 FMA
    peak) with ``dot_kind`` ("bf16dp" / "fma32") and ``dot_method``, ``fma32_TFLOPs``, and ``read_bandwidth_GBps`` (a
    streaming read of ``n_bytes``) with ``read_bandwidth_method``; each probe runs ``n_threads`` threads for about
    ``seconds``. Raises ``RuntimeError`` when the extension is not built (the caller falls back to torch).
    """
    from reatt_kernels import _ext

    C = _ext.ext()
    if C is None or not hasattr(C, "cpu_peak_flops"):
        why = _ext._IMPORT_ERROR or "it has no cpu_peak_flops (an older build: rebuild the extension)"
        raise RuntimeError(f"reatt_kernels._C not available ({why})")
    fma = C.cpu_peak_flops("fma32", n_threads, seconds)
    out = {"fma32_TFLOPs": fma["GFLOPs"] / 1e3, "fma32_method": f"{fma['isa']}: {fma['method']}"}
    if C.cpu_has_avx512_bf16():
        dot = C.cpu_peak_flops("bf16dp", n_threads, seconds)
        out.update(dot_TFLOPs=dot["GFLOPs"] / 1e3, dot_kind="bf16dp",
                   dot_method=f"bf16dp ({dot['isa']}): {dot['method']}")
    else:
        out.update(dot_TFLOPs=out["fma32_TFLOPs"], dot_kind="fma32",
                   dot_method=f"fma32 (this CPU lacks avx512_bf16), {out['fma32_method']}")
    rd = C.cpu_read_bandwidth(n_bytes, n_threads, seconds)
    out.update(read_bandwidth_GBps=rd["GBps"], read_bandwidth_method=rd["method"])
    return out


def roofline(device: torch.device, quick: bool = False) -> dict:
    """Measure this machine's ceilings in this process.

    GPU: device-to-device copy of 1 GiB (bandwidth counts read + write bytes) and a bf16 8192^3 matmul (do_bench p50).
    CPU: the hardware probes of :func:`cpu_probes` (``torch.get_num_threads()`` threads; a 512 MiB read, 128 MiB when
    ``quick``): ``dot_TFLOPs``, the compute ceiling :func:`floor_ms` uses (bf16 ``vdpbf16ps`` peak where the CPU has
    AVX512_BF16, else the fp32 FMA peak), ``fma32_TFLOPs`` and ``read_bandwidth_GBps``. Also, as before, a streaming
    torch ``sum`` over 256 MiB of fp32 (bytes read) and an fp32 2048^3 matmul (FLOPs = 2 n^3), each the fastest of
    >= 5 calls, and a bf16 matmul for information. ``bandwidth_GBps`` is the higher of the torch sum and the C read
    probe. Without the compiled extension the probes' keys are None and the ceilings are torch's (the method strings
    say so).
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
    budget = 0.3 if quick else 1.0
    threads = torch.get_num_threads()
    try:
        # 0.1 s (0.5 s) per probe: 20 (100) rounds of at most 5 ms, or 30+ passes over the buffer; the best is kept.
        probes = cpu_probes(threads, (128 if quick else 512) * MIB, 0.1 if quick else 0.5)
        no_probe = None
    except Exception as exc:  # no extension (pure-Python install), or a probe failed: torch's ceilings, said so
        no_probe = short_reason(exc)
        probes = {"dot_TFLOPs": None, "dot_kind": None, "fma32_TFLOPs": None, "read_bandwidth_GBps": None,
                  "dot_method": f"n/a: {no_probe}; the compute ceiling is the torch fp32 matmul"}
    # On a CPU the ceiling is the fastest call (p0): other processes only ever slow a call down.
    n_el = (256 * MIB) // 4
    x = torch.rand(n_el, dtype=torch.float32)
    t_sum = time_fn(lambda: x.sum(), device, quantiles=(0.0,), min_reps=5, budget_s=budget)
    del x
    n = 1024 if quick else 2048
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    t_mm = time_fn(lambda: a @ b, device, quantiles=(0.0,), min_reps=5, budget_s=budget)
    # For information only: torch's bf16 matmul (the compute floor is the probe's dot_TFLOPs, or the fp32 matmul
    # without the extension).
    a16, b16 = a.bfloat16(), b.bfloat16()
    t_mm16 = time_fn(lambda: a16 @ b16, device, quantiles=(0.0,), min_reps=5, budget_s=budget)
    sum_gbps = 256 * MIB / (t_sum["p0"] * 1e-3) / 1e9
    sum_method = "streaming fp32 torch sum over 256 MiB, bytes read / fastest of >= 5 calls"
    c_gbps = probes["read_bandwidth_GBps"]
    if c_gbps is None:
        bw, bw_method = sum_gbps, f"{sum_method} (the C read probe is n/a: {no_probe})"
    elif c_gbps >= sum_gbps:
        bw, bw_method = c_gbps, f"max of the C read probe (this one) and the torch sum ({sum_gbps:.1f} GB/s): " \
                                f"{probes['read_bandwidth_method']}"
    else:
        bw, bw_method = sum_gbps, f"max of the torch sum (this one) and the C read probe ({c_gbps:.1f} GB/s): " \
                                  f"{sum_method}"
    return {
        "bandwidth_GBps": bw,
        "bandwidth_method": bw_method,
        "sum_bandwidth_GBps": sum_gbps,
        "matmul_TFLOPs": 2 * n**3 / (t_mm["p0"] * 1e-3) / 1e12,
        "matmul_method": f"fp32 {n}^3 matmul, 2 n^3 / fastest of >= 5 calls ({threads} threads)",
        "matmul_bf16_TFLOPs": 2 * n**3 / (t_mm16["p0"] * 1e-3) / 1e12,
        **probes,
    }


# Ceilings where a higher measurement is the better one (best_roofline keeps the maximum of each).
ROOF_KEYS = ("bandwidth_GBps", "read_bandwidth_GBps", "sum_bandwidth_GBps", "matmul_TFLOPs", "matmul_bf16_TFLOPs",
             "dot_TFLOPs", "fma32_TFLOPs")


def best_roofline(*roofs: dict) -> dict:
    """The highest of several roofline measurements (e.g. at the start and the end of a run on a shared machine)."""
    best = dict(roofs[0])
    for key in ROOF_KEYS:
        vals = [r[key] for r in roofs if r.get(key) is not None]
        if vals:
            best[key] = max(vals)
    best["measurements"] = [{k: r.get(k) for k in ("bandwidth_GBps", "matmul_TFLOPs", "dot_TFLOPs")} for r in roofs]
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


def compute_ceiling(roof: dict) -> tuple[float, str]:
    """(TFLOP/s, name) of the compute ceiling in ``roof``: the CPU probe's ``dot_TFLOPs`` when present ("bf16
    dot-product" or "fp32 FMA"), else ``matmul_TFLOPs`` ("matmul": the GPU, a CPU without the extension, or an old
    JSON)."""
    if roof.get("dot_TFLOPs"):
        return roof["dot_TFLOPs"], DOT_NAMES.get(roof.get("dot_kind"), "dot-product")
    return roof["matmul_TFLOPs"], "matmul"


def floor_ms(n_bytes: float, flops: float, roof: dict) -> tuple[float, str]:
    """Roofline time for moving ``n_bytes`` and doing ``flops`` on this machine, and which limit binds.

    Returns (floor in ms, bound): bound is ``"memory"`` or ``"compute (<ceiling>)"``, the ceiling named by
    :func:`compute_ceiling`, e.g. ``"compute (bf16 dot-product)"``."""
    t_mem = n_bytes / (roof["bandwidth_GBps"] * 1e9) * 1e3
    rate, name = compute_ceiling(roof)
    t_flop = flops / (rate * 1e12) * 1e3
    return (t_mem, "memory") if t_mem >= t_flop else (t_flop, f"compute ({name})")


def naive_maxsim(q: torch.Tensor, d_pad: torch.Tensor, d_mask: Optional[torch.Tensor] = None,
                 chunk_elems: Optional[int] = None) -> torch.Tensor:
    """The docs/baselines.md naive baseline: ``einsum``, mask, ``amax`` over document tokens, sum over query tokens.

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
