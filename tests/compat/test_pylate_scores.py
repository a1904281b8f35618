"""reatt_kernels.compat.pylate's scoring functions against PyLate's semantics, written independently in float64
(tests/oracle.py: ``pylate_maxsim_oracle``, from PyLate 1.6.0's einsum / mask / max / sum), never against our kernel.

Every backend that runs here (torch, cpu, the Triton interpreter, cuda_emu; triton/cuda on a GPU), every dtype, forward
and backward, odd sizes, masks with padding, all-masked rows, ragged lists, numpy inputs, non-contiguous tensors.
``mask_semantics="skip"`` is checked against the MaxSim oracle (our own semantics). PyLate itself is not needed here;
tests/compat/test_pylate_patch.py runs with it (in the side environment, `make pylate-env`)."""
from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch

from reatt_kernels.compat import pylate as rp
from reatt_kernels.compat.pylate import scores as rp_scores

from ..oracle import maxsim_oracle, pylate_maxsim_oracle
from ..utils import BACKENDS, CUDA_EMU, DTYPES, assert_fp32_level, device_for, discrete, noncontig

ALL_BACKENDS = [*BACKENDS, CUDA_EMU]
D = 16  # odd token counts; dim 16 keeps the Triton interpreter and the emulator quick


def masks(n, L, device, *, all_masked_row: int, dtype=torch.float32):
    """0/1 float masks with trailing padding of varied length, and one row with every token masked."""
    m = torch.ones(n, L, dtype=dtype, device=device)
    for r in range(n):
        m[r, L - (r % 3):] = 0
    m[all_masked_row] = 0
    return m


def pylate_oracle_all(q, d, qm, dm, grad=None):
    A, B = q.shape[0], d.shape[0]
    res = pylate_maxsim_oracle([(q[a], None if qm is None else qm[a]) for a in range(A)],
                               [(d[b], None if dm is None else dm[b]) for b in range(B)],
                               [(a, b) for a in range(A) for b in range(B)],
                               None if grad is None else grad.reshape(-1))
    res["score"] = res["score"].reshape(A, B)
    res["mag"] = res["mag"].reshape(A, B)
    return res


def check_grads(res, q, d, backend, out_dtype):
    assert_fp32_level(q.grad, torch.stack(res["dq"]), torch.stack(res["mag_dq"]), backend=backend, name="dq",
                      out_dtype=out_dtype)
    assert_fp32_level(d.grad, torch.stack(res["dd"]).reshape(d.shape), torch.stack(res["mag_dd"]).reshape(d.shape),
                      backend=backend, name="dd", out_dtype=out_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_colbert_scores_fwd_bwd(backend, dtype):
    dev = device_for(backend)
    A, B, Lq, Ld = 5, 6, 7, 9
    # discrete values: dot products exact in fp32, so the argmax (and the gradient) is the oracle's
    q = discrete((A, Lq, D), dtype, dev).requires_grad_()
    d = discrete((B, Ld, D), dtype, dev).requires_grad_()
    qm = masks(A, Lq, dev, all_masked_row=2)
    dm = masks(B, Ld, dev, all_masked_row=4)
    dm[1, :] = torch.tensor([0, 1] * 4 + [0.0])  # interleaved holes
    s = rp.colbert_scores(q, d, qm, dm, backend=backend)
    assert s.dtype == torch.float32 and s.shape == (A, B)
    g = torch.randn(A, B, device=dev)
    s.backward(g)
    res = pylate_oracle_all(q, d, qm, dm, g)
    assert_fp32_level(s, res["score"], res["mag"], backend=backend, name="scores")
    assert (s[2] == 0).all()  # an all-masked query scores 0
    assert (s[:, 4] == 0).all()  # an all-masked document scores 0 in PyLate (every token scores 0)
    check_grads(res, q, d, backend, dtype)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_colbert_scores_random_fp32(backend):
    """Continuous random inputs (no exact ties): the scores to fp32 level, masks from every dtype."""
    dev = device_for(backend)
    q = torch.randn(3, 11, D, device=dev)
    d = torch.randn(7, 13, D, device=dev)
    for mdt in (torch.bool, torch.int64, torch.float32, torch.float16):
        qm = masks(3, 11, dev, all_masked_row=1).to(mdt)
        dm = masks(7, 13, dev, all_masked_row=5).to(mdt)
        s = rp.colbert_scores(q, d, qm, dm, backend=backend)
        res = pylate_oracle_all(q, d, qm.double(), dm.double())
        assert_fp32_level(s, res["score"], res["mag"], backend=backend, name=f"scores ({mdt} masks)")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_colbert_scores_skip_semantics(backend, dtype):
    """mask_semantics="skip" is reatt-kernels' MaxSim: masked tokens ignored, an all-masked document -inf."""
    dev = device_for(backend)
    q = discrete((4, 7, D), dtype, dev).requires_grad_()
    d = discrete((5, 9, D), dtype, dev).requires_grad_()
    qm = masks(4, 7, dev, all_masked_row=1)
    dm = masks(5, 9, dev, all_masked_row=3)
    s = rp.colbert_scores(q, d, qm, dm, backend=backend, mask_semantics="skip")
    g = torch.randn(4, 5, device=dev)
    s.backward(g)
    res = maxsim_oracle("padded", q, d, qm.bool(), dm.bool(), grad=g)
    assert_fp32_level(s, res["score"], res["mag"], backend=backend, name="scores")
    assert torch.isneginf(s[[0, 2, 3], 3]).all()
    assert_fp32_level(q.grad, res["dq"], res["mag_dq"], backend=backend, name="dq", out_dtype=dtype)
    assert_fp32_level(d.grad, res["dd"], res["mag_dd"], backend=backend, name="dd", out_dtype=dtype)


def test_mask_semantics_differ_where_pylate_says():
    """A masked document token scores 0 and wins over negative valid tokens under PyLate's semantics only."""
    q = torch.tensor([[[1.0, 0.0]]])
    d = torch.tensor([[[-1.0, 0.0], [5.0, 0.0]]])  # the second token is masked
    dm = torch.tensor([[1.0, 0.0]])
    assert rp.colbert_scores(q, d, None, dm).item() == 0.0
    assert rp.colbert_scores(q, d, None, dm, mask_semantics="skip").item() == -1.0
    assert rp.colbert_scores(q, d).item() == 5.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_colbert_kd_scores_fwd_bwd(backend, dtype):
    dev = device_for(backend)
    B, n, Lq, Ld = 4, 3, 7, 9
    q = discrete((B, Lq, D), dtype, dev).requires_grad_()
    d = discrete((B, n, Ld, D), dtype, dev).requires_grad_()
    qm = masks(B, Lq, dev, all_masked_row=3)
    dm = masks(B * n, Ld, dev, all_masked_row=4).reshape(B, n, Ld)
    s = rp.colbert_kd_scores(q, d, qm, dm, backend=backend)
    assert s.shape == (B, n) and s.dtype == torch.float32
    g = torch.randn(B, n, device=dev)
    s.backward(g)
    res = pylate_maxsim_oracle([(q[a], qm[a]) for a in range(B)],
                               [(d[a, c], dm[a, c]) for a in range(B) for c in range(n)],
                               [(a, a * n + c) for a in range(B) for c in range(n)], g.reshape(-1))
    assert_fp32_level(s, res["score"].reshape(B, n), res["mag"].reshape(B, n), backend=backend, name="scores")
    assert s[1, 1].item() == 0.0  # the all-masked candidate (row 4 = query 1, slot 1)
    check_grads(res, q, d, backend, dtype)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_colbert_scores_pairwise_ragged_lists(backend):
    """Lists of ragged tensors: each pair over its own tokens (PyLate's per-pair loop), gradients to each item."""
    dev = device_for(backend)
    lq, ld = [3, 7, 1, 5], [9, 2, 6, 11]
    qs = [discrete((n, D), torch.float32, dev).requires_grad_() for n in lq]
    ds = [discrete((n, D), torch.float32, dev).requires_grad_() for n in ld]
    s = rp.colbert_scores_pairwise(qs, ds, backend=backend)
    assert s.shape == (4,)
    g = torch.randn(4, device=dev)
    s.backward(g)
    res = pylate_maxsim_oracle([(x, None) for x in qs], [(x, None) for x in ds], [(i, i) for i in range(4)], g)
    assert_fp32_level(s, res["score"], res["mag"], backend=backend, name="scores")
    for i in range(4):
        assert_fp32_level(qs[i].grad, res["dq"][i], res["mag_dq"][i], backend=backend, name=f"dq[{i}]")
        assert_fp32_level(ds[i].grad, res["dd"][i], res["mag_dd"][i], backend=backend, name=f"dd[{i}]")
    # the tensor form gives the same as the list of equal-length items
    qt, dt = torch.randn(3, 5, D, device=dev), torch.randn(3, 8, D, device=dev)
    torch.testing.assert_close(rp.colbert_scores_pairwise(qt, dt, backend=backend),
                               rp.colbert_scores_pairwise(list(qt), list(dt), backend=backend))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_colbert_scores_ragged_lists_and_numpy(backend):
    dev = device_for(backend)
    lq, ld = [4, 7], [5, 1, 9]
    qs = [torch.randn(n, D, device=dev) for n in lq]
    ds = [torch.randn(n, D, device=dev) for n in ld]
    s = rp.colbert_scores(qs, ds, backend=backend)
    res = pylate_maxsim_oracle([(x, None) for x in qs], [(x, None) for x in ds],
                               [(a, b) for a in range(2) for b in range(3)])
    assert_fp32_level(s, res["score"].reshape(2, 3), res["mag"].reshape(2, 3), backend=backend, name="ragged")
    if dev.type != "cpu":
        return
    # numpy: a float32 array, a list of arrays (PyLate makes them float32), nested lists
    qn, dn = np.random.default_rng(0).standard_normal((2, 5, D)), np.random.default_rng(1).standard_normal((3, 6, D))
    want = pylate_oracle_all(torch.from_numpy(qn.astype(np.float32)), torch.from_numpy(dn.astype(np.float32)),
                             None, None)
    for qi, di in ((qn.astype(np.float32), dn.astype(np.float32)), (list(qn), list(dn)),
                   (qn.astype(np.float32).tolist(), dn.astype(np.float32).tolist())):
        s = rp.colbert_scores(qi, di, backend=backend)
        assert s.dtype == torch.float32
        assert_fp32_level(s, want["score"], want["mag"], backend=backend, name=f"numpy form {type(qi).__name__}")
    # float64 numpy (no list): float64 scores, as PyLate's einsum gives (our torch backend)
    s64 = rp.colbert_scores(qn, dn, backend="torch")
    assert s64.dtype == torch.float64
    want64 = pylate_oracle_all(torch.from_numpy(qn), torch.from_numpy(dn), None, None)
    torch.testing.assert_close(s64, want64["score"], rtol=1e-12, atol=1e-12)
    # a ragged list of numpy arrays with a ragged list of masks
    qs_np = [np.random.default_rng(2).standard_normal((n, D)).astype(np.float32) for n in (3, 6)]
    qm = [np.array([1, 0, 1], dtype=np.float32), np.array([1, 1, 0, 1, 1, 1], dtype=np.float32)]
    s = rp.colbert_scores(qs_np, dn.astype(np.float32), queries_mask=qm, backend=backend)
    res = pylate_maxsim_oracle([(torch.from_numpy(x), torch.from_numpy(m)) for x, m in zip(qs_np, qm)],
                               [(torch.from_numpy(x), None) for x in dn.astype(np.float32)],
                               [(a, b) for a in range(2) for b in range(3)])
    assert_fp32_level(s, res["score"].reshape(2, 3), res["mag"].reshape(2, 3), backend=backend, name="ragged+mask")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_noncontiguous_inputs(backend):
    dev = device_for(backend)
    q = noncontig(discrete((3, 5, D), torch.float32, dev)).requires_grad_()
    d = noncontig(discrete((4, 7, D), torch.float32, dev)).requires_grad_()
    dm = masks(4, 7, dev, all_masked_row=0).t().contiguous().t()  # a transposed (non-contiguous) mask
    assert not q.is_contiguous() and not dm.is_contiguous()
    s = rp.colbert_scores(q, d, None, dm, backend=backend)
    g = torch.randn(3, 4, device=dev)
    s.backward(g)
    res = pylate_oracle_all(q, d, None, dm, g)
    assert_fp32_level(s, res["score"], res["mag"], backend=backend, name="scores")
    check_grads(res, q, d, backend, torch.float32)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=BACKENDS[1].marks)])
def test_weighted_masks(backend):
    """Masks with values other than 0/1: PyLate multiplies the token-pair scores by them (inside the max)."""
    q = discrete((3, 5, D)).requires_grad_()
    d = discrete((4, 6, D)).requires_grad_()
    qm = torch.rand(3, 5) * 2 - 0.5
    dm = torch.rand(4, 6) * 1.5
    s = rp.colbert_scores(q, d, qm, dm, backend=backend)
    g = torch.randn(3, 4)
    s.backward(g)
    res = pylate_oracle_all(q, d, qm, dm, g)
    assert_fp32_level(s, res["score"], res["mag"], backend=backend, name="scores")
    check_grads(res, q, d, backend, torch.float32)
    # bf16 embeddings with weights are weighted in fp32 (no 8-bit rounding of the weighted tokens)
    qb, db = discrete((3, 5, D), torch.bfloat16), discrete((4, 6, D), torch.bfloat16)
    sb = rp.colbert_scores(qb, db, qm, dm, backend=backend)
    rb = pylate_oracle_all(qb, db, qm, dm)
    assert_fp32_level(sb, rb["score"], rb["mag"], backend=backend, name="bf16 weighted")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_colbert_scores_class_query_major(backend):
    """ColBERTScores: [Q, Qt, H] x [D, N, Dt, H] -> [Q, D * N], column j * N + k = slot k of group j."""
    dev = device_for(backend)
    Q, G, N, Qt, Dt = 3, 4, 2, 5, 7
    q = discrete((Q, Qt, D), torch.float32, dev).requires_grad_()
    d = discrete((G, N, Dt, D), torch.float32, dev).requires_grad_()
    dm = masks(G * N, Dt, dev, all_masked_row=5).bool().reshape(G, N, Dt)
    s = rp.ColBERTScores()(q, d, documents_mask=dm, backend=backend)
    assert s.shape == (Q, G * N)
    g = torch.randn(Q, G * N, device=dev)
    s.backward(g)
    res = pylate_maxsim_oracle([(q[a], None) for a in range(Q)],
                               [(d[j, k], dm[j, k].double()) for j in range(G) for k in range(N)],
                               [(a, j * N + k) for a in range(Q) for j in range(G) for k in range(N)], g.reshape(-1))
    assert_fp32_level(s, res["score"].reshape(Q, G * N), res["mag"].reshape(Q, G * N), backend=backend, name="scores")
    check_grads(res, q, d, backend, torch.float32)


def test_errors_name_the_argument():
    q, d = torch.randn(2, 3, 8), torch.randn(4, 5, 8)
    with pytest.raises(ValueError, match="queries_embeddings must be 3-D"):
        rp.colbert_scores(torch.randn(3, 8), d)
    with pytest.raises(ValueError, match="documents_embeddings must be 3-D"):
        rp.colbert_scores(q, torch.randn(5, 8))
    with pytest.raises(ValueError, match="same embedding size"):
        rp.colbert_scores(q, torch.randn(4, 5, 7))
    with pytest.raises(ValueError, match="documents_mask must have shape"):
        rp.colbert_scores(q, d, None, torch.ones(4, 6))
    with pytest.raises(ValueError, match="queries_mask must have shape"):
        rp.colbert_scores(q, d, torch.ones(3, 3))
    with pytest.raises(ValueError, match="mask_semantics"):
        rp.colbert_scores(q, d, mask_semantics="ignore")
    with pytest.raises(ValueError, match="backend must be one of"):
        rp.colbert_scores(q, d, backend="nope")
    with pytest.raises(TypeError, match="queries_embeddings must hold floating-point"):
        rp.colbert_scores(torch.ones(2, 3, 8, dtype=torch.int64), d)
    with pytest.raises(ValueError, match="queries_embeddings is empty"):
        rp.colbert_scores([], d)
    with pytest.raises(ValueError, match="pairs"):
        rp.colbert_scores_pairwise(q, torch.randn(3, 5, 8))
    with pytest.raises(ValueError, match="documents_embeddings must be"):
        rp.colbert_kd_scores(q, torch.randn(3, 2, 5, 8))
    with pytest.raises(ValueError, match="documents_embeddings: the elements"):
        rp.colbert_scores(q, [torch.randn(5, 8), torch.randn(5, 7)])
    with pytest.raises(TypeError, match="queries_embeddings must be"):
        rp.colbert_scores("not embeddings", d)


def test_pylate_backends_need_pylate():
    """backend "flash" / "lik" are PyLate's own paths: without PyLate the error says so."""
    pytest.importorskip("numpy")
    try:
        import pylate  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="need PyLate"):
            rp.colbert_scores(torch.randn(1, 2, 8), torch.randn(1, 2, 8), backend="flash")
    else:
        pytest.skip("PyLate is installed: tests/compat/test_pylate_patch.py checks the delegation")


def test_scores_docstring_examples():
    """The docstrings' examples are PyLate's own doctests (same inputs, same printed outputs)."""
    res = doctest.testmod(rp_scores, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted >= 12 and res.failed == 0, res


def test_import_does_not_import_pylate():
    import subprocess
    import sys

    code = ("import sys, reatt_kernels.compat.pylate as p; p.PyLateTokenIndex; "
            "assert not any(m == 'pylate' or m.startswith('pylate.') for m in sys.modules), 'pylate imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
