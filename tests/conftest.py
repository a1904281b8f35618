"""Test configuration: seeds, the gpu marker, and the Triton interpreter on CPU-only machines.

No CUDA is touched at import or collection time beyond ``torch.cuda.is_available()`` (which creates no context).
"""
import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is imported, so it must be set before any test imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Every launcher output starts NaN-filled (reatt_kernels._alloc), so unwritten elements fail the tests.
os.environ.setdefault("REATT_POISON", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
