"""ReAttModel on a tiny random T5: shapes and masks, bi-encoder independence, query dedup == naive per-pair encoding,
KL gradients, fused vs reference loss parity over 20 training steps."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from reatt.config import ReAttConfig  # noqa: E402
from reatt.data import Collator, Example  # noqa: E402
from reatt.demo import generate, load_tokenizer  # noqa: E402
from reatt.model import ReAttModel, apply_reatt_kernels, tiny_t5_config  # noqa: E402

N_DOCS = 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: one thread avoids oversubscribing the shared 2-core CI machine (and is no slower here).
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def examples():
    train = generate(n_entities=12, pool=5, n_ctx=N_DOCS, n_train=64, n_dev=4, seed=1)[0]
    return [Example(r["question"], r["answers"], r["ctxs"]) for r in train]


def make_model(tok, dropout=0.0, seed=0, **rc):
    cfg = tiny_t5_config(vocab_size=len(tok), d_model=32, num_layers=3, num_decoder_layers=2, num_heads=3, d_kv=64,
                         d_ff=48, dropout_rate=dropout)
    return ReAttModel.from_config(cfg, ReAttConfig(**{"retrieval_layer": 1, "retrieval_head": 1, **rc}), tokenizer=tok,
                                  seed=seed)


def ragged_batch(tok, examples, B=5):
    """A batch with ragged queries/documents, an empty document slot (fewer ctxs than n) and odd sizes."""
    exs = copy.deepcopy(examples[:B])
    exs[0].question = exs[0].question + " of the capital of the river"  # a longer query: padding for the others
    exs[1].ctxs[0] = dict(exs[1].ctxs[0], text=exs[1].ctxs[0]["text"] + " the river of the capital is")
    exs[2].ctxs = exs[2].ctxs[:2]  # third document missing -> an all-masked document
    return Collator(tok, N_DOCS, 32, 32, 8)(exs)


def test_forward_shapes_and_masks(tok, examples):
    m = make_model(tok)
    b = ragged_batch(tok, examples)
    B, n, Ld = b["d_ids"].shape
    Lq = b["q_ids"].shape[1]
    out = m(**b)
    assert out["q"].shape == (B, Lq, 64) and out["d"].shape == (B * n, Ld, 64)
    assert torch.isfinite(out["loss"]) and out["kl_loss"] >= 0 and out["qa_loss"] > 0
    t = out["teacher"]
    assert t.shape == (B, n)
    torch.testing.assert_close(t.sum(1), torch.ones(B), atol=1e-5, rtol=0)
    assert t[2, 2] == 0  # the missing document gets no teacher mass
    enc, enc_mask, doc_index = m.read(m.bi_encode(b["q_ids"], b["q_mask"]), b["q_mask"],
                                      m.bi_encode(b["d_ids"].flatten(0, 1), b["d_mask"].flatten(0, 1)),
                                      b["d_mask"].flatten(0, 1))
    assert enc.shape == (B, n * (Lq + Ld), 32)
    # The empty slot (query 2, document 2) is no pair: its query tokens are masked too.
    assert enc_mask.sum() == b["q_mask"].sum() * n - b["q_mask"][2].sum() + b["d_mask"].sum()
    assert not enc_mask.reshape(B, n, -1)[2, 2].any()
    # The original teacher (default): every valid token, query tokens included, counts toward its pair.
    assert ((doc_index >= 0) == enc_mask).all()
    assert (doc_index.reshape(B, n, -1)[enc_mask.reshape(B, n, -1)] ==
            torch.arange(n)[None, :, None].expand(B, n, Lq + Ld)[enc_mask.reshape(B, n, -1)]).all()
    m.config.teacher_includes_query = False  # the alternative: document tokens only
    _, _, doc_index = m.read(m.bi_encode(b["q_ids"], b["q_mask"]), b["q_mask"],
                             m.bi_encode(b["d_ids"].flatten(0, 1), b["d_mask"].flatten(0, 1)),
                             b["d_mask"].flatten(0, 1))
    assert ((doc_index >= 0) == enc_mask.reshape(B, n, -1)[..., :].reshape(B, -1).logical_and(
        torch.cat([torch.zeros(B * n, Lq, dtype=torch.bool), torch.ones(B * n, Ld, dtype=torch.bool)], 1)
        .reshape(B, -1))).all()
    qv, qm = m.encode_queries(["what is the capital of xelta ?", "who is the leader of x ?"])
    dv, dm = m.encode_documents([{"title": "a", "text": "the river of a is b ."}, "the color"])
    assert qv.shape[:2] == qm.shape and qv.shape[-1] == 64 and dv.shape[:2] == dm.shape
    s = m.score(qv, qm, dv, dm)
    assert s.shape == (2, 2) and torch.isfinite(s).all()


def test_bi_encoder_independence(tok, examples):
    """Changing a document leaves the query's layer < B states unchanged, and vice versa."""
    m = make_model(tok).eval()
    b = ragged_batch(tok, examples)
    q1, _ = m.encode_query_ids(b["q_ids"], b["q_mask"])
    d_ids = b["d_ids"].flatten(0, 1)
    d_mask = b["d_mask"].flatten(0, 1)
    hd = m.bi_encode(d_ids, d_mask)
    # Other documents, other queries: every row is encoded on its own.
    d2 = torch.randint(3, len(tok), d_ids.shape)
    q2 = torch.randint(3, len(tok), b["q_ids"].shape)
    out1 = m(b["q_ids"], b["q_mask"], b["d_ids"], b["d_mask"], labels=b["labels"])
    out2 = m(b["q_ids"], b["q_mask"], d2.view_as(b["d_ids"]), b["d_mask"], labels=b["labels"])
    torch.testing.assert_close(out2["q"], out1["q"], rtol=0, atol=0)
    torch.testing.assert_close(out1["q"], q1, rtol=0, atol=0)
    out3 = m(q2, b["q_mask"], b["d_ids"], b["d_mask"], labels=b["labels"])
    torch.testing.assert_close(out3["d"], out1["d"], rtol=0, atol=0)
    torch.testing.assert_close(m.bi_encode(d_ids[:4], d_mask[:4]), hd[:4], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out2["d"], out1["d"])  # the documents did change


def naive_pair_encoder(m: ReAttModel, q_ids, q_mask, d_ids, d_mask):
    """Per (query, document) pair, the unpadded concatenation [query tokens, document tokens] through T5's own blocks:
    layers < B with the 'separate' (block-diagonal) mask, layers >= B with full attention, positions from T5's own
    compute_bias. Returns per-pair encoder states [B, n, L, D] with the same token layout as ReAttModel.read."""
    enc = m.t5.encoder
    B, n, Ld = d_ids.shape
    Lq = q_ids.shape[1]
    out = torch.zeros(B, n, Lq + Ld, m.t5.config.d_model)
    for a in range(B):
        qi = q_ids[a][q_mask[a]]
        for k in range(n):
            di = d_ids[a, k][d_mask[a, k]]
            ids = torch.cat([qi, di])[None]
            L = ids.shape[1]
            seg = torch.cat([torch.zeros(len(qi)), torch.ones(len(di))])
            sep = (seg[:, None] == seg[None, :])
            bias = enc.block[0].layer[0].SelfAttention.compute_bias(L, L)
            neg = torch.finfo(torch.float32).min
            h = enc.embed_tokens(ids)
            for i, blk in enumerate(enc.block):
                mask = torch.zeros(L, L) if i >= m.config.retrieval_layer else torch.zeros(L, L).masked_fill(~sep, neg)
                h = blk(h, attention_mask=mask[None, None], position_bias=bias)[0]
            h = enc.final_layer_norm(h)[0]
            out[a, k, : len(qi)][q_mask[a][: len(qi)]] = h[: len(qi)]
            qpos = torch.nonzero(q_mask[a]).flatten()
            dpos = torch.nonzero(d_mask[a, k]).flatten()
            out[a, k, qpos] = h[: len(qi)]
            out[a, k, Lq + dpos] = h[len(qi):]
    return out


def test_query_dedup_equals_naive_pair_encoding(tok, examples):
    m = make_model(tok).eval()
    b = ragged_batch(tok, examples, B=3)
    B, n, Ld = b["d_ids"].shape
    Lq = b["q_ids"].shape[1]
    with torch.no_grad():
        enc, enc_mask, _ = m.read(m.bi_encode(b["q_ids"], b["q_mask"]), b["q_mask"],
                                  m.bi_encode(b["d_ids"].flatten(0, 1), b["d_mask"].flatten(0, 1)),
                                  b["d_mask"].flatten(0, 1))
        ref = naive_pair_encoder(m, b["q_ids"], b["q_mask"], b["d_ids"], b["d_mask"])
    got = enc.view(B, n, Lq + Ld, -1)
    valid = enc_mask.view(B, n, Lq + Ld)
    assert valid.any()
    torch.testing.assert_close(got[valid], ref[valid], rtol=1e-4, atol=1e-5)


def test_kl_gradients_reach_bi_encoder_not_decoder(tok, examples):
    m = make_model(tok)
    b = ragged_batch(tok, examples)
    out = m(**b)
    out["kl_loss"].backward()
    enc0 = m.t5.encoder.block[0].layer[0].SelfAttention.q.weight.grad
    assert enc0 is not None and enc0.abs().sum() > 0
    assert m.log_scale.grad is not None and m.log_scale.grad != 0
    assert m.t5.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.grad.abs().sum() > 0
    shared = m.t5.shared.weight  # tied: the encoder's embedding is also the decoder's
    for name, p in m.t5.decoder.named_parameters():
        if p is shared:
            continue
        assert p.grad is None or p.grad.abs().sum() == 0, f"decoder parameter {name} got a gradient from the KL"
    # The reader blocks above B get nothing either (the teacher is detached).
    for name, p in m.t5.encoder.block[2].named_parameters():
        assert p.grad is None or p.grad.abs().sum() == 0, name


def test_no_in_batch_negatives_and_detached_bias(tok, examples):
    b = ragged_batch(tok, examples)
    on, off = make_model(tok), make_model(tok, in_batch_negatives=False)
    one = {k: v[:1] for k, v in b.items()}
    # One query: its own documents are the whole batch, so both students are the same.
    torch.testing.assert_close(on(**one)["kl_loss"], off(**one)["kl_loss"], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(on(**b)["kl_loss"], off(**b)["kl_loss"])
    grads = []
    for train_bias in (True, False):
        m = make_model(tok, train_pos_bias=train_bias)
        m(**b)["kl_loss"].backward()
        grads.append(m.t5.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.grad)
    h = 1  # the retrieval head: only its column carries the retrieval bias gradient
    others = [i for i in range(3) if i != h]
    torch.testing.assert_close(grads[0][:, others], grads[1][:, others], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(grads[0][:, h], grads[1][:, h])


def test_fused_vs_reference_loss_parity_20_steps(tok, examples):
    torch.manual_seed(0)
    ref = make_model(tok, dropout=0.0, use_fused_kernels=False)
    fused = copy.deepcopy(ref)
    revert = apply_reatt_kernels(fused)
    assert fused.config.kernel_backend == "auto" and ref.config.kernel_backend == "torch"
    col = Collator(tok, N_DOCS, 32, 32, 8)
    opts = [torch.optim.AdamW(x.parameters(), lr=3e-3) for x in (ref, fused)]
    for step in range(20):
        b = col(examples[(step * 3) % 30 : (step * 3) % 30 + 3])
        losses = []
        for model, opt in zip((ref, fused), opts):
            out = model(**b)
            out["loss"].backward()
            opt.step()
            opt.zero_grad()
            losses.append(out["loss"].item())
        assert abs(losses[1] - losses[0]) <= 1e-4 * abs(losses[0]), f"step {step}: {losses}"
    revert()
    assert fused.config.kernel_backend == "torch"


def test_save_pretrained_round_trip_and_checkpointing(tok, examples, tmp_path):
    m = make_model(tok)
    with torch.no_grad():
        m.log_scale.fill_(0.25)
    m.save_pretrained(str(tmp_path))
    m2 = ReAttModel.from_pretrained(str(tmp_path))
    assert m2.config == m.config and m2.tokenizer is not None
    b = ragged_batch(tok, examples, B=3)
    o1, o2 = m(**b), m2(**b)
    torch.testing.assert_close(o2["loss"], o1["loss"], rtol=1e-6, atol=1e-6)
    # Gradient checkpointing recomputes the encoder blocks: same loss, same gradients.
    m2.gradient_checkpointing_enable()
    m2.train()
    o2 = m2(**b)
    o1["loss"].backward()
    o2["loss"].backward()
    g1 = m.t5.encoder.block[0].layer[1].DenseReluDense.wi.weight.grad
    g2 = m2.t5.encoder.block[0].layer[1].DenseReluDense.wi.weight.grad
    torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-7)
