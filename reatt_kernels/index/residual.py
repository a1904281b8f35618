"""The residual payload of a :class:`~reatt_kernels.index.TokenIndex` (PLAID-style): per token a centroid id and an
n-bit bucket per dimension (:class:`~.codec.ResidualCodec`), plus inverted lists centroid -> documents.

Its searches (``plaid`` and ``scan``) are the residual search plan, :mod:`.residual_search`; its calibrated defaults
come from :mod:`.calibration`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import calibration, residual_search
from .codec import ResidualCodec, check_nbits, default_n_centroids, default_sample_tokens, release_freed_memory
from .inputs import _training_sample
from .io import IndexCorruptedError
from .payload import Payload, _no_extra
from .residual_search import DEFAULTS


class ResidualPayload(Payload):
    """codes [T] (uint16 on a CPU index where C <= 65536, else int32), packed residuals uint8 [T, D * nbits / 8],
    inverted lists ``ivf_offsets`` int64 [C + 1] / ``ivf_docs`` int32, and the codec."""

    KIND = "residual"
    ARRAYS = ("codes", "packed", "ivf_offsets", "ivf_docs")

    def __init__(self, dim: int, device: torch.device, nbits: int = 0, codec: Optional[ResidualCodec] = None):
        super().__init__(dim, device, nbits, codec)
        self.codes = torch.zeros(0, dtype=self._code_dtype(), device=device)
        self.packed = torch.zeros((0, dim * nbits // 8), dtype=torch.uint8, device=device)
        self.ivf_offsets = torch.zeros(1, dtype=torch.int64, device=device)
        # int32 document indices (half the bytes of int64: the lists are about 6 of the ~80 bytes per token);
        # an index holds fewer than 2^31 documents
        self.ivf_docs = torch.zeros(0, dtype=torch.int32, device=device)

    def _code_dtype(self) -> torch.dtype:
        """uint16 centroid ids where they fit (C <= 65536) on a CPU index: 2 bytes per token instead of 4. GPU indexes
        keep int32 (the staged GPU ops read int32)."""
        C = self.codec.centroids.shape[0] if self.codec is not None else 1 << 31
        return torch.uint16 if self.device.type == "cpu" and C <= 65536 else torch.int32

    def codes32(self) -> Tensor:
        """The codes as int32, for the ops that read int32 (the staged pipeline, calibration)."""
        return self.codes if self.codes.dtype == torch.int32 else self.codes.to(torch.int32)

    # ---- build ------------------------------------------------------------------------------------------------------
    @classmethod
    def build_codec(cls, stream, d_offsets, it, buffered, *, dim, nbits, codec, known_tokens, n_centroids,
                    sample_tokens, n_tokens_hint, kmeans_iters, seed):
        """Train the codec on a sample of the input (unless ``codec`` is given: shards of one corpus share one).
        ``known_tokens``: the input's token count when it is a list or packed, else None."""
        check_nbits(nbits, dim)
        if codec is None:
            T0 = known_tokens if known_tokens is not None else (n_tokens_hint or (1 << 18))
            k0 = default_n_centroids(T0) if n_centroids == "auto" else int(n_centroids)
            if sample_tokens == "auto":
                sample_tokens = default_sample_tokens(T0, k0)
            sample, buffered, known_T = _training_sample(stream, d_offsets, it, buffered, int(sample_tokens), seed)
            release_freed_memory()  # the sampling's temporaries: the sample is the build's one large block
            T = n_tokens_hint or known_T
            if sample.shape[0] == 0:
                raise ValueError("a residual index needs tokens to train its centroids (or pass codec=)")
            k = default_n_centroids(T) if n_centroids == "auto" else int(n_centroids)
            codec = ResidualCodec.train(sample, k, nbits, niter=kmeans_iters, seed=seed)
            del sample  # not held while the corpus is encoded
            release_freed_memory()
        return codec, codec.nbits, buffered

    def calibration_queries(self, stream, d_offsets, buffered, seed: int):
        # held-out pseudo-queries from the original vectors; their exact MaxSim against every document is taken
        # while the chunks stream by (the originals are not kept), and is the calibration's truth
        return calibration.pseudo_queries(stream, d_offsets, buffered, calibration.CALIBRATION_QUERIES,
                                          calibration.CALIBRATION_Q_LEN, seed)

    def calibrate(self, ix, n_queries, q_len, k, target, seed) -> dict:
        return calibration.calibrate(ix, n_queries, q_len, k, target, seed)

    # ---- sizes ------------------------------------------------------------------------------------------------------
    @property
    def bytes_per_token(self) -> float:
        """The code (2 bytes as uint16, 4 as int32) + dim * nbits / 8."""
        return self.codes.element_size() + self.dim * self.nbits / 8

    def describe(self) -> str:
        return f", nbits={self.nbits}, centroids={self.codec.centroids.shape[0]}" if self.codec is not None else ""

    # ---- updates ----------------------------------------------------------------------------------------------------
    def check_appendable(self) -> None:
        if self.codec is None:
            raise ValueError("this residual index has no codec (built empty without codec=)")

    def rows(self) -> list[Tensor]:
        return [self.codes, self.packed]

    def encode(self, tokens: Tensor, lens: Tensor, first_doc: int) -> tuple[list[Tensor], object]:
        """Side record: the chunk's (centroid, document) inverted-list pairs, one small pair per chunk."""
        codes, packed = self.codec.encode(tokens)
        c, d = self._cell_doc_pairs(codes, lens)
        return [codes, packed], (c, d + first_doc)

    def commit(self, rows: list[Tensor], sides: list) -> None:
        self.codes, self.packed = rows
        self._merge_ivf([c for c, _ in sides], [d for _, d in sides])

    def compact(self, ix, rows: Tensor) -> None:
        self.codes = self.codes[rows]
        self.packed = self.packed[rows]
        self.build_ivf(ix.offsets)

    @staticmethod
    def _cell_doc_pairs(codes: Tensor, lens: Tensor) -> tuple[Tensor, Tensor]:
        """Unique (centroid, local document) pairs of one chunk, sorted by centroid then document."""
        n = lens.numel()
        doc = torch.repeat_interleave(torch.arange(n, device=codes.device), lens, output_size=codes.numel())
        key = torch.unique(codes.long() * max(n, 1) + doc)
        return (key // max(n, 1)).to(torch.int32), key % max(n, 1)

    def _merge_ivf(self, cells: list[Tensor], docs: list[Tensor]) -> None:
        """Add (centroid, document) pairs to the inverted lists. The existing lists and each chunk's pairs are in
        document order within a centroid, so a stable sort by centroid alone yields (centroid, document) order."""
        C = self.codec.centroids.shape[0]
        dev = self.device
        if self.ivf_offsets.numel() != C + 1:  # a fresh index: no lists yet
            self.ivf_offsets = torch.zeros(C + 1, dtype=torch.int64, device=dev)
            self.ivf_docs = torch.zeros(0, dtype=torch.int32, device=dev)
        old_cells = torch.repeat_interleave(torch.arange(C, device=dev, dtype=torch.int32),
                                            self.ivf_offsets[1:] - self.ivf_offsets[:-1],
                                            output_size=self.ivf_docs.numel())
        cell = torch.cat([old_cells] + cells)
        doc = torch.cat([self.ivf_docs.to(torch.int32)] + [d.to(torch.int32) for d in docs])
        del old_cells
        cell, order = torch.sort(cell, stable=True)
        self.ivf_docs = doc[order]
        del order, doc
        self._set_ivf_offsets(cell, C)

    def build_ivf(self, offsets: Tensor) -> None:
        """Inverted lists: centroid -> sorted unique local document indices holding a token of that centroid."""
        C = self.codec.centroids.shape[0]
        N = offsets.numel() - 1
        lens = offsets[1:] - offsets[:-1]
        doc_of_tok = torch.repeat_interleave(torch.arange(N, device=self.device), lens, output_size=self.codes.numel())
        key = torch.unique(self.codes.long() * max(N, 1) + doc_of_tok)  # sorted by (centroid, doc)
        cell = key // max(N, 1)
        self.ivf_docs = (key % max(N, 1)).to(torch.int32)
        self._set_ivf_offsets(cell, C)

    def _set_ivf_offsets(self, cell: Tensor, C: int) -> None:
        """List boundaries from each entry's centroid (``cell``, sorted)."""
        counts = torch.bincount(cell, minlength=C)
        self.ivf_offsets = torch.zeros(C + 1, dtype=torch.int64, device=self.device)
        self.ivf_offsets[1:] = torch.cumsum(counts, 0)

    def decode_rows(self, rows: Tensor) -> Tensor:
        """Decompressed vectors of token rows ``rows``: fp32 [n, D]."""
        return self.codec.decode(self.codes[rows], self.packed[rows])

    # ---- persistence and validation ---------------------------------------------------------------------------------
    def arrays(self) -> dict[str, Tensor]:
        a = dict(codes=self.codes, packed=self.packed, ivf_offsets=self.ivf_offsets, ivf_docs=self.ivf_docs)
        if self.codec is not None:
            a.update(centroids=self.codec.centroids, cutoffs=self.codec.cutoffs, weights=self.codec.weights)
        return a

    def set_arrays(self, arrays: dict[str, Tensor]) -> None:
        self.codes, self.packed = arrays["codes"], arrays["packed"]
        self.ivf_offsets, self.ivf_docs = arrays["ivf_offsets"], arrays["ivf_docs"]
        if self.codec is not None and self.codes.dtype != self._code_dtype():
            self.codes = self.codes.to(self._code_dtype())  # an index saved with int32 codes, or moved device

    def validate(self, T: int, N: int, where: str) -> None:
        if self.codes.shape[0] < T or self.packed.shape[0] < T or self.packed.shape[1] != self.dim * self.nbits // 8:
            raise IndexCorruptedError(f"{where}: codes {tuple(self.codes.shape)} / packed {tuple(self.packed.shape)} "
                                      f"do not hold {T} tokens of {self.dim * self.nbits // 8} bytes")
        if self.codec is not None and T:
            C = self.codec.centroids.shape[0]
            lo, hi = (int(x) for x in torch.aminmax(self.codes[:T].to(torch.int32)))
            if lo < 0 or hi >= C:
                raise IndexCorruptedError(f"{where}: codes must name centroids in [0, {C}), found [{lo}, {hi}]")
        iv = self.ivf_offsets
        if iv.numel() > 1 and (int(iv[0]) != 0 or bool((iv[1:] < iv[:-1]).any()) or int(iv[-1]) != self.ivf_docs.numel()
                               or (self.ivf_docs.numel() and (int(self.ivf_docs.min()) < 0
                                                              or int(self.ivf_docs.max()) >= N))):
            raise IndexCorruptedError(f"{where}: the inverted lists are inconsistent with {N} documents")

    # ---- search -----------------------------------------------------------------------------------------------------
    def search(self, ix, q, q_mask, k, params, backend, timer, allow):
        """params (defaults: ``DEFAULTS``, and the reason for each beside it): ``method``, ``nprobe``,
        ``ncandidates``, ``exhaustive`` (see ``TokenIndex.search``)."""
        method = params.pop("method", DEFAULTS["method"])
        nprobe = params.pop("nprobe", DEFAULTS["nprobe"])
        ncand = params.pop("ncandidates", DEFAULTS["ncandidates"])
        if params.pop("exhaustive", False):
            method = "scan"
        _no_extra(params)
        if method == "auto":
            # explicit plaid parameters ask for the plaid path; otherwise the calibrated choice
            explicit = nprobe != "auto" or ncand != "auto"
            method = "plaid" if explicit else ix.calibration.get("method", "plaid")
        if method not in ("plaid", "scan"):
            raise ValueError(f"method must be 'auto', 'plaid' or 'scan', got {method!r}")
        if method == "scan":
            return residual_search.search_scan(ix, q, q_mask, k, backend, timer, allow)
        return residual_search.search_plaid(ix, q, q_mask, k, nprobe, ncand, backend, timer, allow)

    def candidates(self, ix, q, q_mask, k, nprobe, ncandidates) -> Tensor:
        if self.codec is None:
            return super().candidates(ix, q, q_mask, k, nprobe, ncandidates)  # raises
        q, q_mask = ix._check_query(q, q_mask)
        return residual_search.candidates(ix, q, q_mask, k, nprobe, ncandidates)

    def scores_decompressed(self, ix, q: Tensor, q_mask: Tensor) -> Tensor:
        """MaxSim of every query against every document (deleted ones -inf), from the codes: fp32 [Bq, N]."""
        return residual_search.scan_scores(ix, q.float(), q_mask)
