"""``--corpus beir:PATH``: a BEIR folder, the format of the BEIR benchmark's datasets.

- ``corpus.jsonl``: one document a line, ``{"_id", "title", "text"}`` (other fields ignored). Each document is one
  passage, not cut, because the qrels judge documents; a document longer than the encoder's limit is cut to it,
  and the number cut is printed and recorded (``n_passages_truncated``).
- ``queries.jsonl``: ``{"_id", "text"}``.
- ``qrels/test.tsv``: ``query-id <tab> corpus-id <tab> score`` after a header line; a score > 0 is relevant, and the
  score is the grade nDCG uses. Only queries with a relevant document are kept. Judgements naming a query or a
  document that the files do not have are dropped and counted (``n_qrels_unknown_query`` / ``_doc``).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..fetch import SourceError
from . import CorpusSpec, local_pins, local_slug

LICENCE = "the user's own data (its licence is the user's to check)"


def _files(path: Path) -> tuple[Path, Path, Path]:
    need = (path / "corpus.jsonl", path / "queries.jsonl", path / "qrels" / "test.tsv")
    missing = [str(p.relative_to(path)) for p in need if not p.is_file()]
    if not path.is_dir() or missing:
        have = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())[:20] if path.is_dir() else []
        raise SourceError(f"beir:{path}: " + (f"lacks {', '.join(missing)}" if path.is_dir() else "is not a folder")
                          + " (a BEIR folder holds corpus.jsonl, queries.jsonl and qrels/test.tsv)"
                          + (f"; it has: {', '.join(have)}" if have else ""))
    return need


def _jsonl(path: Path, fields: tuple) -> list:
    rows = []
    with open(path) as f:
        for ln, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError as e:
                raise SourceError(f"{path}:{ln}: not JSON ({e})") from None
            if not isinstance(obj, dict) or any(not isinstance(obj.get(k), str) for k in fields):
                raise SourceError(f"{path}:{ln}: expected an object with string fields {', '.join(fields)}")
            rows.append(obj)
    return rows


def read_beir(path) -> tuple[list, list, dict]:
    """(passages, questions, stats) of a BEIR folder (see the module docstring); question rows carry ``qrels``
    ({document id: grade}) beside ``gold_ids`` (the documents graded > 0)."""
    path = Path(path).expanduser()
    corpus_f, queries_f, qrels_f = _files(path)
    passages = [{"id": d["_id"], "title": str(d.get("title") or "").strip(), "text": d["text"]}
                for d in _jsonl(corpus_f, ("_id", "text"))]
    by_id = {p["id"]: p for p in passages}
    if len(by_id) != len(passages):
        raise SourceError(f"{corpus_f}: {len(passages) - len(by_id)} repeated _id values (each document needs its own)")
    queries = {q["_id"]: q["text"] for q in _jsonl(queries_f, ("_id", "text"))}
    qrels: dict = {}
    unknown_q = unknown_d = 0
    with open(qrels_f) as f:
        for ln, raw in enumerate(f, 1):
            cols = raw.rstrip("\n").split("\t")
            if not raw.strip() or (ln == 1 and not cols[-1].lstrip("-").isdigit()):
                continue  # the header line
            if len(cols) != 3 or not cols[2].strip().lstrip("-").isdigit():
                raise SourceError(f"{qrels_f}:{ln}: expected 'query-id<TAB>corpus-id<TAB>integer score', got {raw!r}")
            q, d, s = cols[0], cols[1], int(cols[2])
            if q not in queries:
                unknown_q += 1
            elif d not in by_id:
                unknown_d += 1
            else:
                qrels.setdefault(q, {})[d] = s
    questions = []
    for q, text in queries.items():
        judged = qrels.get(q, {})
        gold = [d for d, s in judged.items() if s > 0]
        if gold:
            questions.append({"id": q, "question": text, "answers": [], "gold_ids": gold,
                              "ctxs": [{**by_id[d], "gold": True} for d in gold], "qrels": judged})
    if not questions:
        raise SourceError(f"beir:{path}: no query has a relevant document in {qrels_f} (score > 0, ids found in "
                          f"queries.jsonl and corpus.jsonl)")
    stats = {"sources": {"beir": {"documents": len(passages), "queries": len(queries), "questions": len(questions)}},
             "n_questions_without_answer": 0, "n_questions_without_gold": 0,
             "n_queries_without_qrels": len(queries) - len(questions), "n_qrels_unknown_query": unknown_q,
             "n_qrels_unknown_doc": unknown_d}
    return passages, questions, stats


def spec(path: str) -> CorpusSpec:
    p = Path(path).expanduser()

    def read(root, download, log):
        passages, questions, stats = read_beir(p)
        if stats["n_qrels_unknown_query"] or stats["n_qrels_unknown_doc"]:
            log(f"beir:{p}: dropped {stats['n_qrels_unknown_query']} judgements of unknown queries and "
                f"{stats['n_qrels_unknown_doc']} of unknown documents")
        return passages, questions, stats

    return CorpusSpec(name=f"beir:{path}", slug=local_slug("beir", p), description=f"BEIR folder {p.resolve()}",
                      pins=lambda: local_pins("beir", p, _files(p)), read=read, licence=LICENCE)
