"""MaxSim under CUDA emulation: the launcher of reatt_kernels/cuda/maxsim.py on reatt_kernels._C_emu."""
from __future__ import annotations

from .. import _ext
from ..cuda.maxsim import CudaMaxsim

MAXSIM = CudaMaxsim(_ext.emu)
