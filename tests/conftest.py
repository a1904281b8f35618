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


def _emu():
    """reatt_kernels._C_emu (the CUDA kernels under CPU emulation), or None."""
    try:
        from reatt_kernels import _ext

        return _ext.emu()
    except Exception:  # pragma: no cover - a broken build is reported by the tests themselves
        return None


# The emulator's seed (block order and jitter) for this session: REATT_EMU_SEED, else a random one. Every test that
# involves cuda_emu restarts from it, so `REATT_EMU_SEED=<seed> pytest <that test>` replays the failing block orders.
_EMU_SEED = None


def pytest_report_header(config):
    m = _emu()
    if m is not None:
        c = m.emu_config()
        return (f"cuda_emu: REATT_EMU_SEED={c['seed']} resident={c['resident']} serial={c['serial']} "
                f"mma_order={c['mma_order']}")
    return None


@pytest.fixture(autouse=True)
def _seed(request):
    global _EMU_SEED
    torch.manual_seed(0)
    if "emu" in request.node.nodeid:
        m = _emu()
        if m is not None:
            if _EMU_SEED is None:
                _EMU_SEED = m.emu_config()["seed"]
            m.set_emu_config(seed=_EMU_SEED)
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and "emu" in item.nodeid and _EMU_SEED is not None:
        c = _emu().emu_config()
        rep.sections.append(("cuda_emu replay", f"REATT_EMU_SEED={_EMU_SEED} (resident={c['resident']}, "
                                                f"serial={c['serial']}, mma_order={c['mma_order']})"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
