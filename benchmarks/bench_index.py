"""Token index benchmark (exact and residual-compressed): build time, bytes per token, recall@10/@100 against exact
search, per-query latency at batch 1 and 64 (p50/p99) with the per-stage breakdown, fast-plaid side by side when
installed. Writes benchmarks/results/<device>/bench_index.json and bench_index.png.

    python benchmarks/bench_index.py --quick          # small corpus, short timing
    python benchmarks/bench_index.py --index-docs 50000 --device cuda

The implementation lives in reatt_kernels/index/bench.py (``reatt-bench --index`` calls the same ``run``)."""
import sys

from reatt_kernels.index.bench import main

if __name__ == "__main__":
    sys.exit(main())
