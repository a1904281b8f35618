"""Every console script of pyproject.toml exits with status 0 on success, run as a subprocess the way the installed
wrapper runs it (``sys.exit(main())``): a ``main`` returning a dict (or any non-int) exits with status 1, which
breaks ``set -e`` and ``&&`` chains although the tests that call ``main()`` directly pass.

The wrapper is emulated with ``python -c`` on this checkout (console scripts are not installed for a source tree):
the same entry point string, imported and called the same way."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def run_script(name: str, *argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """What the installed ``name`` wrapper does: import the entry point, ``sys.exit(func())``."""
    module, func = SCRIPTS[name].split(":")
    code = f"import sys; sys.argv[0] = {name!r}; from {module} import {func} as f; sys.exit(f())"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "REATT_REQUIRE_EXT": "0"}
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_help_exits_0(name):
    r = run_script(name, "--help")
    assert r.returncode == 0, f"{name} --help: status {r.returncode}\n{r.stderr[-2000:]}"
    assert "usage:" in r.stdout


def _rows(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reatt_eval_exits_0_after_a_real_run(tmp_path):
    pytest.importorskip("transformers")
    run = _rows(tmp_path / "run.jsonl", [
        {"question": "q one", "answers": ["red"], "ctxs": [{"text": "it is red"}, {"text": "blue"}]},
        {"question": "q two", "answers": ["green"], "ctxs": [{"text": "blue"}, {"text": "green grass"}]}])
    r = run_script("reatt-eval", "--data", str(run), "--top-k", "1,2", "--out", str(tmp_path / "m.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "m.json").read_text())["retrieval"]["top2"] == 1.0


def test_reatt_eval_bad_input_exits_nonzero(tmp_path):
    r = run_script("reatt-eval", "--data", str(tmp_path / "run.jsonl"), "--top-k", "0")
    assert r.returncode != 0 and "--top-k" in r.stderr


def test_reatt_demo_data_only_exits_0(tmp_path):
    pytest.importorskip("transformers")
    r = run_script("reatt-demo", "--data-only", "--out", str(tmp_path / "d"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "d" / "train.jsonl").is_file()


@pytest.mark.slow
def test_reatt_train_and_index_exit_0_after_a_real_run(tmp_path):
    """A 2-step demo training run, then an index build and a search with its model."""
    pytest.importorskip("transformers")
    out = tmp_path / "run"
    r = run_script("reatt-train", "--demo", "--steps", "2", "--eval-every", "0", "--eval-max", "4", "--out", str(out),
                   "--no-progress", "--plot", str(tmp_path / "p.png"))
    assert r.returncode == 0, r.stderr[-2000:]
    model, corpus = out / "final", out / "data" / "corpus.jsonl"
    r = run_script("reatt-index", "build", "--model", str(model), "--corpus", str(corpus), "--out",
                   str(tmp_path / "idx"), "--device", "cpu", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_script("reatt-index", "search", "--model", str(model), "--index", str(tmp_path / "idx"), "--questions",
                   str(out / "data" / "dev.jsonl"), "--k", "3", "--out", str(tmp_path / "run.jsonl"), "--device",
                   "cpu", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
