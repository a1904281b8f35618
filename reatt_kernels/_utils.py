"""Small shared helpers for launchers."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def deterministic_algorithms():
    """Run the body with torch's deterministic algorithms on (e.g. a sort-based CUDA ``index_add_`` instead of float
    atomics), then restore the caller's setting exactly, ``warn_only`` included. The setting is process-global, so a
    thread running torch concurrently sees it too: only launchers that need a reproducible reduction use this."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def device_guard(t: torch.Tensor):
    """Make ``t``'s GPU the current device for the body (kernels launch on the current device and its current
    stream); a no-op on CPU. Custom ops call their backend inside it, so inputs on cuda:1 work while cuda:0 is current."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
