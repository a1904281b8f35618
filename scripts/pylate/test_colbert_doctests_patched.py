"""PyLate's own doctests of ``colbert_scores``, ``colbert_scores_pairwise`` and ``colbert_kd_scores``, run on the
patched names (collected by scripts/pylate/run_pylate_tests.sh with the pylate_plugin).

pytest's ``--doctest-modules`` takes a module's doctests only from objects defined in that module. While patched,
``pylate.scores.colbert.colbert_scores`` is reatt-kernels' function, so pytest would silently drop these three doctests.
They are run here instead: PyLate's original docstrings, parsed and executed with the module's (patched) globals and
PyLate's doctest flags (NORMALIZE_WHITESPACE, NUMBER)."""
from __future__ import annotations

import doctest

import pytest

import pylate.scores.colbert as pylate_colbert
from reatt_kernels.compat.pylate import is_patched, patching


@pytest.mark.parametrize("name", patching.FUNCTIONS)
def test_pylate_doctest_on_our_function(name, request):
    assert is_patched(), "run with -p pylate_plugin (it applies patch())"
    ours = getattr(pylate_colbert, name)
    assert ours.__module__.startswith("reatt_kernels"), f"pylate.scores.colbert.{name} is not patched"
    original = patching.original(name)
    test = doctest.DocTestParser().get_doctest(original.__doc__, dict(vars(pylate_colbert)),
                                               f"pylate.scores.colbert.{name}", pylate_colbert.__file__, 0)
    assert test.examples, f"no doctest in PyLate's {name}"
    from _pytest.doctest import _get_checker, get_optionflags  # PyLate's flags, with pytest's NUMBER checker

    runner = doctest.DocTestRunner(checker=_get_checker(), optionflags=get_optionflags(request.config))
    runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of PyLate's {name} doctest failed"
