"""Backend dispatch, in the manner of xformers: every backend answers ``not_supported_reasons(...) -> list[str]``.

``backend="auto"`` takes the first backend in the device's preference order with no reasons. Naming a backend (the
``backend=`` argument, or the ``REATT_BACKEND`` environment variable when the argument is ``"auto"``) forces it, and a
forced backend that cannot run raises :class:`BackendUnavailableError` listing its reasons.

Implementations are launcher objects (:mod:`reatt_kernels._launcher`), registered per (op, backend) by
``reatt_kernels/ops/<op>.py``, which imports each of them: a reader (or an IDE) follows the imports from an op to every
backend's kernel. Importing them never imports triton (the Triton launchers import their kernels on first call) or
touches CUDA.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable, NamedTuple, Optional, Sequence

import torch

from . import _ext
from ._launcher import Launcher

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class TensorSpec(NamedTuple):
    """What dispatch may look at of a tensor: hashable and free of data, so selection can run at trace time."""

    device: str
    dtype: torch.dtype
    shape: tuple

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point


def spec(t: Optional[torch.Tensor]) -> Optional[TensorSpec]:
    if t is None:
        return None
    return TensorSpec(t.device.type, t.dtype, tuple(int(s) for s in t.shape))


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run these inputs; the message lists each reason."""


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class Backend:
    NAME = ""
    DEVICES: tuple = ()
    DTYPES: tuple = FLOAT_DTYPES

    @classmethod
    def env_reasons(cls) -> list[str]:
        """Why this backend cannot run at all on this machine (empty when it can)."""
        return []

    @classmethod
    def not_supported_reasons(cls, op: str, tensors: Sequence[Optional[TensorSpec]], **kw) -> list[str]:
        """``tensors`` are :class:`TensorSpec` (device type, dtype, shape); ``kw`` carries op-specific facts."""
        reasons = list(cls.env_reasons())
        ts = [t for t in tensors if t is not None]
        float_ts = [t for t in ts if t.is_floating_point()]
        for t in ts:
            if t.device not in cls.DEVICES:
                reasons.append(f"tensors on {t.device}, backend runs on {'/'.join(cls.DEVICES)}")
                break
        for t in float_ts[:1]:
            if t.dtype not in cls.DTYPES:
                reasons.append(f"dtype {t.dtype} not in {[str(x).replace('torch.', '') for x in cls.DTYPES]}")
        impl = _IMPLS.get((op, cls.NAME))
        if impl is None:
            reasons.append(f"no {op!r} implementation for backend {cls.NAME!r}")
        elif not reasons:
            try:
                reasons.extend(impl.not_supported_reasons(tensors, **kw))
            except ImportError as exc:  # a Triton launcher imports its kernels here: a broken install is a reason
                reasons.append(f"implementation failed to import: {type(exc).__name__}: {exc}")
        return reasons


class TorchBackend(Backend):
    """Plain PyTorch, chunked so memory stays bounded. The spec and the last fallback."""

    NAME = "torch"
    DEVICES = ("cpu", "cuda")
    DTYPES = FLOAT_DTYPES + (torch.float64,)


class CpuBackend(Backend):
    """C++ kernels in csrc/ (OpenMP, cache-blocked, SIMD-friendly)."""

    NAME = "cpu"
    DEVICES = ("cpu",)

    @classmethod
    def env_reasons(cls) -> list[str]:
        if _ext.ext() is None:
            return [f"reatt_kernels._C is not importable ({_ext.import_error()})"]
        return []


class TritonBackend(Backend):
    """Triton kernels; on CPU only under TRITON_INTERPRET=1 (the interpreter, for tests)."""

    NAME = "triton"
    DEVICES = ("cuda", "cpu")

    @classmethod
    def env_reasons(cls) -> list[str]:
        try:
            import triton  # noqa: F401
        except Exception as exc:
            return [f"triton is not importable ({type(exc).__name__}: {exc})"]
        return []

    @classmethod
    def not_supported_reasons(cls, op, tensors, **kw):
        reasons = super().not_supported_reasons(op, tensors, **kw)
        ts = [t for t in tensors if t is not None]
        if any(t.device == "cpu" for t in ts) and not _triton_interpret():
            reasons.append("CPU tensors need TRITON_INTERPRET=1 (set before triton is imported)")
        return reasons


class CudaBackend(Backend):
    """CUDA C++ kernels in csrc/ (raw pointers, strides, the current stream)."""

    NAME = "cuda"
    DEVICES = ("cuda",)

    @classmethod
    def env_reasons(cls) -> list[str]:
        if _ext.ext() is None:
            return [f"reatt_kernels._C is not importable ({_ext.import_error()})"]
        reasons = []
        if not _ext.cuda_built():
            reasons.append("reatt_kernels._C was built without CUDA (REATT_CUDA=0, or no nvcc at build time)")
        if not torch.cuda.is_available():
            reasons.append("no CUDA GPU visible to torch")
        return reasons


class CudaEmuBackend(Backend):
    """The CUDA kernels of csrc/ on CPU tensors, under a CPU emulation of the CUDA execution model
    (reatt_kernels._C_emu): a test tool, like the Triton interpreter, so never in an AUTO_ORDER."""

    NAME = "cuda_emu"
    DEVICES = ("cpu",)

    @classmethod
    def env_reasons(cls) -> list[str]:
        if _ext.emu() is None:
            return [f"reatt_kernels._C_emu is not importable ({_ext.emu_import_error()})"]
        return []


BACKENDS: dict[str, type[Backend]] = {
    b.NAME: b for b in (TorchBackend, CpuBackend, TritonBackend, CudaBackend, CudaEmuBackend)
}

# Preference order for backend="auto" per device type. Triton on CPU is the interpreter and cuda_emu the CUDA kernels
# under CPU emulation: both correct but slow (test tools), so never chosen automatically.
# On CUDA, Triton comes before our CUDA C++ kernels for now: no GPU result is committed under benchmarks/results/ yet
# (no GPU machine was lent to the sessions that wrote them), the Triton kernels are verified under the interpreter and
# compiled for sm_90, while the CUDA kernels have only been compiled. `backend="cuda"` (or REATT_BACKEND=cuda) selects
# them explicitly. Once scripts/device_check.sh results land, replace this with a per-shape-family choice that cites them.
AUTO_ORDER: dict[str, list[str]] = {"cuda": ["triton", "cuda", "torch"], "cpu": ["cpu", "torch"]}

# (op, backend) -> that backend's launcher object for the op.
_IMPLS: dict[tuple[str, str], Launcher] = {}
# op -> function(device_type, **kw) -> preference list, for ops whose best backend depends on the shape.
_AUTO_HOOKS: dict[str, Callable[..., list[str]]] = {}


def register_impl(op: str, backend: str, launcher: Launcher) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    if not isinstance(launcher, Launcher):
        raise TypeError(f"{op}/{backend}: a launcher object (reatt_kernels._launcher), got {type(launcher).__name__}")
    _IMPLS[(op, backend)] = launcher


def register_auto_order(op: str, fn: Callable[..., list[str]]) -> None:
    _AUTO_HOOKS[op] = fn


def get_impl(op: str, backend: str) -> Launcher:
    return _IMPLS[(op, backend)]


def _device_type(tensors: Iterable[Optional[TensorSpec]]) -> str:
    for t in tensors:
        if t is not None:
            return t.device
    return "cpu"


def select(op: str, tensors: Sequence[Optional[torch.Tensor]], backend: str = "auto", **kw) -> str:
    """Name of the backend that runs ``op`` on these inputs.

    ``kw`` carries op-specific facts (dim, layout, ...) that a backend's launcher's ``not_supported_reasons(specs,
    **kw)`` may check. Selection sees only :class:`TensorSpec` values, and under ``torch.compile`` it runs once at trace time
    (its result is a constant of the graph), so dispatch never breaks ``fullgraph=True``.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    return _select(op, tuple(spec(t) for t in tensors), backend, tuple(sorted(kw.items())))


@torch.compiler.assume_constant_result
def _select(op: str, tensors: tuple, backend: str, facts: tuple) -> str:
    kw = dict(facts)
    if backend == "auto":
        backend = os.environ.get("REATT_BACKEND", "auto") or "auto"
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
        reasons = BACKENDS[backend].not_supported_reasons(op, tensors, **kw)
        if reasons:
            raise BackendUnavailableError(f"backend {backend!r} cannot run {op}: " + "; ".join(reasons))
        return backend
    dev = _device_type(tensors)
    order = _AUTO_HOOKS[op](dev, **kw) if op in _AUTO_HOOKS else AUTO_ORDER.get(dev, ["torch"])
    why = {}
    for name in order:
        reasons = BACKENDS[name].not_supported_reasons(op, tensors, **kw)
        if not reasons:
            return name
        why[name] = reasons
    raise BackendUnavailableError(
        f"no backend can run {op}: " + "; ".join(f"{n}: {', '.join(r)}" for n, r in why.items())
    )


def available_backends() -> dict[str, str | list[str]]:
    """Each backend's status on this machine: ``"ok"``, or the list of reasons it cannot run at all."""
    out: dict[str, str | list[str]] = {}
    for name, cls in BACKENDS.items():
        reasons = cls.env_reasons()
        if name == "triton" and not reasons and not torch.cuda.is_available() and not _triton_interpret():
            reasons = ["no CUDA GPU (set TRITON_INTERPRET=1 to run the interpreter on CPU, for tests)"]
        out[name] = "ok" if not reasons else reasons
    return out
