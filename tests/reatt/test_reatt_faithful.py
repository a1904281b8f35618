"""ReAtt as the original trains it (issue 10): each test fails on the code before the fix.

1. chaining rounds restores the saved config (the KL keeps a gradient); an unknown T5 shape raises;
2. the default teacher is the original's (independent oracle from HF's own cross-attentions), and it works with a
   question that has fewer documents than n;
3. w starts at 0 (scale 1/H) and both w and c get a gradient;
4. the architecture presets (T5-base: layer 6 head 3; T5-large: layer 12 head 6);
5. another query's in-batch document is scored at its own pair's offset (float64 oracle, and the fused kernels);
and the paper's schedule end to end through the CLI (QA warm-up, KL rounds with GradCache in-batch negatives,
re-retrieval between rounds, each round from the previous round's final/ with a fresh optimizer)."""
from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from reatt.config import ReAttConfig  # noqa: E402
from reatt.data import Collator  # noqa: E402
from reatt.demo import TOKENIZER_DIR, write_demo  # noqa: E402
from reatt.model import ReAttModel, tiny_t5_config  # noqa: E402
from reatt.train import PRESETS, apply_defaults, build_parser, main  # noqa: E402

from .test_reatt_gradcache import _fp64_model, _micro_batches, oracle_loss  # noqa: E402
from .test_reatt_model import _one_thread, examples, make_model, ragged_batch, tok  # noqa: E402,F401


def _cli(out, data, *extra):
    return ["--train", data["train"], "--tokenizer", TOKENIZER_DIR, "--out", out, "--n-docs", "3", "--batch-size",
            "4", "--steps", "3", "--warmup", "1", "--lr", "3e-3", "--max-query-len", "16", "--max-doc-len", "16",
            "--max-answer-len", "4", "--eval-every", "0", "--no-progress",
            "--tiny", "d_model=32,num_layers=4,num_decoder_layers=1,num_heads=3,d_ff=48", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_demo(str(tmp_path_factory.mktemp("faithful") / "data"), n_entities=8, pool=3, n_ctx=3, n_train=40,
                      n_dev=4)


def _kl_grad_on_retrieval_head(model: ReAttModel, tok, examples) -> tuple[torch.Tensor, torch.Tensor]:
    b = Collator(tok, 3, 16, 16, 4)(examples[:4])
    model.zero_grad()
    model(**b)["kl_loss"].backward()
    a = model.t5.encoder.block[model.config.retrieval_layer].layer[0].SelfAttention
    h, dk = model.config.retrieval_head, a.key_value_proj_dim
    return a.q.weight.grad[h * dk : (h + 1) * dk], model.log_scale.grad


# ---- 1 ---------------------------------------------------------------------------------------------------------------
def test_round_two_restores_round_one_config_and_keeps_learning(tmp_path, data, tok, examples):
    r1, r2 = str(tmp_path / "r1"), str(tmp_path / "r2")
    main(_cli(r1, data, "--retrieval-layer", "1", "--retrieval-head", "2"))
    saved = ReAttConfig.load(os.path.join(r1, "final"))
    assert (saved.retrieval_layer, saved.retrieval_head) == (1, 2)
    main(_cli(r2, data, "--model", os.path.join(r1, "final")))  # no layer/head flags: the saved ones
    cfg2 = ReAttConfig.load(os.path.join(r2, "final"))
    assert cfg2 == saved
    m2 = ReAttModel.from_pretrained(os.path.join(r2, "final"))
    assert m2.config == saved
    gq, gc = _kl_grad_on_retrieval_head(m2, tok, examples)
    assert gq.abs().sum() > 0 and gc != 0 and float(m2.student_scale().detach()) > 0
    # Asking for another retriever than the saved one is an error, not a silent mismatch.
    with pytest.raises(SystemExit, match="retrieval-head 0"):
        main(_cli(str(tmp_path / "r3"), data, "--model", os.path.join(r1, "final"), "--retrieval-head", "0"))


def test_unknown_t5_shape_raises_naming_the_flags(tmp_path, tok):
    t5dir = str(tmp_path / "my_t5_large")  # a name that once matched "t5-large"-like guesses: it must not matter
    from transformers import T5ForConditionalGeneration

    T5ForConditionalGeneration(tiny_t5_config(vocab_size=len(tok), num_layers=4, num_heads=2)).save_pretrained(t5dir)
    with pytest.raises(ValueError, match="--retrieval-layer B and --retrieval-head H"):
        ReAttModel.from_pretrained(t5dir)
    m = ReAttModel.from_pretrained(t5dir, reatt_config=ReAttConfig(retrieval_layer=2, retrieval_head=1))
    assert (m.config.retrieval_layer, m.config.retrieval_head) == (2, 1)


# ---- 2 ---------------------------------------------------------------------------------------------------------------
def test_default_teacher_is_the_originals_with_a_missing_document(tok, examples):
    m = make_model(tok).eval()
    b = ragged_batch(tok, examples)  # query 2 has 2 documents of n = 3: an empty slot
    B, n, Ld = b["d_ids"].shape
    Lq = b["q_ids"].shape[1]
    assert m.config.teacher_includes_query
    out = m(**b)
    assert torch.isfinite(out["kl_loss"])
    # Oracle: HF's own decoder cross-attention probabilities of the last layer at step 0 (softmax over every valid
    # encoder token of every pair, query tokens included), averaged over heads, summed per pair.
    with torch.no_grad():
        enc, enc_mask, _ = m.read(m.bi_encode(b["q_ids"], b["q_mask"]), b["q_mask"],
                                  m.bi_encode(b["d_ids"].flatten(0, 1), b["d_mask"].flatten(0, 1)),
                                  b["d_mask"].flatten(0, 1))
        dec = m.t5(encoder_outputs=(enc,), attention_mask=enc_mask.long(), labels=b["labels"], output_attentions=True,
                   return_dict=True, use_cache=False)
        p = dec.cross_attentions[-1][:, :, 0].double().mean(1)  # [B, S]
        ref = (p * enc_mask).reshape(B, n, Lq + Ld).sum(-1)
    torch.testing.assert_close(out["teacher"].double(), ref, rtol=1e-5, atol=1e-6)
    assert out["teacher"][2, 2] == 0
    # The alternative (--teacher-docs-only) differs.
    m.config.teacher_includes_query = False
    assert not torch.allclose(m(**b)["teacher"], out["teacher"], atol=1e-3)


# ---- 3 ---------------------------------------------------------------------------------------------------------------
def test_head_weights_start_uniform_and_learn(tok, examples):
    m = make_model(tok)
    H = m.t5.config.num_heads
    assert torch.equal(m.head_logits.detach(), torch.zeros(H)) and float(m.log_scale.detach()) == 0.0
    torch.testing.assert_close(m.student_scale().detach(), torch.tensor(1.0 / H))
    m(**ragged_batch(tok, examples))["kl_loss"].backward()
    assert m.head_logits.grad.abs().sum() > 0 and m.log_scale.grad != 0


# ---- 4 ---------------------------------------------------------------------------------------------------------------
def test_architecture_presets():
    large = ReAttConfig.for_architecture(24, 16)
    base = ReAttConfig.for_architecture(12, 12)
    assert (large.retrieval_layer, large.retrieval_head) == (12, 6)
    assert (base.retrieval_layer, base.retrieval_head) == (6, 3)
    assert ReAttConfig.for_t5("t5-base") == base and ReAttConfig.for_t5("t5-large") == large
    with pytest.raises(ValueError, match="retrieval-layer"):
        ReAttConfig.for_architecture(6, 8)  # t5-small: no original preset
    with pytest.raises(ValueError, match="no ReAtt preset named"):
        ReAttConfig.for_t5("t5-v1_1-large")
    args = build_parser().parse_args(["--preset", "nq-large", "--lr", "1e-4"])
    apply_defaults(args, build_parser(), ["--preset", "nq-large", "--lr", "1e-4"], PRESETS["nq-large"])
    assert args.lr == 1e-4  # explicit flags win
    assert (args.n_docs, args.kl_weight, args.retrieval_layer, args.retrieval_head, args.warmup_ratio, args.clip,
            args.weight_decay, args.max_query_len + args.max_doc_len) == (100, 8.0, 12, 6, 0.1, 1.0, 0.01, 250)
    assert args.batch_size * args.ibn_accum * 8 == 64  # 8 GPUs: the paper's 64 queries per student softmax


# ---- 5 ---------------------------------------------------------------------------------------------------------------
def test_in_batch_documents_scored_at_their_own_pair_offset(tok):
    """fp64: the model's KL equals the oracle's, whose bias for query a on query a''s document b is
    bias(n_a' + j - i); queries of different lengths make the old choice (n_a) differ."""
    m = _fp64_model(tok).eval()
    (b,) = _micro_batches(tok, 1, per=4)
    nq = b["q_mask"].sum(1)
    assert len(set(nq.tolist())) > 1
    torch.manual_seed(0)
    kl = m(**b)["kl_loss"]
    _, _, ref = oracle_loss(m, [[b]], [0])
    torch.testing.assert_close(kl, ref.detach(), rtol=1e-12, atol=0)


def test_student_scores_fused_kernels_match_fp64_oracle(tok):
    """The grouped-offset layout through the default (fused) backend, fp32, against the float64 spec."""
    from .test_reatt_gradcache import _bias

    torch.manual_seed(3)
    m = make_model(tok)
    B, Lq, Nd, Ld, d = 5, 7, 11, 9, 64
    qv, dv = torch.randn(B, Lq, d), torch.randn(Nd, Ld, d)
    nq = torch.tensor([7, 3, 5, 1, 3])
    q_mask = torch.arange(Lq)[None] < nq[:, None]
    dlen = torch.tensor([9, 4, 0, 1, 9, 6, 2, 3, 9, 5, 8])  # an empty document
    d_mask = torch.arange(Ld)[None] < dlen[:, None]
    owner = torch.tensor([7, 7, 3, 3, 5, 5, 1, 1, 3, 12, 2])  # offsets longer than any query, too
    s = m.student_scores(qv, q_mask, dv, d_mask, owner)
    ref = torch.full((B, Nd), float("-inf"), dtype=torch.float64)
    with torch.no_grad():
        for a in range(B):
            for c in range(Nd):
                if dlen[c] == 0:
                    continue
                i = torch.arange(int(nq[a]))[:, None]
                j = torch.arange(int(dlen[c]))[None, :]
                x = qv[a, : nq[a]].double() @ dv[c, : dlen[c]].double().T + _bias(m, owner[c] + j - i).double()
                ref[a, c] = x.max(1).values.mean()
    assert torch.isneginf(s[:, 2]).all()
    fin = torch.isfinite(ref)
    torch.testing.assert_close(s.double()[fin], ref[fin], rtol=1e-5, atol=1e-5)


# ---- the schedule ----------------------------------------------------------------------------------------------------
def _train_records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["type"] == "train"]


def test_paper_schedule_warmup_then_kl_rounds_with_ibn_accum(tmp_path, data):
    w, r1, r2 = (str(tmp_path / x) for x in ("warmup", "round1", "round2"))
    main(_cli(w, data, "--kl-weight", "0", "--retrieval-layer", "2", "--retrieval-head", "1"))
    assert all(r["kl_loss"] == 0 for r in _train_records(w))
    main(_cli(r1, data, "--model", os.path.join(w, "final"), "--ibn-accum", "2", "--batch-size", "2",
              "--reretrieve-at-start", "--warmup-ratio", "0.34"))
    recs = _train_records(r1)
    assert recs[0]["lr"] > 0 and all(r["kl_loss"] > 0 for r in recs) and all(r["n_queries"] == 4 for r in recs)
    ck = torch.load(os.path.join(r1, "checkpoint.pt"), weights_only=False)
    assert ck["ctx_ids"] is not None  # re-retrieved at the start of the round
    assert ck["scheduler"]["last_epoch"] == 3  # a fresh schedule per round
    main(_cli(r2, data, "--model", os.path.join(r1, "final"), "--ibn-accum", "2", "--batch-size", "2",
              "--reretrieve-at-start"))
    c0, c2 = ReAttConfig.load(os.path.join(w, "final")), ReAttConfig.load(os.path.join(r2, "final"))
    assert (c2.retrieval_layer, c2.retrieval_head) == (c0.retrieval_layer, c0.retrieval_head) == (2, 1)
    assert (c0.kl_weight, c2.kl_weight) == (0.0, 8.0)  # training choices come from each round's own flags
    assert all(r["kl_loss"] > 0 for r in _train_records(r2))


def test_ibn_accum_resume_is_exact(tmp_path, data):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    extra = ("--ibn-accum", "2", "--batch-size", "2", "--dropout", "0.1", "--steps", "4")
    main(_cli(a, data, *extra))
    main(_cli(b, data, *extra, "--stop-after", "2"))
    main(_cli(b, data, *extra, "--resume"))
    la = {r["step"]: r["loss"] for r in _train_records(a)}
    lb = {r["step"]: r["loss"] for r in _train_records(b)}
    assert la == lb and sorted(la) == [1, 2, 3, 4]


def test_ibn_accum_with_accum_is_an_error(tmp_path, data):
    with pytest.raises(SystemExit, match="not both"):
        main(_cli(str(tmp_path / "x"), data, "--ibn-accum", "2", "--accum", "2"))
