"""ReAtt at the paper's scale without surprises (issue 20): the teacher in fp32 under bf16 autocast, the QA-only
warm-up without the GradCache pre-pass, defaults, and the helpers the other fixes share."""
from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from reatt.config import ReAttConfig  # noqa: E402
from reatt.data import Collator, Example  # noqa: E402
from reatt.demo import generate, load_tokenizer  # noqa: E402

from .test_reatt_model import _one_thread, make_model  # noqa: E402,F401  (the fixture applies here too)

N_DOCS = 3


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def rows():
    return generate(n_entities=12, pool=5, n_ctx=N_DOCS, n_train=40, n_dev=8, seed=3)[0]


def _batch(tok, rows, B=4, n=N_DOCS):
    exs = [Example(r["question"], r["answers"], r["ctxs"]) for r in rows[:B]]
    return Collator(tok, n, 32, 32, 8)(exs)


# ---- the teacher is fp32 under bf16 autocast -------------------------------------------------------------------------
def test_teacher_logits_fp32_under_cpu_bf16_autocast(tok, rows):
    """Under bf16 autocast the teacher's logits q.k must be computed in fp32 from the (bf16) projections the reader
    uses: compared with the same product in float64, the error is fp32-level, not bf16-level (~1e-2)."""
    model = make_model(tok).eval()
    cross = model.t5.decoder.block[-1].layer[1].EncDecAttention
    seen = {}
    hq = cross.q.register_forward_hook(lambda m, a, o: seen.setdefault("q", o))
    hk = cross.k.register_forward_hook(lambda m, a, o: seen.__setitem__("k", o))
    b = _batch(tok, rows)
    grabbed = {}
    orig = model._teacher_hook

    def spy(*a, **kw):
        seen.pop("q", None)
        orig(*a, **kw)
        grabbed["logits"] = model._teacher_logits

    model._hook.remove()
    model._hook = cross.register_forward_hook(spy, with_kwargs=True)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model.forward_parts(b["q_ids"], b["q_mask"], b["d_ids"], b["d_mask"], b["labels"])
    finally:
        hq.remove()
        hk.remove()
    logits = grabbed["logits"]
    assert logits.dtype == torch.float32
    H, dk = cross.n_heads, cross.key_value_proj_dim
    q = seen["q"][:, :1].double().view(logits.shape[0], H, dk)
    k = seen["k"].double().view(logits.shape[0], -1, H, dk)
    ref = torch.einsum("bhd,bshd->bhs", q, k)
    err = float((logits.double() - ref).abs().max() / ref.abs().max())
    assert err < 1e-5, f"teacher logits relative error {err:.2e}: not fp32"


# ---- the QA-only warm-up runs no GradCache pre-pass ------------------------------------------------------------------
def test_qa_only_ibn_accum_runs_each_micro_batch_once(tok, rows, monkeypatch):
    """kl_weight 0 (the warm-up round) with K micro-batches: one forward per micro-batch (no no-grad pre-pass, no
    teacher), and the gradient is the big batch's QA gradient."""
    from reatt.gradcache import ibn_accum_step

    model = make_model(tok).double().train()
    model.config.kl_weight = 0.0
    ref = copy.deepcopy(model)
    mbs = [_batch(tok, rows[i * 3:], B=3) for i in range(3)]
    calls = []
    orig = type(model).forward_parts

    def counting(self, *a, **kw):
        calls.append(kw.get("teacher", True))
        return orig(self, *a, **kw)

    monkeypatch.setattr(type(model), "forward_parts", counting)
    logs = ibn_accum_step(model, mbs)
    assert len(calls) == 3 and not any(calls), calls
    monkeypatch.setattr(type(model), "forward_parts", orig)
    parts = [ref.forward_parts(b["q_ids"], b["q_mask"], b["d_ids"], b["d_mask"], b["labels"], teacher=False)
             for b in mbs]
    n = sum(p["n_tokens"] for p in parts)
    qa = sum(p["qa_loss"] * p["n_tokens"] for p in parts) / n
    qa.backward()
    assert abs(logs["qa_loss"] - float(qa)) <= 1e-10 * float(qa)
    for (name, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
        if r.grad is not None and r.grad.norm() > 0:
            assert float((p.grad - r.grad).norm() / r.grad.norm()) < 1e-10, name


def test_qa_only_warmup_turns_ibn_accum_into_plain_accumulation():
    """reatt-train --kl-weight 0 --ibn-accum 4 (the preset's warm-up): plain accumulation of the same 4 micro-batches
    (in-batch negatives mean nothing without a KL)."""
    from reatt.train import build_parser, check_step_args

    args = build_parser().parse_args(["--kl-weight", "0", "--ibn-accum", "4"])
    check_step_args(args)
    assert (args.ibn_accum, args.accum) == (1, 4)


# ---- defaults --------------------------------------------------------------------------------------------------------
def test_reatt_config_default_is_a_preset():
    """ReAttConfig() is the T5-base preset (layer 6, head 3), not layer 6 with T5-large's head 6."""
    c = ReAttConfig()
    assert (c.retrieval_layer, c.retrieval_head) == (6, 3)
    assert ReAttConfig.for_t5("t5-base") == c


def test_token_budgets_are_one_pair_everywhere():
    """Training, indexing, search and evaluation default to the same 50 + 200 tokens per pair (the preset's)."""
    import inspect

    from reatt import data, eval as ev, index_cli, model, retrieve, train
    from reatt.config import MAX_DOC_LEN, MAX_QUERY_LEN

    assert (MAX_QUERY_LEN, MAX_DOC_LEN) == (50, 200) == (train.PRESETS["nq-large"]["max_query_len"],
                                                         train.PRESETS["nq-large"]["max_doc_len"])
    t = train.build_parser().parse_args([])
    e = ev.build_parser().parse_args(["--data", "x"])
    b = index_cli.build_parser().parse_args(["build", "--model", "m", "--corpus", "c", "--out", "o"])
    s = index_cli.build_parser().parse_args(["search", "--model", "m", "--index", "i", "--questions", "q", "--out",
                                             "o"])
    assert (t.max_query_len, t.max_doc_len) == (e.max_query_len, e.max_doc_len) == (MAX_QUERY_LEN, MAX_DOC_LEN)
    assert b.max_doc_len == MAX_DOC_LEN and s.max_query_len == MAX_QUERY_LEN
    for fn, name, want in [(data.tokenize_queries, "max_length", MAX_QUERY_LEN),
                           (data.tokenize_docs, "max_length", MAX_DOC_LEN),
                           (data.Collator.__init__, "max_query_len", MAX_QUERY_LEN),
                           (data.Collator.__init__, "max_doc_len", MAX_DOC_LEN),
                           (model.ReAttModel.encode_queries, "max_length", MAX_QUERY_LEN),
                           (model.ReAttModel.encode_documents, "max_length", MAX_DOC_LEN),
                           (ev.reading_metrics, "max_query_len", MAX_QUERY_LEN),
                           (ev.reading_metrics, "max_doc_len", MAX_DOC_LEN),
                           (retrieve.build_index, "max_len", MAX_DOC_LEN)]:
        assert inspect.signature(fn).parameters[name].default == want, (fn.__qualname__, name)


# ---- one answer normalisation, one distributed setup -----------------------------------------------------------------
def test_one_answer_normalisation_and_one_distributed_setup():
    import inspect

    from reatt import data, distributed, eval as ev, index_cli, retrieve, train

    assert not hasattr(data, "normalize_answer") and not hasattr(data, "exact_match")
    assert train.em_score is ev.em_score
    for mod in (train, index_cli, retrieve):
        src = inspect.getsource(mod)
        assert "init_process_group" not in src and "get_world_size()" not in src, mod.__name__
    assert train.setup_distributed is distributed.setup_distributed is index_cli.setup_distributed
    assert ev.em_score("The Eiffel Tower!", ["eiffel tower"]) == 1.0


# ---- evaluation that scales ------------------------------------------------------------------------------------------
def _ragged(tok, rows, B=5):
    from .test_reatt_model import ragged_batch

    return ragged_batch(tok, [Example(r["question"], r["answers"], r["ctxs"]) for r in rows], B)


def test_read_builds_no_per_pair_bias(tok, rows, monkeypatch):
    """The reader's blocks get a position bias [1, H, L, L] (shared by the pairs of one query length), never one per
    pair; chunking the pairs (max_pairs) gives the same states."""
    model = make_model(tok).eval()
    b = _ragged(tok, rows)
    B, n, Ld = b["d_ids"].shape
    shapes = []
    orig = type(model)._rel_bias

    def spy(self, pq, pk):
        out = orig(self, pq, pk)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(type(model), "_rel_bias", spy)
    with torch.no_grad():
        hq = model.bi_encode(b["q_ids"], b["q_mask"])
        hd = model.bi_encode(b["d_ids"].view(B * n, Ld), b["d_mask"].view(B * n, Ld))
        shapes.clear()
        ref = model.read(hq, b["q_mask"], hd, b["d_mask"].view(B * n, Ld))
        assert shapes and all(s[0] == 1 for s in shapes), shapes
        for mp in (1, 4, 7):
            got = model.read(hq, b["q_mask"], hd, b["d_mask"].view(B * n, Ld), max_pairs=mp)
            for x, y in zip(got, ref):
                assert torch.equal(x, y) if x.dtype == torch.bool or x.dtype == torch.long else \
                    torch.allclose(x, y, atol=1e-5, rtol=1e-5)


def test_cached_greedy_decoding_equals_uncached_and_projects_cross_kv_once(tok, rows):
    """Greedy decoding with the KV cache gives the same tokens as recomputing the prefix, and the cross-attention's
    K/V projections run once per layer for the whole generation."""
    model = make_model(tok, seed=4).eval()
    b = _ragged(tok, rows)
    # A random model rarely says EOS: bias the LM head away from it so that every step runs.
    with torch.no_grad():
        model.t5.lm_head.weight[1].mul_(0.0)
    calls = []
    hooks = [blk.layer[1].EncDecAttention.k.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[1]))
             for blk in model.t5.decoder.block]
    try:
        got = model.generate_answers(b["q_ids"], b["q_mask"], b["d_ids"], b["d_mask"], max_new_tokens=6)
    finally:
        for h in hooks:
            h.remove()
    ref = model.generate_answers(b["q_ids"], b["q_mask"], b["d_ids"], b["d_mask"], max_new_tokens=6, use_cache=False)
    assert got.shape == ref.shape == (5, 6)
    assert torch.equal(got, ref)
    assert len(calls) == len(model.t5.decoder.block), calls


def _eval_setup(tok):
    """A tiny model, 7 dev questions (gold ids) plus 2 without gold ids, the corpus of their ctxs, and train args."""
    from reatt.data import build_corpus, doc_id
    from reatt.train import build_parser

    train_rows, dev, _, _ = generate(n_entities=12, pool=5, n_ctx=N_DOCS, n_train=4, n_dev=9, seed=7)
    exs = [Example(r["question"], r["answers"], r["ctxs"], gold_ids=[doc_id(c) for c in r["ctxs"] if c.get("gold")])
           for r in dev]
    exs[-1].gold_ids, exs[-2].gold_ids = [], []
    corpus, index = build_corpus(exs)
    args = build_parser().parse_args(["--n-docs", str(N_DOCS), "--max-query-len", "16", "--max-doc-len", "16",
                                      "--max-answer-len", "4", "--eval-batch-size", "2", "--top-k", "1,3",
                                      "--eval-retrieved"])
    model = make_model(tok, seed=2).eval()
    return model, exs, corpus, index, args


def test_evaluate_reports_answer_containment_topk(tok):
    """answer_top{k}: DPR answer containment over the corpus ranking, for every question (also without gold ids),
    equal to reatt-eval's retrieval_metrics on the same ranking."""
    from reatt.eval import retrieval_metrics
    from reatt.train import _corpus_search, evaluate

    model, exs, corpus, index, args = _eval_setup(tok)
    res = evaluate(model, tok, exs, corpus, index, args, torch.device("cpu"))
    top = _corpus_search(model, [e.question for e in exs], corpus, 3, args, torch.device("cpu"))
    ref = retrieval_metrics([{"answers": e.answers, "ctxs": [corpus[j] for j in row.tolist()]}
                             for e, row in zip(exs, top)], (1, 3))
    assert res["answer_top1"] == ref["top1"] and res["answer_top3"] == ref["top3"]
    assert {"em", "em_retrieved", "retrieval_top1", "retrieval_own_top1"} <= set(res)


def _eval_worker(rank, world, port, out_path):
    import datetime
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    done = False
    try:
        from reatt.train import evaluate

        tok = load_tokenizer()
        model, exs, corpus, index, args = _eval_setup(tok)
        read = []
        gen = model.generate_answers
        model.generate_answers = lambda q_ids, *a, **kw: (read.append(q_ids.shape[0]), gen(q_ids, *a, **kw))[1]
        res = evaluate(model, tok, exs, corpus, index, args, torch.device("cpu"))
        torch.save({"res": res, "read": sum(read)}, f"{out_path}.{rank}")
        dist.barrier()
        done = True
    finally:
        if done:
            os._exit(0)  # see tests/test_reatt_train.py: leave without the gloo teardown (torch deadlock)
        dist.destroy_process_group()


def test_evaluate_sharded_over_two_gloo_ranks_equals_one_process(tok, tmp_path):
    """Every rank reads only its share of the questions (given ctxs and retrieved ones: 5 + 5 of 9 + 9 on rank 0)
    and gets the gathered metrics, equal to one process's."""
    import socket

    from reatt.train import evaluate

    from ..utils import spawn_with_timeout

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    out = str(tmp_path / "eval.pt")
    spawn_with_timeout(_eval_worker, (2, port, out), nprocs=2)
    model, exs, corpus, index, args = _eval_setup(tok)
    ref = evaluate(model, tok, exs, corpus, index, args, torch.device("cpu"))
    for r in (0, 1):
        got = torch.load(f"{out}.{r}")
        assert got["read"] == (10 if r == 0 else 8), got["read"]
        got = got["res"]
        assert got.keys() == ref.keys()
        for k in ref:
            assert got[k] == pytest.approx(ref[k], abs=1e-12), (r, k, got[k], ref[k])


# ---- the original's target sampling and ctx order --------------------------------------------------------------------
def test_training_target_samples_an_answer_as_the_original(tok):
    """--target random (default, the original's random.choice over the answers) vs first (answers[0])."""
    import random

    from reatt.data import tokenize_answers

    ex = Example("what ?", ["red", "blue", "green"], [{"title": "t", "text": "red blue green"}])
    want = {a: tuple(tokenize_answers(tok, [a], 8)[0].tolist()) for a in ex.answers}
    random.seed(0)
    seen = {tuple(Collator(tok, 1, 16, 16, 8)([ex])["labels"][0].tolist()) for _ in range(40)}
    assert seen == set(want.values())
    first = {tuple(Collator(tok, 1, 16, 16, 8, target="first")([ex])["labels"][0].tolist()) for _ in range(10)}
    assert first == {want["red"]}
    from reatt.train import build_parser

    assert build_parser().parse_args([]).target == "random"


def test_ctxs_sorted_by_score_as_the_original(tmp_path):
    """Training ctxs are sorted by descending "score" when every ctx has one (the original's sort_data);
    --ctx-order file keeps the file's order."""
    from reatt.data import load_jsonl, sort_ctxs_by_score

    p = tmp_path / "t.jsonl"
    rows = [{"question": "q", "answers": ["a"], "ctxs": [{"text": "x", "score": 0.1}, {"text": "y", "score": "2.5"},
                                                          {"text": "z", "score": 1}]},
            {"question": "q2", "answers": ["a"], "ctxs": [{"text": "u"}, {"text": "v", "score": 3}]}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    exs = load_jsonl(str(p))
    sort_ctxs_by_score(exs)
    assert [c["text"] for c in exs[0].ctxs] == ["y", "z", "x"]
    assert [c["text"] for c in exs[1].ctxs] == ["u", "v"]  # not every ctx has a score: file order
    from reatt.train import build_parser

    assert build_parser().parse_args([]).ctx_order == "score"


# ---- FiD readers accept our search output ----------------------------------------------------------------------------
def test_search_output_has_fid_fields_for_a_corpus_without_title_or_id(tmp_path):
    """FiD's reader (src/data.py) reads c['title'], c['text'], c['score'] and str(c['id']) of every ctx: a run written
    for a corpus without titles or ids carries them ("" and the corpus line number), and the gold flags still hold."""
    from reatt.data import doc_id
    from reatt.index_cli import write_run
    from reatt.retrieve import read_corpus

    cp = tmp_path / "corpus.jsonl"
    cp.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["alpha beta", "gamma", "delta"]))
    corpus = read_corpus(str(cp))
    out = tmp_path / "run.jsonl"
    write_run(str(out), [{"question": "q", "answers": ["gamma"], "gold_ids": [doc_id({"text": "gamma"})]}], corpus,
              torch.tensor([[2.0, 1.0]]), torch.tensor([[1, 0]]))
    row = json.loads(out.read_text())
    for c in row["ctxs"]:  # what FiD's Dataset.__getitem__ does with each ctx
        "title: {} context: {}".format(c["title"], c["text"]), float(c["score"]), str(c["id"])
    assert [c["id"] for c in row["ctxs"]] == ["1", "0"] and [c["gold"] for c in row["ctxs"]] == [True, False]


# ---- the author's checkpoints ----------------------------------------------------------------------------------------
def _fork_layout(model, path, kl_method="separate"):
    """Write ``model`` as the FiD fork's FiDT5.save_pretrained would: wrapper names, fork config fields."""
    import os

    os.makedirs(path, exist_ok=True)
    sd = {}
    for k, v in model.t5.state_dict().items():
        if k.startswith("encoder.embed_tokens") or k.startswith("decoder.embed_tokens"):
            continue
        if k.startswith("encoder.block."):
            parts = k.split(".")
            k = ".".join(["encoder", "encoder", "block", parts[2], "module", *parts[3:]])
        elif k.startswith("encoder."):
            k = "encoder." + k
        elif k.startswith("decoder."):
            k = "decoder." + k
        sd[k] = v.clone()
    H = model.t5.config.num_heads
    w = torch.randn(H) * 0.01
    sd["decoder.head_weights"] = w[None] if kl_method != "merge" else w
    sd["decoder.combine_weight"] = torch.tensor(0.7)
    torch.save(sd, os.path.join(path, "pytorch_model.bin"))
    cfg = model.t5.config.to_dict()
    cfg.update(n_layer_two_tower=model.config.retrieval_layer, layer_for_retrieval="first", attention_mask="separate",
               retrieval_aggregation_method="all-avg-max", keep_ctx_in_decoder_head_tau=0.001,
               head_weights_norm_func="softmax", encoder_decoder_kl_method=kl_method, combine_weight=0.0,
               keep_ctx_in_decoder_with_head=None, encoder_decoder_kl_ratio=8.0, architectures=["FiDT5"])
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return w


@pytest.mark.parametrize("kl_method", ["separate", "merge"])
def test_load_a_fid_fork_checkpoint(tok, rows, tmp_path, kl_method):
    """A synthetic checkpoint in the fork's layout (12 heads at layer 6: the fork's head 3) loads into ReAttModel:
    every T5 weight, w from decoder.head_weights, c from decoder.combine_weight, tau 0.001, and the same forward."""
    from reatt.checkpoints import load_original
    from reatt.model import ReAttModel, tiny_t5_config

    cfg = tiny_t5_config(vocab_size=len(tok), d_model=48, num_layers=7, num_decoder_layers=2, num_heads=12, d_kv=8,
                         d_ff=64)
    ref = ReAttModel.from_config(cfg, ReAttConfig(retrieval_layer=6, retrieval_head=3), tokenizer=tok, seed=5).eval()
    w = _fork_layout(ref, str(tmp_path / "ck"), kl_method)
    got = load_original(str(tmp_path / "ck"))
    assert (got.config.retrieval_layer, got.config.retrieval_head, got.config.head_temperature) == (6, 3, 0.001)
    assert torch.equal(got.head_logits, w) and float(got.log_scale.detach()) == pytest.approx(0.7)
    for (n, p), (_, q) in zip(got.t5.state_dict().items(), ref.t5.state_dict().items()):
        assert torch.equal(p, q), n
    with torch.no_grad():
        ref.head_logits.copy_(w)
        ref.log_scale.fill_(0.7)
    got.tokenizer = tok
    b = _batch(tok, rows)
    with torch.no_grad():
        a, r = got(**{k: v for k, v in b.items() if k != "gold"}), ref(**{k: v for k, v in b.items() if k != "gold"})
    assert torch.allclose(a["loss"], r["loss"], rtol=1e-5)


def test_load_a_released_reatt_model_and_convert(tok, tmp_path):
    """The released layout (plain T5 names, retrieval_layer/retrieval_head in config.json) loads with w = 0, c = 0;
    python -m reatt.checkpoints converts it into a directory ReAttModel.from_pretrained reads back."""
    import os

    from reatt.checkpoints import load_original, main
    from reatt.model import ReAttModel, tiny_t5_config

    cfg = tiny_t5_config(vocab_size=len(tok), d_model=32, num_layers=4, num_decoder_layers=2, num_heads=4, d_kv=8,
                         d_ff=48)
    ref = ReAttModel.from_config(cfg, ReAttConfig(retrieval_layer=2, retrieval_head=1), seed=6)
    d = tmp_path / "rel"
    os.makedirs(d)
    torch.save(ref.t5.state_dict(), d / "pytorch_model.bin")
    c = ref.t5.config.to_dict()
    c.update(retrieval_layer=2, retrieval_head=1, distillation_tau=1.0, retrieval_corpus="x")
    (d / "config.json").write_text(json.dumps(c))
    got = load_original(str(d))
    assert (got.config.retrieval_layer, got.config.retrieval_head) == (2, 1)
    assert float(got.head_logits.detach().abs().sum()) == 0.0 and float(got.log_scale.detach()) == 0.0
    assert main([str(d), str(tmp_path / "conv")]) == 0
    back = ReAttModel.from_pretrained(str(tmp_path / "conv"))
    assert (back.config.retrieval_layer, back.config.retrieval_head) == (2, 1)
    for (n, p), (_, q) in zip(back.t5.state_dict().items(), ref.t5.state_dict().items()):
        assert torch.equal(p, q), n


# ---- each rank streams only its share of the training JSONL ----------------------------------------------------------
def test_load_jsonl_share_parses_only_its_lines(tmp_path, monkeypatch):
    """load_jsonl(path, rank, world) keeps examples rank, rank + world, ... and parses only their lines (the others are
    skipped unparsed); errors still name the line; the total count is every example's."""
    from reatt import data

    p = tmp_path / "t.jsonl"
    rows = [{"question": f"q{i}", "answers": ["a"], "ctxs": [{"text": f"t{i}"}]} for i in range(11)]
    p.write_text("".join(json.dumps(r) + ("\n\n" if i == 4 else "\n") for i, r in enumerate(rows)))
    parsed = []
    orig = data.json.loads
    monkeypatch.setattr(data.json, "loads", lambda s, *a, **k: (parsed.append(s), orig(s, *a, **k))[1])
    shares = [data.load_jsonl(str(p), rank=r, world=3) for r in range(3)]
    assert len(parsed) == 11
    assert [[e.question for e in s] for s in shares] == [[f"q{i}" for i in range(r, 11, 3)] for r in range(3)]
    assert shares[1][2].line == 9  # q7 sits on line 9 (a blank line after q4)
    assert data.count_jsonl(str(p)) == 11
    p.write_text(p.read_text().replace('"q7"', "7"))
    data.load_jsonl(str(p), rank=0, world=3)  # line 9 is rank 1's: rank 0 never parses it
    with pytest.raises(data.DataError, match=r"t.jsonl:9: 'question'"):
        data.load_jsonl(str(p), rank=1, world=3)


def test_sharded_sampler_covers_each_global_batch_once():
    """ShardSampler: each rank draws its batch from its own share; a step's global batch holds distinct examples,
    every rank runs the same number of steps per epoch, and one rank's order is EpochSampler's."""
    from reatt.data import EpochSampler, ShardSampler

    N, world, per = 23, 3, 2
    samplers = [ShardSampler(len(range(r, N, world)), per, seed=4, rank=r, world=world, n_total=N)
                for r in range(world)]
    assert len({s.per_epoch for s in samplers}) == 1
    for step in range(samplers[0].per_epoch):
        glob = [r + world * j for r, s in enumerate(samplers) for j in s.batch(step)]
        assert len(glob) == len(set(glob)) == per * world
    one = ShardSampler(N, 4, seed=4, rank=0, world=1, n_total=N)
    old = EpochSampler(N, 4, seed=4)
    assert all(one.batch(s) == old.batch(s) for s in range(12))


def _train_worker(rank, world, port, out, data):
    import datetime
    import os

    import torch.distributed as dist

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=180))
    done = False
    try:
        from reatt import data as rdata
        from reatt.train import train

        from .test_reatt_train import _args

        loaded = []
        orig = rdata.load_jsonl
        rdata.load_jsonl = lambda p, *a, **k: (lambda r: (loaded.append((p, len(r))), r)[1])(orig(p, *a, **k))
        import reatt.train as rt

        rt.load_jsonl = rdata.load_jsonl
        hist = train(_args(out, data, steps=2, batch_size=2, eval=data["dev"], eval_every=1, eval_max=4,
                           reretrieve_every=1, save_every=1))
        torch.save({"loaded": loaded, "hist": hist}, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()
        done = True
    finally:
        if done:
            os._exit(0)  # see tests/test_reatt_train.py: leave without the gloo teardown (torch deadlock)
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_rank_training_streams_shares_and_checkpoints_the_file_order(tmp_path):
    """reatt-train on 2 gloo ranks: each rank loads only its half of the training file, evaluation and re-retrieval
    run on both, and the checkpoint's refreshed ctx ids come back in the file's order (all examples)."""
    import socket

    from reatt.demo import write_demo

    from ..utils import spawn_with_timeout

    data = write_demo(str(tmp_path / "data"), n_entities=8, pool=3, n_ctx=3, n_train=9, n_dev=4)
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    out = str(tmp_path / "run")
    spawn_with_timeout(_train_worker, (2, port, out, data), nprocs=2, timeout_s=600)
    r0, r1 = (torch.load(f"{out}/rank{r}.pt", weights_only=False) for r in (0, 1))
    assert [n for p, n in r0["loaded"] if p == data["train"]] == [5]
    assert [n for p, n in r1["loaded"] if p == data["train"]] == [4]
    drop = ("train_seconds", "eval_seconds")
    h0, h1 = ([{k: v for k, v in h.items() if k not in drop} for h in r["hist"]] for r in (r0, r1))
    assert h0 == h1 and len(h0) == 3
    ck = torch.load(f"{out}/checkpoint.pt", weights_only=False)
    assert len(ck["ctx_ids"]) == 9 and all(len(ids) == 3 for ids in ck["ctx_ids"])
