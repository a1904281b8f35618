"""benchmarks/results/README.md and the README's results table are generated from the committed JSON: a JSON changed
without rerunning ``python benchmarks/make_results_readme.py`` fails here."""
from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "make_results_readme.py"


def _load():
    spec = importlib.util.spec_from_file_location("make_results_readme", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_results_readme_is_generated_and_up_to_date(capsys):
    assert _load().main(["--check"]) == 0, capsys.readouterr().out


def test_generic_rows_get_a_table(tmp_path):
    mod = _load()
    rows = [{"case": "a", "p50_ms": 1.5, "nested": {"x": 1}}, {"case": "b", "p50_ms": 2.25, "extra": None}]
    out = "\n".join(mod.table(rows, mod.generic_columns(rows)))
    assert out.splitlines()[0] == "| case | p50_ms |" and "| b | 2.25 |" in out
