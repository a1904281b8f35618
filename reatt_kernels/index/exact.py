"""The exact payload of a :class:`~reatt_kernels.index.TokenIndex`: every token as fp16 [T, D], searched by MaxSim.

Search pipelines (``method=`` of ``TokenIndex.search``):

``"full"`` (default): ``maxsim_packed`` of every query against every live document, then top-k. The padded query goes
    to the kernel as it is: every maxsim backend packs a query's valid tokens itself (issue 29), so masked query
    tokens cost no work and need no slicing here.
``"flat"`` (ReAtt's inference path): each query token's ``k_token`` nearest tokens by inner product (faiss flat
    inner-product index on CPU, chunked matmul + top-k on CUDA), their documents as candidates, then an exact
    ``maxsim_packed`` rerank of the candidates.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .inputs import _ragged_rows, merge_topk
from .io import IndexCorruptedError
from .payload import Payload, _no_extra, _Timer


class ExactPayload(Payload):
    """fp16 tokens [T, D] (2 * D bytes per token), plus two caches built on first use: the faiss flat index of the
    ``"flat"`` method and the corpus prepared for ``"full"`` search."""

    KIND = "exact"
    ARRAYS = ("tokens",)

    def __init__(self, dim: int, device: torch.device, nbits: int = 0, codec=None):
        super().__init__(dim, device, nbits, codec)
        self.tokens = torch.zeros((0, dim), dtype=torch.float16, device=device)
        self._flat = None  # lazily built token-level flat index (method="flat")
        self._prepared = None  # (tokens, offsets, PreparedCorpus): the corpus prepared for full search

    @classmethod
    def build_codec(cls, stream, d_offsets, it, buffered, *, dim, nbits, codec, **train):
        return codec, 0, buffered  # nothing to train

    @property
    def bytes_per_token(self) -> float:
        return 2.0 * self.dim

    # ---- updates ----------------------------------------------------------------------------------------------------
    def rows(self) -> list[Tensor]:
        return [self.tokens]

    def encode(self, tokens: Tensor, lens: Tensor, first_doc: int) -> tuple[list[Tensor], object]:
        return [tokens], None

    def commit(self, rows: list[Tensor], sides: list) -> None:
        self.tokens = rows[0]
        self._flat = None

    def compact(self, ix, rows: Tensor) -> None:
        self.tokens = self.tokens[rows]
        self._flat = None

    def drop_caches(self) -> None:
        self._flat = None

    # ---- persistence and validation ---------------------------------------------------------------------------------
    def arrays(self) -> dict[str, Tensor]:
        return {"tokens": self.tokens}

    def set_arrays(self, arrays: dict[str, Tensor]) -> None:
        self.tokens = arrays["tokens"]

    def validate(self, T: int, N: int, where: str) -> None:
        if self.tokens.shape[0] < T:
            raise IndexCorruptedError(f"{where}: offsets reach token {T} but tokens holds {self.tokens.shape[0]}")

    # ---- search -----------------------------------------------------------------------------------------------------
    def search(self, ix, q, q_mask, k, params, backend, timer, allow):
        """params: ``method`` ("full" | "flat"), ``k_token`` (flat; <= 2048)."""
        method = params.pop("method", "full")
        k_token = params.pop("k_token", 256)
        _no_extra(params)
        if method == "full":
            return self._search_full(ix, q, q_mask, k, backend, timer, allow)
        if method == "flat":
            return self._search_flat(ix, q, q_mask, k, k_token, backend, timer, allow)
        raise ValueError(f"method must be 'full' or 'flat', got {method!r}")

    def _search_full(self, ix, q, q_mask, k, backend, timer: _Timer, allow: Optional[Tensor] = None):
        from ..ops.maxsim import maxsim_packed

        N = ix.offsets.numel() - 1
        if N == 0:
            empty = torch.zeros((q.shape[0], 0), device=self.device)
            return merge_topk(empty, empty.long(), k)
        if allow is None:
            s = maxsim_packed(q.to(self.tokens.dtype), self.prepared_corpus(ix.offsets), None, q_mask,
                              backend=backend).float()
            s = s.masked_fill(ix.deleted[None, :], float("-inf"))
            ids = ix.doc_ids[None, :].expand_as(s)
        else:  # score only the documents some query may return
            rows = torch.nonzero(allow.any(0) & ~ix.deleted).flatten()
            trows, seg = _ragged_rows(ix.offsets, rows)
            off = torch.zeros(rows.numel() + 1, dtype=torch.int64, device=self.device)
            off[1:] = torch.cumsum(torch.bincount(seg, minlength=rows.numel()), 0)
            s = maxsim_packed(q.to(self.tokens.dtype), self.tokens[trows], off, q_mask, backend=backend).float()
            s = s.masked_fill(~allow[:, rows], float("-inf"))
            ids = ix.doc_ids[rows][None, :].expand_as(s)
        timer.stop("maxsim")
        out = merge_topk(s, ids, k)
        timer.stop("topk")
        return out

    def prepared_corpus(self, offsets: Tensor):
        """The exact corpus prepared once for full search (ops/maxsim.py: prepare_corpus: rows and offsets validated
        once, not on every search; no copy of the tokens). Without the bf16 screen, which does not pay yet (see
        prepare_corpus): once it does, ``screen=True`` here is the whole change. Built on first use; rebuilt when the
        tokens or offsets are replaced (add, compact, load), which is checked by identity on every call."""
        from ..ops.maxsim import prepare_corpus

        p = self._prepared
        if p is None or p[0] is not self.tokens or p[1] is not offsets:
            p = self._prepared = (self.tokens, offsets, prepare_corpus(self.tokens, offsets))
        return p[2]

    def _flat_topk(self, qtok: Tensor, k_token: int) -> Tensor:
        """Rows of the k_token nearest tokens by inner product for each row of qtok [n, D] -> int64 [n, k']."""
        T = self.tokens.shape[0]
        kk = min(k_token, T)
        if self.device.type == "cpu":
            import faiss

            if self._flat is None:
                # fp16 storage, exact inner products of the stored fp16 values (no fp32 copy of the corpus)
                flat = faiss.IndexScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
                for t0 in range(0, T, 1 << 18):
                    flat.add(np.ascontiguousarray(self.tokens[t0:t0 + (1 << 18)].float().numpy()))
                self._flat = flat
            _, rows = self._flat.search(np.ascontiguousarray(qtok.float().cpu().numpy()), kk)
            return torch.from_numpy(rows).to(self.device)
        best_s = best_r = None
        qh = qtok.to(self.tokens.dtype)
        for t0 in range(0, T, 1 << 20):
            s = qh @ self.tokens[t0:t0 + (1 << 20)].T
            sv, si = torch.topk(s.float(), min(kk, s.shape[1]), dim=1)
            si = si + t0
            if best_s is not None:
                sv, pos = torch.topk(torch.cat([best_s, sv], 1), kk, dim=1)
                si = torch.gather(torch.cat([best_r, si], 1), 1, pos)
            best_s, best_r = sv, si
        return best_r

    def _search_flat(self, ix, q, q_mask, k, k_token, backend, timer: _Timer, allow: Optional[Tensor] = None):
        from ..ops.maxsim import maxsim_packed

        if not 1 <= k_token <= 2048:
            raise ValueError(f"k_token must be in [1, 2048], got {k_token}")
        Bq, Lq, _ = q.shape
        if self.tokens.shape[0] == 0:
            empty = torch.zeros((Bq, 0), device=self.device)
            return merge_topk(empty, empty.long(), k)
        rows = self._flat_topk(q.reshape(Bq * Lq, self.dim), k_token).reshape(Bq, Lq, -1)
        timer.stop("token_topk")
        out_s, out_i = [], []
        for a in range(Bq):
            r = rows[a][q_mask[a]].flatten()
            r = r[r >= 0]
            docs = torch.unique(torch.searchsorted(ix.offsets, r, right=True) - 1)
            docs = docs[~ix.deleted[docs]]
            if allow is not None:
                docs = docs[allow[a, docs]]
            trows, seg = _ragged_rows(ix.offsets, docs)
            lens = torch.bincount(seg, minlength=docs.numel())
            off = torch.zeros(docs.numel() + 1, dtype=torch.int64, device=self.device)
            off[1:] = torch.cumsum(lens, 0)
            s = maxsim_packed(q[a:a + 1].to(self.tokens.dtype), self.tokens[trows], off, q_mask[a:a + 1],
                              backend=backend).float()
            si, ii = merge_topk(s, ix.doc_ids[docs][None], k)
            out_s.append(si)
            out_i.append(ii)
        timer.stop("rerank")
        return torch.cat(out_s), torch.cat(out_i)
