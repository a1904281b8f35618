"""The corpora, one file per source. :func:`resolve` turns a ``--corpus`` name into a :class:`CorpusSpec`:

- ``docstrings``, ``docstrings-small``, ``docstrings-large``: the docstrings of the installed Python standard library,
  torch and numpy (:mod:`.docstrings`); nothing to download;
- ``squad-dev``, ``real-all``: SQuAD v1.1 dev, SQuADShifts and Natural Questions from the ``bigbench==1.0.0`` sdist
  (:mod:`.bigbench`, readers :mod:`.squad` and :mod:`.nq`);
- ``beir:PATH``: a BEIR folder (:mod:`.beir`); ``jsonl:PATH``: FiD/DPR JSONL (:mod:`.jsonl`).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class CorpusSpec:
    """How to make one corpus's passages and questions.

    name: as asked for (``"squad-dev"``, ``"beir:/data/scifact"``); slug: its cache folder name; pins(): what the text
    is made from (pinned sources, versions, input file digests): a cached text is reused only while this is equal;
    read(root, download, log) -> (passages, questions, stats) (see :mod:`..text`); sources: the pinned downloads it
    needs (:class:`..fetch.Source`)."""
    name: str
    slug: str
    description: str
    pins: Callable[[], dict]
    read: Callable
    licence: str
    sources: tuple = ()


NAMED = ("docstrings", "docstrings-small", "docstrings-large", "squad-dev", "real-all")
PREFIXES = ("beir:", "jsonl:")
DEFAULT = "docstrings"


def resolve(name: str) -> CorpusSpec:
    """The :class:`CorpusSpec` of a ``--corpus`` value; ValueError naming the accepted values otherwise."""
    from . import beir, bigbench, docstrings, jsonl  # here: each of them imports CorpusSpec from this package

    if name in docstrings.SIZES:
        return docstrings.spec(name)
    if name in bigbench.CORPORA:
        return bigbench.spec(name)
    if name.startswith("beir:"):
        return beir.spec(name[len("beir:"):])
    if name.startswith("jsonl:"):
        return jsonl.spec(name[len("jsonl:"):])
    raise ValueError(f"unknown corpus {name!r}; expected one of {', '.join(NAMED)}, beir:PATH (a BEIR folder) or "
                     f"jsonl:PATH (FiD/DPR JSONL)")


def local_slug(kind: str, path) -> str:
    """Cache folder name of a user's corpus: the kind, the folder or file name, and a digest of its absolute path
    (two folders with the same name do not share a cache)."""
    p = Path(path).expanduser().resolve()
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", p.name)[:40] or "root"
    return f"{kind}-{stem}-{hashlib.sha256(str(p).encode()).hexdigest()[:8]}"


def local_pins(kind: str, path, files) -> dict:
    """What a user's corpus is made from, cheaply: each input file's size and modification time (a changed file
    rebuilds the text; a text rebuilt to the same content keeps its vectors)."""
    p = Path(path).expanduser().resolve()
    out = {}
    for f in files:
        f = Path(f).resolve()
        st = f.stat()
        out[f.relative_to(p).as_posix() if f != p else f.name] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"kind": kind, "path": str(p), "files": out}
