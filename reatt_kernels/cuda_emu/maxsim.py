"""MaxSim under CUDA emulation: the launchers of reatt_kernels/cuda/maxsim.py on reatt_kernels._C_emu."""
from __future__ import annotations

from ..cuda import maxsim as _cuda
from . import emulated

_maxsim_not_supported_reasons = emulated(_cuda._maxsim_not_supported_reasons)
_maxsim_fwd = emulated(_cuda._maxsim_fwd)
_maxsim_bwd = emulated(_cuda._maxsim_bwd)
