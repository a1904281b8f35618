"""``python -m reatt_kernels.bench``: the same as ``reatt-bench`` (:mod:`reatt_kernels.bench.main`)."""
from .main import main

if __name__ == "__main__":
    raise SystemExit(main())
