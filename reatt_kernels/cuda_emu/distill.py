"""Attention distillation under CUDA emulation: the launchers of reatt_kernels/cuda/distill.py on reatt_kernels._C_emu."""
from __future__ import annotations

from .. import _ext
from ..cuda.distill import CudaDistillKl, CudaReaderTeacher

READER_TEACHER = CudaReaderTeacher(_ext.emu)
DISTILL_KL = CudaDistillKl(_ext.emu)
