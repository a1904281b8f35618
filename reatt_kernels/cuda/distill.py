"""CUDA launchers for attention distillation (kernels in csrc/distill/distill_cuda.cu).

Contract: see :mod:`reatt_kernels.ops.distill`. The launchers allocate (through :func:`reatt_kernels._alloc.empty`),
pick the grid and pass raw pointers, strides and the current stream. Small side inputs are normalised here: doc_index
to int16 and the mask to uint8 ([B, S]: tiny next to the attention), and the KL's teacher to fp32 contiguous (the sparse
teacher is [B, n]; a dense non-fp32 teacher costs one fp32 [B, M] copy).
"""
from __future__ import annotations

import torch

from .. import _ext
from .._alloc import empty
from .._launcher import DistillKlLauncher, ReaderTeacherLauncher

# Per-warp shared-memory bins: (8 + 1) * n_docs floats must fit in the 48 KiB default (the binding checks it too).
MAX_DOCS = 1024


# Every launcher takes ``ext``: the loader of the compiled module that holds the kernels (_ext.ext: reatt_kernels._C;
# reatt_kernels/cuda_emu/distill.py passes _ext.emu: the same kernels under CPU emulation), as in cuda/maxsim.py.
def _missing(name: str, ext) -> list[str]:
    if _ext.has(name, ext):
        return []
    return [f"reatt_kernels._C has no {name} (built without csrc/distill/*.cu)" if ext is _ext.ext
            else f"reatt_kernels._C_emu has no {name}"]


def _reader_teacher_not_supported_reasons(tensors, n_docs=0, ext=_ext.ext, **facts) -> list[str]:
    reasons = _missing("reader_teacher_fwd_cuda", ext)
    if n_docs > MAX_DOCS:
        reasons.append(f"n_docs = {n_docs} > {MAX_DOCS} (shared-memory bins per warp)")
    return reasons


def _distill_kl_not_supported_reasons(tensors, ext=_ext.ext, **facts) -> list[str]:
    return _missing("distill_kl_fwd_cuda", ext)


def _reader_teacher_fwd(attn, doc_index, attn_mask, n_docs, is_logits, ext=_ext.ext):
    """attn [B, L, H, T, S] (any strides), doc_index int [B, S], attn_mask bool [B, S] or None -> fp32 [B, n_docs]."""
    ext = ext()
    B, L, H, T, S = attn.shape
    # int16 ids (n_docs <= 1024): every warp re-reads its query's ids once per row, so they cost L1/L2 bandwidth.
    doc = doc_index.to(torch.int16).contiguous()
    mask = attn_mask.contiguous().view(torch.uint8) if attn_mask is not None else None
    sb, sl, sh, st, ss = attn.stride()
    args = _ext.fill(ext.ReaderTeacherArgs(), attn=_ext.ptr(attn), dtype=_ext.dtype_code(attn), B=B, L=L, H=H, T=T,
                     S=S, sb=sb, sl=sl, sh=sh, st=st, ss=ss, doc=_ext.ptr(doc), doc_dtype=_ext.dtype_code(doc),
                     mask=_ext.ptr(mask), n_docs=n_docs, is_logits=bool(is_logits), stream=_ext.stream(attn))
    # The grid (row chunks per query) is planned in C++ on the current device; one partial [n_docs] per chunk.
    n_chunks = ext.reader_teacher_plan_cuda(args)["n_chunks"]
    partial = empty((B, n_chunks, n_docs), torch.float32, attn.device)
    out = empty((B, n_docs), torch.float32, attn.device)
    ext.reader_teacher_fwd_cuda(_ext.fill(args, partial=_ext.ptr(partial), out=_ext.ptr(out)))
    return out


def _distill_kl_fwd(student, teacher, teacher_probs, teacher_cols, normalize, grad_scale, compute_grad, ext=_ext.ext):
    """Per-row loss fp32 [B] and grad [B, M] (student dtype, times grad_scale; [0, M] when not compute_grad)."""
    ext = ext()
    B, M = student.shape
    # An empty teacher (M = 0, or n = 0 sparse) passes null pointers; the kernel reads nothing and writes loss 0.
    loss = empty((B,), torch.float32, student.device)
    grad = empty((B, M) if compute_grad else (0, M), student.dtype, student.device)
    if teacher is not None:
        t, tp, tc, n = teacher.to(torch.float32).contiguous(), None, None, 0
    else:
        t = None
        tp = teacher_probs.to(torch.float32).contiguous()
        tc = teacher_cols.to(torch.int64).contiguous()
        n = tp.shape[1]
    ext.distill_kl_fwd_cuda(_ext.fill(
        ext.DistillKlArgs(), student=_ext.ptr(student), dtype=_ext.dtype_code(student), B=B, M=M,
        ss_b=student.stride(0), ss_m=student.stride(1), sparse=teacher is None, teacher=_ext.ptr(t),
        tprobs=_ext.ptr(tp), tcols=_ext.ptr(tc), n=n, loss=_ext.ptr(loss), grad=_ext.ptr(grad) if compute_grad else 0,
        grad_scale=float(grad_scale), normalize=bool(normalize), stream=_ext.stream(student)))
    return loss, grad


class CudaReaderTeacher(ReaderTeacherLauncher):
    """The `cuda` backend of reader_teacher: csrc/distill/distill_cuda.cu (``ext``: as in cuda/maxsim.py)."""

    def __init__(self, ext=_ext.ext):
        self.ext = ext

    def not_supported_reasons(self, tensors, **facts):
        return _reader_teacher_not_supported_reasons(tensors, ext=self.ext, **facts)

    def forward(self, attn, doc_index, attn_mask, n_docs, is_logits):
        return _reader_teacher_fwd(attn, doc_index, attn_mask, n_docs, is_logits, ext=self.ext)


class CudaDistillKl(DistillKlLauncher):
    """The `cuda` backend of distill_kl: csrc/distill/distill_cuda.cu (``ext``: as in cuda/maxsim.py)."""

    def __init__(self, ext=_ext.ext):
        self.ext = ext

    def not_supported_reasons(self, tensors, **facts):
        return _distill_kl_not_supported_reasons(tensors, ext=self.ext, **facts)

    def forward(self, student, teacher, teacher_probs, teacher_cols, normalize, grad_scale, compute_grad):
        return _distill_kl_fwd(student, teacher, teacher_probs, teacher_cols, normalize, grad_scale, compute_grad,
                               ext=self.ext)


READER_TEACHER = CudaReaderTeacher(_ext.ext)
DISTILL_KL = CudaDistillKl(_ext.ext)
