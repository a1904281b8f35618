"""Measurement code: benchmarks of the public API, kept out of the library layers (nothing in the package imports it).

- :mod:`.util`: the measurement helpers every benchmark shares (timing, roofline, environment, JSON output).
- :mod:`.main`: ``reatt-bench``, the main job (exact MaxSim retrieval latency, every backend beside naive PyTorch).
- :mod:`.index`: the index benchmark (exact vs residual index vs the fast-plaid peer).
- :mod:`.datasets`: deterministic synthetic token corpora (the clustered corpus of docs/baselines.md).
- :mod:`.data`: real-text corpora (the installed docstrings by default; squad-dev, real-all from a local copy of the
  bigbench sdist; the user's BEIR or FiD/DPR JSONL), MiniLM token vectors, a checked cache (docs/data.md;
  ``reatt-data build docstrings``).
- :mod:`.ir_metrics`: nDCG@10, recall@100 and MRR@10 against relevance judgements (pytrec_eval).

The scripts in ``benchmarks/`` import from here. Run the main job with ``reatt-bench`` or
``python -m reatt_kernels.bench.main``.
"""
