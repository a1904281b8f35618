"""PyLate on reatt-kernels: PyLate 1.6.0's scoring functions on our fused MaxSim, a one-line patch, and an index.

The three-line switch (docs/pylate.md)::

    from reatt_kernels.compat import pylate as reatt_pylate
    reatt_pylate.patch()            # PyLate's colbert_scores / _pairwise / _kd_scores, ColBERTScores -> ours
    ...                             # train and score with PyLate as before; reatt_pylate.unpatch() undoes it

- :func:`colbert_scores`, :func:`colbert_scores_pairwise`, :func:`colbert_kd_scores`, :class:`ColBERTScores`: PyLate's
  signatures, input types (list, numpy, tensor), float 0/1 masks and layouts; forward and backward on every backend;
  ``mask_semantics="pylate"`` (default: a masked token scores 0, PyLate's results to fp32 precision) or ``"skip"``.
- :func:`patch` / :func:`unpatch` / :func:`is_patched`: the monkey-patch (:mod:`.patching` says what it swaps).
- :class:`PyLateTokenIndex`: ``pylate.indexes.Base`` on :class:`reatt_kernels.index.TokenIndex` (string ids, removal,
  ``subset``), saved with the index.

Importing this module does not import PyLate (an optional dependency); :func:`patch` does.
"""
from .index import PyLateTokenIndex
from .patching import PINNED_VERSION, is_patched, patch, unpatch
from .scores import MASK_SEMANTICS, ColBERTScores, colbert_kd_scores, colbert_scores, colbert_scores_pairwise

__all__ = ["colbert_scores", "colbert_scores_pairwise", "colbert_kd_scores", "ColBERTScores", "patch", "unpatch",
           "is_patched", "PyLateTokenIndex", "MASK_SEMANTICS", "PINNED_VERSION"]
