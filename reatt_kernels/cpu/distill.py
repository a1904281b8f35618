"""CPU launchers for attention distillation (kernel in csrc/distill/distill_cpu.cpp).

reader_teacher runs the C++ kernel: one pass over the attention, no fp32 copy. distill_kl reuses the reference: its
[B, M] rows are small next to the teacher's input, and torch's vectorised log_softmax is already memory-bound here.
"""
from __future__ import annotations

import torch

from .. import _ext
from . import isa
from .._alloc import empty
from .._launcher import ReaderTeacherLauncher


def _reader_teacher_not_supported_reasons(tensors, **facts) -> list[str]:
    if not _ext.has("reader_teacher_fwd_cpu"):
        return ["reatt_kernels._C has no reader_teacher_fwd_cpu (rebuild: scripts/build_ext.sh)"]
    return []


def _reader_teacher_fwd(attn, doc_index, attn_mask, n_docs, is_logits):
    """attn [B, L, H, T, S] (any strides), doc_index int [B, S], attn_mask bool [B, S] or None -> fp32 [B, n_docs]."""
    ext = _ext.ext()
    B, L, H, T, S = attn.shape
    doc = doc_index.to(torch.int32).contiguous()
    mask = attn_mask.contiguous().view(torch.uint8) if attn_mask is not None else None
    out = empty((B, n_docs), torch.float32, attn.device)
    sb, sl, sh, st, ss = attn.stride()
    ext.reader_teacher_fwd_cpu(_ext.fill(
        ext.ReaderTeacherArgs(), attn=_ext.ptr(attn), dtype=_ext.dtype_code(attn), B=B, L=L, H=H, T=T, S=S, sb=sb,
        sl=sl, sh=sh, st=st, ss=ss, doc=_ext.ptr(doc), doc_dtype=_ext.dtype_code(doc), mask=_ext.ptr(mask),
        n_docs=n_docs, is_logits=bool(is_logits), out=_ext.ptr(out), isa=isa.for_kernel("reader_teacher")))
    return out


class CpuReaderTeacher(ReaderTeacherLauncher):
    """The `cpu` backend of reader_teacher: csrc/distill/distill_cpu.cpp through _C.reader_teacher_fwd_cpu. (The cpu
    backend's distill_kl is the torch reference: ops/distill.py registers reference.distill.DISTILL_KL for it.)"""

    def not_supported_reasons(self, tensors, **facts):
        return _reader_teacher_not_supported_reasons(tensors, **facts)

    def forward(self, attn, doc_index, attn_mask, n_docs, is_logits):
        return _reader_teacher_fwd(attn, doc_index, attn_mask, n_docs, is_logits)


READER_TEACHER = CpuReaderTeacher()
