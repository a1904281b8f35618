"""``PyLateTokenIndex``: PyLate's index interface (``pylate.indexes.Base``) on :class:`reatt_kernels.index.TokenIndex`.

A drop-in for ``pylate.indexes.PLAID`` in PyLate code (``retrieve.ColBERT(index=...)`` included)::

    index = PyLateTokenIndex(index_folder="indexes", index_name="docs", override=True)   # residual 4-bit, like PLAID
    index.add_documents(documents_ids=["a", "b"], documents_embeddings=model.encode(docs, is_query=False))
    index(model.encode(queries, is_query=True), k=10, subset=["a"])   # [[{"id": "a", "score": 12.3}], ...]

- Document ids are PyLate's (str or int), mapped to the TokenIndex's int64 ids; the mapping is saved in the index's
  manifest (``TokenIndex.metadata``), so ``PyLateTokenIndex(..., override=False)`` reopens the same index with its ids.
- Every change is saved at once (atomically, :meth:`TokenIndex.save`), as PyLate's indexes do.
- ``subset`` (one id list for every query, or one list per query) restricts the search through
  ``TokenIndex.search(subset=...)``: applied before the expensive stages; unknown ids are ignored.
- Re-adding an id that is in the index replaces its document (PyLate's FastPlaid keeps the old vectors searchable).
- ``kind="residual"`` trains its centroids on the first ``add_documents`` call and encodes later ones with them (as
  fast-plaid's update does); ``kind="exact"`` stores fp16 vectors and searches by exact MaxSim.

Importing this module does not import PyLate. The class is registered as a virtual subclass of
``pylate.indexes.base.Base`` when PyLate is loaded (``isinstance(index, Base)`` is then True).
"""
from __future__ import annotations

import numbers
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ...index import IndexCorruptedError, TokenIndex

_META_KEY = "pylate"  # TokenIndex.metadata[_META_KEY] = {"int_ids": [...], "ids": [...]}


def _register_with_pylate() -> None:
    """Make ``isinstance(x, pylate.indexes.base.Base)`` hold, when PyLate is loaded (never imports it)."""
    base = sys.modules.get("pylate.indexes.base")
    if base is not None and not issubclass(PyLateTokenIndex, base.Base):
        base.Base.register(PyLateTokenIndex)


def _doc_id(x, name: str):
    """A PyLate document id: str or int (numpy integers become int). JSON-serialisable and hashable."""
    if isinstance(x, str):
        return x
    if isinstance(x, numbers.Integral) and not isinstance(x, bool):
        return int(x)
    raise TypeError(f"{name}: document ids must be str or int, got {type(x).__name__} ({x!r})")


def _ids_list(ids, name: str) -> list:
    if isinstance(ids, (str, numbers.Integral)):
        ids = [ids]
    if isinstance(ids, (Tensor, np.ndarray)):
        ids = ids.tolist()
    try:
        ids = list(ids)
    except TypeError as exc:
        raise TypeError(f"{name} must be an id or a list of ids (str or int), got {type(ids).__name__}") from exc
    return [_doc_id(x, name) for x in ids]


def _as_matrix(x, name: str) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x, dtype=np.float32))
    if t.dim() != 2:
        raise ValueError(f"{name} must be [n_tokens, dim], got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must hold floats, got {t.dtype}")
    return t.detach().float().cpu()


def _documents(embeddings, name: str) -> list[Tensor]:
    """PyLate's document forms -> a list of [L_i, dim] float32 CPU tensors: a [n, L, dim] tensor or array, one
    [L, dim] document, or a list of [L_i, dim] tensors / arrays / nested lists."""
    if isinstance(embeddings, (Tensor, np.ndarray)) and not (isinstance(embeddings, np.ndarray)
                                                             and embeddings.dtype == object):
        if embeddings.ndim == 2:
            return [_as_matrix(embeddings, name)]
        if embeddings.ndim == 3:
            return [_as_matrix(e, f"{name}[{i}]") for i, e in enumerate(embeddings)]
        raise ValueError(f"{name} must be [n, n_tokens, dim] or one [n_tokens, dim] document, got shape "
                         f"{tuple(embeddings.shape)}")
    if isinstance(embeddings, (list, tuple, np.ndarray)):
        return [_as_matrix(e, f"{name}[{i}]") for i, e in enumerate(embeddings)]
    raise TypeError(f"{name} must be a tensor, a numpy array or a list of [n_tokens, dim] documents, got "
                    f"{type(embeddings).__name__}")


def _queries(embeddings) -> tuple[Tensor, Tensor]:
    """PyLate's query forms -> (float32 [Bq, Lmax, dim], bool mask [Bq, Lmax]); ragged queries are padded."""
    docs = _documents(embeddings, "queries_embeddings")
    if not docs:
        raise ValueError("queries_embeddings is empty")
    lmax = max(x.shape[0] for x in docs)
    dims = {x.shape[1] for x in docs}
    if len(dims) != 1:
        raise ValueError(f"queries_embeddings: every query must have the same dim, got {sorted(dims)}")
    q = torch.zeros((len(docs), lmax, dims.pop()))
    mask = torch.zeros((len(docs), lmax), dtype=torch.bool)
    for a, x in enumerate(docs):
        q[a, :x.shape[0]] = x
        mask[a, :x.shape[0]] = True
    return q, mask


class PyLateTokenIndex:
    """A ``pylate.indexes.Base`` index (end to end, like PLAID) on :class:`~reatt_kernels.index.TokenIndex`.

    Args:
        index_folder, index_name: the index lives in ``index_folder/index_name`` (a TokenIndex directory).
        override: delete an index already there; otherwise it is loaded (with its ids).
        kind: "residual" (default: centroid id + ``nbits`` per dimension, PLAID-style) or "exact" (fp16 vectors).
        nbits: 1, 2, 4 (default, as PLAID) or 8 (residual only).
        device: where the index lives and searches ("cpu" default; "cuda").
        backend: the kernel backend for search ("auto").
        search_params: keyword arguments for every :meth:`TokenIndex.search` (``method``, ``nprobe``,
            ``ncandidates``, ``k_token``); ``__call__`` takes more.
        build_params: keyword arguments for :meth:`TokenIndex.build` on the first ``add_documents`` (``n_centroids``,
            ``kmeans_iters``, ``sample_tokens``, ...); ``seed`` defaults to 42 (PLAID's).
        show_progress: progress bars while building.
    """

    is_end_to_end_index = True

    def __init__(self, index_folder: str = "indexes", index_name: str = "reatt", override: bool = False,
                 kind: str = "residual", nbits: int = 4, device: str = "cpu", backend: str = "auto",
                 search_params: Optional[dict] = None, build_params: Optional[dict] = None,
                 show_progress: bool = False) -> None:
        if kind not in ("residual", "exact"):
            raise ValueError(f"kind must be 'residual' or 'exact', got {kind!r}")
        self.index_folder, self.index_name = index_folder, index_name
        self.index_path = os.path.join(index_folder, index_name)
        self.kind, self.nbits, self.device, self.backend = kind, nbits, torch.device(device), backend
        self.search_params = dict(search_params or {})
        self.build_params = {"seed": 42, **(build_params or {})}
        self.show_progress = show_progress
        self.index: Optional[TokenIndex] = None
        self._int_of: dict = {}   # PyLate id -> TokenIndex id
        self._id_of: dict = {}    # TokenIndex id -> PyLate id
        self._rows: Optional[dict] = None  # TokenIndex id -> row (lazily, for get_documents_embeddings)
        if override and os.path.exists(self.index_path):
            shutil.rmtree(self.index_path)
        if (Path(self.index_path) / "CURRENT").is_file():
            self._load()
        _register_with_pylate()

    # ---- persistence -------------------------------------------------------------------------------------------------
    def _load(self) -> None:
        index = TokenIndex.load(self.index_path, device=self.device)
        meta = index.metadata.get(_META_KEY)
        if not isinstance(meta, dict) or len(meta.get("int_ids", ())) != len(meta.get("ids", ())):
            raise IndexCorruptedError(f"{self.index_path}: no PyLate id mapping in the manifest (saved by "
                                      f"TokenIndex.save, not by PyLateTokenIndex?)")
        live = set(index.doc_ids[~index.deleted].tolist())
        if set(meta["int_ids"]) != live:
            raise IndexCorruptedError(f"{self.index_path}: the PyLate id mapping does not match the live documents")
        self.index = index
        self.kind, self.nbits = index.kind, index.nbits or self.nbits
        self._int_of = dict(zip(meta["ids"], meta["int_ids"]))
        self._id_of = dict(zip(meta["int_ids"], meta["ids"]))
        self._rows = None

    def save(self) -> None:
        """Write the index and its id mapping (atomically; every change calls this)."""
        if self.index is None:
            return
        ints = list(self._id_of)
        self.index.metadata[_META_KEY] = {"int_ids": ints, "ids": [self._id_of[i] for i in ints]}
        self.index.save(self.index_path)

    # ---- pylate.indexes.Base -----------------------------------------------------------------------------------------
    def add_documents(self, documents_ids, documents_embeddings, batch_size: Optional[int] = None,
                      **kwargs) -> "PyLateTokenIndex":
        """Add documents (``documents_ids``: an id or a list of str / int ids; ``documents_embeddings``: one
        [n_tokens, dim] document, a [n, n_tokens, dim] tensor or array, or a list of [n_tokens_i, dim]). An id already
        in the index has its document replaced. ``batch_size`` is accepted for PyLate's signature (unused)."""
        ids = _ids_list(documents_ids, "documents_ids")
        docs = _documents(documents_embeddings, "documents_embeddings")
        if len(ids) != len(docs):
            raise ValueError(f"documents_ids has {len(ids)} ids for {len(docs)} documents in documents_embeddings")
        if len(set(ids)) != len(ids):
            raise ValueError("documents_ids holds the same id twice")
        if not docs:
            return self
        if self.index is not None and docs[0].shape[1] != self.index.dim:
            raise ValueError(f"documents_embeddings has dim {docs[0].shape[1]}, the index {self.index.dim}")
        replaced = [i for i in ids if i in self._int_of]
        if replaced:
            self._delete(replaced)
        if self.index is None:
            self.index = TokenIndex.build(docs, kind=self.kind, nbits=self.nbits, device=self.device,
                                          progress=self.show_progress, **self.build_params)
            new = self.index.doc_ids.tolist()
        else:
            new = self.index.add(docs).tolist()
        for user_id, int_id in zip(ids, new):
            self._int_of[user_id] = int_id
            self._id_of[int_id] = user_id
        self._rows = None
        self.save()
        return self

    def _delete(self, ids: list) -> None:
        ints = [self._int_of.pop(i) for i in ids if i in self._int_of]
        for n in ints:
            del self._id_of[n]
        if ints:
            self.index.delete(ints)
            if int(self.index.deleted.sum()) * 2 > self.index.deleted.numel():
                self.index.compact()  # most rows are tombstones: reclaim them
            self._rows = None

    def remove_documents(self, documents_ids) -> "PyLateTokenIndex":
        """Remove documents by id (ids not in the index are ignored)."""
        ids = _ids_list(documents_ids, "documents_ids")
        if self.index is not None:
            self._delete(ids)
            self.save()
        return self

    def update_documents(self, documents_ids, documents_embeddings) -> "PyLateTokenIndex":
        """Replace the documents of these ids (ids not yet in the index are added)."""
        return self.add_documents(documents_ids, documents_embeddings)

    def _int_subset(self, subset, n_queries: int):
        if subset is None:
            return None
        if isinstance(subset, (str, numbers.Integral)):
            subset = [subset]
        subset = list(subset)
        per_query = len(subset) > 0 and all(isinstance(s, (list, tuple, np.ndarray, Tensor)) for s in subset)
        if per_query:
            if len(subset) != n_queries:
                raise ValueError(f"subset has {len(subset)} per-query id lists for {n_queries} queries")
            return [[self._int_of[i] for i in _ids_list(s, f"subset[{a}]") if i in self._int_of]
                    for a, s in enumerate(subset)]
        return [self._int_of[i] for i in _ids_list(subset, "subset") if i in self._int_of]

    def __call__(self, queries_embeddings, k: int = 10, subset=None, **search_params) -> list[list[dict]]:
        """Top-``k`` documents of each query: ``[[{"id": ..., "score": float}, ...], ...]``, best first (fewer than k
        when fewer documents qualify).

        Args:
            queries_embeddings: one [n_tokens, dim] query, a [n, n_tokens, dim] tensor or array, or a list of
                [n_tokens_i, dim] (ragged allowed).
            k: results per query.
            subset: None, a list of ids (every query), or a list of id lists (one per query): only those documents
                can be returned; ids not in the index are ignored.
            search_params: more :meth:`TokenIndex.search` parameters (over the constructor's ``search_params``).
        """
        if self.index is None:
            raise ValueError("The index is empty: add documents before searching it.")
        q, mask = _queries(queries_embeddings)
        params = {**self.search_params, **search_params}
        scores, ids = self.index.search(q, mask, k=int(k), subset=self._int_subset(subset, q.shape[0]),
                                        backend=self.backend, **params)
        out = []
        for row_s, row_i in zip(scores.tolist(), ids.tolist()):
            out.append([{"id": self._id_of[i], "score": s} for s, i in zip(row_s, row_i) if i >= 0 and i in self._id_of])
        return out

    def get_documents_embeddings(self, documents_ids) -> list[list[np.ndarray]]:
        """The vectors of documents, grouped as given (``documents_ids``: a list of id lists): float32 [n_tokens, dim]
        arrays. An exact index returns its stored (fp16) vectors, a residual index the decompressed ones."""
        if self.index is None:
            raise ValueError("The index is empty: add documents before reading it.")
        if self._rows is None:
            live = torch.nonzero(~self.index.deleted).flatten()
            self._rows = dict(zip(self.index.doc_ids[live].tolist(), live.tolist()))
        idx = self.index
        groups = []
        for g, group in enumerate(documents_ids):
            out = []
            for user_id in _ids_list(group, f"documents_ids[{g}]"):
                if user_id not in self._int_of:
                    raise KeyError(f"document id {user_id!r} is not in the index")
                r = self._rows[self._int_of[user_id]]
                t0, t1 = int(idx.offsets[r]), int(idx.offsets[r + 1])
                if idx.kind == "exact":
                    v = idx.tokens[t0:t1].float()
                else:
                    v = idx.codec.decode(idx.codes[t0:t1].to(torch.int64), idx.packed[t0:t1])
                out.append(v.cpu().numpy().astype(np.float32, copy=False))
            groups.append(out)
        return groups

    def __len__(self) -> int:
        return len(self._int_of)

    def __repr__(self) -> str:
        return f"PyLateTokenIndex({self.index_path!r}, documents={len(self)}, index={self.index!r})"
