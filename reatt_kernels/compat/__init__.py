"""Drop-in integrations with other libraries' APIs, on reatt-kernels' ops and index.

- :mod:`reatt_kernels.compat.pylate`: PyLate's scoring functions (``colbert_scores``, ``colbert_scores_pairwise``,
  ``colbert_kd_scores``, ``ColBERTScores``) with PyLate 1.6.0's signatures, ``patch()`` / ``unpatch()`` to swap them
  into PyLate, and :class:`~reatt_kernels.compat.pylate.PyLateTokenIndex`, a ``pylate.indexes.Base`` index on
  :class:`~reatt_kernels.index.TokenIndex`. See docs/pylate.md.

Nothing here imports the other library at import time: each is optional.
"""
