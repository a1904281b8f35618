"""The interface every token payload of a :class:`~reatt_kernels.index.TokenIndex` answers, and the stage timer.

A ``TokenIndex`` holds what every kind shares (``offsets``, ``doc_ids``, ``deleted``, ``next_id``, ``calibration``) and
one payload: what it stores per token and how it searches it. :class:`~.exact.ExactPayload` stores fp16 tokens;
:class:`~.residual.ResidualPayload` stores a centroid id and an n-bit residual per dimension, plus inverted lists.
The index never asks which kind it holds: it calls the payload. Methods that need the shared arrays take the index
(``ix``) as their first argument; a payload holds no reference to its index.
"""
from __future__ import annotations

import time
from typing import Optional

import torch
from torch import Tensor

from .codec import ResidualCodec


class Payload:
    """One kind of token payload. Subclasses set ``KIND`` and ``ARRAYS`` and implement every method that raises
    ``NotImplementedError`` here; the others are the answers of a payload without a calibrated search plan.
    Kind-only extras (``ExactPayload.prepared_corpus``, ``ResidualPayload.build_ivf`` and ``scores_decompressed``)
    are reached through the ``TokenIndex`` methods documented for that kind."""

    KIND = ""
    ARRAYS: tuple[str, ...] = ()  # the arrays a saved index of this kind must hold (beside offsets, doc_ids, deleted)

    def __init__(self, dim: int, device: torch.device, nbits: int = 0, codec: Optional[ResidualCodec] = None):
        self.dim, self.device, self.nbits = int(dim), device, int(nbits)
        self.codec = codec.to(device) if codec is not None else None

    # ---- build ------------------------------------------------------------------------------------------------------
    @classmethod
    def build_codec(cls, stream, d_offsets, it, buffered, *, dim: int, nbits: int, codec, **train):
        """(codec, nbits, buffered) for a new index of this kind, before any chunk is encoded. ``stream``: the input
        (:func:`~.inputs._as_stream`); ``it``: its chunk iterator, ``buffered``: chunks already read from it (a
        payload may read more, and returns the list to encode first). ``train``: ``known_tokens`` (the input's token
        count when it is a list or packed, else None) and ``build``'s ``n_centroids``, ``sample_tokens``,
        ``n_tokens_hint``, ``kmeans_iters``, ``seed``."""
        raise NotImplementedError

    def calibration_queries(self, stream, d_offsets, buffered, seed: int):
        """Pseudo-queries whose exact scores a build streams for :meth:`calibrate`, or None (nothing to calibrate)."""
        return None

    def calibrate(self, ix, n_queries: int, q_len: int, k: int, target: float, seed: int) -> dict:
        """The search defaults chosen for this corpus (``TokenIndex.calibrate``): none here."""
        return {}

    # ---- sizes ------------------------------------------------------------------------------------------------------
    @property
    def bytes_per_token(self) -> float:
        raise NotImplementedError

    def describe(self) -> str:
        """Extra ``key=value`` fields of the index's repr (each with a leading ", ")."""
        return ""

    # ---- updates ----------------------------------------------------------------------------------------------------
    def check_appendable(self) -> None:
        """Raise when documents cannot be added to this payload."""

    def rows(self) -> list[Tensor]:
        """The per-token arrays, in the order :meth:`encode` returns a chunk's rows."""
        raise NotImplementedError

    def encode(self, tokens: Tensor, lens: Tensor, first_doc: int) -> tuple[list[Tensor], object]:
        """One chunk (tokens [n, D] on the payload's device, lens int64 [docs]; its first document is row
        ``first_doc`` of the index) -> (its rows of each :meth:`rows` array, a side record for :meth:`commit`)."""
        raise NotImplementedError

    def commit(self, rows: list[Tensor], sides: list) -> None:
        """Install the grown per-token arrays (``rows``, in :meth:`rows` order) and the chunks' side records."""
        raise NotImplementedError

    def compact(self, ix, rows: Tensor) -> None:
        """Keep token rows ``rows`` (int64) only; ``ix.offsets`` already describe the kept documents."""
        raise NotImplementedError

    def drop_caches(self) -> None:
        """Forget what was derived from the arrays (documents were deleted)."""

    # ---- persistence and validation ---------------------------------------------------------------------------------
    def arrays(self) -> dict[str, Tensor]:
        """Every array this payload holds, by the name it is saved under."""
        raise NotImplementedError

    def set_arrays(self, arrays: dict[str, Tensor]) -> None:
        """Take the loaded arrays (the names of :meth:`arrays`; ``ARRAYS`` are present)."""
        raise NotImplementedError

    def validate(self, T: int, N: int, where: str) -> None:
        """Check the arrays every search trusts for T tokens in N documents; raise ``IndexCorruptedError``."""
        raise NotImplementedError

    # ---- search -----------------------------------------------------------------------------------------------------
    def search(self, ix, q: Tensor, q_mask: Tensor, k: int, params: dict, backend: str, timer: "_Timer",
               allow: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """``TokenIndex.search`` after the query checks: q [Bq, Lq, D] and q_mask bool [Bq, Lq] on the device, allow
        bool [Bq, N] or None; ``params`` are the kind's own (popped; the rest is an error)."""
        raise NotImplementedError

    def candidates(self, ix, q: Tensor, q_mask: Optional[Tensor], k: int, nprobe, ncandidates) -> Tensor:
        raise ValueError(f"candidates() needs a trained residual index, this one is {self.KIND!r}")


def _no_extra(params):
    if params:
        raise TypeError(f"unknown search parameters: {sorted(params)}")


class _Timer:
    def __init__(self, device: torch.device, enabled: bool):
        self.device, self.enabled, self.times, self._t = device, enabled, {}, None

    def start(self):
        if self.enabled:
            self._sync()
            self._t = time.perf_counter()

    def stop(self, name: str):
        if self.enabled:
            self._sync()
            now = time.perf_counter()
            self.times[name] = self.times.get(name, 0.0) + now - self._t
            self._t = now

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
