"""Token index benchmark: exact search, the residual index and fast-plaid (in its own venv, benchmarks/peers/) on the
same corpus and queries, scored with the same metrics (recall@10, eps-recall@10, gold@10 beside exact's), per-query
latency, bytes per token, build time and peak RSS, the per-stage profile of the residual pipeline, and a
recall-vs-latency plot. Writes benchmarks/results/<device>/bench_index[_quick].{json,md,png}.

    python benchmarks/bench_index.py --quick                 # every section at 2,000 documents
    python benchmarks/bench_index.py                         # 100k headline, 20k vs fast-plaid, 20k noise sweep
    python benchmarks/bench_index.py --sections peer --cache ~/.cache/reatt/bench-index   # reuse built indexes
    python benchmarks/bench_index.py --device cuda --docs 200000                          # the GPU configuration

The implementation lives in reatt_kernels/bench/index.py (``reatt-bench --index`` calls the same ``run``)."""
import sys

from reatt_kernels.bench.index import main

if __name__ == "__main__":
    sys.exit(main())
