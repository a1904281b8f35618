"""A deterministic toy open-domain QA set with invented facts, and its own word-level tokenizer.

Every fact is one document: title = the entity, text = "the capital of xelta is quorin ." Each question asks one fact
("what is the capital of xelta ?") and comes with ``n_ctx`` documents: its gold document, documents about the same
entity (other relations) and documents with the same relation (other entities), shuffled. Nothing marks the gold
document to the model (the "gold" field is read only by evaluation), so a retriever can learn it only from the
reader's attention. Answers come from a small pool per relation, so the reader must read the right document to answer;
dev questions ask facts never asked in training (their entities and relations do appear in training).

    python -m reatt.demo --out /tmp/reatt_demo            # writes train.jsonl, dev.jsonl (+ the tokenizer)
"""
from __future__ import annotations

import argparse
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_DIR = os.path.join(HERE, "demo_data", "tokenizer")

SPECIALS = ["<pad>", "</s>", "<unk>"]  # T5's ids: pad 0, eos 1, unk 2
RELATIONS = {
    # relation word: (question template, document template)
    "capital": ("what is the capital of {e} ?", "the capital of {e} is {a} ."),
    "river": ("what is the river of {e} ?", "the river of {e} is {a} ."),
    "leader": ("who is the leader of {e} ?", "the leader of {e} is {a} ."),
    "animal": ("what is the animal of {e} ?", "the animal of {e} is {a} ."),
    "color": ("what is the color of {e} ?", "the color of {e} is {a} ."),
}
FIXED_WORDS = "question title context what who is the of ? . :".split()

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "qu", "x", "th", "br", "kr", "st"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "n", "r", "l", "s", "th", "x"]


def _names(rng: random.Random, k: int, taken: set) -> list[str]:
    out = []
    while len(out) < k:
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.choice([2, 2, 3]))) + rng.choice(_CODAS)
        if w not in taken and w not in FIXED_WORDS and w not in RELATIONS:
            taken.add(w)
            out.append(w)
    return out


def generate(n_entities: int = 64, pool: int = 12, n_ctx: int = 4, dev_frac: float = 0.15, seed: int = 0):
    """-> (train, dev, vocab): lists of FiD-format dicts and the sorted word list."""
    rng = random.Random(seed)
    taken: set = set()
    entities = _names(rng, n_entities, taken)
    pools = {r: _names(rng, pool, taken) for r in RELATIONS}
    facts = {}
    for e in entities:
        for r in RELATIONS:
            facts[(e, r)] = rng.choice(pools[r])

    def doc(e, r):
        return {"id": f"{e}/{r}", "title": e, "text": RELATIONS[r][1].format(e=e, a=facts[(e, r)])}

    keys = list(facts)
    rng.shuffle(keys)
    n_dev = int(len(keys) * dev_frac)
    splits = {"dev": keys[:n_dev], "train": keys[n_dev:]}
    out = {}
    rels = list(RELATIONS)
    for name, ks in splits.items():
        rows = []
        for e, r in ks:
            # Hard negatives: same entity (other relations) and same relation (other entities), half each.
            same_e = [(e, r2) for r2 in rels if r2 != r]
            same_r = [(e2, r) for e2 in entities if e2 != e]
            k1 = (n_ctx - 1) // 2
            negs = rng.sample(same_e, min(k1, len(same_e))) + rng.sample(same_r, n_ctx - 1 - min(k1, len(same_e)))
            ctxs = [dict(doc(e, r), gold=True)] + [doc(*k) for k in negs]
            rng.shuffle(ctxs)
            rows.append({"question": RELATIONS[r][0].format(e=e), "answers": [facts[(e, r)]], "ctxs": ctxs})
        out[name] = rows
    vocab = sorted(set(FIXED_WORDS) | set(RELATIONS) | set(entities) | {w for p in pools.values() for w in p})
    return out["train"], out["dev"], vocab


def build_tokenizer(vocab: list[str], out_dir: str = TOKENIZER_DIR):
    """A WordLevel tokenizer (lower case, words and punctuation) saved as a PreTrainedTokenizerFast directory."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    ids = {w: i for i, w in enumerate(SPECIALS + [w for w in vocab if w not in SPECIALS])}
    tok = Tokenizer(WordLevel(ids, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def load_tokenizer(path: str = TOKENIZER_DIR):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(path)


def write_demo(out_dir: str, seed: int = 0, **kw) -> dict:
    """Write train.jsonl and dev.jsonl to out_dir; returns their paths and the tokenizer directory."""
    train, dev, vocab = generate(seed=seed, **kw)
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, rows in (("train", train), ("dev", dev)):
        paths[name] = os.path.join(out_dir, f"{name}.jsonl")
        with open(paths[name], "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    if not os.path.exists(os.path.join(TOKENIZER_DIR, "tokenizer.json")):
        build_tokenizer(vocab)
    paths["tokenizer"] = TOKENIZER_DIR
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for train.jsonl and dev.jsonl")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rebuild-tokenizer", action="store_true", help="rewrite reatt/demo_data/tokenizer")
    args = ap.parse_args(argv)
    if args.rebuild_tokenizer:
        build_tokenizer(generate(seed=args.seed)[2])
    print(write_demo(args.out, seed=args.seed))


if __name__ == "__main__":
    main()
