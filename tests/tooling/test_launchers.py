"""Launchers are objects registered by import (issue 21): every (op, backend) pair holds an implementation of its
op's contract (reatt_kernels/_launcher.py), ops/<op>.py names each one through an import (no module-path strings), and
importing the package loads no Triton kernel module."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import reatt_kernels  # noqa: F401  (registers every launcher)
from reatt_kernels import _launcher
from reatt_kernels._dispatch import _IMPLS, BACKENDS

PKG = Path(__file__).resolve().parents[2] / "reatt_kernels"
CONTRACT = {"maxsim": _launcher.MaxsimLauncher, "reader_teacher": _launcher.ReaderTeacherLauncher,
            "distill_kl": _launcher.DistillKlLauncher, "residual_maxsim": _launcher.ResidualMaxsimLauncher}


@pytest.mark.parametrize("op", sorted(CONTRACT))
def test_every_backend_registers_a_launcher_of_the_contract(op):
    for backend in BACKENDS:
        impl = _IMPLS.get((op, backend))
        assert isinstance(impl, CONTRACT[op]), f"{op}/{backend}: {impl!r} does not implement {CONTRACT[op].__name__}"


@pytest.mark.parametrize("op_file", ["maxsim.py", "distill.py", "residual_maxsim.py"])
def test_ops_register_imported_objects_not_strings(op_file):
    tree = ast.parse((PKG / "ops" / op_file).read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "register_impl"]
    assert calls, f"ops/{op_file} registers nothing"
    for call in calls:
        target = call.args[2]
        assert isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name), (
            f"ops/{op_file}:{call.lineno}: register a launcher object imported from its backend module")


def test_import_loads_no_triton_kernel_module():
    code = ("import sys, reatt_kernels; "
            "print([m for m in sys.modules if m.startswith('reatt_kernels.triton.')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]", out.stdout
