"""The corpus cache: build what is missing, check what is there, load it.

Layout (``$REATT_DATA/corpora/<corpus>/``; ``<corpus>`` is the name, or ``beir-<folder>-<digest>`` /
``jsonl-<file>-<digest>`` for a user's corpus):

- ``text.json``, ``passages.jsonl``, ``questions.jsonl``: the text stage (:mod:`.text`), made from the corpus's
  sources and reused while its pins (source sha256, installed versions, input file sizes and times) are unchanged;
- ``manifest.json``, ``doc_tokens_<dim>.npy`` [T, dim] fp16, ``doc_offsets.npy`` [N+1] int64,
  ``query_tokens_<dim>.npy`` [Q, 32, dim] fp16 (zero padded), ``query_mask.npy`` [Q, 32] bool, and with PCA
  ``pca<d>.pt``, ``doc_tokens_pca<d>.npy``, ``query_tokens_pca<d>.npy``: the encoded stage, in the corpus folder for
  the pinned MiniLM and in ``encoder-<id>/`` below it for another encoder (``--encoder DIR``).

Every file is recorded in ``text.json`` or ``manifest.json`` with its size and sha256, and checked on every load: a
truncated or altered file is refused (the message names it) and its stage is rebuilt. The encoded stage also records
the sha256 of the text it encoded, so a text rebuilt to the same content keeps its vectors.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .encode import DEFAULT_ENCODER_ID, _folder_encoder, cores, encode_texts, load_encoder, pad_queries
from .fetch import SourceError, data_dir, sha256_file
from .pca import PCA_SAMPLE_TOKENS, apply_pca, fit_pca
from .sources import CorpusSpec, resolve
from .text import CHUNK_WORDS, MIN_TAIL_WORDS, doc_text, read_jsonl, write_jsonl

FORMAT_VERSION = 2
QUERY_MAX_TOKENS = 32
DOC_MAX_TOKENS = 510  # 512 positions minus [CLS] and [SEP] (another encoder: its own limit)
TEXT_FILES = ("passages.jsonl", "questions.jsonl")


def _options() -> dict:
    return {"format": FORMAT_VERSION, "chunk_words": CHUNK_WORDS, "min_tail_words": MIN_TAIL_WORDS,
            "query_max_tokens": QUERY_MAX_TOKENS, "doc_max_tokens": f"min({DOC_MAX_TOKENS}, the encoder's limit)",
            "doc_text": "title. text",
            "vectors": "last hidden state, L2-normalised, special tokens and padding dropped, fp16",
            "pca": "fitted on corpus tokens, output L2-normalised"}


def encoder_id(encoder: Optional[str]) -> str:
    """The id a cache is keyed by: "minilm" for the pinned default (known without finding it, so a built cache loads
    even where the encoder is gone), else the digest of the folder's files."""
    return DEFAULT_ENCODER_ID if encoder is None else _folder_encoder(Path(encoder).expanduser()).id


def corpus_dir(name: str, root=None) -> Path:
    """The text folder of a corpus (``passages.jsonl``, ``questions.jsonl``)."""
    return data_dir(root) / "corpora" / resolve(name).slug


def vectors_dir(name: str, root=None, enc_id: str = DEFAULT_ENCODER_ID) -> Path:
    folder = corpus_dir(name, root)
    return folder if enc_id == DEFAULT_ENCODER_ID else folder / f"encoder-{enc_id}"


def file_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def check_files(folder: Path, records: dict) -> Optional[str]:
    """None when every recorded file is there with its size and sha256; else what is wrong, naming the file."""
    for name, rec in records.items():
        p = folder / name
        if not p.is_file():
            return f"{p} is missing"
        size = p.stat().st_size
        if size != rec["bytes"]:
            return f"{p} has {size} bytes, the manifest says {rec['bytes']} (truncated or altered)"
        digest = sha256_file(p)
        if digest != rec["sha256"]:
            return f"{p} has sha256 {digest}, the manifest says {rec['sha256']} (altered)"
    return None


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _save_npy(path: Path, t: torch.Tensor) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, t.numpy())
    os.replace(tmp, path)


def _load_avg() -> Optional[list]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---- the text stage -------------------------------------------------------------------------------------------------

def _text_current(spec: CorpusSpec, folder: Path, log: Callable) -> Optional[dict]:
    """The text stamp when the cached text is current and intact, else None (saying why when it is not intact)."""
    st = _read_json(folder / "text.json")
    if not st or st.get("pins") != spec.pins() or st.get("options") != _options():
        return None
    problem = check_files(folder, st.get("files", {}))
    if problem:
        log(f"{spec.name}: refusing the cached text: {problem}; rebuilding it")
        return None
    return st


def build_text(name: str, root=None, *, download: bool = True, log: Callable = print) -> tuple[list, list, dict]:
    """The text stage of ``name``: FiD JSONL passages and questions (cached) -> (passages, questions, stats)."""
    spec = resolve(name)
    out = data_dir(root) / "corpora" / spec.slug
    out.mkdir(parents=True, exist_ok=True)
    st = _text_current(spec, out, log)
    if st is None:
        t0 = time.perf_counter()
        passages, questions, stats = spec.read(root, download, log)
        if not passages:
            raise SourceError(f"{name}: no passages")
        write_jsonl(out / "passages.jsonl", passages)
        write_jsonl(out / "questions.jsonl", questions)
        st = {"name": name, "description": spec.description, "licence": spec.licence, "pins": spec.pins(),
              "options": _options(), "files": {f: file_record(out / f) for f in TEXT_FILES}, "stats": stats,
              "build_s": round(time.perf_counter() - t0, 1)}
        _write_json(out / "text.json", st)
        log(f"{name}: {len(passages)} passages, {len(questions)} questions ({stats['n_questions_without_gold']} "
            f"without a gold passage) -> {out}")
        return passages, questions, stats
    return read_jsonl(out / "passages.jsonl"), read_jsonl(out / "questions.jsonl"), st["stats"]


# ---- the encoded stage ----------------------------------------------------------------------------------------------

def _vectors_current(spec: CorpusSpec, folder: Path, text: dict, enc_id: str, log: Callable) -> Optional[dict]:
    """The manifest when the cached vectors were made from this text with this encoder and are intact, else None."""
    man = _read_json(folder / "manifest.json")
    if not man or not man.get("complete") or man.get("options") != _options() or \
            man.get("encoder", {}).get("id") != enc_id or \
            man.get("text_sha256") != {f: r["sha256"] for f, r in text["files"].items()}:
        return None
    problem = check_files(folder, man.get("files", {}))
    if problem:
        log(f"{spec.name}: refusing the cached vectors: {problem}; re-encoding")
        return None
    return man


def _pca_current(spec: CorpusSpec, folder: Path, man: dict, dim: int, log: Callable) -> bool:
    p = man.get("pca", {}).get(str(dim))
    if not p:
        return False
    problem = check_files(folder, p.get("files", {}))
    if problem:
        log(f"{spec.name}: refusing the cached PCA {dim} vectors: {problem}; recomputing them")
    return problem is None


def build_corpus(name: str, root=None, *, pca: Optional[int] = None, download: bool = True, progress: bool = True,
                 threads: Optional[int] = None, encoder: Optional[str] = None, log: Callable = print) -> Path:
    """Build (or finish, or repair) the corpus ``name`` encoded with ``encoder`` (None: the pinned MiniLM); returns
    the folder of its vectors and manifest."""
    spec = resolve(name)
    passages, questions, stats = build_text(name, root, download=download, log=log)
    text = _read_json(data_dir(root) / "corpora" / spec.slug / "text.json")
    enc_id = encoder_id(encoder)
    out = vectors_dir(name, root, enc_id)
    out.mkdir(parents=True, exist_ok=True)
    man = _vectors_current(spec, out, text, enc_id, log)
    if man is not None:
        if pca is None or pca == man["dim"] or _pca_current(spec, out, man, pca, log):
            return out
        return _add_pca(out, man, pca, log)
    threads = threads or cores()
    torch.set_num_threads(threads)
    load0 = _load_avg()
    enc = load_encoder(encoder, root, download=download)
    doc_max = min(DOC_MAX_TOKENS, enc.max_tokens)
    log(f"{name}: encoding {len(passages)} passages and {len(questions)} questions with {enc.info.name} "
        f"({threads} threads)")
    docs, dlens, dinfo = encode_texts(enc, [doc_text(p) for p in passages], doc_max, out / "shards_docs",
                                      desc=f"{name} passages", progress=progress, log=log)
    qv, qlens, qinfo = encode_texts(enc, [q["question"] for q in questions], QUERY_MAX_TOKENS,
                                    out / "shards_queries", desc=f"{name} questions", progress=progress, log=log)
    qpad, qmask = pad_queries(qv, qlens, QUERY_MAX_TOKENS)
    offsets = torch.zeros(len(passages) + 1, dtype=torch.long)
    offsets[1:] = dlens.cumsum(0)
    dim = enc.dim
    files = {f"doc_tokens_{dim}.npy": docs, "doc_offsets.npy": offsets, f"query_tokens_{dim}.npy": qpad,
             "query_mask.npy": qmask}
    for f, t in files.items():
        _save_npy(out / f, t)
    man = {
        "name": name, "complete": True, "description": spec.description, "licence": spec.licence, "dim": dim,
        "sources": spec.pins(), "text_sha256": {f: r["sha256"] for f, r in text["files"].items()},
        "encoder": enc.info.manifest(), "options": _options(),
        "sizes": {"n_passages": len(passages), "n_tokens": int(offsets[-1]), "n_questions": len(questions),
                  "n_query_tokens": int(qlens.sum()), "n_queries_truncated": qinfo["n_truncated"],
                  "n_passages_truncated": dinfo["n_truncated"], "doc_max_tokens": doc_max, **stats},
        "encode": {"threads": threads, "torch": torch.__version__, "load_avg_before": load0,
                   "load_avg_after": _load_avg(), "docs": dinfo, "queries": qinfo},
        "files": {f: file_record(out / f) for f in files},
    }
    _write_json(out / "manifest.json", man)
    for d in ("shards_docs", "shards_queries"):
        shutil.rmtree(out / d, ignore_errors=True)
    log(f"{name}: {len(passages)} passages, {int(offsets[-1])} tokens, {len(questions)} questions; encoded in "
        f"{dinfo['encode_s'] + qinfo['encode_s']:.0f} s -> {out}")
    return _add_pca(out, man, pca, log) if pca not in (None, dim) else out


def _add_pca(out: Path, man: dict, dim: int, log: Callable) -> Path:
    base = man["dim"]
    docs = torch.from_numpy(np.load(out / f"doc_tokens_{base}.npy", mmap_mode="c"))
    queries = torch.from_numpy(np.load(out / f"query_tokens_{base}.npy", mmap_mode="c"))
    p = fit_pca(docs, dim)
    torch.save(p, out / f"pca{dim}.pt")
    _save_npy(out / f"doc_tokens_pca{dim}.npy", apply_pca(docs, p))
    _save_npy(out / f"query_tokens_pca{dim}.npy", apply_pca(queries, p))
    names = [f"pca{dim}.pt", f"doc_tokens_pca{dim}.npy", f"query_tokens_pca{dim}.npy"]
    man.setdefault("pca", {})[str(dim)] = {"explained_variance": round(p["explained"], 4),
                                          "fitted_on_tokens": min(docs.shape[0], PCA_SAMPLE_TOKENS),
                                          "files": {f: file_record(out / f) for f in names}}
    _write_json(out / "manifest.json", man)
    log(f"PCA {base} -> {dim}: {p['explained']:.1%} of the token variance kept")
    return out


# ---- loading --------------------------------------------------------------------------------------------------------

@dataclass
class EncodedCorpus:
    """An encoded corpus, ready for ``TokenIndex.build(doc_tokens, d_offsets=doc_offsets)`` and its search.

    doc_tokens [T, dim] fp16 (unit rows), doc_offsets [N+1] int64 (passage i = rows offsets[i]:offsets[i+1]),
    query_tokens [Q, 32, dim] fp16 (zero rows past the mask), query_mask [Q, 32] bool; per question q: qrels[q] =
    {passage index: relevance grade} (the gold passages, grade 1, unless the corpus grades them, as BEIR's qrels do),
    gold[q] = the passages with a grade > 0 (possibly none), answers[q] (possibly empty), questions[q],
    question_ids[q]; passages[i] = {"id", "title", "text"}, passage_ids[i]. The token arrays are memory-mapped
    copy-on-write from the cache. folder: the text (``passages.jsonl``, ``questions.jsonl``); vectors_folder: the
    arrays and the manifest."""
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
    qrels: list = field(repr=False, default_factory=list)
    vectors_folder: Optional[Path] = None

    @property
    def passages_jsonl(self) -> Path:
        return self.folder / "passages.jsonl"

    @property
    def questions_jsonl(self) -> Path:
        return self.folder / "questions.jsonl"

    @property
    def n_docs(self) -> int:
        return self.doc_offsets.numel() - 1


def qrels_of(question: dict, index_of: dict) -> dict:
    """{passage index: grade} of one question row: its ``qrels`` ({passage id: grade}) when given, else grade 1 for
    each of its ``gold_ids``."""
    given = question.get("qrels")
    pairs = given.items() if isinstance(given, dict) else ((g, 1) for g in question["gold_ids"])
    return {index_of[p]: int(r) for p, r in pairs if p in index_of}


def load_corpus(name: str = "docstrings", *, dim: Optional[int] = None, root=None, build: bool = True,
                download: bool = True, progress: bool = True, encoder: Optional[str] = None,
                log: Callable = print) -> EncodedCorpus:
    """Load an encoded corpus; builds (fetch, extract, chunk, encode), or repairs, what the cache lacks when
    ``build``.

    ``dim``: None or the encoder's width (384 for MiniLM) for its own vectors, or a PCA size (e.g. 128; fitted on
    first use). ``encoder``: a local model folder (None: the pinned MiniLM)."""
    spec = resolve(name)
    enc_id = encoder_id(encoder)
    tfolder = data_dir(root) / "corpora" / spec.slug
    vfolder = vectors_dir(name, root, enc_id)
    text = _text_current(spec, tfolder, log)
    man = None if text is None else _vectors_current(spec, vfolder, text, enc_id, log)
    pca_needed = man is not None and dim not in (None, man["dim"]) and not _pca_current(spec, vfolder, man, dim, log)
    if man is None or pca_needed:
        if not build:
            raise SourceError(f"corpus {name!r} (dim {dim or 'native'}) is not built in {vfolder}; build it with:\n  "
                              f"reatt-data build {name}" + (f" --pca {dim}" if dim else "")
                              + (f" --encoder {encoder}" if encoder else ""))
        build_corpus(name, root, pca=dim, download=download, progress=progress, encoder=encoder, log=log)
        man = _read_json(vfolder / "manifest.json")
    native = man["dim"]
    suffix = f"{native}" if dim in (None, native) else f"pca{dim}"

    def arr(fname):
        return torch.from_numpy(np.load(vfolder / fname, mmap_mode="c"))

    passages = read_jsonl(tfolder / "passages.jsonl")
    questions = read_jsonl(tfolder / "questions.jsonl")
    index_of = {p["id"]: i for i, p in enumerate(passages)}
    qrels = [qrels_of(q, index_of) for q in questions]
    return EncodedCorpus(
        name=name, dim=dim or native, doc_tokens=arr(f"doc_tokens_{suffix}.npy"), doc_offsets=arr("doc_offsets.npy"),
        query_tokens=arr(f"query_tokens_{suffix}.npy"), query_mask=arr("query_mask.npy"),
        gold=[[i for i, r in qr.items() if r > 0] for qr in qrels], answers=[q["answers"] for q in questions],
        questions=[q["question"] for q in questions], question_ids=[q["id"] for q in questions],
        passages=passages, passage_ids=[p["id"] for p in passages], folder=tfolder, manifest=man, qrels=qrels,
        vectors_folder=vfolder)
