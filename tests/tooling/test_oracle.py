"""The oracle's own checks: against torch's kl_div, against finite differences, and against hand-computed cases. The
oracle judges every backend, so it must not share code (or a bug) with them: it imports nothing from reatt_kernels."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from ..oracle import kl_oracle, maxsim_oracle, reader_teacher_oracle, residual_maxsim_oracle
from ..utils import IN_CI, random_mask


def test_oracle_imports_nothing_under_test():
    tree = ast.parse(Path(__file__).resolve().parents[1].joinpath("oracle.py").read_text())
    mods = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    mods += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in mods if m.startswith("reatt")], mods


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_kl_oracle_matches_torch_kl_div(reduction):
    """kl_div(log_softmax(s), t) is KL(t || softmax(s)); its gradient by autograd must equal the oracle's formula."""
    B, M = 5, 13
    s = (torch.randn(B, M, dtype=torch.float64) * 3).requires_grad_(True)
    t = torch.softmax(torch.randn(B, M, dtype=torch.float64) * 2, -1)
    t[0, 3] = 0.0  # an exact zero: 0 * log 0 = 0
    t[0] /= t[0].sum()
    want = torch.nn.functional.kl_div(torch.log_softmax(s, -1), t, reduction=reduction)
    if reduction == "none":
        want = want.sum(-1)  # torch's "none" is elementwise; ours is per row
    g = torch.rand(want.shape, dtype=torch.float64) + 0.5
    want.backward(g)
    got = kl_oracle(s, t, reduction, grad_out=g)
    torch.testing.assert_close(got["loss"], want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["grad"], s.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["padded", "packed", "grouped"])
def test_maxsim_oracle_gradients_by_finite_differences(layout):
    """Continuous inputs (no ties): d/dx of sum(g * score) by central differences equals the explicit backward."""
    torch.manual_seed(1)
    Bq, Lq, Nd, Ld, D = 2, 4, 3, 5, 6
    q = torch.randn(Bq, Lq, D, dtype=torch.float64)
    qm = random_mask((Bq, Lq))
    qm[:, 0] = True
    pb = torch.randn(4, dtype=torch.float64)  # shorter than the largest distance: the clamp is in play
    if layout == "packed":
        lens = torch.tensor([3, 0, 5])
        off = torch.zeros(Nd + 1, dtype=torch.int64)
        off[1:] = lens.cumsum(0)
        d, dm = torch.randn(int(off[-1]), D, dtype=torch.float64), None
    else:
        off = None
        shape = (Bq, Nd, Ld) if layout == "grouped" else (Nd, Ld)
        d, dm = torch.randn(*shape, D, dtype=torch.float64), random_mask(shape)
        dm[..., 0] = True
    g = torch.randn(Bq, Nd, dtype=torch.float64)

    def f(q, d, pb):
        s = maxsim_oracle(layout, q, d, qm, dm, off, pb, "mean")["score"]
        return (torch.where(torch.isfinite(s), s, torch.zeros_like(s)) * g).sum().item()

    out = maxsim_oracle(layout, q, d, qm, dm, off, pb, "mean", grad=g)
    eps = 1e-6
    for name, x, want in (("dq", q, out["dq"]), ("dd", d, out["dd"]), ("dbias", pb, out["dbias"])):
        flat = x.view(-1)
        num = torch.zeros_like(flat)
        for k in range(flat.numel()):
            old = flat[k].item()
            flat[k] = old + eps
            hi = f(q, d, pb)
            flat[k] = old - eps
            lo = f(q, d, pb)
            flat[k] = old
            num[k] = (hi - lo) / (2 * eps)
        torch.testing.assert_close(want.reshape(-1), num, rtol=1e-6, atol=1e-6, msg=name)


def test_maxsim_oracle_hand_case():
    """Ties go to the lowest j; the bias clamps at R - 1; masked tokens never win; an empty document is -inf; a query
    with no valid token scores 0."""
    q = torch.tensor([[[1.0], [2.0]], [[1.0], [1.0]]])  # [2, 2, 1]
    d = torch.tensor([[[1.0], [3.0], [3.0]], [[5.0], [1.0], [1.0]]])  # [2, 3, 1]
    qm = torch.tensor([[True, True], [False, False]])
    dm = torch.tensor([[True, True, True], [False, False, False]])
    pb = torch.tensor([0.5, 0.25])  # R = 2: distances >= 1 all read 0.25
    out = maxsim_oracle("padded", q, d, qm, dm, None, pb, "sum")
    # query 0 (n = 2): i = 0 -> r = 2 + j -> clamped to 1 -> tokens 1, 2 tie at 3.25, j = 1 wins;
    # i = 1 -> r = 1 + j -> clamped -> 2 * 3 + 0.25 for j = 1, 2: j = 1 wins. Score 3.25 + 6.25 = 9.5.
    assert out["score"][0, 0] == 9.5 and out["argmax"][0, 0].tolist() == [1, 1]
    assert torch.isneginf(out["score"][0, 1]) and out["argmax"][0, 1].tolist() == [-1, -1]
    assert out["score"][1].tolist() == [0.0, 0.0] and (out["argmax"][1] == -1).all()


def test_reader_teacher_oracle_hand_case():
    attn = torch.tensor([0.0, 0.0, float("-inf"), 5.0]).reshape(1, 1, 1, 1, 4)
    doc = torch.tensor([[0, 1, 1, -1]])
    p, _ = reader_teacher_oracle(attn, doc, None, 3, True)
    assert p.tolist() == [[0.5, 0.5, 0.0]]  # padding ignored whatever its logit; -inf carries no mass


def test_residual_oracle_hand_case():
    # D = 4, nbits = 2: one byte per token, dimension d at bits 2d..2d+1 (LSB first)
    cent = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    w = torch.tensor([[0.0, 0.125, 0.25, 0.5]] * 4)  # w[d, bucket]
    packed = torch.tensor([[0b11100100]], dtype=torch.uint8)  # buckets 0, 1, 2, 3
    codes = torch.tensor([0], dtype=torch.int32)
    q = torch.ones(1, 1, 4)
    off = torch.tensor([0, 1, 1])
    cand = torch.tensor([[0, 1, -1]])
    s, _ = residual_maxsim_oracle(q, None, cent, w, codes, packed, off, cand, 2)
    assert s[0, 0].item() == (1.0 + 0.0) + 0.125 + 0.25 + 0.5  # w[d, bucket d] per dimension
    assert torch.isneginf(s[0, 1]) and torch.isneginf(s[0, 2])


@pytest.mark.skipif(not IN_CI, reason="CI only (CI=true): a CI machine must have every CPU backend")
def test_ci_has_cpu_and_triton_interpreter():
    """On CI, a failed C++ build or a broken Triton interpreter fails here (the backend tests do not skip either)."""
    import reatt_kernels as rk

    ab = rk.available_backends()
    assert ab["cpu"] == "ok", f"cpu backend unavailable on CI: {ab['cpu']}"
    assert ab["triton"] == "ok", f"triton (interpreter) backend unavailable on CI: {ab['triton']}"
