"""SQuAD JSON (SQuAD v1.1 dev and the SQuADShifts sets): paragraphs and their questions, in file order."""
from __future__ import annotations

import json

from ..text import Paragraph, RawQuestion


def read_squad(path, keep_title: bool) -> tuple[list, list]:
    """SQuAD JSON (``{"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question", "answers":
    [{"text", ...}]}]}]}]}``) -> (paragraphs, questions) in file order. ``keep_title``: Wikipedia sources keep the
    article title (underscores to spaces); NYT, Reddit and Amazon have none worth keeping."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError(f"{path}: not SQuAD JSON (expected an object with a 'data' list)")
    paras, qs = [], []
    for a_no, art in enumerate(data["data"]):
        title = art.get("title", "").replace("_", " ").strip() if keep_title else ""
        for p_no, p in enumerate(art.get("paragraphs", [])):
            if not isinstance(p.get("context"), str):
                raise ValueError(f"{path}: data[{a_no}].paragraphs[{p_no}] has no string 'context'")
            paras.append(Paragraph(title, p["context"]))
            for qa in p.get("qas", []):
                qs.append(RawQuestion(str(qa["id"]), qa["question"].strip(),
                                      [a["text"] for a in qa.get("answers", [])], len(paras) - 1))
    return paras, qs
