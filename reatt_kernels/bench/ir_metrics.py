"""Ranking quality against relevance judgements (qrels): nDCG@10, recall@100 and MRR@10, computed by pytrec_eval
(``pytrec-eval-terrier``, the maintained build of trec_eval's Python binding), as BEIR reports them.

Definitions (trec_eval's): a document is relevant when its grade is > 0.
- nDCG@10 = DCG@10 / ideal DCG@10, DCG@10 = sum over the top 10 of grade / log2(rank + 1) (linear gain), the ideal
  from every judged document of the query, retrieved or not;
- recall@100: relevant documents in the top 100 / relevant documents of the query;
- MRR@10: 1 / rank of the first relevant document within the top 10, else 0 (trec_eval's ``recip_rank`` over the
  top 10 only).
Each is averaged over the queries given. The ranking passed in is used as it is: every document is given a score
that falls with its rank, so trec_eval's own tie-breaking (by document id) never reorders it.
"""
from __future__ import annotations

from typing import Optional, Sequence

METRICS = ("ndcg@10", "recall@100", "mrr@10")


def qrels_metrics(ranked: Sequence[Sequence[int]], qrels: Sequence[dict], n_docs: Optional[int] = None) -> dict:
    """Mean nDCG@10, recall@100 and MRR@10 of ``ranked`` (per query, document indices best first; -1 = no result)
    against ``qrels`` (per query, {document index: grade}).

    recall@100 needs the top 100 (or, in a corpus of ``n_docs`` < 100 documents, all of them): with fewer results it
    is None. When pytrec_eval is not installed every metric is None and ``"qrels_note"`` says so."""
    if len(ranked) != len(qrels):
        raise ValueError(f"ranked has {len(ranked)} queries, qrels {len(qrels)}")
    try:
        import pytrec_eval
    except ImportError as exc:
        return {**{m: None for m in METRICS}, "qrels_note": f"pytrec_eval not installed ({exc}); pip install "
                                                      f"pytrec-eval-terrier"}
    if not ranked:
        return {**{m: None for m in METRICS}, "qrels_note": "no queries"}
    qr = {str(q): {str(d): int(g) for d, g in judged.items()} for q, judged in enumerate(qrels)}
    full, top10 = {}, {}
    for q, ids in enumerate(ranked):
        ids = [int(i) for i in ids if int(i) >= 0]
        full[str(q)] = {str(d): float(len(ids) - r) for r, d in enumerate(ids)}
        top10[str(q)] = {str(d): float(len(ids) - r) for r, d in enumerate(ids[:10])}
    depth = min(len(r) for r in ranked)
    want_recall = depth >= min(100, n_docs if n_docs is not None else 100)
    per = pytrec_eval.RelevanceEvaluator(qr, {"ndcg_cut.10", "recall.100"}).evaluate(full)
    rr = pytrec_eval.RelevanceEvaluator(qr, {"recip_rank"}).evaluate(top10)
    n = len(ranked)

    def mean(res, key):  # a query with nothing retrieved is absent from pytrec_eval's answer: it scores 0
        return sum(res.get(str(q), {}).get(key, 0.0) for q in range(n)) / n

    return {"ndcg@10": mean(per, "ndcg_cut_10"), "recall@100": mean(per, "recall_100") if want_recall else None,
            "mrr@10": mean(rr, "recip_rank")}
