"""From source text to the benchmark's passages and questions: DPR chunking, gold chunks, FiD JSONL.

Every source reader returns paragraphs and raw questions; :func:`assemble` turns them into

- passages ``{"id", "title", "text"}``: each paragraph cut as DPR does, into 100-word chunks (whitespace words); a
  last chunk shorter than 50 words is merged into the chunk before it, so no chunk is a 3-word tail. Ids are stable:
  ``<source>:<paragraph>:<chunk>`` in file order of the pinned source;
- questions ``{"id", "question", "answers", "gold_ids", "ctxs"}``: ``ctxs`` are the chunks of the question's own
  paragraph, ``"gold": true`` on the gold ones. A question's gold chunks are given by its reader (``RawQuestion.gold``:
  the whole paragraph is the answer, as for a docstring) or found by its answers: the chunks whose text contains an
  answer string (case-insensitive, whitespace-normalised). An answer that straddles a chunk boundary gives no gold
  chunk; such questions are kept (their gold list is empty) and counted (``n_questions_without_gold``).

These are the files ``reatt-train``, ``reatt-index`` and ``reatt-eval`` read (``passages.jsonl``, ``questions.jsonl``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

CHUNK_WORDS = 100
MIN_TAIL_WORDS = 50


def chunk_words(text: str, words: int = CHUNK_WORDS, min_tail: int = MIN_TAIL_WORDS) -> list:
    """DPR chunks: consecutive ``words``-word pieces of the whitespace-split text; a last piece shorter than
    ``min_tail`` words joins the one before it. Empty text -> []."""
    w = text.split()
    pieces = [w[i:i + words] for i in range(0, len(w), words)]
    if len(pieces) > 1 and len(pieces[-1]) < min_tail:
        tail = pieces.pop()
        pieces[-1] = pieces[-1] + tail
    return [" ".join(p) for p in pieces]


def norm(s: str) -> str:
    return " ".join(s.lower().split())


def clean_answers(answers: Iterable[str]) -> list:
    """Stripped, deduplicated, non-empty answers, in order."""
    out = []
    for a in answers:
        a = a.strip()
        if a and a not in out:
            out.append(a)
    return out


@dataclass
class Paragraph:
    title: str
    text: str
    key: Optional[str] = None  # id stem of its chunks (default: "<source>:<paragraph number>")


@dataclass
class RawQuestion:
    id: str
    question: str
    answers: list
    paragraph: int  # index into the source's paragraph list
    gold: Optional[str] = None  # "all": every chunk of its paragraph is gold (no answer string to look for)
    extra: dict = field(default_factory=dict)  # written into the question's JSONL row as they are


def assemble(parts: Sequence[tuple[str, list, list]], *, need_answers: bool = True) -> tuple[list, list, dict]:
    """[(source name, paragraphs, questions)] -> (passages, questions, stats); see the module docstring.

    ``need_answers``: drop (and count) questions left without an answer string; False for sources whose gold is given
    (``RawQuestion.gold == "all"``), which have no answer strings."""
    passages, questions = [], []
    stats = {"sources": {}, "n_questions_without_answer": 0, "n_questions_without_gold": 0}
    for source, paras, raw_qs in parts:
        first = len(passages)
        para_chunks = []
        for p_no, p in enumerate(paras):
            ids = []
            stem = p.key or f"{source}:{p_no}"
            for c_no, text in enumerate(chunk_words(p.text)):
                ids.append(len(passages))
                passages.append({"id": f"{stem}:{c_no}", "title": p.title, "text": text})
            para_chunks.append(ids)
        n_q = 0
        for q in raw_qs:
            answers = clean_answers(q.answers)
            if need_answers and not answers and q.gold != "all":
                stats["n_questions_without_answer"] += 1
                continue
            norm_answers = [norm(a) for a in answers]
            ctxs = []
            for j in para_chunks[q.paragraph]:
                c = dict(passages[j])
                c["gold"] = q.gold == "all" or any(a in norm(c["text"]) for a in norm_answers)
                ctxs.append(c)
            gold = [c["id"] for c in ctxs if c["gold"]]
            stats["n_questions_without_gold"] += not gold
            questions.append({"id": q.id, "question": q.question, "answers": answers, "gold_ids": gold, "ctxs": ctxs,
                              **q.extra})
            n_q += 1
        stats["sources"][source] = {"paragraphs": len(paras), "passages": len(passages) - first, "questions": n_q}
    return passages, questions, stats


def doc_text(p: dict) -> str:
    """The text a passage is encoded as: ``"<title>. <text>"``, or the text alone."""
    return f"{p['title']}. {p['text']}" if p.get("title") else p["text"]


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
