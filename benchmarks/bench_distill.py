r"""Attention-distillation benchmarks: reader_teacher + distill_kl and retrieval_distill_loss, naive PyTorch side by side.

Math (see :mod:`reatt_kernels.reference.distill`): the teacher ``p_T[b, k]`` is the FiD reader's cross-attention
softmax averaged over (layer, head, step) and summed per document; the loss is ``KL(p_T || softmax(scale * MaxSim))``.

Providers: ``naive`` (docs/baselines.md: teacher aggregation in fp32 - ``attn.float()``, masked softmax over S, mean, scatter-add
per document - then ``kl_div`` on ``log_softmax``, autograd; for training: ``einsum`` MaxSim with the scores
materialised, position bias, mask, amax, mean, ``log_softmax``, ``kl_div``, autograd) and our backends ``torch``,
``cpu``, ``triton`` (GPU only: on CPU it is the test interpreter) and ``cuda``.

Cases
=====================  =============================================================================================
kl_b8_12x16x32_10x200  teacher + KL fwd+bwd: B 8, 12 layers x 16 heads x 32 steps, 10 docs x 200 tokens, bf16 (docs/baselines.md)
kl_b4_24x16x32_100x200 B 4, 24 layers x 16 heads x 32 steps, 100 docs x 200 tokens, bf16 (docs/baselines.md; 4.1 GiB naive)
reatt_teacher_b64      ReAtt's real teacher: last layer, step 0 ([B, H, S] slice), 16 heads, 100 docs x 250 tok, B 64
train_64x6400          retrieval_distill_loss fwd+bwd: 64 q x 6400 docs (100 each), Lq 32, Ld 200, d 64, bf16, mean,
                       pos_bias, learned scale
CPU (2 cores, scaled down where the full shape is too slow; each case says so in its note):
cpu_kl_b2_12x16x8_10x200   B 2, 12 layers x 16 heads x 8 steps, 10 docs x 200 tokens, bf16
cpu_reatt_teacher_b64      the real ReAtt teacher shape, unscaled
cpu_train_8x800            the training shape scaled to 8 queries x 800 docs (bf16), fwd+bwd
cpu_train_64x6400_ours     the full training shape, ours only, one call (time and peak RSS; naive would need ~10 GB)
=====================  =============================================================================================

Counts: teacher bytes = |attn| + |doc_index| + |mask| (+ 4 * B * n written); FLOPs ~ 0 (memory-bound; the one-hot
tl.dot is not counted). Training: FLOPs = 2 * B * Nd * Lq * Ld * dim, bytes = 3 * (|q| + |d|) + 2 * 4 * B * Nd * Lq.
Peak memory: GPU ``max_memory_allocated`` delta; CPU resident-set delta sampled every 0.5 ms (reatt_kernels/bench/harness.py).

Usage:
    python benchmarks/bench_distill.py [--quick] [--out DIR] [--cases a,b] [--providers x,y]
    python -m pytest benchmarks/bench_distill.py [--benchmark-only]       (REATT_BENCH_QUICK=1 for quick shapes)
JSON goes to benchmarks/results/<device>/bench_distill.json.
"""
from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from reatt_kernels.bench.harness import (  # noqa: E402
    case_main,
    pytest_device,
    pytest_quick,
    ROW_COLUMNS,
    add_speedups,
    base_parser,
    device_name,
    env_info,
    format_table,
    measure,
    results_dir,
    roofline,
    run_pytest_benchmark,
    short_reason,
    write_json,
)

import reatt_kernels as rk  # noqa: E402

PROVIDERS = ["naive", "torch", "cpu", "triton", "cuda"]
OUR_BACKENDS = ("torch", "cpu", "triton", "cuda")
GPU_CASES = ["kl_b8_12x16x32_10x200", "kl_b4_24x16x32_100x200", "reatt_teacher_b64", "train_64x6400"]
CPU_CASES = ["cpu_kl_b2_12x16x8_10x200", "cpu_reatt_teacher_b64", "cpu_train_8x800", "cpu_train_64x6400_ours"]
CPU_QUICK = ["cpu_kl_b2_12x16x8_10x200", "cpu_reatt_teacher_b64", "cpu_train_8x800"]


@dataclass
class Case:
    name: str
    mode: str
    shape: dict
    dtype: torch.dtype
    n_bytes: float
    flops: float
    fns: dict = field(default_factory=dict)
    note: str = ""


def _our_status(backend: str, device: torch.device):
    if backend == "triton" and device.type == "cpu":
        return "on CPU triton is the interpreter (tests only), not a benchmark provider"
    status = rk.available_backends().get(backend)
    return None if status == "ok" else short_reason(status)


# ---- naive baselines ---------------------------------------------------------------------------------------------------
def naive_teacher(attn, doc_index, attn_mask, n_docs):
    """docs/baselines.md naive: an fp32 copy of the whole [B, L, H, T, S] attention, masked softmax, mean, scatter per document."""
    valid = (doc_index >= 0) & attn_mask
    x = attn.float().masked_fill(~valid[:, None, None, None, :], float("-inf")).softmax(-1)
    w = x.mean((1, 2, 3))
    out = torch.zeros(attn.shape[0], n_docs, device=attn.device)
    return out.scatter_add_(1, doc_index.clamp(min=0).long(), w * valid)


def naive_train_loss(q, d, d_mask, q_mask, pos_bias, scale, teacher):
    """Naive training composition: all token-pair scores materialised, autograd through amax."""
    B, Lq, _ = q.shape
    Nd, Ld, _ = d.shape
    s = torch.einsum("aid,bjd->abij", q, d)  # [B, Nd, Lq, Ld] in the input dtype (5 GB bf16 at the full shape)
    nq = q_mask.sum(1)
    r = (nq[:, None, None] + torch.arange(Ld, device=q.device)[None, None, :]
         - torch.arange(Lq, device=q.device)[None, :, None]).clamp(0, pos_bias.numel() - 1)
    s = s + pos_bias[r][:, None].to(s.dtype)
    s = s.masked_fill(~d_mask[None, :, None, :], float("-inf"))
    scores = (s.amax(-1).float() * q_mask[:, None, :]).sum(-1) / nq.clamp(min=1)[:, None]
    n = teacher.shape[1]
    dense = torch.zeros(B, Nd, device=q.device).scatter_(
        1, torch.arange(B, device=q.device)[:, None] * n + torch.arange(n, device=q.device)[None, :], teacher)
    return F.kl_div(F.log_softmax(scale * scores, -1), dense, reduction="batchmean")


# ---- case builders -----------------------------------------------------------------------------------------------------
def _teacher_inputs(B, L, H, T, n, tok, device, dtype=torch.bfloat16):
    S = n * tok
    attn = torch.randn(B, L, H, T, S, device=device, dtype=dtype)
    doc = torch.arange(S, device=device).div(tok, rounding_mode="floor")[None].expand(B, S).contiguous()
    # the last 10% of every document's tokens are padding (as in FiD's per-passage padding)
    pad = (torch.arange(S, device=device) % tok) >= int(tok * 0.9)
    doc = doc.masked_fill(pad[None], -1)
    mask = torch.ones(B, S, dtype=torch.bool, device=device)
    return attn, doc, mask


def _kl_case(name, device, B, L, H, T, n, tok, note=""):
    attn, doc, mask = _teacher_inputs(B, L, H, T, n, tok, device)
    student0 = torch.randn(B, n, device=device)
    n_bytes = attn.numel() * attn.element_size() + doc.numel() * doc.element_size() + mask.numel() + 4 * B * n
    case = Case(name, "teacher+KL fwd+bwd", dict(B=B, L=L, H=H, T=T, n_docs=n, tokens_per_doc=tok), attn.dtype,
                n_bytes, 0.0, note=note)

    def naive():
        s = student0.detach().requires_grad_(True)
        t = naive_teacher(attn, doc, mask, n)
        loss = F.kl_div(F.log_softmax(s, -1), t, reduction="batchmean")
        loss.backward()
        return loss

    case.fns["naive"] = naive
    for be in OUR_BACKENDS:
        why = _our_status(be, device)
        if why:
            case.fns[be] = why
            continue

        def ours(be=be):
            s = student0.detach().requires_grad_(True)
            t = rk.reader_teacher(attn, doc, attn_mask=mask, n_docs=n, backend=be)
            loss = rk.distill_kl(s, t, backend=be)
            loss.backward()
            return loss

        case.fns[be] = ours
    return case


def _reatt_teacher_case(name, device, B=64, H=16, n=100, tok=250, note=""):
    attn5, doc, mask = _teacher_inputs(B, 1, H, 1, n, tok, device)
    attn = attn5[:, 0, :, 0]  # [B, H, S]: the last layer at decoder step 0, as the model hands it over
    n_bytes = attn.numel() * attn.element_size() + doc.numel() * doc.element_size() + mask.numel() + 4 * B * n
    case = Case(name, "teacher fwd", dict(B=B, H=H, n_docs=n, tokens_per_doc=tok, layers="last", steps="0"),
                attn.dtype, n_bytes, 0.0, note=note)
    case.fns["naive"] = lambda: naive_teacher(attn5, doc, mask, n)
    for be in OUR_BACKENDS:
        why = _our_status(be, device)
        case.fns[be] = why if why else (lambda be=be: rk.reader_teacher(attn, doc, attn_mask=mask, n_docs=n, backend=be))
    return case


def _train_case(name, device, B, Nd, Lq=32, Ld=200, D=64, naive=True, note=""):
    n = Nd // B
    g = torch.Generator(device="cpu").manual_seed(0)
    q = F.normalize(torch.randn(B, Lq, D, generator=g), dim=-1).to(device=device, dtype=torch.bfloat16)
    d = F.normalize(torch.randn(Nd, Ld, D, generator=g), dim=-1).to(device=device, dtype=torch.bfloat16)
    lens = torch.randint(Ld // 2, Ld + 1, (Nd,), generator=g)
    d_mask = (torch.arange(Ld)[None, :] < lens[:, None]).to(device)
    q_mask = torch.ones(B, Lq, dtype=torch.bool, device=device)
    q_mask[:, Lq - 4 :] = torch.rand(B, 4, generator=g).to(device) < 0.5
    pos_bias = (torch.randn(Lq + Ld, generator=g) * 0.1).to(device)
    teacher = torch.softmax(torch.randn(B, n, generator=g), -1).to(device)
    flops = 2.0 * B * Nd * Lq * Ld * D
    n_bytes = 3.0 * (q.numel() + d.numel()) * 2 + 2 * 4.0 * B * Nd * Lq
    case = Case(name, "fwd+bwd", dict(B=B, Nd=Nd, Lq=Lq, Ld=Ld, dim=D, reduce="mean", pos_bias=True, scale="learned"),
                torch.bfloat16, n_bytes, flops, note=note)

    def run(fn):
        ql, dl = q.detach().requires_grad_(True), d.detach().requires_grad_(True)
        pb = pos_bias.detach().requires_grad_(True)
        sc = torch.tensor(20.0, device=device, requires_grad=True)
        loss = fn(ql, dl, pb, sc)
        loss.backward()
        return loss

    if naive:
        case.fns["naive"] = lambda: run(lambda ql, dl, pb, sc: naive_train_loss(ql, dl, d_mask, q_mask, pb, sc, teacher))
    else:
        case.fns["naive"] = "skipped: the naive composition materialises B*Nd*Lq*Ld scores (~10 GB fp32 on CPU)"
    for be in OUR_BACKENDS:
        why = _our_status(be, device)
        if why:
            case.fns[be] = why
            continue
        case.fns[be] = lambda be=be: run(lambda ql, dl, pb, sc: rk.retrieval_distill_loss(
            ql, dl, teacher, q_mask=q_mask, d_mask=d_mask, pos_bias=pb, scale=sc, backend=be))
    return case


def case_names(device: torch.device, quick: bool) -> list[str]:
    if device.type == "cuda":
        return GPU_CASES
    return CPU_QUICK if quick else CPU_CASES


def build_case(name: str, device: torch.device, quick: bool) -> Case:
    if name == "kl_b8_12x16x32_10x200":
        return _kl_case(name, device, 8, 12, 16, 32, 10, 200)
    if name == "kl_b4_24x16x32_100x200":
        return _kl_case(name, device, 4, 24, 16, 32, 100, 200)
    if name == "reatt_teacher_b64":
        return _reatt_teacher_case(name, device)
    if name == "train_64x6400":
        return _train_case(name, device, 64, 6400)
    if name == "cpu_kl_b2_12x16x8_10x200":
        return _kl_case(name, device, 2, 12, 16, 8, 10, 200,
                        note="scaled down from B 8 x 32 steps (docs/baselines.md) for the 2-core CPU")
    if name == "cpu_reatt_teacher_b64":
        if quick:
            return _reatt_teacher_case(name, device, B=16, note="quick: B 16 instead of 64")
        return _reatt_teacher_case(name, device, note="the real shape, unscaled")
    if name == "cpu_train_8x800":
        B, Nd = (4, 200) if quick else (8, 800)
        return _train_case(name, device, B, Nd, note=f"scaled down from 64 x 6400 docs for the 2-core CPU: {B} x {Nd}")
    if name == "cpu_train_64x6400_ours":
        case = _train_case(name, device, 64, 6400, naive=False,
                           note="the full training shape on CPU, ours only (one call timed, peak RSS)")
        case.fns["torch"] = ("skipped: the chunked reference MaxSim takes ~3 min per call at this shape on 2 cores "
                             "(190 s and +1.2 GiB measured once, git 4672942)")
        return case
    raise ValueError(f"unknown case {name!r}")


# ---- script ------------------------------------------------------------------------------------------------------------
def run(device: torch.device, quick: bool, cases=None, providers=None, out=None) -> dict:
    info = env_info(device)
    print(f"bench_distill on {info['device_name']}, torch {info['torch']}, triton {info['triton']}, "
          f"git {info['git_sha'][:12]}{' (quick)' if quick else ''}", flush=True)
    roof = roofline(device, quick=quick)
    print(f"roofline (measured now): {roof['bandwidth_GBps']:.1f} GB/s; {roof['matmul_TFLOPs']:.3f} TFLOP/s", flush=True)
    rows, meta = [], {}
    for name in cases or case_names(device, quick):
        try:
            case = build_case(name, device, quick)
        except Exception as exc:
            rows.append(dict(case=name, provider="all", status="n/a", note=f"case build failed: {short_reason(exc)}"))
            continue
        meta[name] = dict(mode=case.mode, shape=case.shape, dtype=str(case.dtype).replace("torch.", ""),
                          bytes=case.n_bytes, flops=case.flops, note=case.note)
        single = name.endswith("_ours")  # the full CPU training shape: one timed call
        for prov in PROVIDERS:
            if providers and prov not in providers:
                continue
            fn = case.fns.get(prov, "not applicable to this case")
            reason = fn if isinstance(fn, str) else None
            row = measure(None if reason else fn, device, roof, n_bytes=case.n_bytes, flops=case.flops, reason=reason,
                          budget_s=0.0 if single else (0.3 if quick else 1.0), min_reps=1 if single else 3,
                          case=name, provider=prov, mode=case.mode, dtype=str(case.dtype).replace("torch.", ""),
                          shape=case.shape)
            rows.append(row)
            msg = (f"p50 {row['p50_ms']:.3f} ms, peak +{(row.get('peak_mem_MiB') or 0):.1f} MiB"
                   if row["status"] == "ok" else f"n/a: {row['note'][:90]}")
            print(f"  {name:<26} {prov:<7} {msg}", flush=True)
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()
    add_speedups(rows)
    print()
    print(format_table(rows, ROW_COLUMNS))
    payload = {
        "bench": "bench_distill",
        "env": info,
        "quick": quick,
        "roofline": roof,
        "formulas": {
            "teacher_bytes": "|attn| + |doc_index| + |mask| + 4 * B * n",
            "train_flops": "2 * B * Nd * Lq * Ld * dim",
            "train_bytes": "3 * (|q| + |d|) * 2 + 2 * 4 * B * Nd * Lq",
            "peak_mem": "GPU: max_memory_allocated delta; CPU: RSS delta sampled every 0.5 ms after malloc_trim",
            "naive": "teacher: attn.float() + masked softmax + mean + scatter_add, kl_div(log_softmax); training: "
                     "einsum scores materialised + bias + mask + amax + mean + log_softmax + kl_div, autograd",
        },
        "cases": meta,
        "rows": rows,
    }
    path = write_json(results_dir(device, out) / "bench_distill.json", payload)
    print(f"\nsaved {path}")
    return payload


def main(argv=None) -> int:
    return case_main(
        "Attention-distillation benchmarks: naive PyTorch vs our backends (docs/baselines.md shapes).", PROVIDERS, run, argv,
        case_names=case_names)


# ---- pytest-benchmark entry points (collected only when this file is named) ---------------------------------------------
_pytest_device = pytest_device
_pytest_quick = pytest_quick


def _pytest_params():
    dev = _pytest_device()
    names = [c for c in case_names(dev, _pytest_quick()) if not c.endswith("_ours")]
    return [(c, p) for c in names for p in PROVIDERS]


@functools.lru_cache(maxsize=1)
def _cached_case(name: str) -> Case:
    return build_case(name, _pytest_device(), _pytest_quick())


try:
    import pytest

    @pytest.mark.parametrize("case_name,provider", _pytest_params(), ids=[f"{c}-{p}" for c, p in _pytest_params()])
    def test_bench_distill(benchmark, case_name, provider):
        case = _cached_case(case_name)
        fn = case.fns.get(provider, "not applicable to this case")
        if isinstance(fn, str):
            pytest.skip(f"{provider}: n/a ({fn})")
        device = _pytest_device()
        run_pytest_benchmark(benchmark, fn, device, rounds=20 if device.type == "cuda" else 3, case=case_name,
                             provider=provider, mode=case.mode, bytes=case.n_bytes, device_name=device_name(device))
        benchmark.extra_info["GBps"] = case.n_bytes / benchmark.stats.stats.median / 1e9
except ImportError:  # running as a plain script without pytest installed
    pass


if __name__ == "__main__":
    sys.exit(main())
