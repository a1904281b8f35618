"""Custom op ``reatt::residual_maxsim`` (forward only): fused decompress + MaxSim over candidate documents.

Every backend registered below is a :class:`reatt_kernels._launcher.ResidualMaxsimLauncher`::

    forward(q, q_mask, centroids, weights, codes, packed, d_offsets, cand, nbits) -> scores fp32 [Bq, Nc]
    not_supported_reasons(tensors, **facts) -> list[str]

with q fp32 contiguous [Bq, Lq, D], q_mask bool [Bq, Lq], centroids fp32 [C, D], weights fp32 [D, 2^nbits], codes
int32 [T], packed uint8 [T, D * nbits // 8], d_offsets int64 [Nd + 1], cand int64 [Bq, Nc] (-1 = padding), all
contiguous and on one device; centroid_scores is None or the table of
:func:`reatt_kernels.ops.centroid_interaction.centroid_score_table` (fp32 [Bq, C, LP]), which a backend may read in
place of the centroids (the cpu kernel does). Semantics: :mod:`reatt_kernels.reference.residual_maxsim`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import triton as triton_launchers
from .._dispatch import get_impl, register_auto_order, register_impl, select
from .._utils import device_guard
from ..cpu import residual_maxsim as cpu_residual_maxsim
from ..cuda import residual_maxsim as cuda_residual_maxsim
from ..cuda_emu import residual_maxsim as cuda_emu_residual_maxsim
from ..reference import residual_maxsim as reference_residual_maxsim
from ..reference.residual_maxsim import check_nbits
from .centroid_interaction import check_score_table
from .maxsim import check_offsets

OP = "residual_maxsim"
register_impl(OP, "torch", reference_residual_maxsim.RESIDUAL_MAXSIM)
register_impl(OP, "cpu", cpu_residual_maxsim.RESIDUAL_MAXSIM)
register_impl(OP, "triton", triton_launchers.RESIDUAL_MAXSIM)  # imports triton/residual_maxsim.py on first call
register_impl(OP, "cuda", cuda_residual_maxsim.RESIDUAL_MAXSIM)
register_impl(OP, "cuda_emu", cuda_emu_residual_maxsim.RESIDUAL_MAXSIM)  # the CUDA kernel under CPU emulation (tests)
# On a GPU, "auto" prefers Triton: its kernel is the one verified against the reference (under the interpreter, and
# by the gpu-marked tests); the CUDA kernel is selectable by name and runs in the same tests when a GPU is present.
register_auto_order(OP, lambda dev, **kw: ["triton", "cuda", "torch"] if dev == "cuda" else ["cpu", "torch"])


@torch.library.custom_op("reatt::residual_maxsim", mutates_args=())
def residual_maxsim_op(q: Tensor, q_mask: Tensor, centroids: Tensor, weights: Tensor, codes: Tensor, packed: Tensor,
                       d_offsets: Tensor, cand: Tensor, nbits: int, backend: str,
                       centroid_scores: Optional[Tensor] = None) -> Tensor:
    """Scores fp32 [Bq, Nc]."""
    Bq, Nc = cand.shape
    if Bq == 0 or Nc == 0:
        return torch.empty((Bq, Nc), dtype=torch.float32, device=q.device)
    with device_guard(q):
        return get_impl(OP, backend).forward(q, q_mask, centroids, weights, codes, packed, d_offsets, cand, nbits,
                                             centroid_scores)


@residual_maxsim_op.register_fake
def _residual_maxsim_fake(q, q_mask, centroids, weights, codes, packed, d_offsets, cand, nbits, backend,
                          centroid_scores=None):
    return q.new_empty(cand.shape, dtype=torch.float32)


def residual_maxsim(q: Tensor, centroids: Tensor, weights: Tensor, codes: Tensor, packed: Tensor, d_offsets: Tensor,
                    cand: Tensor, nbits: int, q_mask: Optional[Tensor] = None, *, backend: str = "auto",
                    centroid_scores: Optional[Tensor] = None) -> Tensor:
    """Fused decompress + MaxSim: score each query against its own candidate documents, straight from the codes.

    Args:
        q: [Bq, Lq, D] float (computed in fp32). q_mask: bool [Bq, Lq] or None.
        centroids: float [C, D]. weights: float [D, 2^nbits] (bucket values per dimension).
        codes: int32 (or uint16) [T] centroid id per token. packed: uint8 [T, D * nbits // 8] bit-packed residual buckets.
        d_offsets: int64 [Nd + 1]. cand: int64 [Bq, Nc] document ids per query, -1 for padding.
        nbits: 1, 2, 4 or 8.
        centroid_scores: optional fp32 [Bq, C, LP] table ``q . centroids^T`` from
            :func:`~reatt_kernels.ops.centroid_interaction.centroid_score_table` for these q, q_mask and centroids.
            The cpu kernel then reads each token's centroid part from it instead of decompressing the centroid (the
            index passes the table it built for candidate generation); other backends ignore it.
        backend: "auto", "torch", "cpu", "triton", "cuda", or "cuda_emu" (the CUDA kernel
            on CPU tensors under emulation: a test tool, never chosen by "auto").
    Returns:
        fp32 scores [Bq, Nc]; -inf for padding and for empty documents, 0 for a query with no valid token.
    """
    for name, t in (("q", q), ("centroids", centroids), ("weights", weights), ("codes", codes), ("packed", packed),
                    ("d_offsets", d_offsets), ("cand", cand)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if q.dim() != 3 or not q.is_floating_point():
        raise ValueError(f"q must be a float [Bq, Lq, D] tensor, got {q.dtype} {tuple(q.shape)}")
    D = q.shape[2]
    check_nbits(nbits, D)
    if centroids.dim() != 2 or centroids.shape[1] != D:
        raise ValueError(f"centroids must be [C, {D}] (q's dim), got {tuple(centroids.shape)}")
    if tuple(weights.shape) != (D, 1 << nbits):
        raise ValueError(f"weights must be [{D}, {1 << nbits}], got {tuple(weights.shape)}")
    if codes.dim() != 1 or codes.dtype not in (torch.int32, torch.uint16):
        raise TypeError(f"codes must be int32 or uint16 [T], got {codes.dtype} {tuple(codes.shape)}")
    if codes.dtype == torch.uint16:  # a CPU index's compact codes: the kernels read int32
        codes = codes.to(torch.int32)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (codes.shape[0], D * nbits // 8):
        raise ValueError(f"packed must be uint8 [{codes.shape[0]}, {D * nbits // 8}], got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    if d_offsets.dtype != torch.int64 or d_offsets.dim() != 1 or d_offsets.shape[0] < 1:
        raise ValueError(f"d_offsets must be int64 [Nd + 1], got {d_offsets.dtype} {tuple(d_offsets.shape)}")
    if cand.dtype != torch.int64 or cand.dim() != 2 or cand.shape[0] != q.shape[0]:
        raise ValueError(f"cand must be int64 [{q.shape[0]}, Nc], got {cand.dtype} {tuple(cand.shape)}")
    check_offsets(d_offsets, codes.shape[0], q)
    if not torch.compiler.is_compiling():
        # Kernels index centroids by code and documents by candidate id without bounds checks of their own: an
        # out-of-range value must fail here, with the argument named, not read past a buffer. One sync for both.
        n_docs, n_cent = d_offsets.shape[0] - 1, centroids.shape[0]
        zero = torch.zeros((), dtype=torch.int64, device=q.device)
        c_lo, c_hi = (cand.min(), cand.max()) if cand.numel() else (zero, zero)
        k_lo, k_hi = (codes.min().long(), codes.max().long()) if codes.numel() else (zero, zero)
        _, c_hi, k_lo, k_hi = torch.stack([c_lo, c_hi, k_lo, k_hi]).tolist()
        if c_hi >= n_docs:
            raise ValueError(f"cand must hold document ids in [0, {n_docs}) (negative = padding), got max {c_hi}")
        if k_lo < 0 or k_hi >= n_cent:
            raise ValueError(f"codes must hold centroid ids in [0, {n_cent}), got [{k_lo}, {k_hi}]")
    if q_mask is None:
        q_mask = torch.ones(q.shape[:2], dtype=torch.bool, device=q.device)
    elif q_mask.dtype != torch.bool or tuple(q_mask.shape) != tuple(q.shape[:2]):
        raise ValueError(f"q_mask must be bool {tuple(q.shape[:2])}, got {q_mask.dtype} {tuple(q_mask.shape)}")
    args = (q.float().contiguous(), q_mask.contiguous(), centroids.float().contiguous(), weights.float().contiguous(),
            codes.contiguous(), packed.contiguous(), d_offsets.contiguous(), cand.contiguous())
    if centroid_scores is not None:
        check_score_table(centroid_scores, q, centroids.shape[0])
    name = select(OP, list(args), backend, dim=D, nbits=nbits)
    return torch.ops.reatt.residual_maxsim(*args, nbits, name, centroid_scores)
