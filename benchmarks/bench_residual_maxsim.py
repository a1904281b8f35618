r"""residual_maxsim benchmarks: fused decompress + MaxSim over candidate documents, every backend beside naive PyTorch.

Math (see :mod:`reatt_kernels.reference.residual_maxsim`): for query ``a`` and candidate document ``b``,
``score = sum_i max_t q[a, i] . (centroids[codes[t]] + weights[:, bucket(packed[t])])`` over b's tokens, straight
from the residual codes (the decompressed vectors never reach memory in the kernels).

Providers: ``naive`` (gather the candidates' tokens, decompress them to fp32 in memory, pad to the longest document,
``einsum`` + mask + ``amax`` + sum: what an index without the fused op does), and our backends ``torch``, ``cpu``,
``triton`` (GPU only; on CPU it is the test interpreter) and ``cuda``. Inputs are random codes over a random codec
(the op's cost does not depend on how well the codes fit a corpus), with documents of 48-128 tokens.

Cases
==================  =================================================================================================
gpu_1q_8192c        1 query (32 tokens) x 8192 candidates, d 128, 4-bit, 1024 centroids
gpu_64q_4096c       64 queries x 4096 candidates each
cpu_1q_4096c        1 query x 4096 candidates (the index's default ncandidates), d 128, 4-bit
cpu_16q_512c        16 queries x 512 candidates each
==================  =================================================================================================

Counts per (query, candidate token): bytes = 4 (code) + d * nbits / 8 (buckets) read; the centroid row and the weight
table stay in cache and are not counted. FLOPs = 2 * Lq * d per (query, candidate token).

Usage:
    python benchmarks/bench_residual_maxsim.py [--quick] [--out DIR] [--cases a,b] [--providers x,y]
JSON goes to benchmarks/results/<device>/bench_residual_maxsim.json.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

import reatt_kernels as rk
from reatt_kernels.bench.harness import (
    ROW_COLUMNS,
    add_speedups,
    case_main,
    env_info,
    format_table,
    measure,
    results_dir,
    roofline,
    short_reason,
    write_json,
)

PROVIDERS = ["naive", "torch", "cpu", "triton", "cuda"]
OUR_BACKENDS = ("torch", "cpu", "triton", "cuda")
GPU_CASES = ["gpu_1q_8192c", "gpu_64q_4096c"]
CPU_CASES = ["cpu_1q_4096c", "cpu_16q_512c"]
SHAPES = {  # name: (queries Bq, candidates per query Nc, documents in the store)
    "gpu_1q_8192c": (1, 8192, 50_000), "gpu_64q_4096c": (64, 4096, 50_000),
    "cpu_1q_4096c": (1, 4096, 20_000), "cpu_16q_512c": (16, 512, 20_000),
}
LQ, DIM, NBITS, N_CENTROIDS = 32, 128, 4, 1024


@dataclass
class Case:
    name: str
    shape: dict
    n_bytes: float
    flops: float
    fns: dict = field(default_factory=dict)
    note: str = ""


def _our_status(backend: str, device: torch.device):
    if backend == "triton" and device.type == "cpu":
        return "on CPU triton is the interpreter (tests only), not a benchmark provider"
    status = rk.available_backends().get(backend)
    return None if status == "ok" else short_reason(status)


def naive_residual_maxsim(q, q_mask, centroids, weights, codes, packed, d_offsets, cand, nbits):
    """Decompress every candidate's tokens to fp32 in memory, pad, then einsum + mask + amax + sum."""
    Bq, Nc = cand.shape
    D = q.shape[2]
    docs = cand.clamp(min=0).reshape(-1)
    lens = d_offsets[docs + 1] - d_offsets[docs]
    Lmax = int(lens.max()) if lens.numel() else 0
    j = torch.arange(Lmax, device=q.device)
    valid = j[None, :] < lens[:, None]                                       # [Bq * Nc, Lmax]
    rows = (d_offsets[docs][:, None] + j[None, :]).clamp(max=codes.numel() - 1)
    per = 8 // nbits
    shifts = torch.arange(per, device=q.device, dtype=torch.int32) * nbits
    b = ((packed[rows].to(torch.int32)[..., None] >> shifts) & ((1 << nbits) - 1)).reshape(*rows.shape, D).long()
    v = centroids[codes[rows].long()] + weights[torch.arange(D, device=q.device), b]   # [Bq * Nc, Lmax, D] fp32
    s = torch.einsum("aid,acjd->acij", q, v.reshape(Bq, Nc, Lmax, D))
    s = s.masked_fill(~valid.reshape(Bq, Nc, 1, Lmax), float("-inf")).amax(-1)
    out = (s * q_mask[:, None, :]).sum(-1)
    return out.masked_fill(cand < 0, float("-inf"))


def build_case(name: str, device: torch.device, quick: bool) -> Case:
    Bq, Nc, Nd = SHAPES[name]
    if quick:
        Bq, Nc, Nd = max(1, Bq // 4), max(64, Nc // 8), max(2000, Nd // 10)
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(48, 129, (Nd,), generator=g)
    off = torch.zeros(Nd + 1, dtype=torch.int64)
    off[1:] = lens.cumsum(0)
    T = int(off[-1])
    centroids = torch.nn.functional.normalize(torch.randn(N_CENTROIDS, DIM, generator=g), dim=-1)
    weights = torch.randn(DIM, 1 << NBITS, generator=g) * 0.05
    codes = torch.randint(0, N_CENTROIDS, (T,), generator=g, dtype=torch.int32)
    packed = torch.randint(0, 256, (T, DIM * NBITS // 8), generator=g, dtype=torch.uint8)
    q = torch.nn.functional.normalize(torch.randn(Bq, LQ, DIM, generator=g), dim=-1)
    q_mask = torch.ones(Bq, LQ, dtype=torch.bool)
    cand = torch.stack([torch.randperm(Nd, generator=g)[:Nc] for _ in range(Bq)])
    t = [x.to(device) for x in (q, q_mask, centroids, weights, codes, packed, off, cand)]
    q, q_mask, centroids, weights, codes, packed, off, cand = t
    cand_tokens = float((off[cand + 1] - off[cand]).sum())
    n_bytes = cand_tokens * (4 + DIM * NBITS / 8) + q.numel() * 4 + cand.numel() * 12
    flops = 2.0 * LQ * DIM * cand_tokens
    shape = dict(Bq=Bq, Lq=LQ, Nc=Nc, docs=Nd, Ld="48-128", dim=DIM, nbits=NBITS, centroids=N_CENTROIDS,
                 candidate_tokens=int(cand_tokens))
    case = Case(name, shape, n_bytes, flops, note="quick: scaled down" if quick else "")
    case.fns["naive"] = lambda: naive_residual_maxsim(q, q_mask, centroids, weights, codes, packed, off, cand, NBITS)
    for be in OUR_BACKENDS:
        why = _our_status(be, device)
        case.fns[be] = why or (lambda be=be: rk.residual_maxsim(q, centroids, weights, codes, packed, off, cand, NBITS,
                                                                 q_mask, backend=be))
    return case


def run(device: torch.device, quick: bool, cases=None, providers=None, out=None) -> dict:
    info = env_info(device)
    print(f"bench_residual_maxsim on {info['device_name']}, torch {info['torch']}, git {info['git_sha'][:12]}"
          f"{' (quick)' if quick else ''}", flush=True)
    roof = roofline(device, quick=quick)
    rows, meta = [], {}
    for name in cases or (GPU_CASES if device.type == "cuda" else CPU_CASES):
        case = build_case(name, device, quick)
        meta[name] = dict(mode="fwd", shape=case.shape, dtype="float32", bytes=case.n_bytes, flops=case.flops,
                          note=case.note)
        for prov in PROVIDERS:
            if providers and prov not in providers:
                continue
            fn = case.fns.get(prov)
            reason = fn if isinstance(fn, str) else None
            row = measure(None if reason else fn, device, roof, n_bytes=case.n_bytes, flops=case.flops, reason=reason,
                          budget_s=0.3 if quick else 1.0, min_reps=3, case=name, provider=prov, mode="fwd",
                          dtype="float32", shape=case.shape)
            rows.append(row)
            msg = f"p50 {row['p50_ms']:.3f} ms" if row["status"] == "ok" else f"n/a: {row['note'][:90]}"
            print(f"  {name:<16} {prov:<7} {msg}", flush=True)
    add_speedups(rows)
    print()
    print(format_table(rows, ROW_COLUMNS))
    payload = {
        "bench": "bench_residual_maxsim", "env": info, "quick": quick, "roofline": roof,
        "formulas": {"bytes": "candidate tokens x (4 + dim * nbits / 8) + |q| + |cand| + |scores|",
                     "flops": "2 * Lq * dim * candidate tokens",
                     "naive": "gather + decompress to fp32 + pad + einsum + mask + amax + sum"},
        "data": {"kind": "synthetic", "what": "random codes, documents of 48-128 tokens"},
        "cases": meta, "rows": rows,
    }
    path = write_json(results_dir(device, out) / "bench_residual_maxsim.json", payload)
    print(f"\nsaved {path}")
    return payload


def main(argv=None) -> int:
    return case_main("residual_maxsim benchmarks: naive PyTorch vs our backends.", PROVIDERS, run, argv,
                     case_names=lambda device, quick: GPU_CASES if device.type == "cuda" else CPU_CASES)


if __name__ == "__main__":
    sys.exit(main())
