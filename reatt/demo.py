"""A deterministic toy open-domain QA set with invented facts, and its own word-level tokenizer.

Every fact is one document: title = the entity, text = "the capital of xelta is quorin ." Each question asks one fact
("what is the capital of xelta ?") and comes with ``n_ctx`` documents: its gold document, documents about the same
entity (other relations) and documents with the same relation (other entities), shuffled. Nothing marks the gold
document to the model (the "gold" field is read only by evaluation and logging), so the retriever can learn it only
through the KL to the reader's attention. Answers come from a small pool per relation and are drawn afresh for every
training example, so the reader must read the right document to answer. Evaluation uses a fixed world: its corpus
(every fact, 5 per entity) is what retrieval searches.

    python -m reatt.demo --out /tmp/reatt_demo     # writes train.jsonl, dev.jsonl, corpus.jsonl (+ the tokenizer)
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
        syllables = rng.choice([2, 2, 3])
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
        if w not in taken and w not in FIXED_WORDS and w not in RELATIONS:
            taken.add(w)
            out.append(w)
    return out


def generate(n_entities: int = 64, pool: int = 12, n_ctx: int = 4, n_train: int = 20000, n_dev: int = 200,
             seed: int = 0, hard_negatives: bool = True):
    """-> (train, dev, vocab, corpus).

    The dev world is fixed: every (entity, relation) has one answer, and ``corpus`` holds its 5 * n_entities fact
    documents; ``dev`` asks ``n_dev`` of them. Training examples draw their answers afresh for every example (the same
    entities and relations, new objects), so an answer cannot be memorised: the only way to lower the QA loss is to
    read the right document, which is what makes the reader's attention a retrieval teacher. ``hard_negatives=False``
    draws distractors about other entities (any relation) instead of same-entity / same-relation ones.
    """
    rng = random.Random(seed)
    taken: set = set()
    entities = _names(rng, n_entities, taken)
    pools = {r: _names(rng, pool, taken) for r in RELATIONS}
    rels = list(RELATIONS)
    world = {(e, r): rng.choice(pools[r]) for e in entities for r in rels}

    def doc(e, r, a):
        return {"id": f"{e}/{r}", "title": e, "text": RELATIONS[r][1].format(e=e, a=a)}

    def row(e, r, answer_of):
        # Hard negatives: same entity (other relations) and same relation (other entities), about half each.
        if hard_negatives:
            k1 = (n_ctx - 1) // 2
            negs = rng.sample([(e, r2) for r2 in rels if r2 != r], min(k1, len(rels) - 1))
            negs += rng.sample([(e2, r) for e2 in entities if e2 != e], n_ctx - 1 - len(negs))
        else:  # other entities, any relation
            negs = [(e2, rng.choice(rels)) for e2 in rng.sample([x for x in entities if x != e], n_ctx - 1)]
        answer = answer_of(e, r)  # once: a fresh draw must be the same in the gold document and the label
        ctxs = [dict(doc(e, r, answer), gold=True)] + [doc(e2, r2, answer_of(e2, r2)) for e2, r2 in negs]
        rng.shuffle(ctxs)
        return {"question": RELATIONS[r][0].format(e=e), "answers": [answer], "ctxs": ctxs}

    fresh = lambda e, r: rng.choice(pools[r])  # noqa: E731
    train = [row(rng.choice(entities), rng.choice(rels), fresh) for _ in range(n_train)]
    keys = sorted(world)
    rng.shuffle(keys)
    dev = [row(e, r, lambda e2, r2: world[(e2, r2)]) for e, r in keys[:n_dev]]
    corpus = [doc(e, r, world[(e, r)]) for e in entities for r in rels]
    vocab = sorted(set(FIXED_WORDS) | set(RELATIONS) | set(entities) | {w for p in pools.values() for w in p})
    return train, dev, vocab, corpus


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
    """Write train.jsonl, dev.jsonl and corpus.jsonl (the dev world's documents) to out_dir; returns their paths and
    the tokenizer directory."""
    train, dev, vocab, corpus = generate(seed=seed, **kw)
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, rows in (("train", train), ("dev", dev), ("corpus", corpus)):
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
