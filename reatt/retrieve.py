"""Encode with the bi-encoder, index with ``reatt_kernels.index``, search: the code that ``reatt-index``,
``reatt-eval`` and ``reatt-train``'s re-retrieval share.

ReAtt retrieves with its own encoder: a document's keys are the retrieval head's k vectors of block B computed from
the bi-encoder (blocks < B) alone, and a question's q vectors likewise; the inference score is the MaxSim sum over
query tokens without position bias (``ReAttModel.score``), which is exactly what a ``TokenIndex`` computes. Only real
tokens are indexed (the document's padding is dropped), so a document of L tokens is L keys of d = d_kv dims.

On disk (``build_index``), an index directory holds::

    reatt_index.json   what was built from what (model, corpus, kind, nbits, part size, lengths): a resumed build
                       must match it
    codec/             residual kind only: one codec (centroids, cutoffs, weights) shared by every part
    part-00000/ ...    one TokenIndex per ``part_size`` documents (saved atomically by TokenIndex.save); a part whose
                       CURRENT file exists is finished, so a killed build restarts at the first unfinished part

Document ids in the index are corpus line numbers (0-based, blank lines skipped); the corpus maps them back to
passages.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from .config import MAX_DOC_LEN
from .data import DataError, doc_id, iter_jsonl, tokenize_docs, tokenize_queries
from .distributed import barrier, rank_and_world
from reatt_kernels.index import PartIndex, merge_topk  # noqa: F401  (one home: the index)

META_NAME = "reatt_index.json"
META_FORMAT = "reatt-index"
META_VERSION = 1

# Test hook: called with the part number after each part is saved (tests kill the build here).
_AFTER_PART_HOOK: Optional[Callable[[int], None]] = None


# ---- files -----------------------------------------------------------------------------------------------------------
def read_corpus(path: str) -> list[dict]:
    """A JSONL of passages ``{"id"?, "title"?, "text"}`` -> list of dicts; errors name the line."""
    out = []
    for ln, c in iter_jsonl(path):
        if not isinstance(c, dict) or not isinstance(c.get("text"), str):
            raise DataError(f"{path}:{ln}: expected an object with a string 'text' (and optional 'title', 'id')")
        if "title" in c and not isinstance(c["title"], str):
            raise DataError(f"{path}:{ln}: 'title' must be a string")
        out.append(c)
    if not out:
        raise DataError(f"{path}: no passages")
    return out


def read_questions(path: str) -> list[dict]:
    """A JSONL of ``{"question", "answers"?, "ctxs"?, "gold_ids"?}`` -> rows with ``question``, ``answers`` (list,
    possibly empty) and ``gold_ids`` (from ``gold_ids`` or the ids of ctxs marked ``"gold": true``)."""
    out = []
    for ln, obj in iter_jsonl(path):
        where = f"{path}:{ln}"
        if not isinstance(obj, dict) or not isinstance(obj.get("question"), str) or not obj["question"].strip():
            raise DataError(f"{where}: expected an object with a non-empty string 'question'")
        answers = obj.get("answers", [])
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise DataError(f"{where}: 'answers' must be a list of strings")
        gold = obj.get("gold_ids")
        if gold is None:
            gold = [doc_id(c) for c in obj.get("ctxs", []) if isinstance(c, dict) and c.get("gold")]
        out.append({"question": obj["question"], "answers": answers, "gold_ids": [str(g) for g in gold]})
    if not out:
        raise DataError(f"{path}: no questions")
    return out


def file_digest(path: str) -> str:
    """sha256 of a file (a resumed build checks that the corpus did not change)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def model_digest(model_dir: str) -> str:
    """sha256 over a saved model's weight files (a resumed build checks that the model did not change)."""
    if not model_dir or not os.path.isdir(model_dir):
        return ""
    h = hashlib.sha256()
    for name in sorted(os.listdir(model_dir)):
        if name.endswith((".safetensors", ".bin", ".pt")):
            h.update(name.encode())
            h.update(file_digest(os.path.join(model_dir, name)).encode())
    return h.hexdigest()


def write_json_atomic(obj, path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---- model -----------------------------------------------------------------------------------------------------------
def load_model(model_dir: str, tokenizer: Optional[str] = None, device="cpu"):
    """A saved ReAttModel (``reatt-train``'s ``final/``) in eval mode, with its own ReAtt config and tokenizer."""
    from .model import ReAttModel

    if not os.path.isdir(model_dir):
        raise SystemExit(f"--model {model_dir!r}: not a directory (expected reatt-train's OUT/final)")
    model = ReAttModel.from_pretrained(model_dir, tokenizer_dir=tokenizer)
    if model.tokenizer is None:
        raise SystemExit(f"--model {model_dir!r} holds no tokenizer files: pass --tokenizer DIR")
    return model.to(device).eval()


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, bf16: str = "auto"):
    """bf16 autocast on GPU by default ("auto"), never on CPU unless "on"."""
    device = torch.device(device)
    on = bf16 == "on" or (bf16 == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if on else nullcontext()


# ---- encoding --------------------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_doc_chunks(model, docs: Sequence[dict], max_len: int, device, batch_size: int = 256, bf16: str = "auto",
                      progress=None) -> Iterator[tuple[Tensor, Tensor]]:
    """Documents -> packed chunks (keys fp32 [T, d] on CPU, offsets int64 [n + 1]), one per batch of
    ``batch_size``: only each document's real tokens, back to back (the form ``TokenIndex.build`` streams)."""
    tok = model._tok()
    for i in range(0, len(docs), batch_size):
        ids, m = tokenize_docs(tok, docs[i:i + batch_size], max_len)
        ids, m = ids.to(device), m.to(device)
        with autocast(device, bf16):
            k, _ = model.encode_document_ids(ids, m)
        lens = m.sum(1).cpu()
        off = torch.zeros(lens.numel() + 1, dtype=torch.int64)
        off[1:] = torch.cumsum(lens, 0)
        yield k[m].float().cpu(), off  # boolean indexing keeps row-major order: document by document
        if progress is not None:
            progress.update(ids.shape[0])


@torch.no_grad()
def encode_questions(model, questions: Sequence[str], max_len: int, device, batch_size: int = 256,
                     bf16: str = "auto") -> Iterator[tuple[Tensor, Tensor]]:
    """Questions -> (q vectors fp32 [b, Lq, d], bool mask [b, Lq]) per batch (bi-encoder + block B's q only)."""
    tok = model._tok()
    for i in range(0, len(questions), batch_size):
        ids, m = tokenize_queries(tok, questions[i:i + batch_size], max_len)
        ids, m = ids.to(device), m.to(device)
        with autocast(device, bf16):
            q, _ = model.encode_query_ids(ids, m)
        yield q.float(), m


# merge_topk and PartIndex live with the index (reatt_kernels.index); re-exported here for reatt's callers.


# ---- in-memory index (training-time re-retrieval and evaluation) -----------------------------------------------------
def build_memory_index(model, docs: Sequence[dict], max_len: int, device, batch_size: int = 256,
                       distributed: bool = False, bf16: str = "auto"):
    """An exact TokenIndex over ``docs`` (ids 0..N-1) built batch by batch: no padded all-passages tensor exists.

    ``distributed`` (under torch.distributed, world > 1): each rank encodes the documents i with i % world == rank
    into its own shard, and the result is a ``ShardedIndex`` (its search is collective: call it on every rank)."""
    from reatt_kernels.index import ShardedIndex, TokenIndex

    dim = model.t5.config.d_kv
    rank, world = rank_and_world()
    if distributed and world > 1:
        mine = list(range(rank, len(docs), world))
        chunks = encode_doc_chunks(model, [docs[i] for i in mine], max_len, device, batch_size, bf16)
        return ShardedIndex.build(chunks, doc_ids=mine, kind="exact", dim=dim, device="cpu", progress=False)
    chunks = encode_doc_chunks(model, docs, max_len, device, batch_size, bf16)
    return TokenIndex.build(chunks, kind="exact", dim=dim, device="cpu", progress=False)


@torch.no_grad()
def search(model, index, questions: Sequence[str], k: int, max_len: int, device, batch_size: int = 256,
           bf16: str = "auto", progress: bool = False, **params) -> tuple[Tensor, Tensor]:
    """Each question's top-k documents -> (scores fp32 [Nq, k], doc ids int64 [Nq, k]; missing: -inf, -1)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(questions), desc="searching", unit="q", disable=not progress, file=sys.stderr)
    out_s, out_i = [], []
    for q, m in encode_questions(model, questions, max_len, device, batch_size, bf16):
        s, i = index.search(q.cpu(), m.cpu(), k, **params)
        out_s.append(s.cpu())
        out_i.append(i.cpu())
        bar.update(q.shape[0])
    bar.close()
    if not out_s:
        return torch.zeros((0, k)), torch.zeros((0, k), dtype=torch.int64)
    return torch.cat(out_s), torch.cat(out_i)


# ---- on-disk index: resumable, in parts, one rank per slice of parts -------------------------------------------------
def part_dir(index_dir, p: int) -> Path:
    return Path(index_dir) / f"part-{p:05d}"


def part_done(index_dir, p: int) -> bool:
    return (part_dir(index_dir, p) / "CURRENT").is_file()


def build_index(model, corpus_path: str, index_dir: str, *, kind: str = "exact", nbits: int = 4,
                part_size: int = 100_000, batch_size: int = 256, max_len: int = MAX_DOC_LEN, device="cpu",
                bf16: str = "auto", n_centroids="auto", codec_sample_docs: int = 20_000, model_dir: str = "",
                progress: bool = True, seed: int = 0) -> dict:
    """Encode the corpus and write the index in parts (see the module docstring). Resumable: finished parts are
    kept, and the build restarts at the first unfinished one. Under torch.distributed every rank builds the parts
    p with p % world == rank (call it on every rank). Returns the metadata."""
    from tqdm.auto import tqdm

    from reatt_kernels.index import TokenIndex

    if kind not in ("exact", "residual"):
        raise ValueError(f"--kind must be 'exact' or 'residual', got {kind!r}")
    if part_size < 1 or batch_size < 1:
        raise ValueError(f"--part-size and --batch-size must be >= 1, got {part_size}, {batch_size}")
    rank, world = rank_and_world()
    docs = read_corpus(corpus_path)
    n_parts = (len(docs) + part_size - 1) // part_size
    root = Path(index_dir)
    meta = {"format": META_FORMAT, "version": META_VERSION, "model": os.path.abspath(model_dir) if model_dir else "",
            "model_sha256": model_digest(model_dir),
            "corpus": os.path.abspath(corpus_path), "corpus_sha256": file_digest(corpus_path),
            "n_docs": len(docs), "kind": kind, "nbits": nbits if kind == "residual" else 0, "part_size": part_size,
            "n_parts": n_parts, "max_doc_len": max_len, "dim": model.t5.config.d_kv,
            "retrieval_layer": model.config.retrieval_layer, "retrieval_head": model.config.retrieval_head,
            "score": "MaxSim sum over query tokens, no position bias"}
    mpath = root / META_NAME
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if mpath.is_file():
            old = json.loads(mpath.read_text())
            diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            if diff:
                raise SystemExit(f"{index_dir}: an index built with other settings is there ({', '.join(diff)} "
                                 f"differ); use a new --out or delete it")
        else:
            write_json_atomic(meta, mpath)
    barrier()

    codec = None
    if kind == "residual":
        cdir = root / "codec"
        if rank == 0 and not (cdir / "CURRENT").is_file():
            # k-means on the keys of a seeded random sample of documents from across the corpus
            g = torch.Generator().manual_seed(seed)
            pick = torch.randperm(len(docs), generator=g)[:codec_sample_docs].sort().values.tolist()
            chunks = list(encode_doc_chunks(model, [docs[i] for i in pick], max_len, device, batch_size, bf16))
            sample = torch.cat([c[0] for c in chunks])
            est_tokens = int(sample.shape[0] * len(docs) / max(1, len(pick)))
            built = TokenIndex.build(sample, d_offsets=torch.tensor([0, sample.shape[0]]), kind="residual",
                                     nbits=nbits, n_centroids=n_centroids, n_tokens_hint=est_tokens, seed=seed,
                                     progress=False)
            # the codec alone, saved as an empty residual index (the public save/load format)
            TokenIndex("residual", meta["dim"], nbits=nbits, codec=built.codec).save(cdir)
        barrier()
        codec = TokenIndex.load(cdir, mmap=False).codec

    mine = [p for p in range(n_parts) if p % world == rank]
    todo = [p for p in mine if not part_done(root, p)]
    n_todo = sum(min(part_size, len(docs) - p * part_size) for p in todo)
    bar = tqdm(total=n_todo, desc=f"encoding (rank {rank})" if world > 1 else "encoding", unit="doc",
               disable=not progress, file=sys.stderr)
    if progress and len(todo) < len(mine):
        print(f"resuming: {len(mine) - len(todo)} of {len(mine)} parts already built", file=sys.stderr)
    for p in todo:
        lo, hi = p * part_size, min(len(docs), (p + 1) * part_size)
        chunks = encode_doc_chunks(model, docs[lo:hi], max_len, device, batch_size, bf16, progress=bar)
        idx = TokenIndex.build(chunks, kind=kind, nbits=nbits, codec=codec, doc_ids=range(lo, hi), dim=meta["dim"],
                               device="cpu", progress=False)
        idx.save(part_dir(root, p))
        if _AFTER_PART_HOOK is not None:
            _AFTER_PART_HOOK(p)
    bar.close()
    barrier()
    return meta


def load_index(index_dir: str, device="cpu", verify: bool = True):
    """-> (index, meta). The index is a PartIndex over every part, or, under torch.distributed, a ShardedIndex whose
    shard on each rank is a PartIndex over the parts p % world == rank (its search is collective)."""
    from reatt_kernels.index import ShardedIndex, TokenIndex

    root = Path(index_dir)
    mpath = root / META_NAME
    if not mpath.is_file():
        raise SystemExit(f"--index {index_dir!r}: no {META_NAME} (not built by reatt-index build)")
    meta = json.loads(mpath.read_text())
    missing = [p for p in range(meta["n_parts"]) if not part_done(root, p)]
    if missing:
        raise SystemExit(f"--index {index_dir!r}: parts {missing[:5]}{'...' if len(missing) > 5 else ''} are not "
                         f"built; rerun reatt-index build with the same arguments to finish it")
    rank, world = rank_and_world()
    mine = [p for p in range(meta["n_parts"]) if p % world == rank]
    local = PartIndex([TokenIndex.load(part_dir(root, p), device=device, verify=verify) for p in mine])
    if world > 1:
        return ShardedIndex(local), meta
    return local, meta
