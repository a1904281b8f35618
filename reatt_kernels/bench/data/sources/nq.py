"""Natural Questions passages from the bigbench knowledge-conflicts task, with the swapped entity put back.

The task swapped the answer entity in each passage for another one; the original is the score-0 key of
``target_scores`` (the substitute is the score-1 key), so every whole-word occurrence of the substitute is put back to
the original, then identical passages are merged (17,528 questions share about 13.8k passages)."""
from __future__ import annotations

import json
import re

from ..text import Paragraph, RawQuestion

_NQ_INPUT = re.compile(r"\s*Question:\s*(.*?)\nContext:\s*(.*)\Z", re.S)


def restore_entity(context: str, target_scores: dict, where: str = "") -> tuple[str, str]:
    """Put the original answer back into an entity-swapped passage: -> (restored context, original answer).

    ``target_scores`` maps the substitute entity to 1 and the original to 0. Every whole-word occurrence of the
    substitute becomes the original. An example with no score-1 key (one in the pinned task) is left as it is."""
    orig = [k for k, v in target_scores.items() if v == 0]
    subs = [k for k, v in target_scores.items() if v == 1]
    if len(orig) != 1 or len(subs) > 1:
        raise ValueError(f"{where}: expected one score-0 (original) and at most one score-1 (substitute) key in "
                         f"target_scores, got {target_scores}")
    if subs and subs[0] != orig[0]:
        context = re.sub(rf"(?<!\w){re.escape(subs[0])}(?!\w)", lambda _: orig[0], context)
    return context, orig[0]


def read_nq(path) -> tuple[list, list]:
    """The bigbench knowledge-conflicts task.json (``{"examples": [{"input": "\\nQuestion: q\\nContext: c",
    "target", "target_scores"}]}``) -> (deduplicated restored paragraphs, questions); question ids ``nq:<example>``."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise ValueError(f"{path}: not a bigbench task.json (expected an object with an 'examples' list)")
    paras, qs, seen = [], [], {}
    for i, ex in enumerate(data["examples"]):
        m = _NQ_INPUT.match(ex.get("input", ""))
        if not m:
            raise ValueError(f"{path}: examples[{i}].input is not '\\nQuestion: ...\\nContext: ...'")
        ctx, answer = restore_entity(m.group(2).strip(), ex.get("target_scores", {}), f"{path}: examples[{i}]")
        key = " ".join(ctx.split())
        if key not in seen:
            seen[key] = len(paras)
            paras.append(Paragraph("", ctx))
        qs.append(RawQuestion(f"nq:{i}", m.group(1).strip(), [answer], seen[key]))
    return paras, qs
