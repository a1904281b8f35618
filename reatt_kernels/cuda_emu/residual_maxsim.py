"""residual_maxsim under CUDA emulation: the launcher of reatt_kernels/cuda/residual_maxsim.py on reatt_kernels._C_emu."""
from __future__ import annotations

from .. import _ext
from ..cuda.residual_maxsim import CudaResidualMaxsim

RESIDUAL_MAXSIM = CudaResidualMaxsim(_ext.emu)
