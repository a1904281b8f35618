"""Backend ``cuda_emu``: the CUDA kernels of csrc/ run on CPU tensors under the CPU emulation of the CUDA execution
model (reatt_kernels._C_emu, csrc/cuda_emu/). A test tool: correct and slow, never chosen by ``backend="auto"``.

Each module here instantiates the launcher classes of reatt_kernels/cuda/<op>.py with ``ext=_ext.emu``, so both
backends run the same launcher code (validation, planning, allocation). To wire another op, copy
reatt_kernels/cuda_emu/maxsim.py (one line per launcher) and register the object in reatt_kernels/ops/<op>.py next to
the op's other backends.
"""
from __future__ import annotations

from .. import _ext


def set_device_limits(smem_optin: int | None = None, sm_count: int | None = None) -> dict:
    """Set the emulated device's opt-in shared memory per block (bytes; ``cudaDevAttrMaxSharedMemoryPerBlockOptin``)
    and SM count; returns the values now in force. Defaults: an H100 (227 KB, 132 SMs)."""
    mod = _ext.emu()
    if mod is None:
        raise RuntimeError(f"reatt_kernels._C_emu is not importable ({_ext.emu_import_error()})")
    return dict(mod.set_device_limits(smem_optin=smem_optin, sm_count=sm_count))
