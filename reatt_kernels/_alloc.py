"""Output allocation for launchers. With ``REATT_POISON=1`` (the test suite sets it) every output buffer starts as NaN
(floats) or the most negative integer, so a kernel that forgets to write an element is caught instead of returning
whatever the allocator had."""
from __future__ import annotations

import os

import torch

POISON = os.environ.get("REATT_POISON", "0") == "1"


def empty(shape, dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        if t.is_floating_point():
            t.fill_(float("nan"))
        else:
            t.fill_(torch.iinfo(t.dtype).min)
    return t
