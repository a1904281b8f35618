"""PartIndex and merge_topk: several index parts searched as one equal one index over all their documents."""
from __future__ import annotations

import torch

from reatt_kernels.index import PartIndex, TokenIndex, merge_topk


def _docs(n, dim=16):
    return [torch.nn.functional.normalize(torch.randn(int(L), dim), dim=-1) for L in torch.randint(1, 9, (n,))]


def test_parts_equal_one_index_over_the_union():
    docs = _docs(23)
    whole = TokenIndex.build(docs, kind="exact", doc_ids=list(range(23)), progress=False)
    parts = PartIndex([TokenIndex.build(docs[a:b], kind="exact", doc_ids=list(range(a, b)), progress=False)
                       for a, b in ((0, 7), (7, 8), (8, 23))])
    assert parts.n_docs == 23
    q = torch.nn.functional.normalize(torch.randn(3, 5, 16), dim=-1)
    for k in (1, 5, 30):  # 30 > documents: (-inf, -1) padding
        s_w, i_w = whole.search(q, k=k)
        s_p, i_p = parts.search(q, k=k)
        torch.testing.assert_close(s_p, s_w.cpu(), rtol=0, atol=0)
        assert torch.equal(i_p, i_w.cpu())


def test_merge_topk_pads_and_never_returns_an_id_at_minus_inf():
    s = torch.tensor([[0.5, float("-inf"), 2.0]])
    i = torch.tensor([[7, 8, 9]])
    top_s, top_i = merge_topk(s, i, 5)
    assert top_i.tolist() == [[9, 7, -1, -1, -1]]
    assert top_s[0, :2].tolist() == [2.0, 0.5] and torch.isneginf(top_s[0, 2:]).all()
    assert PartIndex([]).search(torch.randn(2, 3, 16), k=4)[1].eq(-1).all()
