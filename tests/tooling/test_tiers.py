"""The tier tables of tests/conftest.py name tests that exist: a renamed or moved test must not silently fall into the
fast tier (or out of the sanitized run). Cheap: reads the test files with ``ast``, imports nothing."""
from __future__ import annotations

import ast
from pathlib import Path

from .. import conftest

ROOT = Path(__file__).resolve().parents[2]


def _functions(rel: str) -> set[str]:
    tree = ast.parse((ROOT / rel).read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}


def test_slow_table_names_existing_tests():
    missing = []
    for rel, names in conftest.SLOW.items():
        assert (ROOT / rel).is_file(), f"tests/conftest.py SLOW names a missing file: {rel}"
        have = _functions(rel)
        missing += [f"{rel}::{n}" for n in names if n != "*" and n not in have]
    assert not missing, f"tests/conftest.py SLOW names tests that do not exist: {missing}"


def test_first_shape_table_names_parametrized_tests():
    for rel, tests in conftest.FIRST_SHAPE_ONLY.items():
        src = (ROOT / rel).read_text()
        have = _functions(rel)
        for name, param in tests.items():
            assert name in have, f"{rel}::{name} is in FIRST_SHAPE_ONLY but does not exist"
            assert f'parametrize("{param}"' in src, f"{rel} has no parameter {param!r} for {name}"
