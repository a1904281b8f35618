"""reatt-kernels: Triton, CUDA and C++ kernels for Retrieval as Attention (ReAtt).

Public API (shapes in each docstring):
- :func:`maxsim`, :func:`maxsim_packed`, :func:`maxsim_grouped`: late-interaction scoring, fwd + bwd;
  :func:`prepare_corpus` stores a corpus once for repeated search (a :class:`PreparedCorpus`, which they accept).
- :func:`distill_kl`, :func:`reader_teacher`, :func:`retrieval_distill_loss`: retrieval distillation.
- :func:`residual_maxsim`: fused decompress + MaxSim over residual-compressed documents (the index's scorer).
- :func:`plaid_search`: a residual index's whole search (interaction, selection, decompressed rerank, top-k) in one
  call (the CPU index's search path).
- :func:`centroid_interaction`, :func:`centroid_score_table`: PLAID's approximate MaxSim from centroid ids (the index's
  candidate pruning) and the per-query centroid score table it reads.
- :func:`available_backends`: each backend's status ("ok" or the reasons it cannot run here); :func:`build_info`:
  how the compiled extension was built (empty without one).

Importing this package touches no CUDA and does not import triton.
"""
from . import _ext
from ._dispatch import BackendUnavailableError, available_backends
from ._ext import build_info
from .ops.maxsim import PreparedCorpus, maxsim, maxsim_grouped, maxsim_packed, prepare_corpus
from .ops.distill import distill_kl, reader_teacher, retrieval_distill_loss
from .ops.centroid_interaction import centroid_interaction, centroid_score_table
from .ops.residual_maxsim import residual_maxsim
from .ops.plaid_search import plaid_search

__version__ = "0.1.0"

# A missing compiled extension warns here (or raises under REATT_REQUIRE_EXT=1) instead of passing unnoticed.
_ext.check_loaded()


def __getattr__(name):
    # `reatt_kernels.index` (TokenIndex, ShardedIndex) loads on first use; faiss only when needed.
    if name == "index":
        import importlib

        return importlib.import_module(".index", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "maxsim",
    "maxsim_packed",
    "maxsim_grouped",
    "prepare_corpus",
    "PreparedCorpus",
    "reader_teacher",
    "distill_kl",
    "retrieval_distill_loss",
    "residual_maxsim",
    "centroid_interaction",
    "centroid_score_table",
    "plaid_search",
    "available_backends",
    "build_info",
    "BackendUnavailableError",
]
