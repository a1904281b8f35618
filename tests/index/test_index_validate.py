"""The arrays every search trusts are validated once, at load (a build makes them valid by construction), so a
search makes no pass over the corpus to check them. An index whose files are intact (checksums match) but whose
content is inconsistent (an out-of-range centroid id, decreasing offsets, a broken inverted list) is refused at load,
by name. A CPU residual index stores its codes as uint16 where the centroids fit (2 bytes per token, not 4), and an
index saved with int32 codes loads into the compact form."""
from __future__ import annotations

import pytest
import torch

from reatt_kernels.bench.datasets import clustered_corpus
from reatt_kernels.index import TokenIndex
from reatt_kernels.index.io import IndexCorruptedError


@pytest.fixture(scope="module")
def built():
    d, off = clustered_corpus(n_docs=60, dim=16, min_len=3, max_len=12, n_centroids=12, topics_per_doc=2,
                              noise=0.1, seed=3)
    return d, off, TokenIndex.build(d, d_offsets=off, kind="residual", nbits=4, n_centroids=16, progress=False)


def _corrupt_and_reload(index, tmp_path, mutate):
    clone = TokenIndex.load(_saved(index, tmp_path / "a"), mmap=False)
    mutate(clone)
    return TokenIndex.load(_saved(clone, tmp_path / "b"), mmap=False)


def _saved(index, where):
    index.save(where)
    return where


def test_compact_codes_round_trip(built, tmp_path):
    d, off, index = built
    assert index.codes.dtype == torch.uint16 and index.bytes_per_token == 2 + 16 * 4 / 8
    back = TokenIndex.load(_saved(index, tmp_path / "x"))
    assert back.codes.dtype == torch.uint16 and torch.equal(back.codes, index.codes)
    q = d[:5][None].float()
    assert torch.equal(back.search(q, k=5)[1], index.search(q, k=5)[1])
    # an index saved with int32 codes (an older save) loads compact, and searches the same
    old = TokenIndex.load(_saved(index, tmp_path / "y"), mmap=False)
    old.codes = old.codes.to(torch.int32)
    again = TokenIndex.load(_saved(old, tmp_path / "z"))
    assert again.codes.dtype == torch.uint16 and torch.equal(again.search(q, k=5)[1], index.search(q, k=5)[1])


@pytest.mark.parametrize("what,mutate,match", [
    ("code", lambda ix: ix.codes.__setitem__(7, 16), r"codes must name centroids in \[0, 16\), found \[\d+, 16\]"),
    ("offsets", lambda ix: ix.offsets.__setitem__(3, ix.offsets[4] + 1), r"offsets must start at 0 and never decrease"),
    ("ivf", lambda ix: ix.ivf_docs.__setitem__(0, 10**6), r"inverted lists are inconsistent"),
])
def test_inconsistent_content_is_refused_at_load(built, tmp_path, what, mutate, match):
    _, _, index = built
    with pytest.raises(IndexCorruptedError, match=match):
        _corrupt_and_reload(index, tmp_path, mutate)
