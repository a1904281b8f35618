"""reatt-eval: retrieval and reading metrics of a run file (reatt-index search's output, or any FiD-format JSONL).

    reatt-eval --data run.jsonl                          # retrieval only: answer containment top-1/5/20/100
    reatt-eval --model RUN/final --data run.jsonl        # + FiD reading over the top --n-docs ctxs: EM and F1

Retrieval (ctxs in their file order = rank order):
- ``top{k}``: the fraction of questions with at least one of their first k ctxs containing an answer, as DPR and FiD
  count it: text and answer are NFD-normalised, split into alphanumeric runs and single other non-space characters,
  lower-cased, and the answer's tokens must appear as a contiguous run in the passage's tokens. A question with
  fewer than k ctxs counts the ones it has.
- ``gold_top{k}``: the same with gold labels (ctxs with ``"gold": true``, or ``"gold_ids"``), over the questions that
  have them; reported only when some do.

Reading: Fusion-in-Decoder greedy generation over each question's first ``--n-docs`` ctxs; ``em`` and ``f1`` with
SQuAD's normalisation (lower case, no punctuation, no articles a/an/the, single spaces), the best over the answers.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import string
import sys
import unicodedata
from collections import Counter
from typing import Optional, Sequence

from .config import MAX_DOC_LEN, MAX_QUERY_LEN

try:  # DPR's tokenizer classes (\p{L}\p{N}\p{M}); `regex` comes with transformers
    import regex

    _TOKEN = regex.compile(r"[\p{L}\p{N}\p{M}]+|[^\p{Z}\p{C}]", regex.UNICODE)
except ImportError:  # pragma: no cover - the same classes, by unicodedata categories below
    _TOKEN = None


def _dpr_tokens(text: str) -> list[str]:
    """DPR's SimpleTokenizer, uncased: alphanumeric runs (letters, digits, combining marks) and single other
    non-space, non-control characters."""
    text = unicodedata.normalize("NFD", text)
    if _TOKEN is not None:
        return [t.lower() for t in _TOKEN.findall(text)]
    out, cur = [], []
    for ch in text:
        cat = unicodedata.category(ch)
        if cat[0] in "LNM":
            cur.append(ch)
            continue
        if cur:
            out.append("".join(cur))
            cur = []
        if cat[0] not in "ZC":
            out.append(ch)
    if cur:
        out.append("".join(cur))
    return [t.lower() for t in out]


def has_answer(answers: Sequence[str], text: str) -> bool:
    """DPR/FiD answer containment: some answer's token sequence occurs contiguously in the text's tokens."""
    toks = _dpr_tokens(text)
    for a in answers:
        at = _dpr_tokens(a)
        if not at:
            continue
        n = len(at)
        if any(toks[i:i + n] == at for i in range(len(toks) - n + 1)):
            return True
    return False


def passage_text(c: dict) -> str:
    """What answer containment searches: the passage text (DPR and FiD use the text only, not the title)."""
    return c.get("text", "")


def normalize_answer(s: str) -> str:
    """SQuAD/FiD normalisation: lower case, no punctuation, no articles, single spaces (the one normalisation of
    this package: reatt-train's and reatt-eval's EM both use it)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def em_score(pred: str, answers: Sequence[str]) -> float:
    return float(any(normalize_answer(pred) == normalize_answer(a) for a in answers))


def f1_score(pred: str, answers: Sequence[str]) -> float:
    """SQuAD token F1, the best over the answers."""
    best = 0.0
    p = normalize_answer(pred).split()
    for a in answers:
        g = normalize_answer(a).split()
        common = Counter(p) & Counter(g)
        same = sum(common.values())
        if not p or not g:
            best = max(best, float(p == g))
            continue
        if same:
            prec, rec = same / len(p), same / len(g)
            best = max(best, 2 * prec * rec / (prec + rec))
    return best


def retrieval_metrics(rows: Sequence[dict], ks: Sequence[int] = (1, 5, 20, 100)) -> dict:
    """Answer-containment top-k accuracy over rows {answers, ctxs[, gold_ids]}, and gold-id top-k where labelled."""
    from .data import doc_id

    res: dict = {"n_questions": len(rows)}
    first_hit, gold_hit = [], []
    for r in rows:
        ctxs = r["ctxs"]
        pos = next((j for j, c in enumerate(ctxs) if has_answer(r["answers"], passage_text(c))), None)
        first_hit.append(pos)
        gold = set(r.get("gold_ids") or [doc_id(c) for c in ctxs if c.get("gold")])
        if gold:
            gold_hit.append(next((j for j, c in enumerate(ctxs) if c.get("gold") or doc_id(c) in gold), None))
    n = max(1, len(rows))
    for k in ks:
        res[f"top{k}"] = sum(p is not None and p < k for p in first_hit) / n
    if gold_hit:
        res["n_gold_labelled"] = len(gold_hit)
        for k in ks:
            res[f"gold_top{k}"] = sum(p is not None and p < k for p in gold_hit) / len(gold_hit)
    res["min_ctxs"] = min((len(r["ctxs"]) for r in rows), default=0)
    return res


def reading_metrics(model, rows: Sequence[dict], n_docs: int, device, batch_size: int = 16, max_query_len: int = MAX_QUERY_LEN,
                    max_doc_len: int = MAX_DOC_LEN, max_answer_len: int = 32, bf16: str = "auto", progress: bool = False,
                    predictions: Optional[list] = None) -> dict:
    """FiD greedy generation over each question's first n_docs ctxs -> {"em", "f1", "n_read"}."""
    import torch
    from tqdm.auto import tqdm

    from .data import Collator, Example
    from .retrieve import autocast

    tok = model._tok()
    col = Collator(tok, n_docs, max_query_len, max_doc_len, max_answer_len)
    rows = [r for r in rows if r["answers"] and r["ctxs"]]
    em = f1 = 0.0
    bar = tqdm(total=len(rows), desc="reading", unit="q", disable=not progress, file=sys.stderr)
    for i in range(0, len(rows), batch_size):
        part = rows[i:i + batch_size]
        b = col([Example(r["question"], r["answers"], r["ctxs"]) for r in part])
        b = {k: v.to(device) for k, v in b.items()}
        with torch.no_grad(), autocast(device, bf16):
            gen = model.generate_answers(b["q_ids"], b["q_mask"], b["d_ids"], b["d_mask"],
                                         max_new_tokens=max_answer_len)
        for r, p in zip(part, tok.batch_decode(gen, skip_special_tokens=True)):
            em += em_score(p, r["answers"])
            f1 += f1_score(p, r["answers"])
            if predictions is not None:
                predictions.append(p)
        bar.update(len(part))
    bar.close()
    n = max(1, len(rows))
    return {"em": em / n, "f1": f1 / n, "n_read": len(rows), "n_docs_read": n_docs}


def read_run(path: str) -> list[dict]:
    """reatt-index search's output (or FiD JSONL): question, answers and ranked ctxs; errors name the line."""
    from .data import load_jsonl

    exs = load_jsonl(path, require_ctxs=False)  # validates; errors name the line
    with open(path) as f:  # the gold labels of the question ("gold_ids"), also when no gold ctx was retrieved
        gold = [json.loads(ln).get("gold_ids") for ln in f if ln.strip()]
    return [{"question": e.question, "answers": e.answers, "ctxs": e.ctxs, "gold_ids": g or e.gold_ids}
            for e, g in zip(exs, gold)]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="reatt-eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="run JSONL: question, answers, ctxs in rank order")
    ap.add_argument("--model", help="a model saved by reatt-train (OUT/final): adds FiD reading EM/F1")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    ap.add_argument("--top-k", default="1,5,20,100", help="retrieval cut-offs")
    ap.add_argument("--n-docs", type=int, default=10, help="ctxs read per question by FiD")
    ap.add_argument("--max-query-len", type=int, default=MAX_QUERY_LEN, help="question tokens")
    ap.add_argument("--max-doc-len", type=int, default=MAX_DOC_LEN, help="passage tokens")
    ap.add_argument("--max-answer-len", type=int, default=32, help="generated tokens at most")
    ap.add_argument("--batch-size", type=int, default=16, help="questions per generation batch")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--bf16", choices=["auto", "on", "off"], default="auto", help="bf16 autocast (auto: on GPU)")
    ap.add_argument("--out", help="also write the metrics JSON here")
    ap.add_argument("--predictions", help="write one JSON line per read question: question, answers, prediction")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return ap


def run(argv: Optional[list] = None) -> dict:
    """reatt-eval's work: parse ``argv``, print and return the metrics dict (for Python callers and tests)."""
    args = build_parser().parse_args(argv)
    try:
        ks = [int(k) for k in args.top_k.split(",") if k.strip()]
    except ValueError:
        raise SystemExit(f"--top-k must be comma-separated integers, got {args.top_k!r}") from None
    if not ks or min(ks) < 1:
        raise SystemExit(f"--top-k needs integers >= 1, got {args.top_k!r}")
    rows = read_run(args.data)
    res = {"data": args.data, "retrieval": retrieval_metrics(rows, ks)}
    if args.model:
        from .retrieve import load_model, pick_device

        device = pick_device(args.device)
        model = load_model(args.model, args.tokenizer, device)
        preds: list = []
        res["reading"] = reading_metrics(model, rows, args.n_docs, device, args.batch_size, args.max_query_len,
                                         args.max_doc_len, args.max_answer_len, args.bf16,
                                         progress=not args.no_progress, predictions=preds)
        if args.predictions:
            with open(args.predictions, "w") as f:
                read = [r for r in rows if r["answers"] and r["ctxs"]]
                for r, p in zip(read, preds):
                    f.write(json.dumps({"question": r["question"], "answers": r["answers"], "prediction": p}) + "\n")
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return res


def main(argv: Optional[list] = None) -> int:
    """The console script: the exit status (0), never the metrics (a returned dict makes ``sys.exit`` exit 1)."""
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
