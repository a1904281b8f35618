"""PyLateTokenIndex: PyLate's index interface (string ids, removal, subset, saved ids) on TokenIndex.

Exact indexes are checked against the float64 oracle of PyLate's scores (tests/oracle.py) on the fp16 vectors they
store: the same documents, in the same order, with the same scores. Residual indexes: only allowed, live documents,
every live document when k is large, and their decompressed vectors. PyLate is not needed (its own index tests run on
this class in the side environment: scripts/pylate/run_pylate_tests.sh)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from reatt_kernels.compat.pylate import PyLateTokenIndex

from ..oracle import pylate_maxsim_oracle

D = 16


def corpus(n=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.nn.functional.normalize(torch.randn(int(L), D, generator=g), dim=-1)
            for L in torch.randint(3, 12, (n,), generator=g)]
    ids = [f"doc-{i}" for i in range(n)]
    return ids, docs


def queries(n=4, L=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, L, D, generator=g), dim=-1)


def oracle_ranking(q, ids, docs, allowed=None):
    """(id, score) of every allowed document, best first, per query: PyLate's score on the fp16 vectors (an exact index
    stores fp16 tokens and searches with the queries in fp16)."""
    stored = [d.half().float() for d in docs]
    res = pylate_maxsim_oracle([(x.half().float(), None) for x in q], [(x, None) for x in stored],
                               [(a, b) for a in range(q.shape[0]) for b in range(len(docs))])
    s = res["score"].reshape(q.shape[0], len(docs))
    out = []
    for a in range(q.shape[0]):
        rows = [(ids[b], float(s[a, b])) for b in range(len(docs))
                if allowed is None or ids[b] in (allowed[a] if isinstance(allowed[0], list) else allowed)]
        out.append(sorted(rows, key=lambda r: -r[1]))
    return out


def check_exact(got, want, k):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert [r["id"] for r in g] == [r[0] for r in w[:k]]
        np.testing.assert_allclose([r["score"] for r in g], [r[1] for r in w[:k]], rtol=1e-5, atol=1e-5)
        assert all(set(r) == {"id", "score"} and isinstance(r["score"], float) for r in g)


def test_exact_index_add_search_subset_remove_reload(tmp_path):
    ids, docs = corpus()
    q = queries()
    index = PyLateTokenIndex(index_folder=str(tmp_path), index_name="idx", override=True, kind="exact")
    index.add_documents(ids[:15], docs[:15])
    index.add_documents(ids[15:], docs[15:])  # a second insertion after the first
    assert len(index) == 23 and index.is_end_to_end_index
    check_exact(index(q, k=5), oracle_ranking(q, ids, docs), 5)
    # k beyond the corpus: every document once
    res = index(q.numpy(), k=100)
    assert [len(r) for r in res] == [23] * 4 and len({r["id"] for r in res[0]}) == 23
    # a subset shared by the queries (unknown ids ignored), then one per query (an empty one returns nothing)
    shared = ["doc-3", "doc-17", "doc-8", "nope"]
    check_exact(index(q, k=10, subset=shared), oracle_ranking(q, ids, docs, shared), 10)
    per = [["doc-1"], ["doc-2", "doc-20", "doc-21"], [], ids[5:18]]
    got = index(q, k=3, subset=per)
    assert got[2] == []
    check_exact([got[0], got[1], got[3]], [w for a, w in enumerate(oracle_ranking(q, ids, docs, per)) if a != 2], 3)
    # remove (an unknown id is ignored), then reload from disk with the ids
    index.remove_documents(["doc-0", "doc-5", "missing"])
    keep = [i for i in range(23) if ids[i] not in ("doc-0", "doc-5")]
    want = oracle_ranking(q, [ids[i] for i in keep], [docs[i] for i in keep])
    check_exact(index(q, k=7), want, 7)
    again = PyLateTokenIndex(index_folder=str(tmp_path), index_name="idx")
    assert len(again) == 21
    check_exact(again(q, k=7), want, 7)
    manifest = json.loads((Path(tmp_path) / "idx" / (Path(tmp_path) / "idx" / "CURRENT").read_text().strip()
                           / "manifest.json").read_text())
    assert sorted(manifest["metadata"]["pylate"]["ids"]) == sorted(ids[i] for i in keep)
    # the stored vectors come back (fp16-rounded), grouped as asked
    emb = again.get_documents_embeddings([["doc-3", "doc-1"], ["doc-22"]])
    assert [len(g) for g in emb] == [2, 1]
    np.testing.assert_array_equal(emb[0][0], docs[3].half().float().numpy())
    np.testing.assert_array_equal(emb[1][0], docs[22].half().float().numpy())
    with pytest.raises(KeyError, match="doc-0"):
        again.get_documents_embeddings([["doc-0"]])
    # override starts afresh
    assert len(PyLateTokenIndex(index_folder=str(tmp_path), index_name="idx", override=True)) == 0


def test_readd_replaces_and_update(tmp_path):
    ids, docs = corpus(6)
    index = PyLateTokenIndex(str(tmp_path), "idx", override=True, kind="exact")
    index.add_documents(ids, docs)
    q = queries(2)
    _, other = corpus(3, seed=9)  # distinct documents (no exact ties in the ranking)
    index.add_documents("doc-2", other[0])  # one [L, dim] document under an existing id: replaced
    index.update_documents(["doc-4", "doc-new"], [other[1], other[2]])
    new_docs = {**dict(zip(ids, docs)), "doc-2": other[0], "doc-4": other[1], "doc-new": other[2]}
    want = oracle_ranking(q, list(new_docs), list(new_docs.values()))
    check_exact(index(q, k=10), want, 10)
    assert len(index) == 7


def test_input_forms_and_int_ids(tmp_path):
    ids, docs = corpus(8)
    index = PyLateTokenIndex(str(tmp_path), "idx", override=True, kind="exact")
    index.add_documents(range(4), np.stack([d[:3].numpy() for d in docs[:4]]))  # ints, a 3-D numpy array
    index.add_documents(np.arange(4, 8), [d.numpy() for d in docs[4:]])  # numpy ints, a list of arrays
    q = queries(3, seed=4)
    ragged = [q[0, :2], q[1], q[2, :4].numpy()]
    got = index(ragged, k=8)
    stored = [d[:3] for d in docs[:4]] + docs[4:]
    for a, x in enumerate(ragged):
        want = oracle_ranking(torch.as_tensor(x)[None], list(range(8)), stored)
        check_exact([got[a]], want, 8)
    one = index(q[1], k=2)  # a single [L, dim] query
    assert len(one) == 1 and [r["id"] for r in one[0]] == [r["id"] for r in got[1][:2]]
    again = PyLateTokenIndex(str(tmp_path), "idx")
    assert again(q[1], k=2) == one and all(isinstance(r["id"], int) for r in one[0])


def test_residual_index(tmp_path):
    ids, docs = corpus(40, seed=3)
    q = queries(3, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the calibration may choose scan on random vectors, and says so
        index = PyLateTokenIndex(str(tmp_path), "res", override=True, kind="residual", nbits=4)
        index.add_documents(ids[:30], docs[:30])
        index.add_documents(ids[30:], docs[30:])  # encoded with the first batch's centroids
    res = index(q, k=100)
    assert [len(r) for r in res] == [40] * 3
    assert [r["score"] for r in res[0]] == sorted((r["score"] for r in res[0]), reverse=True)
    sub = index(q, k=5, subset=[ids[:3], ids[10:20], ["doc-39", "x"]])
    assert {r["id"] for r in sub[0]} == set(ids[:3]) and {r["id"] for r in sub[2]} == {"doc-39"}
    assert {r["id"] for r in sub[1]} <= set(ids[10:20]) and len(sub[1]) == 5
    index.remove_documents(ids[::2])
    left = {r["id"] for r in index(q, k=100)[0]}
    assert left == set(ids[1::2])
    emb = PyLateTokenIndex(str(tmp_path), "res").get_documents_embeddings([["doc-1", "doc-39"]])[0]
    for got, want in zip(emb, (docs[1], docs[39])):
        assert got.shape == tuple(want.shape) and got.dtype == np.float32
        assert np.abs(got - want.numpy()).max() < 0.5  # decompressed: close, not equal


def test_errors(tmp_path):
    ids, docs = corpus(3)
    index = PyLateTokenIndex(str(tmp_path), "idx", override=True, kind="exact")
    with pytest.raises(ValueError, match="empty"):
        index(queries(1), k=2)
    with pytest.raises(ValueError, match="2 ids for 3 documents"):
        index.add_documents(ids[:2], docs)
    with pytest.raises(ValueError, match="same id twice"):
        index.add_documents(["a", "a", "b"], docs)
    with pytest.raises(TypeError, match="document ids must be str or int"):
        index.add_documents([1.5, 2, 3], docs)
    index.add_documents(ids, docs)
    with pytest.raises(ValueError, match="dim"):
        index.add_documents(["z"], [torch.randn(3, D + 1)])
    with pytest.raises(ValueError, match="per-query id lists"):
        index(queries(2), k=1, subset=[["doc-1"]])
    with pytest.raises(ValueError, match="kind"):
        PyLateTokenIndex(str(tmp_path), "other", kind="plaid")
