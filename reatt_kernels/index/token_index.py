"""TokenIndex: exact (fp16) and residual-compressed (PLAID-style) token-vector indexes with MaxSim search.

The front door. A ``TokenIndex`` holds what every kind shares (``offsets``, ``doc_ids``, ``deleted``, ``next_id``,
``calibration``, ``metadata``) and one payload, which stores the tokens and searches them. The jobs live in:

- :mod:`.payload`: the interface every payload answers (and the stage timer);
- :mod:`.exact`: ``ExactPayload``, fp16 tokens, and the exact search pipelines (``method="full"`` / ``"flat"``);
- :mod:`.residual`: ``ResidualPayload``, centroid codes + packed residuals + inverted lists;
- :mod:`.residual_search`: the residual search plan (``method="plaid"``: fused ``plaid_search`` on CPU, staged ops
  elsewhere; ``method="scan"``; the inverted-list probe; candidates), with ``DEFAULTS`` and the reason for each;
- :mod:`.calibration`: pseudo-queries, exact truth streamed at build, ``calibrate``;
- :mod:`.updates`: the append stream (build, add), delete, compact;
- :mod:`.inputs`: input normalisation (every input form becomes a stream of chunks) and :func:`merge_topk`;
- :mod:`.persistence`: save / load, on :mod:`.io`'s durable format.

Search pipelines (``index.search(q, q_mask, k, **params) -> (scores [Bq, k], doc_ids [Bq, k])``): described where
they are implemented, in :mod:`.exact` (exact) and :mod:`.residual_search` (residual). Results always have k columns:
when fewer than k live documents qualify, the tail is ``-inf`` with id ``-1``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import persistence, residual_search, updates
from .calibration import CALIBRATION_Q_LEN, CALIBRATION_QUERIES, CALIBRATION_TARGET
from .codec import ResidualCodec
from .exact import ExactPayload
from .inputs import _as_stream, _chunks, _stream_tokens
from .io import IndexCorruptedError
from .payload import Payload, _Timer
from .residual import ResidualPayload
from .residual_search import DEFAULTS
# Public names defined in this module before the split (issue 28), importable from here still:
from .calibration import SCAN_FRACTION  # noqa: F401
from .inputs import merge_topk  # noqa: F401
from .residual_search import DEFAULT_RERANK_FACTOR, PROBE_CELLS  # noqa: F401

PAYLOADS: dict[str, type[Payload]] = {"exact": ExactPayload, "residual": ResidualPayload}
KINDS = tuple(PAYLOADS)


def _payload_attr(name: str, doc: str) -> property:
    """An index attribute that lives in its payload (``index.codes`` is ``index.payload.codes``); an attribute the
    payload lacks (``codes`` of an exact index) raises AttributeError, as a missing attribute does."""
    return property(lambda self: getattr(self.payload, name), lambda self, v: setattr(self.payload, name, v), doc=doc)


class TokenIndex:
    """A token-vector index over documents (each a [L_i, dim] matrix of unit vectors), searched by MaxSim.

    Build with :meth:`build`, search with :meth:`search`, grow with :meth:`add`, tombstone with :meth:`delete`,
    reclaim with :meth:`compact`, persist with :meth:`save` / :meth:`load`.
    """

    def __init__(self, kind: str, dim: int, *, device="cpu", nbits: int = 0, codec: Optional[ResidualCodec] = None):
        self.dim = int(dim)
        self.device = torch.device(device)
        self.payload = self._payload_class(kind)(self.dim, self.device, nbits, codec)
        dev = self.device
        self.offsets = torch.zeros(1, dtype=torch.int64, device=dev)
        self.doc_ids = torch.zeros(0, dtype=torch.int64, device=dev)
        self.deleted = torch.zeros(0, dtype=torch.bool, device=dev)
        self.next_id = 0
        self.last_timings: dict[str, float] = {}
        # search defaults chosen for this corpus by calibrate() (empty: DEFAULTS' fallbacks)
        self.calibration: dict = {}
        # Caller-owned JSON-serialisable data saved in the manifest with the index (e.g. the string document ids of
        # reatt_kernels.compat.pylate.PyLateTokenIndex); the index itself never reads it.
        self.metadata: dict = {}
        self._calib_truth = None  # ((q, q_mask, sources), exact scores [n, N]): build-time calibration truth

    @staticmethod
    def _payload_class(kind: str) -> type[Payload]:
        if kind not in PAYLOADS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return PAYLOADS[kind]

    # the payload's attributes, where callers have always found them
    kind = property(lambda self: self.payload.KIND, doc='"exact" or "residual".')
    nbits = _payload_attr("nbits", "Bits per residual dimension (residual; 0 for exact).")
    codec = _payload_attr("codec", "The ResidualCodec (centroids, cutoffs, weights), or None.")
    tokens = _payload_attr("tokens", "Exact: fp16 [T, dim].")
    codes = _payload_attr("codes", "Residual: centroid ids [T] (uint16 on a CPU index where they fit, else int32).")
    packed = _payload_attr("packed", "Residual: packed residual buckets uint8 [T, dim * nbits / 8].")
    ivf_offsets = _payload_attr("ivf_offsets", "Residual: inverted-list boundaries int64 [C + 1].")
    ivf_docs = _payload_attr("ivf_docs", "Residual: inverted lists, local document indices int32.")

    # ---- sizes ------------------------------------------------------------------------------------------------------
    @property
    def n_docs(self) -> int:
        """Live (not deleted) documents."""
        return int((~self.deleted).sum())

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def bytes_per_token(self) -> float:
        """Bytes of token payload per token: 2 * dim (fp16) for exact; the code (2 bytes as uint16, 4 as int32) + dim *
        nbits / 8 for residual."""
        return self.payload.bytes_per_token

    def nbytes(self) -> int:
        """All arrays' bytes (payload, offsets, ids, tombstones, inverted lists, codec)."""
        return sum(t.numel() * t.element_size() for t in self._arrays().values())

    def __repr__(self) -> str:
        return (f"TokenIndex(kind={self.kind!r}, dim={self.dim}{self.payload.describe()}, docs={self.n_docs}, "
                f"tokens={self.n_tokens}, device={self.device})")

    # ---- build ------------------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, vectors, *, d_offsets: Optional[Tensor] = None, kind: str = "residual", nbits: int = 4,
              n_centroids="auto", doc_ids: Optional[Sequence[int]] = None, dim: Optional[int] = None,
              device=None, codec: Optional[ResidualCodec] = None, sample_tokens="auto",
              n_tokens_hint: Optional[int] = None, kmeans_iters: int = 4, seed: int = 0,
              chunk_tokens: int = 1 << 16, progress: bool = True, calibrate: bool = True) -> "TokenIndex":
        """Build an index in bounded memory, streaming over chunks with a tqdm progress bar.

        Args:
            vectors: a list of [L_i, dim] tensors; packed d_tokens [T, dim] with ``d_offsets`` int64 [Nd + 1]; or an
                iterator of chunks (each a [L, dim] tensor = one document, a list of them, or a (tokens, offsets)
                tuple).
            kind: "exact" (fp16 tokens) or "residual" (centroid id + nbits per dimension).
            nbits: 1, 2, 4 or 8 (residual). n_centroids: "auto" (:func:`~.codec.default_n_centroids`: PLAID's
                2^floor(log2(16 sqrt(T))), capped so each centroid trains on >= 64 sample points) or an int.
            doc_ids: int64 ids per document (default 0..Nd-1). dim: needed only when ``vectors`` is empty.
            device: where the index lives and searches (default: the input's device, else CPU).
            codec: reuse trained centroids/cutoffs/weights (no k-means); shards of one corpus share one codec.
            sample_tokens: tokens sampled for k-means and the quantiles; "auto" = 64 per centroid, at least 2^18, at
                most the corpus (:func:`~.codec.default_sample_tokens`).
            n_tokens_hint: expected token count when ``vectors`` is an iterator (for n_centroids="auto"; also sizes the
                payload up front).
            kmeans_iters: k-means iterations (4, as PLAID: the codes' quality barely moves after a few, and each
                iteration costs sample x centroids x dim multiply-adds).
            calibrate: residual: choose the search defaults for this corpus from pseudo-queries
                (:meth:`calibrate`; costs 32 short scans of the corpus).

        Memory: the payload is written in place into arrays sized up front (when the token count is known: packed or
        list input, or ``n_tokens_hint``; otherwise grown by 1.25x), and the inverted lists are collected per chunk
        as (centroid, document) pairs, so the build's peak is about the final index plus one chunk, never the
        chunks plus their concatenation.
        """
        payload_cls = cls._payload_class(kind)
        stream = _as_stream(vectors)
        first_dev = None
        if isinstance(stream, Tensor):
            first_dev, dim = stream.device, stream.shape[-1] if stream.dim() == 2 else dim
        elif isinstance(stream, list) and stream:
            first_dev, dim = stream[0].device, stream[0].shape[-1]
        device = torch.device(device) if device is not None else (first_dev or torch.device("cpu"))
        it = _chunks(stream, d_offsets, chunk_tokens)
        buffered: list[tuple[Tensor, Tensor]] = []
        if dim is None:  # an iterator: peek at the first chunk for the dimension
            for ch in it:
                buffered.append(ch)
                dim = ch[0].shape[1]
                break
        if dim is None:
            raise ValueError("empty input: pass dim= to build an empty index")
        known = _stream_tokens(stream)
        codec, nbits, buffered = payload_cls.build_codec(
            stream, d_offsets, it, buffered, dim=dim, nbits=nbits, codec=codec, known_tokens=known,
            n_centroids=n_centroids, sample_tokens=sample_tokens, n_tokens_hint=n_tokens_hint,
            kmeans_iters=kmeans_iters, seed=seed)
        index = cls(kind, dim, device=device, nbits=nbits, codec=codec)
        total = known if known is not None else n_tokens_hint
        pseudo = index.payload.calibration_queries(stream, d_offsets, buffered, seed) if calibrate else None
        updates.append_stream(index, buffered, it, doc_ids, progress, desc=f"building {kind} index",
                              total_tokens=total, truth_queries=pseudo)
        if calibrate:
            index.calibrate(seed=seed)
        return index

    # ---- updates ----------------------------------------------------------------------------------------------------
    def add(self, vectors, doc_ids: Optional[Sequence[int]] = None, *, d_offsets: Optional[Tensor] = None,
            progress: bool = False) -> Tensor:
        """Append documents (same input forms as :meth:`build`), encoded with the existing centroids (no rebuild).
        Returns their ids (int64 [n])."""
        return updates.add(self, vectors, doc_ids, d_offsets, progress)

    def delete(self, doc_ids) -> int:
        """Tombstone documents by id: they are never returned again. Unknown ids are ignored. Returns how many
        live documents were deleted."""
        return updates.delete(self, doc_ids)

    def compact(self) -> None:
        """Drop tombstoned documents' tokens and rebuild offsets and inverted lists."""
        updates.compact(self)

    def _build_ivf(self) -> None:
        """Residual: rebuild the inverted lists from the codes."""
        self.payload.build_ivf(self.offsets)

    # ---- search -----------------------------------------------------------------------------------------------------
    def _check_query(self, q: Tensor, q_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        if not isinstance(q, Tensor) or not q.is_floating_point():
            raise TypeError(f"q must be a float tensor [Bq, Lq, {self.dim}]")
        if q.dim() == 2:
            q = q[None]
            q_mask = q_mask[None] if q_mask is not None else None
        if q.dim() != 3:
            raise ValueError(f"q must be [Bq, Lq, dim] (or [Lq, dim]), got shape {tuple(q.shape)}")
        if q.shape[-1] != self.dim:
            raise ValueError(f"query dim {q.shape[-1]} != index dim {self.dim}")
        if q_mask is None:
            q_mask = torch.ones(q.shape[:2], dtype=torch.bool)
        if q_mask.dtype != torch.bool or tuple(q_mask.shape) != tuple(q.shape[:2]):
            raise ValueError(f"q_mask must be bool {tuple(q.shape[:2])}, got {q_mask.dtype} {tuple(q_mask.shape)}")
        # A NaN or inf would flow through every stage and come back as non-finite scores (or silently wrong ids);
        # reject it here, naming where it is. Masked-out tokens are checked too: padding must be finite.
        bad = ~torch.isfinite(q)
        if bool(bad.any()):
            a, i, d = (int(v) for v in torch.nonzero(bad)[0])
            raise ValueError(f"q holds {int(bad.sum())} non-finite value(s) (NaN or inf), the first at query {a}, "
                             f"token {i}, dimension {d}: query vectors must be finite")
        return q.to(self.device), q_mask.to(self.device)

    def search(self, q: Tensor, q_mask: Optional[Tensor] = None, k: int = 10, *, timings: bool = False,
               backend: str = "auto", subset=None, **params) -> tuple[Tensor, Tensor]:
        """Top-k documents per query by MaxSim.

        Args:
            q: [Bq, Lq, dim] (or [Lq, dim]) float. q_mask: bool [Bq, Lq] or None. k: results per query (>= 1).
            timings: record per-stage seconds in ``self.last_timings`` (synchronises the GPU between stages).
            backend: kernel backend for the scoring op.
            subset: None, or an allow-list of document ids: one sequence (or int64 tensor) for every query, or a list
                of ``Bq`` sequences, one per query. Only those documents can be returned; ids not in the index are
                ignored. It is applied to the candidates before the expensive stages (exact: only the allowed
                documents are scored; residual: before centroid interaction, selection and rerank).
            params: exact: ``method`` ("full" | "flat"), ``k_token`` (flat; <= 2048). residual (defaults:
                ``DEFAULTS``, and the reason for each beside it): ``method`` ("auto" | "plaid" | "scan"; "auto" is
                the calibrated choice, or plaid when ``nprobe`` or ``ncandidates`` is given), ``nprobe``
                ("auto" or cells per query token; 0 = score every document by centroid interaction),
                ``ncandidates`` ("auto" or documents decompressed and reranked), ``exhaustive=True`` (same as
                ``method="scan"``: decompressed MaxSim against every live document).
        Returns:
            scores fp32 [Bq, k] (descending) and doc ids int64 [Bq, k]; missing results are (-inf, -1).
        """
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        q, q_mask = self._check_query(q, q_mask)
        allow = self._allow_mask(subset, q.shape[0])
        timer = _Timer(self.device, timings)
        timer.start()
        scores, ids = self.payload.search(self, q, q_mask, k, params, backend, timer, allow)
        self.last_timings = dict(timer.times)
        return scores, ids

    def _allow_mask(self, subset, Bq: int) -> Optional[Tensor]:
        """``subset`` (document ids) -> bool [Bq, N] over the index's rows, or None."""
        if subset is None:
            return None

        def rows_of(ids, where):
            t = ids if isinstance(ids, Tensor) else torch.as_tensor(ids)
            if t.numel() == 0:
                t = t.reshape(0).to(torch.int64)  # an empty list allows nothing
            if t.dim() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise TypeError(f"subset{where} must be a 1-D sequence of int document ids, got "
                                f"{t.dtype} {tuple(t.shape)}")
            return torch.isin(self.doc_ids, t.to(device=self.device, dtype=torch.int64))

        per_query = isinstance(subset, (list, tuple)) and len(subset) > 0 and all(
            isinstance(x, (list, tuple, Tensor)) for x in subset)
        if per_query:
            if len(subset) != Bq:
                raise ValueError(f"subset has {len(subset)} per-query lists for {Bq} queries")
            return torch.stack([rows_of(x, f"[{a}]") for a, x in enumerate(subset)])
        return rows_of(subset, "").expand(Bq, -1)

    def _ncandidates(self, k: int, ncand) -> int:
        """Documents the plaid path decompresses: ``ncand``, or for "auto" ceil(rerank_factor x k) (calibrated)."""
        return residual_search.ncandidates(self, k, ncand)

    def _prepared_corpus(self):
        """Exact: the corpus prepared once for full search (:meth:`.exact.ExactPayload.prepared_corpus`)."""
        return self.payload.prepared_corpus(self.offsets)

    def candidates(self, q: Tensor, q_mask: Optional[Tensor] = None, *, k: int = 10,
                   nprobe=DEFAULTS["nprobe"], ncandidates=DEFAULTS["ncandidates"]) -> Tensor:
        """Residual index: the documents the plaid path would decompress for top-``k`` (stages 1-3, untimed).

        q [Bq, Lq, D] (or [Lq, D]), q_mask bool [Bq, Lq] or None -> int64 [Bq, M] local document indices (rows of
        ``offsets``, not user ids), -1 padded; M <= ``ncandidates``."""
        return self.payload.candidates(self, q, q_mask, k, nprobe, ncandidates)

    def exact_scores_decompressed(self, q: Tensor, q_mask: Optional[Tensor] = None) -> Tensor:
        """Residual index: MaxSim of every query against every document (deleted ones -inf), from the codes."""
        q, q_mask = self._check_query(q, q_mask)
        return self.payload.scores_decompressed(self, q, q_mask)

    # ---- calibration ------------------------------------------------------------------------------------------------
    def calibrate(self, n_queries: int = CALIBRATION_QUERIES, q_len: int = CALIBRATION_Q_LEN, k: int = 10,
                  target: float = CALIBRATION_TARGET, seed: int = 0) -> dict:
        """Choose the residual search defaults for this corpus from held-out pseudo-queries (exact-search truth), and
        keep them in ``self.calibration`` (saved with the index): ``method`` ("plaid", or "scan" with a warning when
        clusters do not predict MaxSim) and ``rerank_factor``. The method: :func:`.calibration.calibrate`. An exact
        index has nothing to calibrate ({})."""
        self.calibration = self.payload.calibrate(self, n_queries, q_len, k, target, seed)
        return self.calibration

    # ---- persistence ------------------------------------------------------------------------------------------------
    def _arrays(self) -> dict[str, Tensor]:
        return {"offsets": self.offsets, "doc_ids": self.doc_ids, "deleted": self.deleted, **self.payload.arrays()}

    def save(self, directory) -> None:
        """Persist atomically (see :mod:`reatt_kernels.index.io`): a crash mid-save leaves the previous save intact.
        ``self.metadata`` goes into the manifest (it must be JSON-serialisable: checked before anything is written)."""
        persistence.save(self, directory)

    @classmethod
    def load(cls, directory, device="cpu", mmap: bool = True, verify: bool = True) -> "TokenIndex":
        """Load a saved index onto ``device``. On CPU with ``mmap`` the arrays stay copy-on-write memory maps.
        Raises :class:`IndexCorruptedError` naming the file when a file is missing, truncated or corrupted."""
        return persistence.load(cls, directory, device, mmap, verify)

    def validate(self, where: str = "index") -> None:
        """Check the arrays every search trusts, once (at load; a build makes them valid by construction): offsets
        start at 0, never decrease and end at the token count; codes name existing centroids; the packed residuals
        and inverted lists have their shapes and ranges. Raises :class:`IndexCorruptedError` naming what is wrong.
        One pass over the codes: this is why searches need none."""
        off = self.offsets
        T = int(off[-1]) if off.numel() else 0
        if off.numel() < 1 or int(off[0]) != 0 or bool((off[1:] < off[:-1]).any()):
            raise IndexCorruptedError(f"{where}: offsets must start at 0 and never decrease")
        self.payload.validate(T, off.numel() - 1, where)
