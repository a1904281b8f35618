"""Launcher contracts: one small typed interface per op, implemented once per backend.

Each backend module defines an implementation object (``LAUNCHER``) and ``reatt_kernels/ops/<op>.py`` imports it and
registers it with :func:`reatt_kernels._dispatch.register_impl`, so "go to definition" leads from an op to every
backend's kernel through imports alone::

    ops/maxsim.py --import--> cpu/maxsim.py: LAUNCHER = CpuMaxsim() --> _maxsim_fwd --> _C.maxsim_fwd_cpu
                  --import--> triton/__init__.py: TritonMaxsim (imports triton/maxsim.py on first call)

Importing a launcher never imports triton or touches CUDA: the Triton launchers live in ``reatt_kernels/triton/
__init__.py`` and import their kernel modules inside their methods; the CUDA launchers load the compiled module on
first call.

Tensor layouts are the canonical ones of the op's spec (``reatt_kernels/reference/<op>.py``); the op has already
validated and normalised them. ``not_supported_reasons(tensors, **facts)`` sees :class:`reatt_kernels._dispatch.
TensorSpec` values and op-specific facts (``dim``, ``layout``, ``n_docs``, ...), and returns why this backend cannot
run them (empty: it can). It is asked only after the backend's device/dtype/environment checks passed.
"""
from __future__ import annotations

import abc
from typing import Optional, Sequence

from torch import Tensor


class Launcher(abc.ABC):
    """What every backend launcher answers, whatever its op."""

    def not_supported_reasons(self, tensors: Sequence, **facts) -> list[str]:
        return []


class MaxsimLauncher(Launcher):
    """``reatt::maxsim_fwd`` / ``maxsim_bwd``: q [Bq, Lq, D], d padded [Nd, Ld, D] (+ ``d_mask``) or packed [T, D] (+
    int64 ``d_offsets`` [Nd + 1]); grouped = padded with ``group_size`` documents per query; ``q_mask`` bool [Bq, Lq]."""

    @abc.abstractmethod
    def forward(self, q: Tensor, d: Tensor, q_mask: Tensor, d_mask: Optional[Tensor], d_offsets: Optional[Tensor],
                pos_bias: Optional[Tensor], group_size: int, mean: bool,
                screen: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
        """-> scores fp32 [Bq, C], argmax int32 [Bq, C, Lq] (C = Nd, or group_size). ``screen``: None, or the
        (d_screen bf16 [T, dim rounded up to 32], d_norm fp32 [Nd]) of a corpus prepared once for the packed d
        (ops/maxsim.py: prepare_corpus); a backend may read them instead of preparing d itself (the cpu kernel does)."""

    @abc.abstractmethod
    def backward(self, grad: Tensor, q: Tensor, d: Tensor, q_mask: Tensor, d_offsets: Optional[Tensor],
                 argmax: Tensor, n_bias: int, group_size: int, mean: bool,
                 deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
        """-> dq (q's shape and dtype), dd (d's shape and dtype), dbias fp32 [n_bias]."""


class ReaderTeacherLauncher(Launcher):
    """``reatt::reader_teacher``: attn [B, L, H, T, S] (any strides), doc_index int [B, S], attn_mask bool [B, S]."""

    @abc.abstractmethod
    def forward(self, attn: Tensor, doc_index: Tensor, attn_mask: Optional[Tensor], n_docs: int,
                is_logits: bool) -> Tensor:
        """-> p_T fp32 [B, n_docs]."""


class DistillKlLauncher(Launcher):
    """``reatt::distill_kl_fwd``: student [B, M]; the teacher dense [B, M], or sparse (probs, cols) [B, n]."""

    @abc.abstractmethod
    def forward(self, student: Tensor, teacher: Optional[Tensor], teacher_probs: Optional[Tensor],
                teacher_cols: Optional[Tensor], normalize: bool, grad_scale: float,
                compute_grad: bool) -> tuple[Tensor, Tensor]:
        """-> loss_rows fp32 [B], grad [B, M] in the student's dtype times grad_scale ([0, M] if not compute_grad)."""


class ResidualMaxsimLauncher(Launcher):
    """``reatt::residual_maxsim``: q fp32 [Bq, Lq, D], q_mask bool [Bq, Lq], centroids fp32 [C, D], weights fp32
    [D, 2^nbits], codes int32 [T], packed uint8 [T, D * nbits // 8], d_offsets int64 [Nd + 1], cand int64 [Bq, Nc]."""

    @abc.abstractmethod
    def forward(self, q: Tensor, q_mask: Tensor, centroids: Tensor, weights: Tensor, codes: Tensor, packed: Tensor,
                d_offsets: Tensor, cand: Tensor, nbits: int, centroid_scores: Optional[Tensor] = None) -> Tensor:
        """-> scores fp32 [Bq, Nc] (-inf for padding candidates and empty documents). ``centroid_scores``: None or the
        table of ops/centroid_interaction.centroid_score_table for these q and centroids (a backend may read it instead
        of the centroids; the cpu kernel does)."""


class CentroidInteractionLauncher(Launcher):
    """``reatt::centroid_interaction``: table fp32 [Bq, C, LP], q_mask bool [Bq, Lq] (Lq <= LP), codes int32 [T],
    d_offsets int64 [Nd + 1], cand int64 [Bq, Nc] or None (every document)."""

    @abc.abstractmethod
    def forward(self, table: Tensor, q_mask: Tensor, codes: Tensor, d_offsets: Tensor,
                cand: Optional[Tensor]) -> Tensor:
        """-> scores fp32 [Bq, Nc] (-inf for padding candidates and empty documents, 0 without a valid token)."""


class PlaidSearchLauncher(Launcher):
    """``reatt::plaid_search``: table fp32 [Bq, C, LP], q fp32 [Bq, LP, D] (valid tokens first), n_valid int32 [Bq],
    weights fp32 [D, 2^nbits], codes int32 or uint16 [T], packed uint8 [T, D * nbits // 8], d_offsets int64 [Nd + 1],
    live bool [Nd] or None, allow bool [Bq, Nd] or None, cand int64 [Bq, Nc] or None."""

    @abc.abstractmethod
    def forward(self, table: Tensor, q: Tensor, n_valid: Tensor, weights: Tensor, codes: Tensor, packed: Tensor,
                d_offsets: Tensor, nbits: int, k: int, ncand: int, live: Optional[Tensor], allow: Optional[Tensor],
                cand: Optional[Tensor], stage_s: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """-> scores fp32 [Bq, k], document rows int64 [Bq, k] ((-inf, -1) past the kept documents). ``stage_s``:
        None, or fp64 [3] a backend may fill with the seconds of its stages (interaction, selection, rerank + top-k)."""
