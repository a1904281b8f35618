"""Token-vector indexes for late-interaction (MaxSim) retrieval: exact fp16 and residual-compressed (PLAID-style).

- :class:`TokenIndex`: build / search / add / delete / compact / save / load.
- :class:`ShardedIndex`: one shard per torch.distributed rank, results merged by score.
- :func:`residual_maxsim`: re-exported from :mod:`reatt_kernels.ops.residual_maxsim` (the op's home; also
  ``reatt_kernels.residual_maxsim``), the fused decompress + MaxSim the residual index searches with.

faiss is imported only when an index trains centroids or builds a flat token index.
"""
from .codec import ResidualCodec, default_n_centroids
from .io import IndexCorruptedError
from ..ops.residual_maxsim import residual_maxsim
from .sharded import ShardedIndex
from .token_index import DEFAULTS, TokenIndex

__all__ = ["TokenIndex", "ShardedIndex", "ResidualCodec", "IndexCorruptedError", "residual_maxsim",
           "default_n_centroids", "DEFAULTS"]
