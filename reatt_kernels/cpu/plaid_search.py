"""The `cpu` backend of plaid_search: launcher for csrc/plaid_search/plaid_search_cpu.cpp (OpenMP; AVX-512 / AVX2 /
scalar by reatt_kernels/cpu/isa.py). The whole search of a batch is one C++ call; this launcher only hands over
pointers (every tensor arrives contiguous and typed from ops/plaid_search.py) and allocates the outputs."""
from __future__ import annotations

import torch

from .. import _ext
from .._alloc import empty
from .._launcher import PlaidSearchLauncher
from . import isa


def _plaid_search_not_supported_reasons(tensors, **facts):
    if not _ext.has("plaid_search_cpu"):
        return ["reatt_kernels._C has no plaid_search_cpu (rebuild: scripts/build_ext.sh)"]
    if facts.get("lp", 16) not in (16, 32, 48, 64):
        return [f"the cpu kernel takes at most 64 query tokens (table columns {facts.get('lp')})"]
    return []


def _u8(t):
    return None if t is None else t.contiguous().view(torch.uint8)


def _plaid_search_fwd(table, q, n_valid, weights, codes, packed, d_offsets, nbits, k, ncand, live, allow, cand,
                      stage_s=None):
    Bq, C, LP = table.shape
    scores = empty((Bq, k), torch.float32, table.device)
    docs = empty((Bq, k), torch.int64, table.device)
    live8, allow8 = _u8(live), _u8(allow)
    P = _ext.ptr
    ext = _ext.ext()
    ext.plaid_search_cpu(_ext.fill(
        ext.PlaidSearchArgs(), table=P(table), q=P(q), n_valid=P(n_valid), weights=P(weights), codes=P(codes),
        code_dtype=_ext.dtype_code(codes), packed=P(packed), offsets=P(d_offsets), live=P(live8), allow=P(allow8),
        cand=P(cand), Nc=0 if cand is None else cand.shape[1], out_scores=P(scores), out_docs=P(docs),
        stage_s=P(stage_s), Bq=Bq, LP=LP, D=q.shape[2], C=C, Nd=d_offsets.shape[0] - 1, T=codes.shape[0],
        nbits=nbits, ncand=ncand, k=k, nthreads=torch.get_num_threads(), isa=isa.for_kernel("plaid_search")))
    return scores, docs


class CpuPlaidSearch(PlaidSearchLauncher):
    """The `cpu` backend of plaid_search: csrc/plaid_search/plaid_search_cpu.cpp."""

    def not_supported_reasons(self, tensors, **facts):
        return _plaid_search_not_supported_reasons(tensors, **facts)

    def forward(self, table, q, n_valid, weights, codes, packed, d_offsets, nbits, k, ncand, live, allow, cand,
                stage_s=None):
        return _plaid_search_fwd(table, q, n_valid, weights, codes, packed, d_offsets, nbits, k, ncand, live, allow,
                                 cand, stage_s)


PLAID_SEARCH = CpuPlaidSearch()
