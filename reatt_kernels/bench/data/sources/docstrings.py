"""Docstrings of the installed Python standard library, torch and numpy: real English written by people, that arrives
with the project's own pinned dependencies (nothing is downloaded, so it cannot disappear while the project installs).

Each docstring is one question and its gold passages:

- the question is its summary: the first paragraph (leading signature lines such as ``abs(input, *, out=None) ->
  Tensor`` skipped), or that paragraph's first sentence when the paragraph is longer than 24 words; a docstring whose
  summary is still longer, or shorter than 4 words, gives passages but no question;
- the passages are the rest of the docstring, cut into 100-word chunks (:func:`..text.chunk_words`); all of them are
  the question's gold. Each passage's title is the documented object's dotted name (``torch.nn.functional.conv2d``).

Extraction reads the installed source files with :mod:`ast` and imports nothing: the docstrings of modules, classes
and functions, and the string given to the docstring-setting calls that document compiled functions
(``add_docstr`` / ``_add_docstr`` / ``add_docstr_all`` in torch, ``add_newdoc`` in numpy; a ``"...".format(...)``
template keeps its placeholders' names). Tests, vendored third-party code (``torch/_vendor``, ``torch/utils/hipify``)
and the interpreter's own ``site-packages`` are left out. Docstrings that are identical (after whitespace
normalisation) are kept once; a docstring whose body has fewer than 30 words is dropped; a repeated summary keeps its
passages but asks no second question.

Order and size: files are visited in the order of ``sha256("<source>/<path>")`` (an interleaving of the three
sources that does not depend on the file system), docstrings in source order within a file, until the size's word
budget of passage text is reached (:data:`SIZES`); so each size is a prefix of the next. The text is deterministic for
the installed versions, which the manifest records (Python, torch, numpy) with the sha256 of the text it gives.

Licences: the Python standard library is under the PSF License Agreement (``LICENSE.txt`` beside it); torch under its
BSD-3-Clause licence (``torch-*.dist-info/licenses/LICENSE``; the third-party licences listed there cover compiled
code, not these docstrings, and the vendored Python is skipped); numpy under BSD-3-Clause (``numpy-*.dist-info/
licenses/LICENSE.txt``; ``numpy/ma`` is BSD-3-Clause from the University of Georgia, ``numpy/random`` NCSA/BSD-3-Clause).
"""
from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import inspect
import os
import platform
import re
import sysconfig
from pathlib import Path
from typing import Iterator, Optional

from ..text import Paragraph, RawQuestion, assemble, norm
from . import CorpusSpec

# name -> words of passage text (None: every docstring). Sized for the encoder's speed on a 2-core machine (about
# 2,100 wordpieces/s with MiniLM) and the text's density (about 2.2 wordpieces per word of docstring text, with each
# passage's title): "docstrings" is about 325k token vectors, a 2.5-3 minute encode, so `make bench` from a fresh
# clone fits 10 minutes; "docstrings-large" is every docstring, about 2.3M (torch 2.13.0, numpy 2.4.6, Python 3.11.7).
SIZES = {"docstrings-small": 5_000, "docstrings": 145_000, "docstrings-large": None}
EXTRACTOR = 1  # bump when a rule above changes: cached texts are rebuilt
MAX_QUESTION_WORDS = 24  # so that few questions exceed the 32 wordpieces a query keeps
MIN_QUESTION_WORDS = 4
MIN_BODY_WORDS = 30
LICENCE = "Python standard library: PSF-2.0; torch: BSD-3-Clause; numpy: BSD-3-Clause"

# Folders left out, by name anywhere below a root, or by path from the root.
_SKIP_NAMES = {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"}
_SKIP_PATHS = {"torch": ("_vendor", "utils/hipify", "testing/_internal")}
# Calls that set a compiled object's docstring: name -> how to read (dotted target, docstring) from the arguments.
_DOC_CALLS = ("add_docstr", "_add_docstr", "add_docstr_all", "add_newdoc")
_SIGNATURE = re.compile(r"^[\w.]+\(.*\)\s*(->.*)?$")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def roots() -> dict:
    """source -> the installed folder it is read from (found without importing anything)."""
    out = {"python": Path(sysconfig.get_paths()["stdlib"])}
    for pkg in ("torch", "numpy"):
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"{pkg} is not installed: the docstrings corpus reads its installed source files")
        out[pkg] = Path(list(spec.submodule_search_locations)[0])
    return out


def versions() -> dict:
    return {"python": platform.python_version(), "torch": importlib.metadata.version("torch"),
            "numpy": importlib.metadata.version("numpy")}


def source_files(roots_: dict) -> list:
    """[(source, path relative to its root)] of every .py file kept, in the corpus's visiting order."""
    out = []
    for source, root in roots_.items():
        skip = _SKIP_PATHS.get(source, ())
        for dirpath, dirnames, filenames in os.walk(root):
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            dirnames[:] = [d for d in dirnames if d not in _SKIP_NAMES
                           and (f"{rel_dir}/{d}" if rel_dir != "." else d) not in skip]
            for f in filenames:
                if f.endswith(".py"):
                    out.append((source, (Path(rel_dir) / f).as_posix() if rel_dir != "." else f))
    return sorted(out, key=lambda sr: hashlib.sha256(f"{sr[0]}/{sr[1]}".encode()).hexdigest())


def module_name(source: str, rel: str) -> str:
    parts = rel[:-3].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    prefix = [] if source == "python" else [source]
    return ".".join(prefix + parts)


def _literal(node) -> Optional[str]:
    """The string a docstring argument spells out: a literal, a concatenation of literals, or a ``.format`` /
    ``%`` template (its placeholders keep their names: ``{input}`` -> ``input``); None for anything computed."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _literal(node.left), _literal(node.right)
        return None if left is None or right is None else left + right
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):
        return _literal(node.left)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
        t = _literal(node.func.value)
        return None if t is None else _PLACEHOLDER.sub(r"\1", t).replace("{{", "{").replace("}}", "}")
    return None


def _doc_call(node: ast.Call) -> Optional[tuple[str, str]]:
    """(dotted name, docstring) of a docstring-setting call, or None."""
    f = node.func
    name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
    if name not in _DOC_CALLS or len(node.args) < 2:
        return None
    a = node.args
    if name == "add_newdoc" and len(a) >= 3:  # add_newdoc(place, obj, doc) or add_newdoc(place, obj, (attr, doc))
        place, obj = _literal(a[0]), _literal(a[1])
        doc, target = a[2], f"{place}.{obj}"
        if isinstance(doc, ast.Tuple) and len(doc.elts) == 2:
            target, doc = f"{target}.{_literal(doc.elts[0])}", doc.elts[1]
        text = _literal(doc)
    elif name == "add_docstr_all":  # torch/_tensor_docs.py: a method of torch.Tensor by name
        target, text = f"torch.Tensor.{_literal(a[0])}", _literal(a[1])
    else:
        target = _literal(a[0]) or ast.unparse(a[0])
        text = _literal(a[1])
    return None if text is None else (target, text)


def docstrings_of(tree: ast.Module, module: str) -> Iterator[tuple[int, str, str]]:
    """(line, dotted name, cleaned docstring) of one parsed file, in source order."""
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        yield 1, module, doc

    def visit(node, qual):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{qual}.{child.name}"
                d = ast.get_docstring(child, clean=True)
                if d:
                    yield child.lineno, name, d
                yield from visit(child, name)
            elif isinstance(child, ast.Call) and (got := _doc_call(child)):
                yield child.lineno, got[0], inspect.cleandoc(got[1])
                yield from visit(child, qual)
            else:
                yield from visit(child, qual)

    yield from visit(tree, module)


def split_docstring(doc: str) -> tuple[Optional[str], str]:
    """(summary or None, body) of a cleaned docstring; see the module docstring for the rules."""
    lines = doc.split("\n")
    i = 0
    head = []
    while i < len(lines) and (not lines[i].strip() or _SIGNATURE.match(lines[i].strip())):
        head.append(lines[i])
        i += 1
    para = []
    while i < len(lines) and lines[i].strip():
        para.append(lines[i].strip())
        i += 1
    rest = "\n".join(head + lines[i:])
    summary = " ".join(para)
    n = len(summary.split())
    if n > MAX_QUESTION_WORDS:
        m = re.match(r"(.+?[.!?])\s+(.*)\Z", summary, re.S)
        if m and MIN_QUESTION_WORDS <= len(m.group(1).split()) <= MAX_QUESTION_WORDS:
            return m.group(1), m.group(2) + "\n" + rest
        return None, summary + "\n" + rest
    if n < MIN_QUESTION_WORDS:
        return None, summary + "\n" + rest
    return summary, rest


def extract(words: Optional[int], roots_: Optional[dict] = None, log=print) -> tuple[list, list, dict]:
    """Paragraphs and questions (:mod:`..text` types) of the first ``words`` words of passage text (None: all),
    and extraction counts."""
    roots_ = roots_ or roots()
    paras, qs = [], []
    seen_docs, seen_summaries = set(), set()
    total = 0
    stats = {"files_read": 0, "files_unparsable": 0, "docstrings_seen": 0, "duplicates": 0, "too_short": 0,
             "without_question": 0, "repeated_summary": 0, "words": 0, "by_source": {s: 0 for s in roots_}}
    for source, rel in source_files(roots_):
        if words is not None and total >= words:
            break
        path = roots_[source] / rel
        stats["files_read"] += 1
        try:
            tree = ast.parse(path.read_bytes(), str(path))
        except (SyntaxError, ValueError):
            stats["files_unparsable"] += 1
            continue
        module = module_name(source, rel)
        for line, name, doc in docstrings_of(tree, module):
            if words is not None and total >= words:
                break
            stats["docstrings_seen"] += 1
            key = norm(doc)
            if key in seen_docs:
                stats["duplicates"] += 1
                continue
            seen_docs.add(key)
            summary, body = split_docstring(doc)
            n_body = len(body.split())
            if n_body < MIN_BODY_WORDS:
                stats["too_short"] += 1
                continue
            stem = f"{source}/{rel}:{line}"
            paras.append(Paragraph(name, body, key=stem))
            total += n_body
            stats["by_source"][source] += n_body
            if summary is None:
                stats["without_question"] += 1
            elif norm(summary) in seen_summaries:
                stats["repeated_summary"] += 1
            else:
                seen_summaries.add(norm(summary))
                qs.append(RawQuestion(stem, summary, [], len(paras) - 1, gold="all"))
    stats["words"] = total
    log(f"docstrings: {len(paras)} docstrings ({total} words) and {len(qs)} questions from {stats['files_read']} "
        f"files")
    return paras, qs, stats


def spec(name: str) -> CorpusSpec:
    words = SIZES[name]

    def pins():
        return {"installed": versions(), "words": words, "extractor": EXTRACTOR}

    def read(root, download, log):
        paras, qs, ex = extract(words, log=log)
        passages, questions, stats = assemble([("docstrings", paras, qs)], need_answers=False)
        stats["extraction"] = ex
        return passages, questions, stats

    size = "every docstring" if words is None else f"{words:,} words of passage text"
    return CorpusSpec(name=name, slug=name, description=f"docstrings of the installed Python standard library, torch "
                      f"and numpy ({size}; nothing downloaded)", pins=pins, read=read, licence=LICENCE)
