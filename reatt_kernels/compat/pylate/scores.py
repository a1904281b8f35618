r"""PyLate's ColBERT scoring functions, with PyLate 1.6.0's signatures, on reatt-kernels' fused MaxSim.

PyLate's semantics (``pylate/scores/colbert.py``, 1.6.0), for query ``a`` and document ``b``::

    s[a, b, i, j] = (q[a, i] . d[b, j]) * q_mask[a, i] * d_mask[b, j]          (einsum, then the float masks)
    score(a, b)   = sum_i max_j s[a, b, i, j]                                   (over *every* i and j)

So a masked document token is not skipped: it scores 0 and takes part in the max (a document whose valid tokens all
score below 0 gets 0 from its masked ones), and a document with every token masked scores 0. A masked query token's
row is all zeros, so it adds 0. reatt-kernels' own semantics ("skip", :func:`reatt_kernels.maxsim`) skip masked tokens:
a masked document token never wins the max, and an all-masked document scores -inf.

``mask_semantics="pylate"`` (the default) reproduces PyLate's: 0/1 document masks zero the masked rows
(``d.masked_fill(~mask, 0)``: the dot product with a zero row is exactly 0, and no gradient reaches those rows, as in
PyLate where the gradient of ``s * 0`` is 0) and the kernel runs without a document mask; a 0/1 query mask is passed
to the kernel (a masked query token adds 0 either way, and gets no gradient). Masks with other values (weights) are
multiplied into the embeddings, which is PyLate's product ``(q . d) * w_q * w_d`` up to rounding.
``mask_semantics="skip"`` gives the kernel the masks (nonzero = keep).

Where we differ from PyLate, on purpose (docs/pylate.md):
- Scores are float32 for float32, float16 and bfloat16 inputs (accumulated in fp32; PyLate returns the inputs' dtype)
  and float64 for float64 inputs (the ``torch`` backend).
- Ragged inputs (a list of [L_i, dim] tensors or arrays of different lengths) are accepted everywhere: each is scored
  over its own tokens (the padding we add is skipped, whatever ``mask_semantics``). PyLate's ``colbert_scores`` and
  ``colbert_kd_scores`` cannot stack them; its ``colbert_scores_pairwise`` loops over pairs, with the same result.
- Non-finite values in masked tokens never reach a score (PyLate's ``0 * inf`` gives NaN).
- Mismatched pair counts in ``colbert_scores_pairwise`` raise (PyLate's ``zip`` drops the extra ones).
- A document with no tokens at all (``L = 0``) scores -inf (PyLate's ``max`` over an empty axis raises).

``backend``: PyLate's names ``"auto"`` (default; ``PYLATE_SCORES_BACKEND`` is read when ``backend`` is None, then
``REATT_BACKEND``) and ``"torch"`` run our kernels (``torch`` = our reference backend), and ours (``"cpu"``,
``"triton"``, ``"cuda"``, ``"cuda_emu"``) name one; ``"flash"`` and ``"lik"`` (PyLate's optional GPU packages) are
handed to PyLate's own, unpatched function.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ...ops.maxsim import maxsim, maxsim_grouped

MASK_SEMANTICS = ("pylate", "skip")
OUR_BACKENDS = ("auto", "torch", "cpu", "triton", "cuda", "cuda_emu")
PYLATE_BACKENDS = ("flash", "lik")  # handed to PyLate's own (unpatched) scoring function


# ---- arguments -----------------------------------------------------------------------------------------------------
def resolve_backend(backend) -> str:
    """``backend`` (None reads ``PYLATE_SCORES_BACKEND``, as PyLate does on every call) -> a lower-case name."""
    if backend is None:
        backend = os.environ.get("PYLATE_SCORES_BACKEND", "auto")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    name = backend.lower()
    if name not in OUR_BACKENDS + PYLATE_BACKENDS:
        raise ValueError(f"backend must be one of {OUR_BACKENDS + PYLATE_BACKENDS} (or None), got {backend!r}")
    return name


def _check_semantics(mask_semantics) -> None:
    if mask_semantics not in MASK_SEMANTICS:
        raise ValueError(f"mask_semantics must be 'pylate' (a masked token scores 0, PyLate's behaviour) or 'skip' "
                         f"(a masked token is ignored), got {mask_semantics!r}")


def _item(x, name: str, where: str) -> Tensor:
    """One element of a list input -> a tensor (PyLate's convert_to_tensor: numpy arrays in a list become float32)."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.asarray(x, dtype=np.float32) if x.dtype.kind in "fiub" else x)
    if isinstance(x, (list, tuple)):
        try:
            return torch.tensor(x, dtype=torch.float32)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name}{where} must be a tensor, a numpy array or a (nested) list of numbers: {exc}") \
                from exc
    raise TypeError(f"{name}{where} must be a tensor, a numpy array or a list, got {type(x).__name__}")


def as_tensor(x, name: str, ndim: int, shape_desc: str, *, is_mask: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """PyLate's input forms -> (tensor with ``ndim`` axes, real-token mask or None).

    Accepts a tensor, a numpy array (an object array is read as a list) or a list of tensors, arrays or nested lists,
    one per leading entry. Elements of different lengths along the token axis (the second to last for embeddings, the
    last for masks) are padded with zeros, and the returned bool mask (shape = the result's shape without its last
    axis for embeddings, the result's shape for masks) marks the real tokens; it is None when nothing was padded.
    """
    if isinstance(x, np.ndarray) and x.dtype == object:
        x = list(x)
    if isinstance(x, Tensor):
        t, real = x, None
    elif isinstance(x, np.ndarray):
        t, real = torch.from_numpy(x), None
    elif isinstance(x, (list, tuple)):
        if len(x) == 0:
            raise ValueError(f"{name} is empty: expected {shape_desc}")
        items = [_item(v, name, f"[{i}]") for i, v in enumerate(x)]
        shapes = {tuple(v.shape) for v in items}
        if len(shapes) == 1:
            t, real = torch.stack(items), None
        else:
            tok_axis = -1 if is_mask else -2
            rest = {v.shape[:tok_axis] + (v.shape[tok_axis + 1:] if tok_axis == -2 else ()) for v in items
                    if v.dim() == ndim - 1}
            if any(v.dim() != ndim - 1 for v in items) or len(rest) != 1:
                raise ValueError(f"{name}: the elements must have the same number of axes ({ndim - 1}) and differ "
                                 f"only in length along the token axis, got shapes {sorted(shapes)}")
            lmax = max(v.shape[tok_axis] for v in items)
            dt = items[0].dtype
            for v in items[1:]:
                dt = torch.promote_types(dt, v.dtype)
            padded, masks = [], []
            for v in items:
                n = v.shape[tok_axis]
                pad = (0, lmax - n) if is_mask else (0, 0, 0, lmax - n)
                padded.append(torch.nn.functional.pad(v.to(dt), pad))
                m = torch.zeros(v.shape[:tok_axis] + (lmax,), dtype=torch.bool, device=v.device)
                m[..., :n] = True
                masks.append(m)
            t, real = torch.stack(padded), torch.stack(masks)
    else:
        raise TypeError(f"{name} must be a torch.Tensor, a numpy array or a list {shape_desc}, got {type(x).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {shape_desc}, got shape {tuple(t.shape)}")
    if not is_mask and not t.is_floating_point():
        raise TypeError(f"{name} must hold floating-point embeddings (float32, float16, bfloat16 or float64), got "
                        f"{t.dtype}")
    return t, real


def _mask(m, name: str, shape: tuple, device: torch.device) -> Optional[Tensor]:
    """A PyLate mask (bool, int or float; tensor, array or list) -> a tensor of ``shape`` on ``device``, or None."""
    if m is None:
        return None
    t, _ = as_tensor(m, name, len(shape), f"of shape {tuple(shape)}", is_mask=True)
    if t.is_complex():
        raise TypeError(f"{name} must be bool, int or float, got {t.dtype}")
    try:
        t = torch.broadcast_to(t.to(device), shape)
    except RuntimeError as exc:
        raise ValueError(f"{name} must have shape {tuple(shape)} (one entry per token), got {tuple(t.shape)}") from exc
    return t


def _binary(m: Tensor) -> Optional[Tensor]:
    """The mask as bool when every entry is 0 or 1 (one device sync for non-bool masks), else None (weights)."""
    if m.dtype == torch.bool:
        return m
    if bool(((m == 0) | (m == 1)).all()):
        return m != 0
    return None


def _and(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    if a is None:
        return b
    if b is None:
        return a
    return a & b


def _weighted(x: Tensor, w: Tensor) -> Tensor:
    """x * w per token, in fp32 at least (a weighted fp16/bf16 token would otherwise be rounded to 8 or 11 bits)."""
    dt = torch.promote_types(x.dtype, torch.float32)
    return x.to(dt) * w.unsqueeze(-1).to(dt)


def _queries(q: Tensor, qm: Optional[Tensor], real: Optional[Tensor], semantics: str):
    """(queries for the kernel, the kernel's bool q_mask or None)."""
    if qm is None:
        return q, real
    keep = (qm != 0) if semantics == "skip" else _binary(qm)
    if keep is not None:  # a masked query token adds 0 and gets no gradient, skipped or zeroed alike
        return q, _and(keep, real)
    return _weighted(q, qm), real  # weights: PyLate's product, inside the max


def _documents(d: Tensor, dm: Optional[Tensor], real: Optional[Tensor], semantics: str):
    """(documents for the kernel, the kernel's bool d_mask or None)."""
    if dm is None:
        return d, real
    if semantics == "skip":
        return d, _and(dm != 0, real)
    keep = _binary(dm)
    if keep is None:
        return _weighted(d, dm), real
    if bool(keep.all()):
        return d, real
    # PyLate: a masked token scores exactly 0 and competes in the max. A zero row gives exactly that, and
    # masked_fill passes no gradient to it (nor lets a NaN or inf in a masked row reach a score).
    return d.masked_fill(~keep.unsqueeze(-1), 0), real


def _common(q: Tensor, d: Tensor, dname: str = "documents_embeddings") -> tuple[Tensor, Tensor]:
    if q.device != d.device:
        raise ValueError(f"queries_embeddings is on {q.device} but {dname} is on {d.device}")
    if q.shape[-1] != d.shape[-1]:
        raise ValueError(f"queries_embeddings and {dname} must have the same embedding size (last axis), got "
                         f"{q.shape[-1]} and {d.shape[-1]}")
    if q.dtype != d.dtype:
        dt = torch.promote_types(q.dtype, d.dtype)
        q, d = q.to(dt), d.to(dt)
    return q, d


def _prepare(q, q_real, d, d_real, queries_mask, documents_mask, semantics: str):
    """Embeddings and PyLate masks -> (q, kernel q_mask, d, kernel d_mask) for maxsim / maxsim_grouped. ``d`` may be
    [N, L, dim] or [B, n, L, dim]; its mask has its shape without the last axis."""
    _check_semantics(semantics)
    q, d = _common(q, d)
    qm = _mask(queries_mask, "queries_mask", tuple(q.shape[:2]), q.device)
    dm = _mask(documents_mask, "documents_mask", tuple(d.shape[:-1]), d.device)
    q, qk = _queries(q, qm, q_real, semantics)
    d, dk = _documents(d, dm, d_real, semantics)
    if q.dtype != d.dtype:  # one side was weighted in fp32
        dt = torch.promote_types(q.dtype, d.dtype)
        q, d = q.to(dt), d.to(dt)
    return q, qk, d, dk


def _pylate_original(name: str):
    """PyLate's own function (for backend "flash" / "lik"), the unpatched one even while :func:`patch` is active."""
    from . import patching

    return patching.original(name)


# ---- the functions -------------------------------------------------------------------------------------------------
def colbert_scores(
    queries_embeddings: list | np.ndarray | torch.Tensor,
    documents_embeddings: list | np.ndarray | torch.Tensor,
    queries_mask: torch.Tensor | None = None,
    documents_mask: torch.Tensor | None = None,
    backend: str | None = None,
    *,
    mask_semantics: str = "pylate",
) -> torch.Tensor:
    """ColBERT scores of every query against every document: PyLate's ``colbert_scores`` on our MaxSim kernels.

    Args:
        queries_embeddings: [n_queries, n_query_tokens, dim]: a tensor, a numpy array, or a list of [L_i, dim]
            tensors/arrays/lists (ragged lengths allowed: each query is scored over its own tokens).
        documents_embeddings: [n_documents, n_document_tokens, dim], same forms.
        queries_mask: [n_queries, n_query_tokens], bool / 0-1 int / float (PyLate multiplies by it), or None.
        documents_mask: [n_documents, n_document_tokens], same forms, or None.
        backend: None / "auto" / "torch" / "cpu" / "triton" / "cuda" / "cuda_emu" (ours), "flash" / "lik" (PyLate's).
        mask_semantics: "pylate" (default: a masked token scores 0 and takes part in the max) or "skip" (ours: a
            masked token is ignored; an all-masked document scores -inf). See the module docstring.
    Returns:
        float32 scores [n_queries, n_documents] (float64 for float64 inputs), differentiable w.r.t. both embeddings.

    Examples:
        >>> import torch
        >>> q = torch.tensor([[[1.], [0.], [0.], [0.]], [[0.], [2.], [0.], [0.]], [[0.], [0.], [3.], [0.]]])
        >>> d = torch.tensor([[[10.], [0.], [1.]], [[0.], [100.], [10.]], [[1.], [0.], [1000.]]])
        >>> dm = torch.tensor([[1., 1., 1.], [1., 0., 1.], [1., 1., 1.]])
        >>> qm = torch.tensor([[1., 1., 1., 1.], [1., 1., 1., 1.], [1., 1., 0., 1.]])
        >>> colbert_scores(q, d, qm, dm)
        tensor([[  10.,   10., 1000.],
                [  20.,   20., 2000.],
                [   0.,    0.,    0.]])
    """
    name = resolve_backend(backend)
    if name in PYLATE_BACKENDS:
        return _pylate_original("colbert_scores")(queries_embeddings, documents_embeddings, queries_mask,
                                                  documents_mask, backend=name)
    q, q_real = as_tensor(queries_embeddings, "queries_embeddings", 3, "[n_queries, n_query_tokens, dim]")
    d, d_real = as_tensor(documents_embeddings, "documents_embeddings", 3, "[n_documents, n_document_tokens, dim]")
    q, qk, d, dk = _prepare(q, q_real, d, d_real, queries_mask, documents_mask, mask_semantics)
    return maxsim(q, d, qk, dk, backend=name)


def colbert_scores_pairwise(
    queries_embeddings: torch.Tensor,
    documents_embeddings: torch.Tensor,
    backend: str | None = None,
) -> torch.Tensor:
    """ColBERT score of each query with its own document (pair i = query i, document i): PyLate's
    ``colbert_scores_pairwise``, one grouped MaxSim call instead of a Python loop of einsums.

    Args:
        queries_embeddings: [n_pairs, n_query_tokens, dim], or a list of [L_i, dim] tensors/arrays (ragged allowed).
        documents_embeddings: [n_pairs, n_document_tokens, dim], or a list of [L_i, dim] (ragged allowed).
        backend: as in :func:`colbert_scores`.
    Returns:
        float32 scores [n_pairs] (float64 for float64 inputs), differentiable.

    Examples:
        >>> import torch
        >>> q = torch.tensor([[[1.], [0.], [0.], [0.]], [[0.], [2.], [0.], [0.]], [[0.], [0.], [3.], [0.]]])
        >>> d = torch.tensor([[[10.], [0.], [1.]], [[0.], [100.], [1.]], [[1.], [0.], [1000.]]])
        >>> colbert_scores_pairwise(q, d)
        tensor([  10.,  200., 3000.])
    """
    name = resolve_backend(backend)
    if name in PYLATE_BACKENDS:
        return _pylate_original("colbert_scores_pairwise")(queries_embeddings, documents_embeddings, backend=name)
    q, q_real = as_tensor(queries_embeddings, "queries_embeddings", 3, "[n_pairs, n_query_tokens, dim]")
    d, d_real = as_tensor(documents_embeddings, "documents_embeddings", 3, "[n_pairs, n_document_tokens, dim]")
    if q.shape[0] != d.shape[0]:
        raise ValueError(f"colbert_scores_pairwise scores pairs: queries_embeddings has {q.shape[0]} and "
                         f"documents_embeddings {d.shape[0]}")
    q, d = _common(q, d)
    dk = d_real[:, None] if d_real is not None else None
    return maxsim_grouped(q, d[:, None], q_real, dk, backend=name)[:, 0]


def colbert_kd_scores(
    queries_embeddings: list | np.ndarray | torch.Tensor,
    documents_embeddings: list | np.ndarray | torch.Tensor,
    queries_mask: torch.Tensor = None,
    documents_mask: torch.Tensor = None,
    backend: str | None = None,
    *,
    mask_semantics: str = "pylate",
) -> torch.Tensor:
    """ColBERT scores of each query against its own candidates (knowledge distillation): PyLate's
    ``colbert_kd_scores`` through :func:`reatt_kernels.maxsim_grouped`.

    Args:
        queries_embeddings: [batch, n_query_tokens, dim] (tensor, numpy array or list, ragged allowed).
        documents_embeddings: [batch, n_candidates, n_document_tokens, dim] (or a list of [n_candidates, L_i, dim]).
        queries_mask: [batch, n_query_tokens] or None. documents_mask: [batch, n_candidates, n_document_tokens] or
            None (bool, 0/1 int or float).
        backend, mask_semantics: as in :func:`colbert_scores`.
    Returns:
        float32 scores [batch, n_candidates] (float64 for float64 inputs), differentiable.

    Examples:
        >>> import torch
        >>> q = torch.tensor([[[1.], [0.], [0.], [0.]], [[0.], [2.], [0.], [0.]], [[0.], [0.], [3.], [0.]]])
        >>> d = torch.tensor([
        ...     [[[10.], [0.], [1.]], [[20.], [0.], [1.]], [[30.], [0.], [1.]]],
        ...     [[[0.], [100.], [1.]], [[0.], [200.], [1.]], [[0.], [300.], [1.]]],
        ...     [[[1.], [0.], [1000.]], [[1.], [0.], [2000.]], [[10.], [0.], [3000.]]]])
        >>> dm = torch.tensor([[[0., 1., 1.], [1., 1., 1.], [1., 1., 1.]],
        ...                    [[1., 1., 1.], [1., 1., 1.], [1., 1., 1.]],
        ...                    [[1., 1., 1.], [1., 1., 1.], [1., 1., 1.]]])
        >>> qm = torch.tensor([[1., 1., 1., 1.], [1., 1., 1., 1.], [1., 1., 0., 1.]])
        >>> colbert_kd_scores(q, d, qm, dm)
        tensor([[  1.,  20.,  30.],
                [200., 400., 600.],
                [  0.,   0.,   0.]])
    """
    name = resolve_backend(backend)
    if name in PYLATE_BACKENDS:
        return _pylate_original("colbert_kd_scores")(queries_embeddings, documents_embeddings, queries_mask,
                                                     documents_mask, backend=name)
    q, q_real = as_tensor(queries_embeddings, "queries_embeddings", 3, "[batch, n_query_tokens, dim]")
    d, d_real = as_tensor(documents_embeddings, "documents_embeddings", 4,
                          "[batch, n_candidates, n_document_tokens, dim]")
    if d.shape[0] != q.shape[0]:
        raise ValueError(f"documents_embeddings must be [batch, n_candidates, n_document_tokens, dim] with batch = "
                         f"queries_embeddings.shape[0] = {q.shape[0]}, got {tuple(d.shape)}")
    q, qk, d, dk = _prepare(q, q_real, d, d_real, queries_mask, documents_mask, mask_semantics)
    return maxsim_grouped(q, d, qk, dk, backend=name)


class ColBERTScores:
    """PyLate's contrastive scorer: queries [Q, Qt, H] against stacked document groups [D, N, Dt, H] -> [Q, D * N],
    query-major (``scores[i, j * N + k]`` = query i against slot k of group j). One MaxSim call over the D * N
    documents (PyLate 1.6.0 loops over the N slots).

    Args:
        mask_semantics: as in :func:`colbert_scores` (default "pylate").
    """

    def __init__(self, mask_semantics: str = "pylate") -> None:
        _check_semantics(mask_semantics)
        self.mask_semantics = mask_semantics

    def __call__(self, queries_embeddings, documents_embeddings, queries_mask=None, documents_mask=None,
                 backend=None) -> torch.Tensor:
        return grouped_documents_scores(queries_embeddings, documents_embeddings, queries_mask, documents_mask,
                                        backend, mask_semantics=self.mask_semantics)


def grouped_documents_scores(queries_embeddings, documents_embeddings, queries_mask=None, documents_mask=None,
                             backend=None, *, mask_semantics: str = "pylate") -> torch.Tensor:
    """``ColBERTScores.__call__``'s body: documents [D, N, Dt, H] (mask [D, N, Dt]) scored as D * N documents, so
    column ``j * N + k`` is slot k of group j (query-major)."""
    name = resolve_backend(backend)
    if name in PYLATE_BACKENDS:  # PyLate's own ColBERTScores loop, on PyLate's own colbert_scores
        d = documents_embeddings
        return torch.stack([_pylate_original("colbert_scores")(
            queries_embeddings, d[:, j], queries_mask, documents_mask[:, j] if documents_mask is not None else None,
            backend=name) for j in range(d.shape[1])], dim=2).reshape(-1, d.shape[0] * d.shape[1])
    q, q_real = as_tensor(queries_embeddings, "queries_embeddings", 3, "[n_queries, n_query_tokens, dim]")
    d, d_real = as_tensor(documents_embeddings, "documents_embeddings", 4, "[n_groups, n_per_group, n_tokens, dim]")
    q, qk, d, dk = _prepare(q, q_real, d, d_real, queries_mask, documents_mask, mask_semantics)
    D, N, Dt, H = d.shape
    return maxsim(q, d.reshape(D * N, Dt, H), qk, dk.reshape(D * N, Dt) if dk is not None else None, backend=name)
