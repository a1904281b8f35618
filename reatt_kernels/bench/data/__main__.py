"""``python -m reatt_kernels.bench.data``: the same as ``reatt-data`` (:mod:`.cli`)."""
from .cli import main

raise SystemExit(main())
