"""train -> index -> retrieve -> read on a tiny model and a generated corpus: reatt-index build / search, reatt-eval,
re-retrieval through the same index code, a killed build resuming byte for byte, ranks building parts searched as a
ShardedIndex, answer containment on hand-made cases, and optional matplotlib."""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import socket
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from reatt import retrieve  # noqa: E402
from reatt.config import ReAttConfig  # noqa: E402
from reatt.data import load_jsonl  # noqa: E402
from reatt.demo import generate, load_tokenizer, plot_ablation  # noqa: E402
from reatt.eval import em_score, f1_score, has_answer, retrieval_metrics  # noqa: E402
from reatt.eval import run as eval_main  # noqa: E402
from reatt.index_cli import main as index_main  # noqa: E402
from reatt.model import ReAttModel, tiny_t5_config  # noqa: E402
from reatt.train import _plot, build_parser, train  # noqa: E402

from ..utils import spawn_with_timeout  # noqa: E402

LENS = ["--max-doc-len", "24"]
QLENS = ["--max-query-len", "16"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved tiny random ReAtt model (d_kv 16) and a generated corpus (95 passages: 90 facts of one length and 5 of
    other lengths, so batches hold padding) with dev questions."""
    d = tmp_path_factory.mktemp("workflow")
    train_rows, dev, _, corpus = generate(n_entities=6, pool=3, n_ctx=3, n_train=16, n_dev=12, seed=0,
                                          n_corpus_distractors=2)
    words = "the capital of the river is a color what who".split()
    for i in range(5):  # ragged lengths, one without a title, spread over the parts
        corpus.insert(17 * i + 3, {"id": f"ragged{i}", **({"title": "x"} if i else {}),
                                   "text": " ".join(words[: 2 * i + 1] * (i + 1))})
    tok = load_tokenizer()
    cfg = tiny_t5_config(vocab_size=len(tok), d_model=32, num_layers=3, num_decoder_layers=1, num_heads=2, d_kv=16,
                         d_ff=48)
    model = ReAttModel.from_config(cfg, ReAttConfig(retrieval_layer=1, retrieval_head=1), tokenizer=tok, seed=0)
    model.save_pretrained(str(d / "model"))
    return {"dir": d, "model": str(d / "model"), "corpus": _write(d / "corpus.jsonl", corpus),
            "dev": _write(d / "dev.jsonl", dev), "train": _write(d / "train.jsonl", train_rows),
            "n_docs": len(corpus)}


def _build(world, out, *extra):
    index_main(["build", "--model", world["model"], "--corpus", world["corpus"], "--out", str(out), "--part-size",
                "23", "--batch-size", "8", "--device", "cpu", "--no-progress", *LENS, *extra])


@pytest.fixture(scope="module")
def built(world):
    out = world["dir"] / "index"
    _build(world, out)
    return out


# ---- build -> search -> eval -----------------------------------------------------------------------------------------
def test_build_search_eval_round_trip(world, built, tmp_path):
    meta = json.loads((built / "reatt_index.json").read_text())
    assert meta["n_docs"] == world["n_docs"] == 95 and meta["n_parts"] == 5 and meta["dim"] == 16
    run = tmp_path / "run.jsonl"
    index_main(["search", "--model", world["model"], "--index", str(built), "--questions", world["dev"], "--k", "7",
                "--out", str(run), "--device", "cpu", "--no-progress", *QLENS])
    rows = [json.loads(ln) for ln in run.read_text().splitlines()]
    dev = [json.loads(ln) for ln in open(world["dev"])]
    assert [r["question"] for r in rows] == [q["question"] for q in dev]
    corpus_ids = {json.loads(ln)["id"] for ln in open(world["corpus"])}
    for r, q in zip(rows, dev):
        assert r["answers"] == q["answers"] and len(r["ctxs"]) == 7
        scores = [c["score"] for c in r["ctxs"]]
        assert scores == sorted(scores, reverse=True)
        ids = [c["id"] for c in r["ctxs"]]
        assert len(set(ids)) == 7 and set(ids) <= corpus_ids
        gold = [c["id"] for c in q["ctxs"] if c.get("gold")]
        assert r["gold_ids"] == gold and all(c["gold"] == (c["id"] in gold) for c in r["ctxs"])

    # training-time re-retrieval (in-memory index) ranks exactly as reatt-index search does
    from reatt.train import _corpus_search

    model = retrieve.load_model(world["model"])
    corpus = retrieve.read_corpus(world["corpus"])
    args = build_parser().parse_args(["--max-doc-len", "24", "--max-query-len", "16"])
    top = _corpus_search(model, [q["question"] for q in dev], corpus, 7, args, torch.device("cpu"))
    assert [[corpus[j]["id"] for j in row] for row in top.tolist()] == [[c["id"] for c in r["ctxs"]] for r in rows]

    out = tmp_path / "metrics.json"
    res = eval_main(["--data", str(run), "--model", world["model"], "--n-docs", "3", "--top-k", "1,5,7",
                     "--device", "cpu", "--no-progress", "--out", str(out), *LENS, *QLENS, "--max-answer-len", "4"])
    assert json.loads(out.read_text()) == res
    ret = res["retrieval"]
    assert ret == retrieval_metrics([{"answers": r["answers"], "ctxs": r["ctxs"], "gold_ids": r["gold_ids"]}
                                     for r in rows], (1, 5, 7))
    assert ret["n_questions"] == 12 and ret["n_gold_labelled"] == 12
    assert 0 <= ret["top1"] <= ret["top5"] <= ret["top7"] <= 1
    assert ret["gold_top7"] == sum(any(c["gold"] for c in r["ctxs"]) for r in rows) / 12
    assert res["reading"]["n_read"] == 12 and 0 <= res["reading"]["em"] <= res["reading"]["f1"] <= 1


def test_search_output_is_reatt_train_input(world, built, tmp_path):
    run = tmp_path / "train_run.jsonl"
    index_main(["search", "--model", world["model"], "--index", str(built), "--questions", world["train"], "--k",
                "3", "--out", str(run), "--device", "cpu", "--no-progress", *QLENS])
    assert len(load_jsonl(str(run))) == 16  # reatt-train's own reader accepts it
    out = tmp_path / "round2"
    args = build_parser().parse_args(["--train", str(run), "--model", world["model"], "--out", str(out), "--steps", "2",
                                      "--batch-size", "4", "--n-docs", "3", "--warmup", "1", "--eval-every", "0",
                                      "--corpus", world["corpus"], "--reretrieve-every", "1", "--no-progress", *LENS,
                                      *QLENS, "--max-answer-len", "4"])
    train(args)
    recs = [json.loads(ln) for ln in open(out / "metrics.jsonl")]
    assert [r["step"] for r in recs if r["type"] == "train"] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs if r["type"] == "train")


# ---- the index ranks by exact MaxSim over the model's keys -----------------------------------------------------------
def _maxsim_oracle(q, qm, keys, offsets):
    """float64, from the definition: score(a, b) = sum over a's valid tokens i of max over b's tokens t of q_i . k_t."""
    q = q.double()
    out = torch.empty(q.shape[0], len(offsets) - 1, dtype=torch.float64)
    for b in range(len(offsets) - 1):
        kb = keys[offsets[b]:offsets[b + 1]].double()
        s = torch.einsum("aid,td->ait", q, kb).amax(-1)
        out[:, b] = (s * qm).sum(1)
    return out


def test_exact_index_topk_equals_exact_maxsim(world, built):
    from reatt_kernels.index import TokenIndex

    model = retrieve.load_model(world["model"])
    corpus = retrieve.read_corpus(world["corpus"])
    parts = [TokenIndex.load(retrieve.part_dir(built, p)) for p in range(5)]
    keys = torch.cat([p.tokens for p in parts])
    lens = torch.cat([p.offsets[1:] - p.offsets[:-1] for p in parts])
    offsets = [0] + torch.cumsum(lens, 0).tolist()
    assert torch.equal(torch.cat([p.doc_ids for p in parts]), torch.arange(95))
    # The stored keys are the model's layer-B retrieval keys of each passage's real tokens (bi-encoder only), in fp16.
    with torch.no_grad():
        k_ref, m_ref = model.encode_documents(corpus, max_length=24)
    assert torch.equal(lens, m_ref.sum(1))
    torch.testing.assert_close(keys.float(), k_ref[m_ref].half().float(), rtol=2e-3, atol=2e-3)

    questions = [json.loads(ln)["question"] for ln in open(world["dev"])]
    with torch.no_grad():
        q, qm = model.encode_queries(questions, max_length=16)
    q = q.half()  # what the exact index scores with (its keys are fp16)
    index, _ = retrieve.load_index(str(built))
    k = 10
    s, ids = index.search(q.float(), qm, k)
    ref = _maxsim_oracle(q, qm, keys, offsets)
    for a in range(len(questions)):
        got = ref[a, ids[a]]
        torch.testing.assert_close(s[a].double(), got, rtol=1e-5, atol=1e-4)  # the scores are the documents' MaxSim
        kth = ref[a].topk(k).values[-1]
        assert (got >= kth - 1e-4).all(), f"question {a}: a returned document is not in the exact top-{k}"
        must = torch.nonzero(ref[a] > kth + 1e-4).flatten()
        assert set(must.tolist()) <= set(ids[a].tolist()), f"question {a}: the exact top-{k} was not returned"


# ---- resumable build -------------------------------------------------------------------------------------------------
def _killed_build(model_dir, corpus, out, kind):
    """Build, and SIGKILL this process in the middle of saving part 1 (after part 0 is finished)."""
    import signal

    import reatt_kernels.index.io as index_io

    torch.set_num_threads(1)

    def after_part(p):
        if p == 0:
            index_io._AFTER_WRITE_HOOK = lambda name: os.kill(os.getpid(), signal.SIGKILL)

    retrieve._AFTER_PART_HOOK = after_part
    model = retrieve.load_model(model_dir)
    retrieve.build_index(model, corpus, out, kind=kind, part_size=23, batch_size=8, max_len=24, n_centroids=8,
                         codec_sample_docs=40, progress=False)


def _tree(root: Path) -> dict:
    """relative path -> bytes, for every file; the generation directory's name (a save's timestamp, also the content
    of CURRENT) is normalised."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "CURRENT":
                data = re.sub(rb"^g\d+", b"g*", data)
            out[re.sub(r"/g\d+/", "/g*/", "/" + str(p.relative_to(root)))] = data
    return out


@pytest.mark.parametrize("kind", ["exact", "residual"])
def test_killed_build_resumes_to_the_same_index(world, tmp_path, kind):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = multiprocessing.get_context("spawn").Process(target=_killed_build,
                                                        args=(world["model"], world["corpus"], str(killed), kind))
    proc.start()
    proc.join(120)
    if proc.is_alive():
        proc.kill()
        pytest.fail("the build to be killed did not finish within 120 s")
    assert proc.exitcode == -9, f"the build was not killed (exit code {proc.exitcode})"
    assert retrieve.part_done(killed, 0) and not retrieve.part_done(killed, 1)
    assert any(p.name.startswith(".tmp-") for p in (killed / "part-00001").iterdir()), "no half-written part left"
    part0 = _tree(killed / "part-00000")
    gen0 = (killed / "part-00000" / "CURRENT").read_text()

    model = retrieve.load_model(world["model"])
    kw = dict(kind=kind, part_size=23, batch_size=8, max_len=24, n_centroids=8, codec_sample_docs=40, progress=False)
    retrieve.build_index(model, world["corpus"], str(killed), **kw)  # resume
    retrieve.build_index(model, world["corpus"], str(clean), **kw)  # uninterrupted
    assert (killed / "part-00000" / "CURRENT").read_text() == gen0, "a finished part was rebuilt"
    assert _tree(killed / "part-00000") == part0
    a, b = _tree(killed), _tree(clean)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name] == b[name], f"{name} differs after resuming"


def test_build_and_search_refuse_other_settings(world, built, tmp_path):
    with pytest.raises(SystemExit, match="part_size"):
        _build(world, built, "--part-size", "50")
    other = tmp_path / "other.jsonl"
    other.write_text(Path(world["corpus"]).read_text().replace(" is ", " was ", 1))  # one passage edited
    with pytest.raises(SystemExit, match="not the corpus the index was built from"):
        index_main(["search", "--model", world["model"], "--index", str(built), "--questions", world["dev"],
                    "--corpus", str(other), "--out", str(tmp_path / "r.jsonl"), "--no-progress", "--device", "cpu"])


# ---- ranks build parts; the parts are searched as a ShardedIndex -----------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, model_dir, corpus, questions, out):
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    model = retrieve.load_model(model_dir)
    retrieve.build_index(model, corpus, out, part_size=23, batch_size=8, max_len=24, progress=False)
    index, _ = retrieve.load_index(out)
    s, i = retrieve.search(model, index, questions, 9, 16, torch.device("cpu"))
    # training-time re-retrieval under DDP: each rank encodes its slice into a shard of an in-memory ShardedIndex
    from reatt.train import _corpus_search

    args = build_parser().parse_args(["--max-doc-len", "24", "--max-query-len", "16"])
    top = _corpus_search(model, questions, retrieve.read_corpus(corpus), 9, args, torch.device("cpu"), distributed=True)
    torch.save((s, i, type(index).__name__, top), f"{out}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_ranks_build_parts_searched_as_sharded_index(world, built, tmp_path):
    questions = [json.loads(ln)["question"] for ln in open(world["dev"])]
    out = tmp_path / "ddp_index"
    spawn_with_timeout(_ddp_worker, (2, _free_port(), world["model"], world["corpus"], questions, str(out)), nprocs=2)
    # every part equals the one-process build's, byte for byte
    for p in range(5):
        assert _tree(retrieve.part_dir(out, p)) == _tree(retrieve.part_dir(built, p))
    model = retrieve.load_model(world["model"])
    index, _ = retrieve.load_index(str(built))
    s1, i1 = retrieve.search(model, index, questions, 9, 16, torch.device("cpu"))
    for rank in range(2):
        s, i, kind, top = torch.load(out / f"rank{rank}.pt")
        assert kind == "ShardedIndex"
        assert torch.equal(i, i1) and torch.equal(s, s1)
        assert torch.equal(top, i1)  # corpus line numbers = index ids


# ---- answer containment (DPR / FiD) and SQuAD EM / F1 on hand-made cases ---------------------------------------------
def test_answer_containment_hand_made():
    assert has_answer(["Paris"], "The capital is Paris.")
    assert not has_answer(["Paris"], "Parisian food")  # whole tokens only
    assert has_answer(["\u00c9mile Zola"], "written by E\u0301MILE zola in 1880")  # NFD, uncased
    assert not has_answer(["\u00c9mile Zola"], "written by Emile Zola")  # accents are not stripped (as DPR)
    assert has_answer(["1,000"], "about 1,000 people") and not has_answer(["1,000"], "about 1000 people")
    assert has_answer(["New York"], "in new york city") and not has_answer(["New York"], "New-York")
    assert has_answer(["x", "the moon"], "to The Moon !") and not has_answer([""], "anything")

    def ctx(text, gold=False):
        return {"title": "t", "text": text, **({"gold": True} if gold else {})}

    rows = [
        {"answers": ["Paris"], "ctxs": [ctx("Parisian food"), ctx("capital: Paris", gold=True), ctx("x")]},
        {"answers": ["42"], "ctxs": [ctx("it is 42", gold=True), ctx("41")]},  # 2 ctxs: top-5 counts both
        {"answers": ["blue"], "ctxs": [ctx("red"), ctx("green"), ctx("yellow"), ctx("black"), ctx("the sky is blue")]},
        {"answers": ["none"], "ctxs": [ctx("nothing here"), ctx("no")]},
        {"answers": ["z"], "ctxs": [ctx("a"), ctx("b z")], "gold_ids": ["unretrieved"]},  # gold not retrieved
    ]
    res = retrieval_metrics(rows, (1, 2, 5))
    assert res["top1"] == pytest.approx(1 / 5) and res["top2"] == pytest.approx(3 / 5)
    assert res["top5"] == pytest.approx(4 / 5)
    assert res["n_gold_labelled"] == 3
    assert res["gold_top1"] == pytest.approx(1 / 3) and res["gold_top2"] == pytest.approx(2 / 3)
    assert res["gold_top5"] == pytest.approx(2 / 3) and res["min_ctxs"] == 2

    import reatt.eval as ev

    texts = ["written by E\u0301MILE zola, 1,000 (x_y) \u00e7a-va\u2009ok\tdone", "Caf\u00e9 \u6771\u4eac 3.5%"]
    with_regex = [ev._dpr_tokens(t) for t in texts]
    assert with_regex[0][:4] == ["written", "by", "e\u0301mile", "zola"]
    saved, ev._TOKEN = ev._TOKEN, None  # the standard-library fallback tokenizes the same
    try:
        assert [ev._dpr_tokens(t) for t in texts] == with_regex
    finally:
        ev._TOKEN = saved

    assert em_score("The Eiffel Tower!", ["eiffel tower"]) == 1.0 and em_score("tower", ["eiffel tower"]) == 0.0
    assert f1_score("the tower in paris", ["Eiffel Tower"]) == pytest.approx(0.4)  # p = 1/3, r = 1/2
    assert f1_score("tower", ["nope", "Eiffel Tower"]) == pytest.approx(2 / 3)  # the best answer counts
    assert f1_score("", ["a"]) == 1.0 and f1_score("x", ["the"]) == 0.0  # "a"/"the" normalise to empty


# ---- optional packages never fail a finished run ---------------------------------------------------------------------
def test_plots_skip_without_matplotlib(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert _plot([{"step": 0, "em": 0.0}], str(tmp_path / "a.png"), "t") is False
    assert plot_ablation({"arms": {}}, str(tmp_path / "b.png")) is False
    out = capsys.readouterr()
    assert "matplotlib is not installed" in out.err + out.out
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("cli", ["reatt.index_cli build", "reatt.index_cli search", "reatt.eval", "reatt.demo"])
def test_cli_help_documents_every_flag(cli, capsys):
    import importlib

    mod, *sub = cli.split()
    m = importlib.import_module(mod)
    with pytest.raises(SystemExit) as ei:
        m.main(sub + ["--help"])
    assert ei.value.code == 0
    text = capsys.readouterr().out
    ap = m.build_parser() if hasattr(m, "build_parser") else None
    if ap is not None:
        if sub:
            ap = next(a for a in ap._actions if a.dest == "cmd").choices[sub[0]]
        for action in ap._actions:
            for opt in action.option_strings:
                assert opt in text
            if action.dest != "help":
                assert action.help, f"{cli}: {action.option_strings} has no help text"
