"""FiD/ReAtt JSONL data: one question per line, {"question", "answers": [...], "ctxs": [{"title", "text"}, ...]}.

Queries are tokenized as "question: <q>" without EOS (a pair is query tokens then document tokens), documents as
"title: <t> context: <text>" with EOS, answers as "<a>" with EOS. Optional ctx fields: "id" (the document's identity
for retrieval metrics; default: title + text) and "gold" (true for the gold document, used only for evaluation).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .config import MAX_DOC_LEN, MAX_QUERY_LEN


class DataError(ValueError):
    """A malformed line of a JSONL file; the message names the file and line."""


@dataclass
class Example:
    question: str
    answers: list
    ctxs: list  # list of {"title", "text", ...}
    line: int = 0
    gold_ids: list = field(default_factory=list)


def doc_id(ctx: dict) -> str:
    return str(ctx["id"]) if "id" in ctx else f"{ctx.get('title', '')}\x00{ctx['text']}"


def iter_jsonl(path: str, rank: int = 0, world: int = 1):
    """Yield ``(line, obj)`` for the non-blank lines k = rank, rank + world, ... of a JSONL file (1-based line numbers,
    for error messages), streaming: the other lines are read but never parsed or kept. A line that is not valid
    JSON raises :class:`DataError` naming it."""
    k = -1
    with open(path) as f:
        for ln, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            k += 1
            if k % world != rank:
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{ln}: not valid JSON ({e.msg})") from None
            yield ln, obj


def count_jsonl(path: str) -> int:
    """Number of non-blank lines (examples) of a JSONL file, without parsing them."""
    with open(path) as f:
        return sum(1 for raw in f if raw.strip())


def load_jsonl(path: str, require_ctxs: bool = True, rank: int = 0, world: int = 1) -> list[Example]:
    """Read and validate a FiD/ReAtt JSONL file; errors name the line (1-based) and the problem.

    ``rank``/``world``: only this rank's share, the examples rank, rank + world, ... (reatt-train under
    torch.distributed: no rank holds the whole file, about 20 GB for NQ with 100 ctxs per question)."""
    out = []
    for ln, obj in iter_jsonl(path, rank, world):
        where = f"{path}:{ln}"
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        for key in ("question", "answers", "ctxs"):
            if key not in obj:
                raise DataError(f"{where}: missing field {key!r}")
        q, answers, ctxs = obj["question"], obj["answers"], obj["ctxs"]
        if not isinstance(q, str) or not q.strip():
            raise DataError(f"{where}: 'question' must be a non-empty string")
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise DataError(f"{where}: 'answers' must be a non-empty list of strings")
        if not isinstance(ctxs, list):
            raise DataError(f"{where}: 'ctxs' must be a list of {{'title', 'text'}} objects")
        if require_ctxs and not ctxs:
            raise DataError(f"{where}: 'ctxs' is empty (every question needs at least one document)")
        for k, c in enumerate(ctxs):
            if not isinstance(c, dict) or not isinstance(c.get("text"), str):
                raise DataError(f"{where}: ctxs[{k}] must be an object with a string 'text'")
            if "title" in c and not isinstance(c["title"], str):
                raise DataError(f"{where}: ctxs[{k}].title must be a string")
        gold = [doc_id(c) for c in ctxs if c.get("gold")]
        out.append(Example(q, answers, ctxs, ln, gold))
    if not out:
        raise DataError(f"{path}: no examples" + (f" for rank {rank} of {world}" if world > 1 else ""))
    return out


def query_text(q: str) -> str:
    return f"question: {q}"


def doc_text(c) -> str:
    if isinstance(c, str):
        return f"title:  context: {c}"
    return f"title: {c.get('title', '')} context: {c['text']}"


def _tokenize(tok, texts, max_length, add_eos):
    enc = tok(list(texts), add_special_tokens=add_eos, truncation=True, max_length=max_length, padding="longest",
              return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"].bool()


def tokenize_queries(tok, questions: Sequence[str], max_length: int = MAX_QUERY_LEN):
    """-> ids [N, Lq], bool mask [N, Lq] ("question: ..." without EOS)."""
    return _tokenize(tok, [query_text(q) for q in questions], max_length, False)


def tokenize_docs(tok, docs: Sequence, max_length: int = MAX_DOC_LEN):
    """-> ids [N, Ld], bool mask [N, Ld] ("title: ... context: ..." + EOS)."""
    return _tokenize(tok, [doc_text(c) for c in docs], max_length, True)


def tokenize_answers(tok, answers: Sequence[str], max_length: int = 32):
    ids, mask = _tokenize(tok, answers, max_length, True)
    return ids.masked_fill(~mask, -100)


class Collator:
    """Examples -> a training batch: q_ids/q_mask [B, Lq], d_ids/d_mask [B, n, Ld], labels [B, T] (-100 padded), and
    gold [B, n] (bool, from the ctxs' "gold" field: for logging how much teacher mass lands on the gold document; the
    model never sees it).

    Each example contributes its first ``n_docs`` ctxs (fewer: the missing ones are empty, all-masked documents).
    The target: one of the answers drawn with Python's ``random`` (``target="random"``, the original's
    ``random.choice``; seeded and checkpointed by reatt-train), or ``answers[0]`` (``target="first"``).
    """

    def __init__(self, tok, n_docs: int, max_query_len: int = MAX_QUERY_LEN, max_doc_len: int = MAX_DOC_LEN,
                 max_answer_len: int = 32, target: str = "random"):
        if target not in ("random", "first"):
            raise ValueError(f"target must be 'random' or 'first', got {target!r}")
        self.tok, self.n_docs, self.target = tok, n_docs, target
        self.max_query_len, self.max_doc_len, self.max_answer_len = max_query_len, max_doc_len, max_answer_len

    def __call__(self, exs: Sequence[Example]) -> dict:
        B, n = len(exs), self.n_docs
        q_ids, q_mask = tokenize_queries(self.tok, [e.question for e in exs], self.max_query_len)
        docs, present = [], []
        for e in exs:
            cs = e.ctxs[:n]
            docs.extend(cs + [{"title": "", "text": ""}] * (n - len(cs)))
            present.extend([True] * len(cs) + [False] * (n - len(cs)))
        d_ids, d_mask = tokenize_docs(self.tok, docs, self.max_doc_len)
        d_mask &= torch.tensor(present)[:, None]
        targets = [random.choice(e.answers) if self.target == "random" and len(e.answers) > 1 else e.answers[0]
                   for e in exs]
        labels = tokenize_answers(self.tok, targets, self.max_answer_len)
        # Evaluation-only diagnostic (never given to the model): which slots hold a gold document.
        gold = torch.tensor([[bool(c.get("gold")) for c in e.ctxs[:n]] + [False] * (n - len(e.ctxs[:n])) for e in exs])
        return {"q_ids": q_ids, "q_mask": q_mask, "d_ids": d_ids.view(B, n, -1), "d_mask": d_mask.view(B, n, -1),
                "labels": labels, "gold": gold}


def sort_ctxs_by_score(examples: Sequence[Example]) -> None:
    """Sort each example's ctxs by descending ``score`` in place, as the original's ``sort_data`` (stable; an
    example where some ctx has no numeric score keeps its file order)."""
    for e in examples:
        try:
            keys = [float(c["score"]) for c in e.ctxs]
        except (KeyError, TypeError, ValueError):
            continue
        order = sorted(range(len(keys)), key=lambda i: -keys[i])
        e.ctxs = [e.ctxs[i] for i in order]


def build_corpus(examples: Sequence[Example]) -> tuple[list, dict]:
    """Unique documents over all examples' ctxs -> (docs, id -> index)."""
    docs, index = [], {}
    for e in examples:
        for c in e.ctxs:
            i = doc_id(c)
            if i not in index:
                index[i] = len(docs)
                docs.append(c)
    return docs, index


class EpochSampler:
    """Deterministic data order: epoch e is a permutation seeded by (seed, e), so a step number alone says where a
    resumed run continues. Global batch g covers order[g*G : (g+1)*G]; rank r takes its contiguous slice."""

    def __init__(self, n: int, global_batch: int, seed: int):
        if global_batch > n:
            raise ValueError(f"global batch {global_batch} is larger than the dataset ({n} examples)")
        self.n, self.G, self.seed = n, global_batch, seed
        self.per_epoch = n // global_batch

    def batch(self, step: int, rank: int = 0, world: int = 1) -> list[int]:
        epoch, k = divmod(step, self.per_epoch)
        order = list(range(self.n))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        g = order[k * self.G : (k + 1) * self.G]
        per = self.G // world
        return g[rank * per : (rank + 1) * per]


class ShardSampler:
    """Data order when every rank holds only its share of the examples (``load_jsonl(..., rank, world)``): epoch e
    of rank r is a permutation of its share seeded by (seed, e, r), so a step number alone says where a resumed run
    continues; a step's global batch is the ranks' disjoint batches. Every rank runs the same number of steps per
    epoch (the smallest share's). With world = 1 the order is :class:`EpochSampler`'s."""

    def __init__(self, n_local: int, batch: int, seed: int, rank: int = 0, world: int = 1,
                 n_total: Optional[int] = None):
        n_total = n_local if n_total is None else n_total
        self.per_epoch = (n_total // world) // batch
        if self.per_epoch == 0:
            raise ValueError(f"global batch {batch * world} is larger than the dataset ({n_total} examples)")
        self.n, self.B, self.seed, self.rank = n_local, batch, seed, rank

    def batch(self, step: int) -> list[int]:
        """Local indices (into this rank's share) of this rank's batch at ``step``."""
        epoch, k = divmod(step, self.per_epoch)
        order = list(range(self.n))
        random.Random(self.seed * 1_000_003 + epoch + self.rank * 7_919_993).shuffle(order)
        return order[k * self.B : (k + 1) * self.B]

