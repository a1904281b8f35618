"""Loads the compiled modules once (``reatt_kernels._C``, and ``reatt_kernels._C_emu``: the CUDA kernels under CPU
emulation), and keeps their import errors for the backends' reasons lists.

The module links no libtorch: every binding takes raw data pointers (``int``), sizes, strides, a dtype code and, for
CUDA, the stream handle. The helpers here turn tensors into those arguments.
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Optional

import torch

# Must match csrc/common.h::DType.
DTYPE_CODES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.int32: 3,
    torch.int64: 4,
    torch.uint8: 5,
    torch.bool: 6,
    torch.int16: 7,
    torch.uint16: 8,
}

_C = None
_IMPORT_ERROR: Optional[str] = None


@functools.lru_cache(maxsize=None)
def _load():
    global _C, _IMPORT_ERROR
    try:
        from reatt_kernels import _C as mod  # type: ignore[attr-defined]

        _C = mod
    except Exception as exc:  # pragma: no cover - depends on the build
        _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
    return _C


def ext():
    """The compiled module, or None when it was not built or failed to load."""
    return _load()


_C_EMU = None
_EMU_IMPORT_ERROR: Optional[str] = None


@functools.lru_cache(maxsize=None)
def _load_emu():
    """``reatt_kernels._C_emu``, or the file named by ``REATT_EMU_LIB`` (a sanitized build: scripts/ci/20-*.sh)."""
    global _C_EMU, _EMU_IMPORT_ERROR
    try:
        path = os.environ.get("REATT_EMU_LIB", "")
        if path:
            import importlib.util
            import sys

            spec = importlib.util.spec_from_file_location("reatt_kernels._C_emu", path)
            if spec is None or spec.loader is None:
                raise ImportError(f"REATT_EMU_LIB={path!r} is not a loadable extension module")
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            sys.modules["reatt_kernels._C_emu"] = mod
        else:
            from reatt_kernels import _C_emu as mod  # type: ignore[attr-defined]
        _C_EMU = mod
    except Exception as exc:  # pragma: no cover - depends on the build
        _EMU_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
    return _C_EMU


def emu():
    """The CUDA kernels compiled against the CPU emulation (``reatt_kernels._C_emu``), or None."""
    return _load_emu()


def emu_import_error() -> Optional[str]:
    _load_emu()
    return _EMU_IMPORT_ERROR


def import_error() -> Optional[str]:
    _load()
    return _IMPORT_ERROR


class ExtensionMissingWarning(UserWarning):
    """``reatt_kernels._C`` could not be imported; only the torch (and triton) backends run."""


def check_loaded() -> None:
    """Run by ``import reatt_kernels``: a missing ``_C`` warns once, or raises under ``REATT_REQUIRE_EXT=1``.

    The pure-Python fallback is legitimate (no compiler on the machine), but it must never pass unnoticed: the message
    names the missing part and the fix.
    """
    if ext() is not None:
        return
    msg = (f"reatt_kernels._C is not importable ({_IMPORT_ERROR}), so the 'cpu' and 'cuda' backends are unavailable. "
           "Fix: install a binary wheel, or rebuild with a C++17 compiler and cmake>=3.24 (pip install --no-binary "
           "reatt-kernels reatt-kernels; in a git checkout: scripts/build_ext.sh); REATT_REQUIRE_EXT=1 makes this an "
           "error")
    if os.environ.get("REATT_REQUIRE_EXT", "0").strip() not in ("", "0"):
        raise ImportError(msg)
    warnings.warn(msg, ExtensionMissingWarning, stacklevel=2)


@functools.lru_cache(maxsize=None)
def build_info() -> dict:
    mod = ext()
    return dict(mod.build_info()) if mod is not None else {}


def cuda_built() -> bool:
    return bool(build_info().get("cuda", False))


def has(name: str, loader=ext) -> bool:
    """True when the compiled module (``loader()``: :func:`ext` or :func:`emu`) exposes binding ``name``."""
    mod = loader()
    return mod is not None and hasattr(mod, name)


def fill(args, **fields):
    """Set the named fields of a compiled parameter struct (``MaxsimArgs`` and the like) and return it. A misspelt field
    raises AttributeError: the bound structs have no ``__dict__``, so a typo can never pass unnoticed."""
    for name, value in fields.items():
        setattr(args, name, value)
    return args


def dtype_code(t: torch.Tensor) -> int:
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"reatt_kernels._C has no code for dtype {t.dtype}") from None


def ptr(t: Optional[torch.Tensor]) -> int:
    """Data pointer of ``t`` (0 for None or an empty tensor)."""
    if t is None or t.numel() == 0:
        return 0
    return t.data_ptr()


def stream(t: torch.Tensor) -> int:
    """Raw ``cudaStream_t`` of the current stream on ``t``'s device (0 on CPU)."""
    if t.device.type != "cuda":
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream
