"""Peak memory and time of ReAtt evaluation (FiD greedy reading) vs documents per question and batch size.

Each case runs in a fresh process (allocator state never carries over): build a ReAtt T5, draw one evaluation batch
of ``B`` questions x ``n`` documents of random token ids, then measure ONE ``generate_answers`` call (the reader over
all pairs, then greedy decoding of ``--new-tokens`` tokens): its peak resident memory above the process's resident
memory just before it (Linux: VmHWM after a reset through /proc/self/clear_refs; CUDA: max_memory_allocated) and its
time. Providers:

- ``kv-cache``: ``generate_answers`` as evaluation runs it (cross-attention K/V once, self-attention cached);
- ``no-cache``: ``use_cache=False``, the prefix recomputed every step (what evaluation did before).

Both read the pairs in chunks of queries of one length with one position bias [1, H, L, L] per chunk. The column
``per_pair_bias_mib`` is what the former per-pair bias [B*n, H, L, L] alone would have allocated for the same batch
(fp32), for comparison. The number to read: peak memory and time grow linearly in ``n`` and in ``B``.

Synthetic data: uniform random token ids (vocab 512); the LM head's EOS row is zeroed so every case decodes all
``--new-tokens`` steps.

    python benchmarks/bench_reatt_eval.py              # n = 4, 8, 16, 32 at B = 4; B = 1, 2, 4, 8 at n = 8
    python benchmarks/bench_reatt_eval.py --quick      # n = 4, 8 at B = 2; B = 1, 2 at n = 4
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


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return float("nan")


def one_case(provider: str, B: int, n: int, a) -> dict:
    """Runs in the child process."""
    from reatt.config import ReAttConfig
    from reatt.model import ReAttModel, tiny_t5_config

    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    H = 4
    cfg = tiny_t5_config(vocab_size=512, d_model=a.d_model, num_layers=4, num_decoder_layers=2, num_heads=H, d_kv=64,
                         d_ff=4 * a.d_model)
    model = ReAttModel.from_config(cfg, ReAttConfig(retrieval_layer=2, retrieval_head=1), seed=0).to(dev).eval()
    with torch.no_grad():
        model.t5.lm_head.weight[cfg.eos_token_id].zero_()
    g = torch.Generator().manual_seed(0)
    q_ids = torch.randint(3, 512, (B, a.lq), generator=g).to(dev)
    d_ids = torch.randint(3, 512, (B, n, a.ld), generator=g).to(dev)
    q_mask = torch.ones(B, a.lq, dtype=torch.bool, device=dev)
    d_mask = torch.ones(B, n, a.ld, dtype=torch.bool, device=dev)

    def run():
        return model.generate_answers(q_ids, q_mask, d_ids, d_mask, max_new_tokens=a.new_tokens,
                                      use_cache=provider == "kv-cache")

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size (Linux >= 4.0)
        base = _status_mib("VmRSS:")
    t0 = time.perf_counter()
    out = run()
    dt = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = _status_mib("VmHWM:") - base
    L = a.lq + a.ld
    return {"provider": provider, "B": B, "n_docs": n, "pairs": B * n, "peak_mib": round(peak, 1),
            "seconds": round(dt, 3), "new_tokens": int(out.shape[1]),
            "per_pair_bias_mib": round(B * n * H * L * L * 4 / 2**20, 1)}


def _plot(rows, path) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"note: matplotlib is not installed, so no plot was written to {path}")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    twins = {}
    for ax, sweep, x in ((axes[0], "n", "n_docs"), (axes[1], "B", "B")):
        for prov, style in (("kv-cache", "o-"), ("no-cache", "s--")):
            rs = sorted((r for r in rows if r.get("sweep") == sweep and r["provider"] == prov and "peak_mib" in r),
                        key=lambda r: r[x])
            if rs:
                ax.plot([r[x] for r in rs], [r["peak_mib"] for r in rs], style, label=f"{prov} peak MiB")
                tx = twins.setdefault(sweep, ax.twinx())
                tx.plot([r[x] for r in rs], [r["seconds"] for r in rs], style, color="gray", alpha=0.6)
                tx.set_ylabel("seconds (gray)")
        ax.set_xlabel(x)
        ax.set_ylabel("peak MiB above the batch's inputs")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle("ReAtt evaluation batch (reader + greedy decoding), CPU", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smaller sweep")
    ap.add_argument("--ns", default="4,8,16,32", help="documents per question (sweep at --batch)")
    ap.add_argument("--batch", type=int, default=4, help="questions per batch in the n sweep")
    ap.add_argument("--bs", default="1,2,4,8", help="questions per batch (sweep at --n-docs)")
    ap.add_argument("--n-docs", type=int, default=8, help="documents per question in the batch sweep")
    ap.add_argument("--lq", type=int, default=16, help="query tokens")
    ap.add_argument("--ld", type=int, default=64, help="document tokens")
    ap.add_argument("--d-model", type=int, default=128, help="T5 width")
    ap.add_argument("--new-tokens", type=int, default=8, help="greedy decoding steps")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each case")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="results root (JSON under <device>/)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        provider, B, n = a.child.split(":")
        print(json.dumps(one_case(provider, int(B), int(n), a)))
        return 0
    if a.quick:
        a.ns, a.batch, a.bs, a.n_docs = "4,8", 2, "1,2", 4
    cases = [("n", a.batch, int(n)) for n in a.ns.split(",")] + [("B", int(b), a.n_docs) for b in a.bs.split(",")]
    argv = [x for x in sys.argv[1:] if x != "--quick"]
    rows = []
    for sweep, B, n in cases:
        for provider in ("kv-cache", "no-cache"):
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(HERE),
                                                                              os.environ.get("PYTHONPATH")]))}
            r = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--child", f"{provider}:{B}:{n}"],
                               capture_output=True, text=True, env=env)
            if r.returncode != 0:
                row = {"provider": provider, "B": B, "n_docs": n, "status": "n/a", "reason": r.stderr.strip()[-300:]}
            else:
                row = json.loads(r.stdout.strip().splitlines()[-1])
            row["sweep"] = sweep
            rows.append(row)
            print(row, flush=True)
    shape = dict(lq=a.lq, ld=a.ld, d_model=a.d_model, heads=4, layers="4 enc (retrieval layer 2) + 2 dec",
                 new_tokens=a.new_tokens, threads=a.threads)
    out = os.path.join(a.out, a.device)
    os.makedirs(out, exist_ok=True)
    name = "bench_reatt_eval_quick" if a.quick else "bench_reatt_eval"
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump({"rows": rows, "shape": shape, "load_avg": os.getloadavg(), "torch": torch.__version__}, f, indent=1)
    _plot(rows, os.path.join(out, f"{name}.png"))
    print(f"\n{'sweep':>5} {'B':>3} {'n':>4} {'pairs':>6} {'kv-cache MiB':>13} {'s':>7} {'no-cache MiB':>13} {'s':>7} "
          f"{'former bias MiB':>16}")
    for sweep, B, n in cases:
        c = next(r for r in rows if (r["sweep"], r["B"], r["n_docs"], r["provider"]) == (sweep, B, n, "kv-cache"))
        u = next(r for r in rows if (r["sweep"], r["B"], r["n_docs"], r["provider"]) == (sweep, B, n, "no-cache"))
        print(f"{sweep:>5} {B:>3} {n:>4} {B * n:>6} {c.get('peak_mib', 'n/a'):>13} {c.get('seconds', 'n/a'):>7} "
              f"{u.get('peak_mib', 'n/a'):>13} {u.get('seconds', 'n/a'):>7} {c.get('per_pair_bias_mib', 'n/a'):>16}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
