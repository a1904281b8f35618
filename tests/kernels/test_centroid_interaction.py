"""centroid_interaction (PLAID's approximate MaxSim from centroid ids) and centroid_score_table: every CPU backend
against the float64 oracle (tests/oracle.py), the spec's edge cases (empty documents, padding, all-masked queries,
NaN in masked columns, ties), cand=None (every document), opcheck and torch.compile, and argument validation. Also the
cpu residual_maxsim kernel's table path (the index passes its table) against the oracle."""
from __future__ import annotations

import pytest
import torch

from reatt_kernels import centroid_interaction, centroid_score_table, residual_maxsim

from ..isa import isa_params
from ..oracle import centroid_interaction_oracle, residual_maxsim_oracle
from ..utils import _has_cpu_ext, assert_fp32_level, noncontig

BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(not _has_cpu_ext(), reason="no C++ extension"))]


def make_inputs(Lq=5, Bq=3, C=11, D=24, lens=(3, 0, 20, 70, 1, 5, 33, 2), Nc=7, ties=False):
    """Odd sizes, one empty document, -1 padding, a repeated candidate, one all-masked query row."""
    Nd = len(lens)
    off = torch.zeros(Nd + 1, dtype=torch.int64)
    off[1:] = torch.tensor(lens).cumsum(0)
    T = int(off[-1])
    q = torch.randn(Bq, Lq, D)
    cent = torch.randn(C, D)
    if ties:  # duplicate centroids: equal table entries everywhere
        cent[1::2] = cent[0]
    qm = torch.rand(Bq, Lq) < 0.7
    qm[0, 0] = True
    qm[-1] = False
    codes = torch.randint(0, C, (T,), dtype=torch.int32)
    cand = torch.randint(-1, Nd, (Bq, Nc))
    cand[0, :3] = torch.tensor([1, 3, 3])
    return q, qm, cent, codes, off, cand


@pytest.mark.parametrize("Lq", [1, 5, 16, 17, 33, 64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_centroid_interaction_matches_oracle(backend, Lq):
    q, qm, cent, codes, off, cand = make_inputs(Lq=Lq)
    table = centroid_score_table(q, cent, qm)
    assert table.shape == (3, cent.shape[0], max(16, -(-Lq // 16) * 16))
    ref, mag = centroid_interaction_oracle(table, qm, codes, off, cand)
    out = centroid_interaction(table, codes, off, cand, qm, backend=backend)
    assert_fp32_level(out, ref, mag, backend=backend, name=f"centroid_interaction[{backend}, Lq={Lq}]")
    assert torch.isinf(out[0, 0]) and out[0, 0] < 0, "an empty document must score -inf"
    assert (out[-1][cand[-1] >= 0] == 0).all(), "a query with no valid token must score 0"
    assert torch.isinf(out[cand < 0]).all() and (out[cand < 0] < 0).all(), "padding must score -inf"
    assert out[0, 1] == out[0, 2], "a repeated candidate scores the same"
    # every document in order (cand=None)
    ref_all, mag_all = centroid_interaction_oracle(table, qm, codes, off, None)
    out_all = centroid_interaction(table, codes, off, None, qm, backend=backend)
    assert_fp32_level(out_all, ref_all, mag_all, backend=backend, name=f"centroid_interaction[{backend}, all docs]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_centroid_interaction_table_semantics(backend):
    """The table is q . centroids^T (fp32), masked tokens' columns zero; NaN in masked query rows never reaches the
    table or the score; ties (duplicate centroids) give the tied value."""
    q, qm, cent, codes, off, cand = make_inputs(Lq=7, ties=True)
    q = noncontig(q)
    q_poison = q.clone()
    q_poison[~qm] = float("nan")
    table = centroid_score_table(q_poison, cent, qm)
    assert torch.isfinite(table).all()
    exp = torch.einsum("bld,cd->bcl", q.double().masked_fill(~qm[..., None], 0), cent.double())
    torch.testing.assert_close(table[:, :, :7].double(), exp, atol=1e-5, rtol=1e-5)
    assert (table[:, :, 7:] == 0).all()
    ref, mag = centroid_interaction_oracle(table, qm, codes, off, cand)
    out = centroid_interaction(table, codes, off, cand, qm, backend=backend)
    assert_fp32_level(out, ref, mag, backend=backend, name=f"centroid_interaction[{backend}, ties]")
    # garbage (NaN) in the masked and padding columns of a hand-made table is never summed
    t2 = table.clone()
    t2[:, :, 7:] = float("nan")
    t2[:, :, :7] = t2[:, :, :7].masked_fill(~qm[:, None, :], float("nan"))
    out2 = centroid_interaction(t2, codes, off, cand, qm, backend=backend)
    torch.testing.assert_close(out2, out, equal_nan=False)


def test_centroid_interaction_opcheck_and_compile():
    q, qm, cent, codes, off, cand = make_inputs()
    table = centroid_score_table(q, cent, qm)
    for backend in ["torch"] + (["cpu"] if _has_cpu_ext() else []):
        torch.library.opcheck(torch.ops.reatt.centroid_interaction.default, (table, qm, codes, off, cand, backend))
        torch.library.opcheck(torch.ops.reatt.centroid_interaction.default, (table, qm, codes, off, None, backend))
    fn = torch.compile(lambda t, c, o, k, m: centroid_interaction(t, c, o, k, m, backend="torch"), fullgraph=True,
                       backend="aot_eager")
    torch.testing.assert_close(fn(table, codes, off, cand, qm),
                               centroid_interaction(table, codes, off, cand, qm, backend="torch"))


def test_centroid_interaction_rejects_bad_arguments():
    q, qm, cent, codes, off, cand = make_inputs()
    table = centroid_score_table(q, cent, qm)
    bad = cand.clone()
    bad[0, 0] = off.numel() - 1
    with pytest.raises(ValueError, match="cand must hold document ids"):
        centroid_interaction(table, codes, off, bad, qm)
    bad_codes = codes.clone()
    bad_codes[0] = cent.shape[0]
    with pytest.raises(ValueError, match="codes must hold centroid ids"):
        centroid_interaction(table, bad_codes, off, cand, qm)
    with pytest.raises(ValueError, match="table must be fp32"):
        centroid_interaction(table.double(), codes, off, cand, qm)
    with pytest.raises(ValueError, match="q_mask must be bool"):
        centroid_interaction(table, codes, off, cand, torch.ones(3, 17, dtype=torch.bool))
    with pytest.raises(TypeError, match="codes must be int32"):
        centroid_interaction(table, codes.long(), off, cand, qm)


@pytest.mark.parametrize("nbits", [1, 2, 4, 8])
@pytest.mark.parametrize("Lq", [5, 17])
@pytest.mark.skipif(not _has_cpu_ext(), reason="no C++ extension")
def test_residual_maxsim_cpu_table_path_matches_oracle(nbits, Lq):
    """The cpu kernel with the index's table (centroid_scores=) against the oracle, which decompresses."""
    D = 32
    q, qm, cent, codes, off, cand = make_inputs(Lq=Lq, D=D)
    w = torch.randn(D, 1 << nbits) * 0.3
    packed = torch.randint(0, 256, (codes.numel(), D * nbits // 8), dtype=torch.uint8)
    table = centroid_score_table(q, cent, qm)
    ref, mag = residual_maxsim_oracle(q, qm, cent, w, codes, packed, off, cand, nbits)
    out = residual_maxsim(q, cent, w, codes, packed, off, cand, nbits, qm, backend="cpu", centroid_scores=table)
    assert_fp32_level(out, ref, mag, backend="cpu", name=f"residual_maxsim[cpu, table, nbits={nbits}]")
    with pytest.raises(ValueError, match="centroid_scores must be"):
        residual_maxsim(q, cent, w, codes, packed, off, cand, nbits, qm, centroid_scores=table[:, :-1])


# ---- every ISA path of the cpu kernels (tests/isa.py) ------------------------------------------------------------------
@pytest.mark.parametrize("isa", isa_params("centroid_interaction"))
@pytest.mark.skipif(not _has_cpu_ext(), reason="no C++ extension")
def test_centroid_interaction_cpu_isa_paths(isa, force_isa):
    """Each instruction-set path of the cpu kernel, forced, against the oracle: every table width (LP 16..64) and the
    spec's edge cases."""
    force_isa(isa)
    for Lq in (5, 17, 33, 64):
        q, qm, cent, codes, off, cand = make_inputs(Lq=Lq)
        table = centroid_score_table(q, cent, qm)
        ref, mag = centroid_interaction_oracle(table, qm, codes, off, cand)
        out = centroid_interaction(table, codes, off, cand, qm, backend="cpu")
        assert_fp32_level(out, ref, mag, backend="cpu", name=f"centroid_interaction[cpu {isa}, Lq={Lq}]")
        assert torch.isinf(out[0, 0]) and out[0, 0] < 0 and (out[-1][cand[-1] >= 0] == 0).all()


@pytest.mark.parametrize("isa", isa_params("residual_maxsim"))
@pytest.mark.skipif(not _has_cpu_ext(), reason="no C++ extension")
def test_residual_maxsim_cpu_isa_paths(isa, force_isa):
    """Each instruction-set path of the cpu residual_maxsim kernel, forced, against the oracle (which decompresses):
    every nbits, query lengths across the 4-token register groups, documents across 16-token tiles."""
    force_isa(isa)
    D = 40
    for nbits in (1, 2, 4, 8):
        for Lq in (5, 17):
            q, qm, cent, codes, off, cand = make_inputs(Lq=Lq, D=D)
            w = torch.randn(D, 1 << nbits) * 0.3
            packed = torch.randint(0, 256, (codes.numel(), D * nbits // 8), dtype=torch.uint8)
            ref, mag = residual_maxsim_oracle(q, qm, cent, w, codes, packed, off, cand, nbits)
            out = residual_maxsim(q, cent, w, codes, packed, off, cand, nbits, qm, backend="cpu")
            assert_fp32_level(out, ref, mag, backend="cpu", name=f"residual_maxsim[cpu {isa}, nbits={nbits}, Lq={Lq}]")
            assert torch.isinf(out[0, 0]) and out[0, 0] < 0 and torch.isinf(out[cand < 0]).all()
