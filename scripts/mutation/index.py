"""Mutants of the index (reatt_kernels/index/): the token index's own logic above the ops.

Loaded by the mutation gate (scripts/mutation/gate.py). Each entry is a small, realistic bug:
``dict(name=, path=, old=, new=, tests=[pytest args], build=None | "cpu" | "emu")``: ``old`` occurs exactly once in
``path`` and is replaced by ``new``; ``build="cpu"`` rebuilds reatt_kernels._C, ``"emu"`` the CUDA emulation module
reatt_kernels._C_emu; the ``tests`` must FAIL with the mutant (and pass without it). ``issue13=True`` marks the seven
bugs of issue 13 (always in the CI selection); ``ci=True`` keeps a mutant in the CI selection beside the first mutant
of each file.
"""

INDEX = "tests/index/test_index.py"

MUTANTS = [
    dict(name="token-index-deleted-not-masked", path="reatt_kernels/index/exact.py",
         old='s = s.masked_fill(ix.deleted[None, :], float("-inf"))', new="s = s",
         tests=[INDEX, "-k", "deleted_documents_never_returned_small"]),
]
