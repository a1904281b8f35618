"""Attention-distillation custom ops ``reatt::reader_teacher`` / ``reatt::distill_kl_fwd``, autograd, functional API.

Every backend registered below is a :class:`reatt_kernels._launcher.ReaderTeacherLauncher` or
:class:`~reatt_kernels._launcher.DistillKlLauncher`::

    ReaderTeacherLauncher.forward(attn, doc_index, attn_mask, n_docs, is_logits) -> p_T fp32 [B, n_docs]
        attn [B, L, H, T, S] (any strides; layers/steps already selected), doc_index int32/int64 [B, S],
        attn_mask bool [B, S] or None.
    DistillKlLauncher.forward(student, teacher, teacher_probs, teacher_cols, normalize, grad_scale, compute_grad)
        -> (loss_rows fp32 [B], grad [B, M] in student's dtype, already times grad_scale; [0, M] if not compute_grad)
    not_supported_reasons(tensors, **facts) -> list[str]

The KL's gradient is computed in the forward (as Liger-Kernel's loss kernels do) and saved; the backward only scales it
by the upstream gradient, and returns it untouched when that gradient is exactly 1 (the usual ``loss.backward()``).
"""
from __future__ import annotations

from numbers import Real
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .. import triton as triton_launchers
from .._dispatch import get_impl, register_impl, select
from .._utils import device_guard
from ..cpu import distill as cpu_distill
from ..cuda import distill as cuda_distill
from ..cuda_emu import distill as cuda_emu_distill
from ..reference import distill as reference_distill
from ..reference.distill import reduce_rows
from .maxsim import maxsim, maxsim_packed

register_impl("reader_teacher", "torch", reference_distill.READER_TEACHER)
register_impl("reader_teacher", "cpu", cpu_distill.READER_TEACHER)  # C++, one pass over the attention
register_impl("reader_teacher", "triton", triton_launchers.READER_TEACHER)  # imports triton/distill.py on first call
register_impl("reader_teacher", "cuda", cuda_distill.READER_TEACHER)
register_impl("reader_teacher", "cuda_emu", cuda_emu_distill.READER_TEACHER)  # the CUDA kernels under CPU emulation
register_impl("distill_kl", "torch", reference_distill.DISTILL_KL)
# cpu: the reference (its [B, M] rows are small next to the teacher's input; torch's log_softmax is memory-bound already)
register_impl("distill_kl", "cpu", reference_distill.DISTILL_KL)
register_impl("distill_kl", "triton", triton_launchers.DISTILL_KL)
register_impl("distill_kl", "cuda", cuda_distill.DISTILL_KL)
register_impl("distill_kl", "cuda_emu", cuda_emu_distill.DISTILL_KL)

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INTS = (torch.int32, torch.int64)
_REDUCTIONS = ("batchmean", "sum", "mean", "none")
# A teacher row must sum to 1 within this (unless normalize_teacher=True).
TEACHER_SUM_TOL = 1e-3


def _out_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ---- reader_teacher ----------------------------------------------------------------------------------------------------
@torch.library.custom_op("reatt::reader_teacher", mutates_args=())
def reader_teacher_op(attn: Tensor, doc_index: Tensor, attn_mask: Optional[Tensor], n_docs: int, is_logits: bool,
                      backend: str) -> Tensor:
    """p_T fp32 [B, n_docs] from attn [B, L, H, T, S]. No autograd: a teacher is a constant."""
    B, L, H, T, S = attn.shape
    if B == 0 or n_docs == 0 or L * H * T == 0 or S == 0:
        return torch.zeros((B, n_docs), dtype=_out_dtype(attn), device=attn.device)
    with device_guard(attn):
        return get_impl("reader_teacher", backend).forward(attn, doc_index, attn_mask, n_docs, is_logits)


@reader_teacher_op.register_fake
def _reader_teacher_fake(attn, doc_index, attn_mask, n_docs, is_logits, backend):
    return attn.new_empty((attn.shape[0], n_docs), dtype=_out_dtype(attn))


def _select_dim(x: Tensor, dim: int, sel, name: str) -> Tensor:
    """x restricted to the indices ``sel`` (None, int, slice or sequence of ints) along ``dim``: a view whenever the
    indices are evenly spaced (the usual case), else a gather in the input's dtype (never an fp32 copy)."""
    size = x.shape[dim]
    if sel is None:
        return x
    if isinstance(sel, Tensor):
        if sel.dtype.is_floating_point or sel.dim() > 1:
            raise TypeError(f"{name} must be an int, a slice or a 1-D sequence of ints")
        sel = sel.tolist()
    if isinstance(sel, bool):
        raise TypeError(f"{name} must be an int, a slice or a sequence of ints, got bool")
    if isinstance(sel, int):
        sel = [sel]
    if isinstance(sel, slice):
        idx = list(range(size))[sel]
    elif isinstance(sel, (list, tuple, range)):
        idx = []
        for i in sel:
            if not isinstance(i, int) or isinstance(i, bool):
                raise TypeError(f"{name} must hold ints, got {type(i).__name__}")
            if not -size <= i < size:
                raise ValueError(f"{name} index {i} is out of range for {size} entries")
            idx.append(i % size)
    else:
        raise TypeError(f"{name} must be None, an int, a slice or a sequence of ints, got {type(sel).__name__}")
    if not idx:
        raise ValueError(f"{name} selects nothing (the dimension has {size} entries)")
    step = idx[1] - idx[0] if len(idx) > 1 else 1
    if step > 0 and all(b - a == step for a, b in zip(idx, idx[1:])):
        return x[(slice(None),) * dim + (slice(idx[0], idx[-1] + 1, step),)]
    return x.index_select(dim, torch.tensor(idx, dtype=torch.int64, device=x.device))


def reader_teacher(attn: Tensor, doc_index: Tensor, *, is_logits: bool = True, attn_mask: Optional[Tensor] = None,
                   layers: Union[None, int, slice, Sequence[int]] = None,
                   steps: Union[None, int, slice, Sequence[int]] = None, n_docs: Optional[int] = None,
                   backend: str = "auto") -> Tensor:
    """The FiD reader's cross-attention as a distribution over its documents (ReAtt's teacher).

    Args:
        attn: decoder-to-encoder cross-attention, [B, L, H, T, S] (layers, heads, decoder steps, encoder tokens of all
            n documents concatenated), or the slices [B, H, T, S] and [B, H, S]; float32/float16/bfloat16, any strides.
            Logits (``is_logits=True``: softmax over the valid tokens inside) or probabilities (renormalised over the
            valid tokens).
        doc_index: int32/int64 [B, S]: document of each encoder token (0..n-1), or -1 for padding.
        attn_mask: bool [B, S] or None (True = real token); masked tokens never contribute.
        layers: layers to average (int, slice or ints; negative counts from the end; 5-D attn only). None = all.
            ReAtt uses ``layers=-1``.
        steps: decoder steps to average (same forms; 4-D/5-D attn only). None = all. ReAtt uses ``steps=0``.
        n_docs: n. Default ``doc_index.max() + 1`` (a device sync; pass it explicitly in training loops).
        backend: "auto", "torch", "cpu", "triton", "cuda", or "cuda_emu" (the CUDA kernel on CPU tensors under
            emulation: a test tool, never chosen by "auto").
    Returns:
        p_T float32 [B, n]: softmax per (layer, head, step), mean over those, summed per document; each row sums to 1
        (all zeros for a query with no valid token; 0 for a document whose tokens are all padding). **Detached**: a
        teacher gets no gradient. The cpu, triton and cuda backends stream the input once (no fp32 copy, no
        [B, L, H, T, S] temporary); the torch reference works through fp32 chunks of at most 16 MiB. Unevenly spaced
        ``layers``/``steps`` lists are gathered first (in the input's dtype); evenly spaced ones are views.
    """
    if not isinstance(attn, Tensor):
        raise TypeError(f"attn must be a torch.Tensor [B, L, H, T, S], got {type(attn).__name__}")
    if attn.dtype not in _FLOATS:
        raise TypeError(f"attn must be float32, float16 or bfloat16, got {attn.dtype}")
    if attn.dim() not in (3, 4, 5):
        raise ValueError(f"attn must be [B, L, H, T, S], [B, H, T, S] or [B, H, S], got shape {tuple(attn.shape)}")
    if attn.dim() < 5 and layers is not None:
        raise ValueError(f"layers needs a 5-D attn [B, L, H, T, S], got {attn.dim()}-D")
    if attn.dim() < 4 and steps is not None:
        raise ValueError(f"steps needs a 4-D or 5-D attn (with decoder steps), got {attn.dim()}-D")
    a = attn.detach()
    if a.dim() == 3:
        a = a[:, None, :, None, :]
    elif a.dim() == 4:
        a = a[:, None]
    a = _select_dim(a, 1, layers, "layers")
    a = _select_dim(a, 3, steps, "steps")
    B, S = a.shape[0], a.shape[-1]
    if not isinstance(doc_index, Tensor):
        raise TypeError(f"doc_index must be an int torch.Tensor [B, S], got {type(doc_index).__name__}")
    if doc_index.dtype not in _INTS:
        raise TypeError(f"doc_index must be int32 or int64, got {doc_index.dtype}")
    if tuple(doc_index.shape) != (B, S):
        raise ValueError(f"doc_index must have shape [B, S] = {(B, S)} (attn's batch and last axis), "
                         f"got {tuple(doc_index.shape)}")
    if doc_index.device != a.device:
        raise ValueError(f"doc_index is on {doc_index.device} but attn is on {a.device}")
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor) or attn_mask.dtype != torch.bool:
            raise TypeError("attn_mask must be a bool torch.Tensor [B, S] (True = real token)")
        if tuple(attn_mask.shape) != (B, S):
            raise ValueError(f"attn_mask must have shape {(B, S)}, got {tuple(attn_mask.shape)}")
        if attn_mask.device != a.device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but attn is on {a.device}")
    compiling = torch.compiler.is_compiling()
    if n_docs is None and compiling:
        raise ValueError("pass n_docs explicitly under torch.compile (its default needs doc_index.max())")
    lo = hi = None
    if not compiling and doc_index.numel():
        lo, hi = torch.stack(list(torch.aminmax(doc_index))).tolist()  # one device sync for the default and the check
    if n_docs is None:
        n_docs = hi + 1 if hi is not None else 0
    if not isinstance(n_docs, int) or isinstance(n_docs, bool) or n_docs < 0:
        raise ValueError(f"n_docs must be an int >= 0, got {n_docs!r}")
    if lo is not None and (lo < -1 or hi >= n_docs):
        raise ValueError(f"doc_index values must be in [-1, n_docs - 1] = [-1, {n_docs - 1}], got [{lo}, {hi}]")
    name = select("reader_teacher", [a, doc_index, attn_mask], backend, n_docs=n_docs, is_logits=bool(is_logits))
    return torch.ops.reatt.reader_teacher(a, doc_index, attn_mask, n_docs, bool(is_logits), name)


# ---- distill_kl --------------------------------------------------------------------------------------------------------
@torch.library.custom_op("reatt::distill_kl_fwd", mutates_args=())
def distill_kl_fwd(student: Tensor, teacher: Optional[Tensor], teacher_probs: Optional[Tensor],
                   teacher_cols: Optional[Tensor], normalize: bool, reduction: str, compute_grad: bool,
                   backend: str) -> tuple[Tensor, Tensor]:
    """(loss: 0-d, or [B] for reduction="none"; fp32), (d loss / d student [B, M] in student's dtype, or [0, M])."""
    B, M = student.shape
    _, grad_scale = reduce_rows(student.new_empty((B,)), reduction, M)
    if B == 0:
        rows = torch.zeros((0,), dtype=_out_dtype(student), device=student.device)
        grad = student.new_zeros((0, M))
    else:
        with device_guard(student):
            rows, grad = get_impl("distill_kl", backend).forward(
                student, teacher, teacher_probs, teacher_cols, normalize, grad_scale, compute_grad)
    loss = reduce_rows(rows, reduction, M)[0]
    return (loss.clone() if reduction == "none" else loss), grad


@distill_kl_fwd.register_fake
def _distill_kl_fake(student, teacher, teacher_probs, teacher_cols, normalize, reduction, compute_grad, backend):
    B, M = student.shape
    loss = student.new_empty((B,) if reduction == "none" else (), dtype=_out_dtype(student))
    return loss, student.new_empty((B if compute_grad else 0, M))


def _kl_setup_context(ctx, inputs, output):
    student, teacher, teacher_probs, teacher_cols, normalize, reduction, compute_grad, backend = inputs
    _, grad = output
    ctx.save_for_backward(grad)
    ctx.reduction, ctx.compute_grad = reduction, compute_grad
    ctx.mark_non_differentiable(grad)


def _is_concrete(t: Tensor) -> bool:
    """True for a plain eager tensor whose value may be read; False while tracing (dynamo, AOT autograd's fake and
    functional tensors, functorch transforms), where reading it would break the graph."""
    if torch.compiler.is_compiling() or type(t) is not torch.Tensor:
        return False
    return not torch._C._functorch.is_functorch_wrapped_tensor(t)


def _kl_backward(ctx, g_loss, g_grad):
    (grad,) = ctx.saved_tensors
    if not ctx.compute_grad:
        raise RuntimeError("distill_kl: the forward ran without computing the gradient (grad mode was off)")
    # Scale in fp32 (fp64 for fp64 inputs) and round once: multiplying in a half dtype would round g_loss and the
    # product as well, and fp32 would cost an fp64 caller its precision.
    acc = torch.promote_types(grad.dtype, torch.float32)
    if ctx.reduction == "none":
        dstudent = (grad.to(acc) * g_loss.to(acc)[:, None]).to(grad.dtype)
    elif _is_concrete(g_loss) and bool(g_loss == 1):
        dstudent = grad  # the gradient was computed in the forward: nothing left to do
    else:
        dstudent = (grad.to(acc) * g_loss.to(acc)).to(grad.dtype)
    return dstudent, None, None, None, None, None, None, None


distill_kl_fwd.register_autograd(_kl_backward, setup_context=_kl_setup_context)


def _check_float2d(name: str, t, shape_desc: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape_desc}, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D {shape_desc}, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_teacher_values(name: str, t: Tensor, normalize: bool, cols: Optional[Tensor] = None, M: int = 0) -> None:
    """Eager-only data checks, with ONE device sync on the happy path: finite, non-negative, rows summing to 1 (or > 0
    when normalising); for the sparse form also columns in [0, M) and unique per row. Messages are built only on
    failure."""
    if torch.compiler.is_compiling() or t.numel() == 0:
        return
    bad = ~(t >= 0) | torch.isinf(t)
    z = t.sum(-1, dtype=torch.float64)
    off = (z <= 0) if normalize else ((z - 1).abs() > TEACHER_SUM_TOL)
    flags = [bad.any(), off.any()]
    if cols is not None:
        flags.append(((cols < 0) | (cols >= M)).any())
        srt = cols.sort(-1).values
        flags.append((srt[:, 1:] == srt[:, :-1]).any())
    flags = torch.stack(flags).tolist()
    if not any(flags):
        return
    if flags[0]:
        b, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"{name} must hold finite probabilities >= 0; {name}[{b}, {j}] = {float(t[b, j])}")
    if cols is not None and flags[2]:
        raise ValueError(f"teacher_cols must be in [0, M - 1] = [0, {M - 1}], got [{int(cols.min())}, {int(cols.max())}]")
    if cols is not None and flags[3]:
        raise ValueError("teacher_cols must not repeat a column within a row")
    b = int(off.nonzero()[0])
    if normalize:
        raise ValueError(f"{name} row {b} has no mass, so it cannot be normalised (normalize_teacher=True)")
    raise ValueError(f"{name} rows must sum to 1 within {TEACHER_SUM_TOL} (row {b} sums to {float(z[b]):.6g}); "
                     "pass normalize_teacher=True to normalise them")


def distill_kl(student: Tensor, teacher: Optional[Tensor] = None, *, teacher_probs: Optional[Tensor] = None,
               teacher_cols: Optional[Tensor] = None, reduction: str = "batchmean", normalize_teacher: bool = False,
               backend: str = "auto") -> Tensor:
    """KL(teacher || softmax(student)) row-wise, with its gradient computed in the forward.

    Args:
        student: logits [B, M], float32/float16/bfloat16 (any strides). -inf is allowed where the teacher mass is 0.
        teacher: dense probabilities [B, M] (any float dtype), or None when the sparse form is given.
        teacher_probs: [B, n] probabilities at the columns ``teacher_cols`` int32/int64 [B, n] (unique per row, in
            [0, M)); every other column has teacher mass 0 (e.g. the in-batch documents of other queries).
        reduction: "batchmean" (sum / B), "sum", "mean" (sum / (B * M), as torch's kl_div) or "none" ([B]).
        normalize_teacher: divide each teacher row by its sum; otherwise a row not summing to 1 within 1e-3 raises.
        backend: "auto", "torch", "cpu", "triton", "cuda", or "cuda_emu" (the CUDA kernel under CPU emulation).
    Returns:
        fp32 loss (0-d; [B] for "none"). Differentiable w.r.t. student only (the teacher is a constant).
    Raises:
        ValueError when the teacher has negative or non-finite entries, rows off 1 (see above), or puts mass on a
        student logit of -inf (the KL would be infinite). These data checks sync the device; under torch.compile
        they are skipped and such a loss comes out +inf.
    """
    _check_float2d("student", student, "[B, M]")
    B, M = student.shape
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if teacher is not None:
        if teacher_probs is not None or teacher_cols is not None:
            raise ValueError("pass either teacher (dense) or teacher_probs + teacher_cols (sparse), not both")
        _check_float2d("teacher", teacher, "[B, M]")
        if teacher.shape != student.shape:
            raise ValueError(f"teacher must have student's shape {tuple(student.shape)}, got {tuple(teacher.shape)}")
        if teacher.device != student.device:
            raise ValueError(f"teacher is on {teacher.device} but student is on {student.device}")
        teacher = teacher.detach()
        _check_teacher_values("teacher", teacher, normalize_teacher)
        tensors = [student, teacher]
    else:
        if teacher_probs is None or teacher_cols is None:
            raise ValueError("pass a dense teacher [B, M], or both teacher_probs [B, n] and teacher_cols [B, n]")
        _check_float2d("teacher_probs", teacher_probs, "[B, n]")
        if teacher_probs.shape[0] != B:
            raise ValueError(f"teacher_probs must be [B, n] with B = {B}, got {tuple(teacher_probs.shape)}")
        if not isinstance(teacher_cols, Tensor) or teacher_cols.dtype not in _INTS:
            raise TypeError("teacher_cols must be an int32/int64 torch.Tensor [B, n]")
        if teacher_cols.shape != teacher_probs.shape:
            raise ValueError(f"teacher_cols must have teacher_probs' shape {tuple(teacher_probs.shape)}, "
                             f"got {tuple(teacher_cols.shape)}")
        for nm, t in (("teacher_probs", teacher_probs), ("teacher_cols", teacher_cols)):
            if t.device != student.device:
                raise ValueError(f"{nm} is on {t.device} but student is on {student.device}")
        teacher_probs = teacher_probs.detach()
        _check_teacher_values("teacher_probs", teacher_probs, normalize_teacher, teacher_cols, M)
        tensors = [student, teacher_probs, teacher_cols]
    compute_grad = bool(torch.is_grad_enabled() and student.requires_grad)
    name = select("distill_kl", tensors, backend, sparse=teacher is None, reduction=reduction)
    loss, _ = torch.ops.reatt.distill_kl_fwd(student, teacher, teacher_probs, teacher_cols, bool(normalize_teacher),
                                             reduction, compute_grad, name)
    if not torch.compiler.is_compiling() and B > 0 and not bool(torch.isfinite(loss).all()):
        s = student.detach()
        t = teacher if teacher is not None else torch.zeros((B, M), dtype=teacher_probs.dtype,
                                                               device=s.device).scatter_(
            1, teacher_cols.long(), teacher_probs)
        hit = (t > 0) & torch.isneginf(s)
        if bool(hit.any()):
            b, j = (int(x) for x in hit.nonzero()[0])
            raise ValueError(f"the teacher puts mass {float(t[b, j]):.4g} on student[{b}, {j}] = -inf: the KL is "
                             "infinite (mask that column in the teacher, or give the student a finite logit)")
        raise ValueError("distill_kl: non-finite loss; the student holds NaN or +inf")
    return loss


# ---- retrieval_distill_loss --------------------------------------------------------------------------------------------
def retrieval_distill_loss(q: Tensor, d: Tensor, teacher: Tensor, *, q_mask: Optional[Tensor] = None,
                           d_mask: Optional[Tensor] = None, d_offsets: Optional[Tensor] = None,
                           pos_bias: Optional[Tensor] = None, scale: Union[float, Tensor] = 1.0, reduce: str = "mean",
                           teacher_cols: Optional[Tensor] = None, normalize_teacher: bool = False,
                           backend: str = "auto") -> Tensor:
    """ReAtt's retriever loss: KL(reader teacher || softmax over in-batch documents of scale * MaxSim).

    Args:
        q: [B, Lq, dim] query tokens; q_mask bool [B, Lq] or None.
        d: padded documents [Nd, Ld, dim] (d_mask bool [Nd, Ld] or None), or packed tokens [T, dim] with d_offsets
            int64 [Nd + 1]. Every query is scored against all Nd in-batch documents (its own and the others').
        teacher: [B, n] probabilities over each query's own documents (e.g. :func:`reader_teacher`); rows sum to 1.
        pos_bias: [R] or None: ReAtt's relative-position bias (see :func:`reatt_kernels.maxsim`).
        scale: float > 0, or a 0-d / 1-element tensor (may require grad: ReAtt learns its temperature).
        reduce: MaxSim reduction over query tokens, "mean" (ReAtt) or "sum".
        teacher_cols: int [B, n] student columns of the teacher entries. Default: query a owns documents
            a*n .. a*n+n-1 (requires Nd = B * n).
        normalize_teacher: as in :func:`distill_kl`.
        backend: used for both the MaxSim and the KL.
    Returns:
        fp32 scalar, the batch-mean KL. Gradients reach q, d, pos_bias and scale (MaxSim's backward goes through its
        saved argmax: no token-pair scores are ever stored). An empty document scores -inf and must have teacher 0.
    """
    if d_offsets is not None:
        if d_mask is not None:
            raise ValueError("d_mask is for padded documents; packed documents (d_offsets) have no padding")
        scores = maxsim_packed(q, d, d_offsets, q_mask, pos_bias=pos_bias, reduce=reduce, backend=backend)
    else:
        scores = maxsim(q, d, q_mask, d_mask, pos_bias=pos_bias, reduce=reduce, backend=backend)
    B, Nd = scores.shape
    _check_float2d("teacher", teacher, "[B, n]")
    if teacher.shape[0] != B:
        raise ValueError(f"teacher must be [B, n] with B = q.shape[0] = {B}, got {tuple(teacher.shape)}")
    n = teacher.shape[1]
    if teacher_cols is None:
        if Nd != B * n:
            raise ValueError(f"with the default teacher_cols, d must hold B * n = {B} * {n} = {B * n} documents "
                             f"(query a owns a*n .. a*n+n-1), got {Nd}; pass teacher_cols otherwise")
        teacher_cols = (torch.arange(B, device=scores.device)[:, None] * n
                        + torch.arange(n, device=scores.device)[None, :])
    if isinstance(scale, Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must be a number or a 1-element tensor, got shape {tuple(scale.shape)}")
        scale = scale.reshape(())
    elif not isinstance(scale, Real) or isinstance(scale, bool) or not scale > 0:
        raise ValueError(f"scale must be a float > 0 or a tensor, got {scale!r}")
    # Empty documents score -inf. Keep them -inf in the student, but never multiply -inf by the scale: its gradient
    # would be 0 * -inf = NaN.
    empty = torch.isneginf(scores)
    student = torch.where(empty, scores, scale * scores.masked_fill(empty, 0.0))
    return distill_kl(student, teacher_probs=teacher, teacher_cols=teacher_cols, reduction="batchmean",
                      normalize_teacher=normalize_teacher, backend=backend)
