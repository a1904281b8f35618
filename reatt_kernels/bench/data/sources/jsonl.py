"""``--corpus jsonl:PATH``: FiD / DPR JSONL, the files ``reatt-train``, ``reatt-index`` and ``reatt-eval`` read.

PATH is either
- a folder with ``passages.jsonl`` (``{"id", "title"?, "text"}``) and ``questions.jsonl`` (``{"question",
  "answers"?, "gold_ids"?, "ctxs"?}``): what ``reatt-data build`` writes, or
- one questions file whose ``ctxs`` (``[{"id"?, "title"?, "text", "gold"? / "has_answer"?}]``, FiD and DPR's
  retriever output) are the passages: their union, repeated ones (same id, or same title and text) kept once.

A question's gold passages, first rule that gives any: its ``gold_ids``; its ctxs marked ``"gold": true``; its
ctxs marked ``"has_answer": true`` (DPR); its ctxs whose text contains one of its answers (case-insensitive,
whitespace-normalised). A question left with none is kept in the files and counted (``n_questions_without_gold``),
and the benchmarks leave it out of the quality figures. Passages are not cut again: they are used as given.
A passage without an ``id`` is named by its title and text, as ``reatt.data.doc_id`` does, and given the id
``p<number>``.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..fetch import SourceError
from ..text import clean_answers, norm
from . import CorpusSpec, local_pins, local_slug

LICENCE = "the user's own data (its licence is the user's to check)"


def _files(path: Path) -> list:
    if path.is_dir():
        need = [path / "passages.jsonl", path / "questions.jsonl"]
        missing = [p.name for p in need if not p.is_file()]
        if missing:
            raise SourceError(f"jsonl:{path}: the folder lacks {', '.join(missing)} (expected passages.jsonl and "
                              f"questions.jsonl, or give one FiD/DPR questions file whose ctxs are the passages)")
        return need
    if not path.is_file():
        raise SourceError(f"jsonl:{path}: no such file or folder (expected a folder with passages.jsonl and "
                          f"questions.jsonl, or one FiD/DPR questions file)")
    return [path]


def _rows(path: Path):
    with open(path) as f:
        for ln, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError as e:
                raise SourceError(f"{path}:{ln}: not JSON ({e})") from None
            if not isinstance(obj, dict):
                raise SourceError(f"{path}:{ln}: expected a JSON object")
            yield ln, obj


def _key(p: dict) -> str:
    """A passage's identity: its id, else its title and text (as reatt.data.doc_id)."""
    return str(p["id"]) if "id" in p else f"{p.get('title', '')}\x00{p['text']}"


def _passage(obj: dict, where: str) -> dict:
    if not isinstance(obj.get("text"), str) or not isinstance(obj.get("title", ""), str):
        raise SourceError(f"{where}: expected a passage object with a string 'text' (and an optional string 'title')")
    return {"title": obj.get("title", "") or "", "text": obj["text"]}


def read_fid(path) -> tuple[list, list, dict]:
    """(passages, questions, stats) of FiD/DPR JSONL (see the module docstring)."""
    path = Path(path).expanduser()
    files = _files(path)
    passages, index = [], {}

    def add(obj, where):
        k = _key(obj)
        if k not in index:
            index[k] = len(passages)
            passages.append({"id": str(obj["id"]) if "id" in obj else f"p{len(passages)}", **_passage(obj, where)})
        return k

    if len(files) == 2:
        for ln, obj in _rows(files[0]):
            if _key(obj) in index:
                raise SourceError(f"{files[0]}:{ln}: repeated passage id {obj.get('id')!r}")
            add(obj, f"{files[0]}:{ln}")
    qfile = files[-1]
    questions = []
    stats = {"sources": {}, "n_questions_without_answer": 0, "n_questions_without_gold": 0, "n_gold_unknown": 0}
    for ln, obj in _rows(qfile):
        where = f"{qfile}:{ln}"
        q = obj.get("question")
        if not isinstance(q, str) or not q.strip():
            raise SourceError(f"{where}: expected an object with a non-empty string 'question'")
        answers = obj.get("answers", [])
        answers = [answers] if isinstance(answers, str) else answers
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise SourceError(f"{where}: 'answers' must be a list of strings")
        answers = clean_answers(answers)
        ctxs = obj.get("ctxs", [])
        if not isinstance(ctxs, list):
            raise SourceError(f"{where}: 'ctxs' must be a list of passage objects")
        keys = []
        for k, c in enumerate(ctxs):
            if not isinstance(c, dict):
                raise SourceError(f"{where}: ctxs[{k}] must be an object with a string 'text'")
            if len(files) == 1:
                keys.append(add(c, f"{where}: ctxs[{k}]"))
            else:
                keys.append(_key(c) if "text" in c or "id" in c else None)
        norm_answers = [norm(a) for a in answers]
        if obj.get("gold_ids"):
            gold = [str(g) for g in obj["gold_ids"]]
        else:
            gold = []
            for rule in (lambda c: c.get("gold") is True, lambda c: c.get("has_answer") is True,
                         lambda c: isinstance(c.get("text"), str) and any(a in norm(c["text"]) for a in norm_answers)):
                gold = [k for k, c in zip(keys, ctxs) if k is not None and rule(c)]
                if gold:
                    break
        known = [passages[index[g]]["id"] for g in dict.fromkeys(gold) if g in index]
        stats["n_gold_unknown"] += len(set(gold)) - len(known)
        stats["n_questions_without_gold"] += not known
        qid = str(obj.get("id", obj.get("qid", f"q{ln}")))
        questions.append({"id": qid, "question": q.strip(), "answers": answers, "gold_ids": known,
                          "ctxs": [{**passages[index[g]], "gold": True} for g in dict.fromkeys(gold) if g in index]})
    if not questions:
        raise SourceError(f"jsonl:{path}: no questions in {qfile}")
    stats["sources"]["jsonl"] = {"passages": len(passages), "questions": len(questions)}
    return passages, questions, stats


def spec(path: str) -> CorpusSpec:
    p = Path(path).expanduser()

    def read(root, download, log):
        passages, questions, stats = read_fid(p)
        if stats["n_gold_unknown"]:
            log(f"jsonl:{p}: {stats['n_gold_unknown']} gold ids name no passage (dropped)")
        return passages, questions, stats

    return CorpusSpec(name=f"jsonl:{path}", slug=local_slug("jsonl", p), description=f"FiD/DPR JSONL {p.resolve()}",
                      pins=lambda: local_pins("jsonl", p, _files(p)), read=read, licence=LICENCE)
