"""nDCG@10, recall@100 and MRR@10 against qrels (reatt_kernels.bench.ir_metrics), checked against values worked out by
hand in the docstring (never by calling pytrec_eval a second time)."""
from __future__ import annotations

import math

import pytest

from reatt_kernels.bench.ir_metrics import qrels_metrics

pytest.importorskip("pytrec_eval")

INV_LOG2_3 = 1 / math.log2(3)  # the DCG discount of rank 2 (rank 1: 1 / log2(2) = 1; rank 3: 1 / log2(4) = 1/2)


def test_qrels_metrics_by_hand():
    """Three queries over documents 0..149, graded qrels.

    q0: ranking 7, 3, 5, ...; grades {3: 1, 5: 2, 7: 0}.
        DCG@10 = 0 / 1 + 1 / log2(3) + 2 / log2(4) = 0.63093 + 1; ideal order 5, 3: 2 / 1 + 1 / log2(3) = 2.63093.
        nDCG@10 = 1.63093 / 2.63093; recall@100 = 2 / 2; first relevant at rank 2: MRR@10 = 1/2.
    q1: document 42 (grade 1) at rank 11, document 120 (grade 1) at rank 101, i.e. outside the top 100.
        nothing relevant in the top 10: nDCG@10 = 0 and MRR@10 = 0; recall@100 = 1 / 2.
    q2: the only relevant document (grade 3) at rank 1: nDCG@10 = 1, recall@100 = 1, MRR@10 = 1.
    A ranking that lists fewer than 100 documents of a 150-document corpus has no recall@100."""
    q0 = [7, 3, 5] + [d for d in range(150) if d not in (7, 3, 5)]
    q1 = [d for d in range(150) if d not in (42, 120)]
    q1 = q1[:10] + [42] + q1[10:99] + [120] + q1[99:]
    assert q1.index(42) == 10 and q1.index(120) == 100
    q2 = [9] + [d for d in range(150) if d != 9]
    qrels = [{3: 1, 5: 2, 7: 0}, {42: 1, 120: 1}, {9: 3}]
    m = qrels_metrics([q0, q1, q2], qrels, n_docs=150)
    ndcg0 = (INV_LOG2_3 + 1) / (2 + INV_LOG2_3)
    assert m["ndcg@10"] == pytest.approx((ndcg0 + 0 + 1) / 3, abs=1e-4)
    assert m["recall@100"] == pytest.approx((1 + 0.5 + 1) / 3, abs=1e-9)
    assert m["mrr@10"] == pytest.approx((0.5 + 0 + 1) / 3, abs=1e-9)
    # ties: the order passed in is kept (trec_eval would otherwise order equal scores by document id)
    assert qrels_metrics([[2, 1]], [{1: 1}], n_docs=2)["mrr@10"] == 0.5
    short = qrels_metrics([q[:10] for q in (q0, q1, q2)], qrels, n_docs=150)
    assert short["recall@100"] is None and short["ndcg@10"] == pytest.approx(m["ndcg@10"], abs=1e-9)
    # -1 = no result; a small corpus is ranked whole
    assert qrels_metrics([[1, -1, -1]], [{0: 1}], n_docs=2) == {"ndcg@10": 0.0, "recall@100": 0.0, "mrr@10": 0.0}
    with pytest.raises(ValueError, match="ranked has 2 queries, qrels 1"):
        qrels_metrics([[0], [1]], [{0: 1}])
