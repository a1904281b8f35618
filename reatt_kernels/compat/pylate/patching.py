"""``patch()`` / ``unpatch()``: swap PyLate's ColBERT scoring for reatt-kernels' (a documented monkey-patch).

PyLate's backend list is closed (``PYLATE_SCORES_BACKEND`` accepts only its own names), so, in the spirit of Liger's
``apply_liger_kernel_to_*``, :func:`patch` rebinds PyLate's names to ours, and :func:`unpatch` binds them back. Tested
against PyLate 1.6.0 (``PINNED_VERSION``); another version warns.

What is swapped, in every ``pylate.*`` module loaded at the time of the call:
- the module attributes ``colbert_scores``, ``colbert_scores_pairwise`` and ``colbert_kd_scores`` that hold PyLate's
  functions (``pylate.scores``, ``pylate.scores.colbert``, and the modules that imported them by name:
  ``pylate.rank.rank``, ``pylate.scores.similarity_functions``, ``pylate.losses.distillation``,
  ``pylate.evaluation.colbert_distillation``, ``pylate.evaluation.colbert_triplet``). A ``pylate`` module imported
  later binds ours, since it imports them from ``pylate.scores``;
- default argument values that hold them (``pylate.losses.Distillation(score_metric=colbert_kd_scores)``);
- ``pylate.scores.ColBERTScores.__call__`` (the ``Contrastive`` and ``CachedContrastive`` losses' default scorer, so
  existing instances switch too): one MaxSim call over all D * N documents.

Objects built *before* ``patch()`` that stored a function (a ``Distillation`` loss's ``score_metric``, a model's
similarity function) keep PyLate's unless passed to ``patch(*objects)``; :func:`unpatch` restores those too.
"""
from __future__ import annotations

import importlib
import sys
import types
import warnings
from typing import Any, Callable

from . import scores as _ours

PINNED_VERSION = "1.6.0"
FUNCTIONS = ("colbert_scores", "colbert_scores_pairwise", "colbert_kd_scores")
# Attributes of user objects (models, losses) that may hold a scoring function.
OBJECT_ATTRIBUTES = ("score_metric", "_similarity", "_similarity_pairwise", "similarity_fn")

_state: dict[str, Any] = {"active": False, "originals": {}, "ours": {}, "call": None, "objects": []}


def _with_semantics(fn: Callable, mask_semantics: str) -> Callable:
    """``fn`` with another default ``mask_semantics`` (same signature otherwise)."""
    if mask_semantics == "pylate":
        return fn
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        kwargs.setdefault("mask_semantics", mask_semantics)
        return fn(*args, **kwargs)

    return wrapper


def _pylate_modules() -> list[types.ModuleType]:
    return [m for name, m in list(sys.modules.items())
            if (name == "pylate" or name.startswith("pylate.")) and isinstance(m, types.ModuleType)]


def _functions_of(module: types.ModuleType):
    """Functions defined in ``module``, and those of its classes (plain, static and class methods)."""
    for value in list(vars(module).values()):
        if isinstance(value, types.FunctionType) and value.__module__ == module.__name__:
            yield value
        elif isinstance(value, type) and value.__module__ == module.__name__:
            for attr in vars(value).values():
                fn = attr.__func__ if isinstance(attr, (staticmethod, classmethod)) else attr
                if isinstance(fn, types.FunctionType):
                    yield fn


def _swap(mapping: dict[int, Callable]) -> int:
    """Replace every reference (by identity) to a key's function with its value, in loaded pylate modules' attributes
    and in default argument values. Returns how many references were swapped."""
    n = 0
    for module in _pylate_modules():
        for attr, value in list(vars(module).items()):
            if callable(value) and id(value) in mapping:
                setattr(module, attr, mapping[id(value)])
                n += 1
        for fn in _functions_of(module):
            if fn.__defaults__ and any(id(v) in mapping for v in fn.__defaults__):
                fn.__defaults__ = tuple(mapping.get(id(v), v) for v in fn.__defaults__)
                n += 1
            if fn.__kwdefaults__ and any(id(v) in mapping for v in fn.__kwdefaults__.values()):
                fn.__kwdefaults__ = {k: mapping.get(id(v), v) for k, v in fn.__kwdefaults__.items()}
                n += 1
    return n


def _swap_objects(objects, mapping: dict[int, Callable]) -> None:
    for obj in objects:
        for attr in OBJECT_ATTRIBUTES:
            value = getattr(obj, attr, None)
            if value is not None and id(value) in mapping:
                setattr(obj, attr, mapping[id(value)])


def _import_pylate():
    try:
        scores_mod = importlib.import_module("pylate.scores.colbert")
        pylate = importlib.import_module("pylate")
    except ImportError as exc:
        raise ImportError("reatt_kernels.compat.pylate.patch() needs PyLate (pip install pylate==1.6.0; "
                          "docs/pylate.md)") from exc
    version = getattr(pylate, "__version__", "?")
    if version != PINNED_VERSION:
        warnings.warn(f"reatt_kernels.compat.pylate.patch() is tested against PyLate {PINNED_VERSION}; this is "
                      f"PyLate {version}: check that its scoring functions still have the same names", stacklevel=3)
    return scores_mod


def _grouped_call(self, queries_embeddings, documents_embeddings, queries_mask=None, documents_mask=None,
                  backend=None):
    """``pylate.scores.ColBERTScores.__call__`` while patched (PyLate's signature)."""
    return _ours.grouped_documents_scores(queries_embeddings, documents_embeddings, queries_mask, documents_mask,
                                          backend, mask_semantics=_state["mask_semantics"])


def patch(*objects, mask_semantics: str = "pylate") -> None:
    """Swap PyLate's ColBERT scoring functions (and the losses and modules that use them) for reatt-kernels'.

    Call it once, before building PyLate models and losses (``objects``: models or losses built earlier, whose stored
    scoring functions are swapped too). Calling it again re-applies with the new settings.

    Args:
        objects: PyLate objects already built (a ``models.ColBERT``, a ``losses.Distillation``, ...).
        mask_semantics: "pylate" (default: PyLate's results to fp32 precision) or "skip" (masked tokens ignored).
    Raises:
        ImportError: PyLate is not installed.
    """
    _ours._check_semantics(mask_semantics)
    if _state["active"]:
        unpatch()
    scores_mod = _import_pylate()
    originals = {name: getattr(scores_mod, name) for name in FUNCTIONS}
    for name, fn in originals.items():
        if getattr(fn, "__module__", "").startswith("reatt_kernels"):
            raise RuntimeError(f"pylate.scores.colbert.{name} is already reatt-kernels' (patched by another copy?)")
    ours = {"colbert_scores": _with_semantics(_ours.colbert_scores, mask_semantics),
            "colbert_scores_pairwise": _ours.colbert_scores_pairwise,
            "colbert_kd_scores": _with_semantics(_ours.colbert_kd_scores, mask_semantics)}
    _state.update(originals=originals, ours=ours, mask_semantics=mask_semantics, objects=list(objects))
    mapping = {id(originals[n]): ours[n] for n in FUNCTIONS}
    _swap(mapping)
    _swap_objects(objects, mapping)
    cls = scores_mod.ColBERTScores
    _state["call"] = (cls, cls.__dict__["__call__"])
    cls.__call__ = _grouped_call
    _state["active"] = True


def unpatch() -> None:
    """Undo :func:`patch`: every reference it swapped (and any taken since by pylate modules imported while patched)
    points to PyLate's functions again. A no-op when not patched."""
    if not _state["active"]:
        return
    originals, ours = _state["originals"], _state["ours"]
    mapping = {id(ours[n]): originals[n] for n in FUNCTIONS}
    _swap(mapping)
    _swap_objects(_state["objects"], mapping)
    cls, call = _state["call"]
    cls.__call__ = call
    _state.update(active=False, originals={}, ours={}, call=None, objects=[])


def is_patched() -> bool:
    """Whether :func:`patch` is in effect."""
    return bool(_state["active"])


def original(name: str) -> Callable:
    """PyLate's own ``name`` (one of FUNCTIONS), unpatched (PyLate's "flash" / "lik" backends run through it)."""
    if name not in FUNCTIONS:
        raise ValueError(f"name must be one of {FUNCTIONS}, got {name!r}")
    if _state["active"]:
        return _state["originals"][name]
    try:
        scores_mod = importlib.import_module("pylate.scores.colbert")
    except ImportError as exc:
        raise ImportError(f"backend 'flash' / 'lik' are PyLate's own scoring paths: they need PyLate installed "
                          f"(pip install pylate==1.6.0)") from exc
    return getattr(scores_mod, name)
