r"""MaxSim benchmarks: every provider side by side in one process, on the docs/baselines.md shapes.

Math: ``score(a, b) = sum_i max_j q[a, i] . d[b, j]`` (plus the ReAtt position bias and the mean for training; see
:mod:`reatt_kernels.reference.maxsim`).

Providers: ``naive`` (``einsum`` + mask + ``amax`` + sum, chunked over documents: the docs/baselines.md baseline), our backends
``torch`` / ``cpu`` / ``triton`` (GPU only: the CPU interpreter is for tests) / ``cuda``, and the peers when installed:
``late-interaction-kernels`` (Triton, GPU), ``maxsim-cpu`` (Rust + libxsmm, CPU, optional: not a dependency) and
``fast-plaid`` (listed for completeness; it is an approximate index, measured by benchmarks/bench_index.py). A provider
that cannot run is a row with ``status = "n/a"`` and its reason. Benchmarks never assert.

Cases (GPU: fp16 search, bf16 training; CPU: fp32 search, bf16 training, scaled down):

=====================  ==========================================================================================
search_1q_100k         1 query x 32 tok vs 100k docs x 128 tok x d 128 (the late-interaction-kernels table)
search_1q_200k         1 query vs 200k docs (3.3e9 elements > 2^31: needs 64-bit offsets)
search_16q_100k/200k   16 queries (tensor cores)
search_1q_1M           1 query vs 1M docs (full mode only: 33 GB)
train_64x6400          fwd+bwd, 64 queries x 6400 in-batch docs, Lq 32, Ld 200 (ragged), d 64, mean, pos_bias
cpu_fixed_1q_20k       1 query vs 20k docs x 128 tok x 128, fp32, unit-norm (clustered corpus; the query is 32
                       noisy tokens of one document, as in reatt-bench)
cpu_fixed_16q_20k      16 queries (clustered_queries, seed 1) vs the same corpus (16x the FLOPs for the same bytes);
                       maxsim-cpu is a Python loop over the queries (it has no batch API)
cpu_ragged_1q_20k      same, 48-128 tokens per doc: ours and maxsim-cpu on the packed/variable layout, naive padded
cpu_train_8x800        the training shape scaled down to 8 queries x 800 docs (bf16), fwd+bwd
(--quick on CPU: 4k documents and cpu_train_4x200; on GPU: everything but the 1M case)
=====================  ==========================================================================================

Counts (explicit, per call):
- search bytes = |d| + |q| (itemsize) + 4 * Bq * Nd (fp32 scores); FLOPs = 2 * Bq * Lq * T * dim (T = real tokens).
- training FLOPs = 2 * Bq * Nd * Lq * Ld * dim (the forward dot products; the backward through the argmax is
  O(Bq * Nd * Lq * dim)); bytes = 3 * (|q| + |d|) + 2 * 4 * Bq * Nd * Lq (read q, d twice and write dq, dd; the int32
  argmax written by the forward and read by the backward).
- floor = max(bytes / bandwidth, FLOPs / compute ceiling) with both measured in the same run
  (reatt_kernels/bench/util.py ``roofline``; CPU: the bf16 dot-product peak, ``vdpbf16ps``, where the CPU has
  AVX512_BF16, else the fp32 FMA peak, and the higher of a C streaming-read probe and a torch sum; GPU: a bf16
  matmul and a device copy); each row names the limit that binds (``bound``: memory, or compute with its ceiling);
  % of roofline = floor / p50.
- batch throughput (a 16-query case next to its 1-query case, same provider, same run): per-query p50 at batch 1 /
  per-query p50 at batch 16 (``batch_throughput`` in the JSON, and ``batch_throughput_vs_1q`` on the 16-query rows).

Usage:
    python benchmarks/bench_maxsim.py [--quick] [--out DIR] [--cases a,b] [--providers x,y]
    python -m pytest benchmarks/bench_maxsim.py [--benchmark-only]        (REATT_BENCH_QUICK=1 for the quick shapes)
JSON (and a PNG) go to benchmarks/results/<device>/bench_maxsim.json.
"""
from __future__ import annotations

import functools
import gc
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from reatt_kernels.bench.harness import (  # noqa: E402
    case_main,
    pytest_device,
    pytest_quick,
    GIB,
    ROW_COLUMNS,
    add_speedups,
    apply_roofline,
    best_roofline,
    base_parser,
    device_name,
    env_info,
    format_table,
    measure,
    naive_maxsim,
    plot_rows,
    results_dir,
    roofline,
    run_pytest_benchmark,
    short_reason,
    sync,
    write_json,
)

import reatt_kernels as rk  # noqa: E402
from reatt_kernels.bench.datasets import clustered_corpus, clustered_queries, pad_packed  # noqa: E402

PROVIDERS = ["naive", "torch", "cpu", "triton", "cuda", "late-interaction-kernels", "maxsim-cpu", "fast-plaid"]
OUR_BACKENDS = ("torch", "cpu", "triton", "cuda")
INT32_MAX = 2**31 - 1

GPU_DOCS = {"100k": 100_000, "200k": 200_000, "1M": 1_000_000}
GPU_CASES = ["search_1q_100k", "search_1q_200k", "search_16q_100k", "search_16q_200k", "search_1q_1M", "train_64x6400"]
GPU_QUICK = ["search_1q_100k", "search_1q_200k", "search_16q_100k", "search_16q_200k", "train_64x6400"]


@dataclass
class Case:
    """Inputs of one benchmark case plus its counts; ``fns`` maps provider -> callable or the reason it is n/a."""

    name: str
    mode: str
    shape: dict
    dtype: torch.dtype
    n_bytes: float
    flops: float
    fns: dict = field(default_factory=dict)
    note: str = ""
    # Search cases: compare each provider's scores with naive's ([Bq, Nd]); training cases: False.
    compare: bool = False
    # provider -> how it runs here, when that differs from the others (copied into its row's note when it ran).
    provider_notes: dict = field(default_factory=dict)


def _score_diff(ref: torch.Tensor) -> Callable[[object], float]:
    """max |provider scores - naive scores| (any provider output: tensor [Bq, Nd], or maxsim-cpu's numpy [Nd])."""

    def check(out) -> float:
        out = torch.as_tensor(out).to(device=ref.device, dtype=torch.float32).reshape(ref.shape)
        return float((out - ref).abs().max())

    return check


# ---- peers ------------------------------------------------------------------------------------------------------------
def _import_peer(name: str):
    try:
        if name == "late-interaction-kernels":
            import late_interaction_kernels as mod
        elif name == "maxsim-cpu":
            import maxsim_cpu as mod
        elif name == "fast-plaid":
            import fast_plaid as mod
        else:
            raise ImportError(name)
        return mod, None
    except Exception as exc:
        return None, f"not installed ({short_reason(exc)})"


def _peer_version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def _fast_plaid_reason() -> str:
    mod, why = _import_peer("fast-plaid")
    if mod is None:
        return why
    return ("fast-plaid is an approximate PLAID index (centroid candidates + compressed residuals), not an exact "
            "MaxSim scorer: measured in benchmarks/bench_index.py")


def _our_status(backend: str, device: torch.device):
    """None when our backend may run here, else the reason."""
    if backend == "triton" and device.type == "cpu":
        return "on CPU triton is the interpreter (tests only), not a benchmark provider"
    status = rk.available_backends().get(backend)
    return None if status == "ok" else short_reason(status)


# ---- case builders ----------------------------------------------------------------------------------------------------
def _unit(x: torch.Tensor, chunk: int = 50_000) -> torch.Tensor:
    """Normalise token vectors in place, chunk by chunk (a 1M-doc fp16 corpus is 33 GB)."""
    for i in range(0, x.shape[0], chunk):
        x[i : i + chunk] = torch.nn.functional.normalize(x[i : i + chunk].float(), dim=-1).to(x.dtype)
    return x


def _search_counts(q: torch.Tensor, n_docs: int, tokens: int, itemsize: int):
    Bq, Lq, D = q.shape
    n_bytes = tokens * D * itemsize + q.numel() * itemsize + 4 * Bq * n_docs
    return float(n_bytes), 2.0 * Bq * Lq * tokens * D


def _gpu_search(name: str, device: torch.device, store: dict) -> Case:
    n_q = 16 if "_16q_" in name else 1
    n_docs = GPU_DOCS[name.rsplit("_", 1)[1]]
    Lq, Ld, D, dtype = 32, 128, 128, torch.float16
    if n_docs <= GPU_DOCS["200k"]:
        # One 200k corpus serves the 100k cases too (a leading slice is contiguous: no copy).
        if "d200k" not in store:
            store.clear()
            gc.collect()
            torch.cuda.empty_cache()
            store["d200k"] = _unit(torch.randn(GPU_DOCS["200k"], Ld, D, dtype=dtype, device=device))
        d = store["d200k"][:n_docs]
    else:
        store.clear()
        gc.collect()
        torch.cuda.empty_cache()
        store["d1M"] = _unit(torch.randn(n_docs, Ld, D, dtype=dtype, device=device))
        d = store["d1M"]
    g = torch.Generator(device=device).manual_seed(1)
    q = _unit(torch.randn(n_q, Lq, D, dtype=dtype, device=device, generator=g))
    n_bytes, flops = _search_counts(q, n_docs, n_docs * Ld, 2)
    case = Case(name, "fwd", dict(Bq=n_q, Lq=Lq, Nd=n_docs, Ld=Ld, dim=D), dtype, n_bytes, flops, compare=True)
    case.fns["naive"] = lambda: naive_maxsim(q, d)
    for b in OUR_BACKENDS:
        why = _our_status(b, device)
        case.fns[b] = why if why else functools.partial(rk.maxsim, q, d, backend=b)
    lik, why = _import_peer("late-interaction-kernels")
    if lik is None:
        case.fns["late-interaction-kernels"] = why
    elif d.numel() > INT32_MAX:
        case.fns["late-interaction-kernels"] = (
            f"skipped: {d.numel():.3g} document elements > 2^31, where 0.4.5 crashes with an illegal memory access "
            "(docs/baselines.md); a crash would poison the CUDA context for every later provider")
    else:
        case.fns["late-interaction-kernels"] = lambda: lik.maxsim(q, d)
    case.fns["maxsim-cpu"] = "CPU-only peer (see the cpu_* cases)"
    case.fns["fast-plaid"] = _fast_plaid_reason()
    return case


def _train(name: str, device: torch.device, Bq: int, Nd: int, note: str = "") -> Case:
    Lq, Ld, D, dtype = 32, 200, 64, torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(2)
    q = torch.nn.functional.normalize(torch.randn(Bq, Lq, D, generator=g), dim=-1).to(device, dtype)
    d = torch.nn.functional.normalize(torch.randn(Nd, Ld, D, generator=g), dim=-1).to(device, dtype)
    # Ragged like real passages and questions: 100-200 document tokens, 16-32 query tokens, right-padded (T5).
    d_len = torch.randint(Ld // 2, Ld + 1, (Nd,), generator=g)
    q_len = torch.randint(Lq // 2, Lq + 1, (Bq,), generator=g)
    d_mask = (torch.arange(Ld)[None, :] < d_len[:, None]).to(device)
    q_mask = (torch.arange(Lq)[None, :] < q_len[:, None]).to(device)
    R = Lq + Ld
    pos_bias = (0.1 * torch.randn(R, generator=g)).to(device)
    grad = torch.randn(Bq, Nd, generator=g).to(device)
    q.requires_grad_(True)
    d.requires_grad_(True)
    pos_bias.requires_grad_(True)
    itemsize = q.element_size()
    n_bytes = 3.0 * (q.numel() + d.numel()) * itemsize + 2 * 4 * Bq * Nd * Lq
    flops = 2.0 * Bq * Nd * Lq * Ld * D
    case = Case(name, "fwd+bwd", dict(Bq=Bq, Lq=Lq, Nd=Nd, Ld=Ld, dim=D, reduce="mean", pos_bias=R), dtype, n_bytes,
                flops, note=note)
    nq = q_mask.sum(1).clamp(min=1)
    # r = n_a + j - i, clamped: ReAtt's relative position (reatt_kernels.reference.maxsim).
    r_idx = (nq[:, None, None] + torch.arange(Ld, device=device)[None, None, :]
             - torch.arange(Lq, device=device)[None, :, None]).clamp(0, R - 1)  # [Bq, Lq, Ld]

    def naive():
        s = torch.einsum("aid,bjd->abij", q, d)  # [Bq, Nd, Lq, Ld] token-pair scores, materialised
        s.add_(pos_bias.to(dtype)[r_idx][:, None])
        s.masked_fill_(~d_mask[None, :, None, :], float("-inf"))
        m = s.amax(-1).masked_fill(~q_mask[:, None, :], 0.0)
        score = m.float().sum(-1) / nq[:, None]
        return torch.autograd.grad(score, (q, d, pos_bias), grad)

    case.fns["naive"] = naive
    for b in OUR_BACKENDS:
        why = _our_status(b, device)
        if why:
            case.fns[b] = why
            continue

        def ours(b=b):
            s = rk.maxsim(q, d, q_mask, d_mask, pos_bias=pos_bias, reduce="mean", backend=b)
            return torch.autograd.grad(s, (q, d, pos_bias), grad)

        case.fns[b] = ours
    lik, why = _import_peer("late-interaction-kernels")
    if lik is None or device.type != "cuda":
        case.fns["late-interaction-kernels"] = why or "GPU peer (its CPU path is a PyTorch reference)"
    else:

        def peer():
            # No position bias in its API; the mean is applied here (cheap), so the work matches otherwise.
            s = lik.maxsim(q, d, q_mask, d_mask) / nq[:, None]
            return torch.autograd.grad(s, (q, d), grad)

        case.fns["late-interaction-kernels"] = peer
        case.note = (case.note + "; " if case.note else "") + "late-interaction-kernels runs without pos_bias (no API)"
    case.fns["maxsim-cpu"] = "forward-only scorer of one query (no batch, no backward)"
    case.fns["fast-plaid"] = _fast_plaid_reason()
    return case


def _cpu_corpus(n_docs: int, ragged: bool, store: dict):
    """The clustered fp32 corpus (d_tokens [T, 128], d_offsets [n_docs + 1]), built once per process and shape: the
    1-query and 16-query fixed cases share it (20k documents take seconds to build); other corpora are dropped."""
    key = ("cpu_corpus", n_docs, ragged)
    if key not in store:
        store.clear()
        gc.collect()
        lo = 48 if ragged else 128
        store[key] = clustered_corpus(n_docs=n_docs, dim=128, min_len=lo, max_len=128, seed=0, dtype=torch.float32)
    return store[key]


def _cpu_search(name: str, device: torch.device, n_docs: int, ragged: bool, n_q: int = 1) -> Case:
    Lq, D, dtype = 32, 128, torch.float32
    lo = 48 if ragged else 128
    d_tokens, d_offsets = _cpu_corpus(n_docs, ragged, _STORE)
    # Queries drawn from the corpus (32 noisy tokens of one document each), not random noise: the C++ kernel screens
    # in bf16 and rescores near-maxima exactly, so its speed depends on how close the maxima stand to the bulk; a
    # random query would flatter it.
    q, _ = clustered_queries(d_tokens, d_offsets, n_q, q_len=Lq, seed=1)
    T = d_tokens.shape[0]
    n_bytes, flops = _search_counts(q, n_docs, T, 4)
    case = Case(name, "fwd", dict(Bq=n_q, Lq=Lq, Nd=n_docs, Ld=f"{lo}-128" if ragged else 128, dim=D, tokens=T),
                dtype, n_bytes, flops, compare=True)
    if ragged:
        d_pad, d_mask = pad_packed(d_tokens, d_offsets, max_len=128)
        case.fns["naive"] = lambda: naive_maxsim(q, d_pad, d_mask)
        for b in OUR_BACKENDS:
            why = _our_status(b, device)
            case.fns[b] = why if why else functools.partial(rk.maxsim_packed, q, d_tokens, d_offsets, backend=b)
    else:
        d = d_tokens.view(n_docs, 128, D)
        case.fns["naive"] = lambda: naive_maxsim(q, d)
        for b in OUR_BACKENDS:
            why = _our_status(b, device)
            case.fns[b] = why if why else functools.partial(rk.maxsim, q, d, backend=b)
    mc, why = _import_peer("maxsim-cpu")
    if n_q > 1:
        case.note = f"maxsim-cpu runs as a Python loop over the {n_q} queries (it has no batch API)"
        case.provider_notes["maxsim-cpu"] = f"Python loop over the {n_q} queries (no batch API)"
    if mc is None:
        case.fns["maxsim-cpu"] = why
    elif n_q > 1:
        # maxsim-cpu scores one query per call: a loop over the queries, stacked to [n_q, Nd] like the others' scores.
        import numpy as np

        assert not ragged, "the batched CPU case uses the fixed-length corpus"
        q_nps = [q[i].numpy() for i in range(n_q)]
        docs = d_tokens.view(n_docs, 128, D).numpy()
        case.fns["maxsim-cpu"] = lambda: np.stack([mc.maxsim_scores(qi, docs) for qi in q_nps])
    else:
        q_np = q[0].numpy()
        if ragged:
            off = d_offsets.tolist()
            docs = [d_tokens[off[i] : off[i + 1]].numpy() for i in range(n_docs)]  # views, no copy
            case.fns["maxsim-cpu"] = lambda: mc.maxsim_scores_variable(q_np, docs)
        else:
            docs = d_tokens.view(n_docs, 128, D).numpy()
            case.fns["maxsim-cpu"] = lambda: mc.maxsim_scores(q_np, docs)
    case.fns["late-interaction-kernels"] = "GPU peer (its CPU path is a PyTorch reference)"
    case.fns["fast-plaid"] = _fast_plaid_reason()
    return case


def _cpu_docs(quick: bool) -> int:
    return 4_000 if quick else 20_000


def case_names(device: torch.device, quick: bool) -> list[str]:
    """Case names carry their sizes, so the quick CPU shapes are named for what they are (e.g. ``_4k``)."""
    if device.type == "cuda":
        return list(GPU_QUICK if quick else GPU_CASES)
    k = f"{_cpu_docs(quick) // 1000}k"
    train = "cpu_train_4x200" if quick else "cpu_train_8x800"
    # The 16-query case right after the 1-query one: they share the corpus (built once) and are compared.
    return [f"cpu_fixed_1q_{k}", f"cpu_fixed_16q_{k}", f"cpu_ragged_1q_{k}", train]


_STORE: dict = {}


def build_case(name: str, device: torch.device, quick: bool) -> Case:
    """Inputs for one case (previous cases' tensors are dropped first, except the shared 200k GPU corpus and the
    CPU corpus of the fixed-length cases)."""
    if device.type == "cuda":
        if name.startswith("search_"):
            return _gpu_search(name, device, _STORE)
        _STORE.clear()
        gc.collect()
        torch.cuda.empty_cache()
        return _train(name, device, 64, 6400)
    n_docs = _cpu_docs(quick)
    if name.startswith("cpu_fixed_1q_"):
        return _cpu_search(name, device, n_docs, ragged=False)
    if name.startswith("cpu_fixed_16q_"):
        return _cpu_search(name, device, n_docs, ragged=False, n_q=16)
    if name.startswith("cpu_ragged_1q_"):
        return _cpu_search(name, device, n_docs, ragged=True)
    if name.startswith("cpu_train_"):
        _STORE.clear()
        Bq, Nd = (4, 200) if quick else (8, 800)
        return _train(name, device, Bq, Nd, note=f"scaled down from 64 x 6400 docs for the 2-core CPU: {Bq} x {Nd}")
    raise ValueError(f"unknown case {name!r}")


# ---- script -----------------------------------------------------------------------------------------------------------
def _roof_line(roof: dict) -> str:
    """One line naming the run's ceilings and how each was measured."""
    parts = [f"{roof['bandwidth_GBps']:.1f} GB/s ({roof['bandwidth_method']})"]
    if roof.get("dot_TFLOPs"):
        parts.append(f"{roof['dot_TFLOPs']:.3f} TFLOP/s compute ceiling ({roof['dot_method']})")
        if roof.get("dot_kind") != "fma32" and roof.get("fma32_TFLOPs"):
            parts.append(f"fp32 FMA {roof['fma32_TFLOPs']:.3f} TFLOP/s")
        parts.append(f"torch fp32 matmul {roof['matmul_TFLOPs']:.3f} TFLOP/s (information)")
    else:
        parts.append(f"{roof['matmul_TFLOPs']:.3f} TFLOP/s compute ceiling ({roof['matmul_method']})")
        if roof.get("dot_method"):
            parts.append(roof["dot_method"])
    return "; ".join(parts)


def _one_query_case(name: str) -> str:
    """The 1-query case a 16-query case is compared with: ``cpu_fixed_16q_20k`` -> ``cpu_fixed_1q_20k``."""
    return name.replace("_16q_", "_1q_")


def add_batch_throughput(rows: list[dict]) -> dict:
    """For each 16-query case whose 1-query case ran too: ``{case: {provider: ratio}}``, ratio = per-query p50 at
    batch 1 / per-query p50 at batch 16 (same provider, same run; > 1: batching pays). Also stored on the 16-query
    rows as ``batch_throughput_vs_1q``."""
    ok = {(r["case"], r["provider"]): r for r in rows if r.get("status") == "ok" and r.get("p50_ms")}
    out: dict = {}
    for r in rows:
        case = r.get("case", "")
        if "_16q_" not in case or r.get("status") != "ok" or not r.get("p50_ms"):
            continue
        one = ok.get((_one_query_case(case), r["provider"]))
        if one is None:
            continue
        ratio = (one["p50_ms"] / one["shape"]["Bq"]) / (r["p50_ms"] / r["shape"]["Bq"])
        r["batch_throughput_vs_1q"] = ratio
        out.setdefault(case, {})[r["provider"]] = ratio
    return out


def run(device: torch.device, quick: bool, cases=None, providers=None, out=None) -> dict:
    info = env_info(device)
    print(f"bench_maxsim on {info['device_name']}, torch {info['torch']}, triton {info['triton']}, "
          f"git {info['git_sha'][:12]}{' (quick)' if quick else ''}", flush=True)
    roof = roofline(device, quick=quick)
    print(f"roofline (measured now): {_roof_line(roof)}", flush=True)
    rows, case_meta = [], {}
    budget = 0.3 if quick else 1.0
    for name in cases or case_names(device, quick):
        try:
            case = build_case(name, device, quick)
        except Exception as exc:  # e.g. out of memory for the 1M case: record it, go on
            rows.append(dict(case=name, provider="all", status="n/a", note=f"case build failed: {short_reason(exc)}"))
            continue
        case_meta[name] = dict(mode=case.mode, shape=case.shape, dtype=str(case.dtype).replace("torch.", ""),
                               bytes=case.n_bytes, flops=case.flops, note=case.note)
        check = None
        if case.compare and not isinstance(case.fns.get("naive"), str):
            try:
                check = _score_diff(case.fns["naive"]().float())
            except Exception as exc:
                print(f"  {name}: naive reference failed ({short_reason(exc)}); no score check", flush=True)
        for prov in PROVIDERS:
            if providers and prov not in providers:
                continue
            fn = case.fns.get(prov, "not applicable to this case")
            reason = fn if isinstance(fn, str) else None
            row = measure(None if reason else fn, device, roof, n_bytes=case.n_bytes, flops=case.flops, reason=reason,
                          budget_s=budget, check=check, case=name, provider=prov, mode=case.mode,
                          dtype=str(case.dtype).replace("torch.", ""), shape=case.shape)
            if row["status"] == "ok" and prov in case.provider_notes:
                row["note"] = case.provider_notes[prov]
            rows.append(row)
            msg = (f"p50 {row['p50_ms']:.3f} ms, {row['pct_roofline']:.1f}% of roofline ({row['bound']})"
                   if row["status"] == "ok" else f"n/a: {row['note'][:100]}")
            print(f"  {name:<20} {prov:<25} {msg}", flush=True)
        del case, check
        if device.type == "cuda":
            torch.cuda.empty_cache()
    _STORE.clear()
    # A shared machine's ceilings drift during a run: take the best of the start and end measurements, so the
    # percentages are conservative (a value above 100 still means the machine was busier while the ceiling was timed).
    roof = best_roofline(roof, roofline(device, quick=quick))
    apply_roofline(rows, roof)
    add_speedups(rows)
    batch_tp = add_batch_throughput(rows)
    print()
    print(f"roofline (best of the start and end of the run): {_roof_line(roof)}")
    print(format_table(rows, ROW_COLUMNS))
    for case16, ratios in batch_tp.items():
        print(f"batch throughput, {case16} vs {_one_query_case(case16)} (per-query p50 at batch 1 / at batch 16, "
              "same provider, this run): " + (", ".join(f"{p} {r:.2f}x" for p, r in ratios.items()) or "n/a"))
    payload = {
        "bench": "bench_maxsim",
        "env": info,
        "quick": quick,
        "roofline": roof,
        "peers": {p: _peer_version(p) for p in ("late-interaction-kernels", "maxsim-cpu", "fast-plaid")},
        "formulas": {
            "search_bytes": "|d| + |q| (itemsize) + 4 * Bq * Nd",
            "search_flops": "2 * Bq * Lq * T * dim (T = real document tokens)",
            "train_flops": "2 * Bq * Nd * Lq * Ld * dim (forward dot products; backward via argmax is O(Bq Nd Lq dim))",
            "train_bytes": "3 * (|q| + |d|) * itemsize + 2 * 4 * Bq * Nd * Lq",
            "floor_ms": "max(bytes / bandwidth, flops / compute ceiling), both measured in this run (best of the "
                        "measurements at its start and end). CPU: compute ceiling = dot_TFLOPs (the bf16 "
                        "dot-product peak, vdpbf16ps, where the CPU has AVX512_BF16, else the fp32 FMA peak; "
                        "matmul_TFLOPs without the extension), bandwidth = max(C read probe, torch sum). GPU: bf16 "
                        "matmul (do_bench median) and a device copy",
            "bound": "memory, or compute (<ceiling>): the limit floor_ms comes from",
            "pct_roofline": "100 * floor_ms / p50_ms (% of the binding limit)",
            "batch_throughput": "{16-query case: {provider: per-query p50 of the 1-query case / per-query p50 of "
                                "the 16-query case}}, same provider and run",
            "speedup_vs_naive": "naive p50 / provider p50, same case",
            "max_abs_diff_vs_naive": "search cases: max |scores - naive scores| on the first call (not asserted; "
                                     "naive accumulates in the input dtype, so fp16 differences are expected)",
            "naive": "einsum + mask + amax + sum, chunked over documents "
                     "(CPU: 2000 docs per chunk for 1 x 32 x 128; GPU: 2^28 score elements per chunk); "
                     "training naive: one einsum (scores materialised) + bias + mask + amax + mean, autograd",
        },
        "cases": case_meta,
        "batch_throughput": batch_tp,
        "rows": rows,
    }
    out_dir = results_dir(device, out)
    path = write_json(out_dir / "bench_maxsim.json", payload)
    print(f"\nsaved {path}")
    png = plot_rows(rows, out_dir / "bench_maxsim.png", f"MaxSim, {info['device_name']} (p50; dashed: roofline)")
    if png:
        print(f"saved {png}")
    return payload


def main(argv=None) -> int:
    return case_main(
        "MaxSim benchmarks: naive PyTorch, our backends and peers side by side (docs/baselines.md shapes).", PROVIDERS, run, argv,
        case_names=case_names)


# ---- pytest-benchmark entry points (collected only when this file is named: testpaths = ["tests"]) --------------------
_pytest_device = pytest_device
_pytest_quick = pytest_quick


def _pytest_params():
    dev = _pytest_device()
    return [(c, p) for c in case_names(dev, _pytest_quick()) for p in PROVIDERS]


@functools.lru_cache(maxsize=1)
def _cached_case(name: str) -> Case:
    return build_case(name, _pytest_device(), _pytest_quick())


def _pytest_param_ids():
    return [f"{c}-{p}" for c, p in _pytest_params()]


try:
    import pytest

    @pytest.mark.parametrize("case_name,provider", _pytest_params(), ids=_pytest_param_ids())
    def test_bench_maxsim(benchmark, case_name, provider):
        case = _cached_case(case_name)
        fn = case.fns.get(provider, "not applicable to this case")
        if isinstance(fn, str):
            pytest.skip(f"{provider}: n/a ({fn})")
        device = _pytest_device()
        run_pytest_benchmark(benchmark, fn, device, rounds=20 if device.type == "cuda" else 5,
                             case=case_name, provider=provider, mode=case.mode, bytes=case.n_bytes, flops=case.flops,
                             device_name=device_name(device))
        median_s = benchmark.stats.stats.median
        benchmark.extra_info["GBps"] = case.n_bytes / median_s / 1e9
        benchmark.extra_info["TFLOPs"] = case.flops / median_s / 1e12
except ImportError:  # running as a plain script without pytest installed
    pass


if __name__ == "__main__":
    sys.exit(main())
