"""Token-vector indexes for late-interaction (MaxSim) retrieval: exact fp16 and residual-compressed (PLAID-style).

- :class:`TokenIndex`: build / search / add / delete / compact / save / load.
- :class:`ShardedIndex`: one shard per torch.distributed rank, results merged by score; :class:`PartIndex`:
  several parts in one process searched as one; :func:`merge_topk`: the merge both use.
- :func:`residual_maxsim`: re-exported from :mod:`reatt_kernels.ops.residual_maxsim` (the op's home; also
  ``reatt_kernels.residual_maxsim``), the fused decompress + MaxSim the residual index searches with.

faiss is imported only when an index trains centroids or builds a flat token index.
"""
from .codec import ResidualCodec, default_n_centroids
from .io import IndexCorruptedError
from ..ops.residual_maxsim import residual_maxsim
from .sharded import PartIndex, ShardedIndex
from .token_index import DEFAULTS, TokenIndex, merge_topk

__all__ = ["TokenIndex", "ShardedIndex", "PartIndex", "merge_topk", "ResidualCodec", "IndexCorruptedError",
           "residual_maxsim", "default_n_centroids", "DEFAULTS"]
