"""Peak memory of one training step vs the number of in-batch-negative micro-batches K (``reatt-train --ibn-accum K``).

Each case runs in a fresh process (so allocator state never carries over): build a ReAtt T5, collate K micro-batches
of ``--micro`` questions x ``--n-docs`` documents from random token ids, then measure ONE optimizer step's peak
resident memory above the process's resident memory just before it (Linux: VmHWM after resetting it through
/proc/self/clear_refs; on CUDA: torch.cuda.max_memory_allocated). Providers:

- ``gradcache``: ``ibn_accum_step`` over K micro-batches (one student softmax over all K * micro queries);
- ``big-batch``: the same K * micro questions as ONE forward/backward (what GradCache replaces).

Synthetic data: uniform random token ids (vocab 512); the step's memory does not depend on the values. The number to
read is how each provider's peak grows with K: GradCache should stay near one micro-batch's activations plus the
q/k cache ((Lq + n * Ld) * d floats per query), the big batch grows linearly.

    python benchmarks/bench_ibn_accum.py                 # K = 1, 2, 4, 8 on CPU
    python benchmarks/bench_ibn_accum.py --quick         # K = 1, 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size (Linux >= 4.0)


def one_case(provider: str, K: int, a) -> dict:
    """Runs in the child process."""
    from reatt.config import ReAttConfig
    from reatt.gradcache import ibn_accum_step
    from reatt.model import ReAttModel, tiny_t5_config

    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    cfg = tiny_t5_config(vocab_size=512, d_model=a.d_model, num_layers=4, num_decoder_layers=2, num_heads=4, d_kv=64,
                         d_ff=4 * a.d_model, dropout_rate=0.1)
    model = ReAttModel.from_config(cfg, ReAttConfig(retrieval_layer=2, retrieval_head=1), seed=0).to(dev).train()
    g = torch.Generator().manual_seed(0)

    def batch(B):
        q_ids = torch.randint(3, 512, (B, a.lq), generator=g)
        d_ids = torch.randint(3, 512, (B, a.n_docs, a.ld), generator=g)
        labels = torch.randint(3, 512, (B, 4), generator=g)
        return {"q_ids": q_ids.to(dev), "q_mask": torch.ones(B, a.lq, dtype=torch.bool, device=dev),
                "d_ids": d_ids.to(dev), "d_mask": torch.ones(B, a.n_docs, a.ld, dtype=torch.bool, device=dev),
                "labels": labels.to(dev)}

    if provider == "gradcache":
        mbs = [batch(a.micro) for _ in range(K)]
        run = lambda: ibn_accum_step(model, mbs)  # noqa: E731
    else:
        big = batch(a.micro * K)
        run = lambda: model(**big)["loss"].backward()  # noqa: E731
    # Parameters' .grad exist before the measured step (a training step after the first holds them too).
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_hwm()
        base = _rss_mib()
    t0 = time.perf_counter()
    run()
    dt = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = _hwm_mib() - base
    cache_mib = K * a.micro * (a.lq + a.n_docs * a.ld) * 64 * 4 / 2**20
    return {"provider": provider, "K": K, "queries": K * a.micro, "peak_mib": round(peak, 1),
            "qk_cache_mib": round(cache_mib, 2) if provider == "gradcache" else 0.0, "step_s": round(dt, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="K = 1, 2 only")
    ap.add_argument("--ks", default="1,2,4,8", help="values of K")
    ap.add_argument("--micro", type=int, default=2, help="questions per micro-batch")
    ap.add_argument("--n-docs", type=int, default=8, help="documents per question")
    ap.add_argument("--lq", type=int, default=16, help="query tokens")
    ap.add_argument("--ld", type=int, default=96, help="document tokens")
    ap.add_argument("--d-model", type=int, default=256, help="T5 width")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each case")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="results root (JSON under <device>/)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        provider, K = a.child.split(":")
        print(json.dumps(one_case(provider, int(K), a)))
        return
    ks = [1, 2] if a.quick else [int(k) for k in a.ks.split(",")]
    rows = []
    argv = [x for x in sys.argv[1:] if x != "--quick"]
    for K in ks:
        for provider in ("gradcache", "big-batch"):
            r = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--child", f"{provider}:{K}"],
                               capture_output=True, text=True)
            if r.returncode != 0:
                rows.append({"provider": provider, "K": K, "status": "n/a", "reason": r.stderr.strip()[-300:]})
            else:
                rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    shape = dict(micro=a.micro, n_docs=a.n_docs, lq=a.lq, ld=a.ld, d_model=a.d_model, layers="4 enc + 2 dec")
    out = os.path.join(a.out, a.device)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bench_ibn_accum.json"), "w") as f:
        json.dump({"rows": rows, "shape": shape, "load_avg": os.getloadavg(), "torch": torch.__version__}, f, indent=1)
    print(f"\n{'K':>3} {'queries':>8} {'gradcache MiB':>14} {'big-batch MiB':>14} {'q/k cache MiB':>14}")
    for K in ks:
        g = next(r for r in rows if r["K"] == K and r["provider"] == "gradcache")
        b = next(r for r in rows if r["K"] == K and r["provider"] == "big-batch")
        print(f"{K:>3} {K * a.micro:>8} {g.get('peak_mib', 'n/a'):>14} {b.get('peak_mib', 'n/a'):>14} "
              f"{g.get('qk_cache_mib', 'n/a'):>14}")


if __name__ == "__main__":
    main()
