"""The residual_maxsim benchmark's naive provider computes the op (so its timings compare like with like)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

import reatt_kernels as rk

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_residual_maxsim.py"


def test_naive_matches_the_op():
    spec = importlib.util.spec_from_file_location("bench_residual_maxsim", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    case = mod.build_case("cpu_16q_512c", torch.device("cpu"), quick=True)
    assert case.shape["Bq"] == 4 and case.flops > 0
    naive = case.fns["naive"]()
    ref = case.fns["torch"]()
    torch.testing.assert_close(naive, ref, rtol=1e-4, atol=1e-3)
    assert rk.residual_maxsim is not None
