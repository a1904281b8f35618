"""ReAtt training-step benchmark: fused ops vs the torch reference ops, step time and peak memory.

    python benchmarks/bench_train.py --quick          # CPU: a small config; GPU: a T5-large-shaped config (random)

Providers: "reference" (backend="torch": plain-torch MaxSim/teacher/KL) and "fused" (backend="auto": the C++ CPU or
CUDA/Triton kernels). Modes: "step" = forward + backward + AdamW step of the whole model (bf16 autocast on GPU), and
"loss" = the retrieval loss alone (retrieval_distill_loss fwd + bwd at the step's shapes, in-batch negatives).
Writes benchmarks/results/<device>/bench_train.json (device, versions, git sha). Never asserts.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time

import torch

import reatt_kernels as rk  # noqa: E402
from reatt.config import ReAttConfig  # noqa: E402
from reatt.model import ReAttModel, tiny_t5_config  # noqa: E402

CONFIGS = {
    # name: (T5 shape, ReAtt B/head, batch: questions B, docs n, Lq, Ld, answer tokens T)
    "cpu-small": (dict(d_model=128, num_layers=4, num_decoder_layers=2, num_heads=4, d_kv=64, d_ff=256,
                       vocab_size=512), dict(retrieval_layer=2, retrieval_head=0), dict(B=8, n=4, Lq=16, Ld=32, T=4)),
    "gpu-t5-large": (dict(d_model=1024, num_layers=24, num_decoder_layers=24, num_heads=16, d_kv=64, d_ff=2816,
                          vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
                     dict(retrieval_layer=12, retrieval_head=6), dict(B=4, n=16, Lq=32, Ld=192, T=16)),
}


def git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).strip()
    except Exception:
        return "unknown"


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())


def make_batch(shape: dict, vocab: int, dev, gen):
    B, n, Lq, Ld, T = shape["B"], shape["n"], shape["Lq"], shape["Ld"], shape["T"]
    q_ids = torch.randint(3, vocab, (B, Lq), generator=gen)
    d_ids = torch.randint(3, vocab, (B, n, Ld), generator=gen)
    # Ragged: real lengths between half and all of the padded length.
    q_mask = torch.arange(Lq)[None] < torch.randint(Lq // 2, Lq + 1, (B, 1), generator=gen)
    d_mask = torch.arange(Ld)[None, None] < torch.randint(Ld // 2, Ld + 1, (B, n, 1), generator=gen)
    labels = torch.randint(3, vocab, (B, T), generator=gen)
    labels[:, -1] = 1
    return {k: v.to(dev) for k, v in dict(q_ids=q_ids, q_mask=q_mask, d_ids=d_ids, d_mask=d_mask,
                                           labels=labels).items()}


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_fn(fn, dev, warmup: int, iters: int) -> dict:
    for _ in range(warmup):
        fn()
    _sync(dev)
    if dev.type == "cuda":
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=0, rep=max(1, iters) * 50)
        return {"p50_ms": p50, "p20_ms": p20, "p80_ms": p80}
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    ts.sort()
    q = lambda f: ts[min(len(ts) - 1, int(f * len(ts)))]  # noqa: E731
    return {"p50_ms": q(0.5), "p20_ms": q(0.2), "p80_ms": q(0.8)}


def peak_memory(fn, dev) -> float:
    """Peak extra memory of one call in MiB (CUDA allocator peak), or None on CPU."""
    if dev.type == "cuda":
        _sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        fn()
        _sync(dev)
        return (torch.cuda.max_memory_allocated(dev) - base) / 2**20
    # CPU: the process' max RSS only grows, so after warm-up it says nothing about one call: not reported.
    return None


def bench_config(name: str, dev, quick: bool) -> list:
    t5_shape, rc_kw, shape = CONFIGS[name]
    rows = []
    gen = torch.Generator().manual_seed(0)
    extra = {k: t5_shape[k] for k in ("feed_forward_proj", "tie_word_embeddings") if k in t5_shape}
    base = {k: v for k, v in t5_shape.items() if k not in extra}
    cfg = tiny_t5_config(**base, **extra)
    batch = make_batch(shape, cfg.vocab_size, dev, gen)
    bf16 = dev.type == "cuda"
    for provider, fused in (("reference", False), ("fused", True)):
        model = ReAttModel.from_config(cfg, ReAttConfig(use_fused_kernels=fused, **rc_kw), seed=0).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(**batch)
            out["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        iters = (3 if quick else 10) if dev.type == "cuda" else (5 if quick else 20)
        t = time_fn(step, dev, warmup=2, iters=iters)
        mem = peak_memory(step, dev)
        rows.append({"config": name, "provider": provider, "mode": "step", "shape": shape, **t, "peak_mib": mem,
                     "backend": model.config.kernel_backend})

        # The retrieval loss alone at this step's shapes (q: B queries, d: every in-batch document).
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(**batch)
        dt = torch.bfloat16 if bf16 else torch.float32
        q = out["q"].detach().to(dt).requires_grad_()
        d = out["d"].detach().to(dt).requires_grad_()
        qm, dm = batch["q_mask"], batch["d_mask"].flatten(0, 1)
        teacher = out["teacher"].detach()
        pb = model.retrieval_pos_bias(q.shape[1] + d.shape[1]).detach().requires_grad_()
        be = model.config.kernel_backend

        def loss_fb():
            rk.retrieval_distill_loss(q, d, teacher, q_mask=qm, d_mask=dm, pos_bias=pb, scale=1.0, reduce="mean",
                                      backend=be).backward()

        t = time_fn(loss_fb, dev, warmup=2, iters=iters * 2)
        rows.append({"config": name, "provider": provider, "mode": "loss", "shape": shape, **t,
                     "peak_mib": peak_memory(loss_fb, dev), "backend": be})
        for r in rows[-2:]:
            peak = "n/a" if r["peak_mib"] is None else f"+{r['peak_mib']:.0f} MiB"
            print(f"{name:13s} {provider:9s} {r['mode']:4s} p50 {r['p50_ms']:9.2f} ms  (p20 {r['p20_ms']:.2f}, "
                  f"p80 {r['p80_ms']:.2f})  peak {peak}  backend={r['backend']}", flush=True)
        del model, opt, out
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer iterations (fits a ~1 minute device budget)")
    ap.add_argument("--config", choices=sorted(CONFIGS), help="default: gpu-t5-large on GPU, cpu-small on CPU")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/<device>/bench_train.json)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = args.config or ("gpu-t5-large" if dev.type == "cuda" else "cpu-small")
    rows = bench_config(name, dev, args.quick)
    try:
        import triton

        triton_v = triton.__version__
    except Exception:
        triton_v = "n/a"
    import transformers

    res = {"bench": "train", "device": device_name(dev), "device_type": dev.type, "torch": torch.__version__,
           "triton": triton_v, "transformers": transformers.__version__, "git_sha": git_sha(),
           "threads": torch.get_num_threads(), "quick": args.quick, "backends": rk.available_backends(),
           "rows": rows}
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   "gpu" if dev.type == "cuda" else "cpu", "bench_train.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1, default=str)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
