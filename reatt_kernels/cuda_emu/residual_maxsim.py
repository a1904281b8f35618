"""residual_maxsim under CUDA emulation: the launchers of reatt_kernels/cuda/residual_maxsim.py on reatt_kernels._C_emu."""
from __future__ import annotations

from ..cuda import residual_maxsim as _cuda
from . import emulated

_residual_maxsim_not_supported_reasons = emulated(_cuda._residual_maxsim_not_supported_reasons)
_residual_maxsim_fwd = emulated(_cuda._residual_maxsim_fwd)
