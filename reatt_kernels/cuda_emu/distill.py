"""Attention distillation under CUDA emulation: the launchers of reatt_kernels/cuda/distill.py on reatt_kernels._C_emu."""
from __future__ import annotations

from ..cuda import distill as _cuda
from . import emulated

_reader_teacher_not_supported_reasons = emulated(_cuda._reader_teacher_not_supported_reasons)
_reader_teacher_fwd = emulated(_cuda._reader_teacher_fwd)
_distill_kl_not_supported_reasons = emulated(_cuda._distill_kl_not_supported_reasons)
_distill_kl_fwd = emulated(_cuda._distill_kl_fwd)
