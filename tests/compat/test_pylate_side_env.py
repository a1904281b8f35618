"""The PyLate side environment (`make pylate-env`: PyLate 1.6.0's own pins, torch 2.11) seen from the main suite.

Every test here is skipped, with the reason, when ``.venv-pylate`` (or ``$PYLATE_VENV``) is absent: CI builds it only
where it can afford it (docs/pylate.md gives the times).
- The in-place extension built under the main venv's torch 2.13 imports and runs, unchanged, under PyLate's torch 2.11
  (it links no libtorch: pybind11 and raw pointers), and matches PyLate's einsum.
- Our compat tests (tests/compat, test_pylate_patch.py included) pass there, with PyLate installed.
- PyLate's own tests and doctests for scores, losses, rank and indexes pass on our kernels and on our index
  (scripts/pylate/run_pylate_tests.sh): no failure, and the patched functions were called."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("PYLATE_VENV", ROOT / ".venv-pylate"))
PY = VENV / "bin" / "python"
needs_side_env = pytest.mark.skipif(not PY.exists(), reason=f"no PyLate side environment at {VENV}: run "
                                                            f"`make pylate-env` (PyLate 1.6.0 pins torch 2.11)")


def _side(args, timeout, **kw):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([str(PY), *args], capture_output=True, text=True, timeout=timeout, env=env, **kw)


def test_extension_links_no_libtorch():
    """What makes one build serve every torch version: no libtorch / libc10 among the extension's libraries."""
    import shutil

    import reatt_kernels._C as C

    if shutil.which("ldd") is None:
        pytest.skip("no ldd on this machine")
    libs = subprocess.run(["ldd", C.__file__], capture_output=True, text=True, check=True).stdout
    assert "libtorch" not in libs and "libc10" not in libs, libs


@needs_side_env
def test_inplace_build_runs_under_pylates_torch(tmp_path):
    code = r"""
import json, torch, pylate, reatt_kernels as rk, reatt_kernels._C as C
from pylate.scores.colbert import colbert_scores as einsum_scores
from reatt_kernels.compat.pylate import colbert_scores
g = torch.Generator().manual_seed(0)
q = torch.nn.functional.normalize(torch.randn(8, 32, 128, generator=g), dim=-1).requires_grad_()
d = torch.nn.functional.normalize(torch.randn(12, 180, 128, generator=g), dim=-1).requires_grad_()
dm = torch.rand(12, 180, generator=g) < 0.8
ours = colbert_scores(q, d, None, dm, backend="cpu")
ref = einsum_scores(q.detach(), d.detach(), None, dm, backend="torch")
print(json.dumps({"torch": torch.__version__, "pylate": pylate.__version__, "ext": C.__file__,
                  "cpu": rk.available_backends()["cpu"], "max_rel": float(((ours - ref).abs() / ref.abs()).max())}))
"""
    out = _side(["-c", code], timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    import reatt_kernels._C as C

    assert info["torch"].startswith("2.11") and info["pylate"] == "1.6.0", info
    assert info["ext"] == C.__file__, f"the side env imported another build: {info['ext']}"
    assert info["cpu"] == "ok", info
    assert info["max_rel"] < 2e-6, info


@needs_side_env
@pytest.mark.slow
def test_compat_tests_pass_with_pylate():
    out = _side(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/compat", "-k",
                 "not side_env and not triton and not emu"], timeout=1800, cwd=ROOT)
    tail = out.stdout[-4000:] + out.stderr[-2000:]
    assert out.returncode == 0, tail
    summary = tail.split("short test summary")[-1]
    assert " passed" in tail and "] tests/compat/test_pylate_patch.py:" not in summary, tail  # not skipped there


@needs_side_env
@pytest.mark.slow
def test_pylate_own_tests_pass_on_our_kernels(tmp_path):
    out = subprocess.run(["bash", str(ROOT / "scripts/pylate/run_pylate_tests.sh"), "all"], capture_output=True,
                         text=True, timeout=3600, env={**os.environ, "REATT_PYLATE_OUT": str(tmp_path)})
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    for run in ("scores", "index-residual", "index-exact"):
        rep = json.loads((tmp_path / f"{run}.json").read_text())
        assert rep["stats"].get("failed", 0) == 0 and rep["stats"].get("error", 0) == 0, (run, rep)
        assert rep["stats"].get("passed", 0) > 0, (run, rep)
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["calls"]["maxsim"] > 0 and scores["calls"]["maxsim_grouped"] > 0, scores


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
