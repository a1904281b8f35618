"""The package's layering runs one way: bench -> package, compat -> index -> ops/backends -> reference/dispatch ->
extension.

Scans every module of reatt_kernels/ with ``ast`` (nothing is imported, so this is cheap and touches no CUDA) and fails
on any import, module-level or inside a function, that reaches a higher layer. ``reatt/`` (the model) sits above the
package and below nothing in it: no reatt_kernels module imports it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "reatt_kernels"

# Layer of each module path under reatt_kernels (first matching prefix wins); higher numbers sit higher.
LAYERS = [
    ("bench", 5),                                   # measurement code: uses the public API only
    ("__init__", 4), ("__main__", 4),               # the package's public API
    ("compat", 4),                                  # other libraries' APIs (PyLate) on the public ops and the index
    ("index", 3),                                   # the token index: calls the public ops
    ("ops", 2), ("cpu", 2), ("cuda", 2), ("triton", 2), ("cuda_emu", 2),   # ops and their backends
    ("reference", 1), ("_dispatch", 1), ("_launcher", 1),  # the spec, backend selection, launcher contracts
    ("_ext", 0), ("_alloc", 0), ("_utils", 0),      # the compiled extension and small helpers
    ("_C", 0), ("_C_emu", 0),                       # the compiled modules themselves
]
COMPILED = {"_C", "_C_emu"}  # submodules built by CMake (no .py file)
NAMES = {1: "reference/dispatch", 0: "extension", 2: "ops/backends", 3: "index", 4: "package/compat", 5: "bench"}


def layer(rel: tuple[str, ...]) -> int:
    """rel: the module path under reatt_kernels, e.g. ("index", "token_index") or ("__init__",)."""
    head = rel[0] if rel else "__init__"
    for prefix, rank in LAYERS:
        if head == prefix:
            return rank
    raise AssertionError(f"reatt_kernels/{'/'.join(rel)}: no layer assigned; add it to LAYERS in {__file__}")


def modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("").parts
        yield path, rel


def imported(path: Path, rel: tuple[str, ...]):
    """(line, target module path under reatt_kernels, or ("<reatt>",) for the model package) of every import."""
    pkg_parts = rel[:-1]  # the package a relative import starts from (for __init__ too: its own package)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "reatt_kernels":
                    yield node.lineno, tuple(parts[1:])
                elif parts[0] == "reatt":
                    yield node.lineno, ("<reatt>",)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] == "reatt":
                    yield node.lineno, ("<reatt>",)
                    continue
                if parts[0] != "reatt_kernels":
                    continue
                base = tuple(parts[1:])
            else:
                up = node.level - 1
                base = pkg_parts[:len(pkg_parts) - up] if up else pkg_parts
                if node.module:
                    base = base + tuple(node.module.split("."))
            for a in node.names:
                sub = base + (a.name,)
                # `from X import name`: a submodule when that file or package exists, else an attribute of X
                if (PKG.joinpath(*sub).with_suffix(".py")).exists() or PKG.joinpath(*sub, "__init__.py").exists() \
                        or sub in {(c,) for c in COMPILED}:
                    yield node.lineno, sub
                else:
                    yield node.lineno, base


def test_imports_run_one_way():
    bad = []
    for path, rel in modules():
        mine = layer(rel)
        for line, target in imported(path, rel):
            where = f"reatt_kernels/{'/'.join(rel)}.py:{line}"
            if target == ("<reatt>",):
                bad.append(f"{where} imports the reatt model package (it sits above reatt_kernels)")
                continue
            theirs = layer(target if target else ("__init__",))
            if theirs > mine:
                bad.append(f"{where} ({NAMES[mine]}) imports reatt_kernels.{'.'.join(target) or '__init__'} "
                           f"({NAMES[theirs]}): imports must run down the layers")
    assert not bad, "layering violations:\n" + "\n".join(bad)


@pytest.mark.parametrize("backend", ["cpu", "cuda", "triton", "cuda_emu", "reference", "ops"])
def test_backends_never_import_the_index_or_bench(backend):
    for path, rel in modules():
        if rel[0] != backend:
            continue
        for line, target in imported(path, rel):
            assert target[:1] not in (("index",), ("bench",)), f"reatt_kernels/{'/'.join(rel)}.py:{line} imports {target}"
