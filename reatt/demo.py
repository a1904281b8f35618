"""A deterministic toy open-domain QA set whose distractors only the reader can tell from the gold document.

Every (entity, relation) fact has one gold document, ``"the capital of xelta is quorin ."``, and distractor documents
that use the question's words exactly as the gold one does but answer nothing: ``"the capital of xelta is unknown
."`` (the last word is a filler: unknown, disputed, secret, ...). The question ``"what is the capital of xelta ?"``
therefore overlaps the gold document and each distractor equally, so neither lexical overlap nor in-batch negatives
(which only teach "same entity and relation") can rank the gold document first among a question's own documents.
The reader, trained on the answer, must find the one document that holds a name; its cross-attention is then the
only signal that separates gold from distractor. That is the claim the ablation (``reatt-demo``) tests: the reader
teacher against a uniform teacher and against no KL.

Answers come from a small pool per relation and are drawn afresh for every training example, so they cannot be
memorised: the reader has to read. Nothing marks the gold document to the model (the ``"gold"`` field is read only by
evaluation and logging). Evaluation uses a fixed world: its corpus holds every gold document and
``n_corpus_distractors`` distractors per fact, and each dev question comes with its gold document and
``n_ctx - 1`` of its fact's corpus distractors.

    python -m reatt.demo --out /tmp/reatt_demo --data-only   # writes train.jsonl, dev.jsonl, corpus.jsonl
    reatt-demo --out runs/demo                                # the ablation: three arms, a table and a plot
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

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
# Words that take the answer's place in a distractor: same template, same question words, no answer.
FILLERS = ["unknown", "disputed", "secret", "unclear", "forgotten", "hidden", "contested", "unrecorded"]
FIXED_WORDS = "question title context what who is the of ? . :".split()

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "qu", "x", "th", "br", "kr", "st"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "n", "r", "l", "s", "th", "x"]


def _names(rng: random.Random, k: int, taken: set) -> list[str]:
    out = []
    while len(out) < k:
        syllables = rng.choice([2, 2, 3])
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
        if w not in taken and w not in FIXED_WORDS and w not in RELATIONS and w not in FILLERS:
            taken.add(w)
            out.append(w)
    return out


def generate(n_entities: int = 64, pool: int = 12, n_ctx: int = 4, n_train: int = 20000, n_dev: int = 200,
             seed: int = 0, n_corpus_distractors: int = 6):
    """-> (train, dev, vocab, corpus): lists of JSON-able rows, the vocabulary, and the dev world's documents.

    Each question row has ``n_ctx`` shuffled ctxs: its gold document (``"gold": true``, id ``"<e>/<r>"``) and
    ``n_ctx - 1`` distractors of the same fact (id ``"<e>/<r>/<filler>"``). Training rows draw a fresh answer and
    fresh fillers each; dev rows use the fixed world and its corpus distractors. ``corpus`` holds
    ``n_entities * 5 * (1 + n_corpus_distractors)`` documents.
    """
    if not 1 <= n_ctx <= 1 + n_corpus_distractors <= 1 + len(FILLERS):
        raise ValueError(f"need 1 <= n_ctx ({n_ctx}) <= 1 + n_corpus_distractors ({n_corpus_distractors}) <= "
                         f"{1 + len(FILLERS)}")
    rng = random.Random(seed)
    taken: set = set()
    entities = _names(rng, n_entities, taken)
    pools = {r: _names(rng, pool, taken) for r in RELATIONS}
    rels = list(RELATIONS)
    world = {(e, r): rng.choice(pools[r]) for e in entities for r in rels}
    world_fillers = {(e, r): rng.sample(FILLERS, n_corpus_distractors) for e in entities for r in rels}

    def gold(e, r, a):
        return {"id": f"{e}/{r}", "title": e, "text": RELATIONS[r][1].format(e=e, a=a), "gold": True}

    def distractor(e, r, f):
        return {"id": f"{e}/{r}/{f}", "title": e, "text": RELATIONS[r][1].format(e=e, a=f)}

    def row(e, r, answer, fillers):
        ctxs = [gold(e, r, answer)] + [distractor(e, r, f) for f in fillers]
        rng.shuffle(ctxs)
        return {"question": RELATIONS[r][0].format(e=e), "answers": [answer], "ctxs": ctxs}

    train = []
    for _ in range(n_train):
        e, r = rng.choice(entities), rng.choice(rels)
        train.append(row(e, r, rng.choice(pools[r]), rng.sample(FILLERS, n_ctx - 1)))
    keys = sorted(world)
    rng.shuffle(keys)
    dev = [row(e, r, world[(e, r)], rng.sample(world_fillers[(e, r)], n_ctx - 1)) for e, r in keys[:n_dev]]
    corpus = []
    for e in entities:
        for r in rels:
            g = gold(e, r, world[(e, r)])
            del g["gold"]  # the corpus carries no labels; dev rows say which id is gold
            corpus.append(g)
            corpus.extend(distractor(e, r, f) for f in world_fillers[(e, r)])
    vocab = sorted(set(FIXED_WORDS) | set(RELATIONS) | set(FILLERS) | set(entities)
                   | {w for p in pools.values() for w in p})
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
    tok_dir = TOKENIZER_DIR
    if not os.path.exists(os.path.join(TOKENIZER_DIR, "tokenizer.json")):  # never write into the package
        tok_dir = os.path.join(out_dir, "tokenizer")
        build_tokenizer(vocab, tok_dir)
    paths["tokenizer"] = tok_dir
    return paths


# ---- the ablation: reader teacher vs uniform teacher vs no KL --------------------------------------------------------
ARMS = {
    # name: (reatt-train flags, what the arm tests)
    "reader": ([], "ReAtt: KL to the reader's cross-attention"),
    "uniform": (["--teacher", "uniform"], "KL to a uniform teacher over each question's documents"),
    "no_kl": (["--kl-weight", "0"], "QA loss only (no retrieval loss)"),
}


def machine_info() -> dict:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        if names:
            cpu = f"{names[0]} ({len(names)} logical CPUs)"
    except OSError:
        pass
    info = {"cpu": cpu, "python": platform.python_version()}
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        import subprocess

        info["git_sha"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                         cwd=HERE, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001 - informational only
        pass
    return info


def _read_metrics(path: str) -> tuple[list, list]:
    ev, tr = [], []
    if os.path.exists(path):
        with open(path) as f:
            for r in map(json.loads, f):
                (ev if r["type"] == "eval" else tr).append(r)
    return ev, tr


def _smooth(xs: list, w: int) -> list:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= w:
            acc -= xs[i - w]
        out.append(acc / min(i + 1, w))
    return out


def summarize(out_dir: str, arms: list, extra: dict | None = None) -> dict:
    """Read each arm's metrics.jsonl -> the ablation JSON (final metrics, curves) and a Markdown table."""
    res = {"what": "reatt-demo ablation: toy QA whose distractors share the question's words with the gold document",
           "machine": machine_info(), **(extra or {}), "arms": {}}
    for arm in arms:
        ev, tr = _read_metrics(os.path.join(out_dir, arm, "metrics.jsonl"))
        tg = [(r["step"], r["teacher_gold"]) for r in tr if "teacher_gold" in r]
        last = ev[-1] if ev else {}
        res["arms"][arm] = {
            "flags": ARMS[arm][0], "what": ARMS[arm][1], "steps": tr[-1]["step"] if tr else 0,
            "final": {k: last.get(k) for k in ("step", "train_seconds", "retrieval_own_top1", "retrieval_top1",
                                              "retrieval_top5", "em", "em_retrieved")},
            "teacher_gold_last100": (sum(v for _, v in tg[-100:]) / len(tg[-100:])) if tg else None,
            "eval": ev,
            "teacher_gold": [[s, round(v, 4)] for s, v in tg],
        }
    a = res["arms"]
    if "reader" in a and "uniform" in a:
        r, u = a["reader"]["final"].get("retrieval_own_top1"), a["uniform"]["final"].get("retrieval_own_top1")
        if r is not None and u is not None:
            res["reader_minus_uniform_own_top1"] = round(r - u, 4)
            res["target_met"] = bool(r - u >= 0.3)
    rows = ["| arm | steps | gold top-1 among own docs | gold top-1 over corpus | gold top-5 over corpus | EM (given "
            "docs) | EM (retrieved top-n) | teacher mass on gold (last 100 steps) |", "|---" * 8 + "|"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for arm, v in a.items():
        f = v["final"]
        rows.append(f"| {arm} | {v['steps']} | {fmt(f.get('retrieval_own_top1'))} | {fmt(f.get('retrieval_top1'))} | "
                    f"{fmt(f.get('retrieval_top5'))} | {fmt(f.get('em'))} | {fmt(f.get('em_retrieved'))} | "
                    f"{fmt(v['teacher_gold_last100'])} |")
    res["table"] = "\n".join(rows)
    return res


def plot_ablation(res: dict, path: str) -> bool:
    """Three panels: gold top-1 among own docs, gold top-1 over the corpus and EM, teacher mass on gold. matplotlib
    is optional: without it, a one-line notice and no plot."""
    try:
        import matplotlib
    except ImportError:
        print(f"note: matplotlib is not installed, so {path} was not written (pip install matplotlib)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for k, (arm, v) in enumerate(res["arms"].items()):
        c = f"C{k}"
        steps = [r["step"] for r in v["eval"]]
        axes[0].plot(steps, [r.get("retrieval_own_top1", float("nan")) for r in v["eval"]], "-o", ms=3, color=c,
                     label=arm)
        axes[1].plot(steps, [r.get("retrieval_top1", float("nan")) for r in v["eval"]], "-o", ms=3, color=c,
                     label=f"{arm}: gold top-1 (corpus)")
        axes[1].plot(steps, [r.get("em_retrieved", float("nan")) for r in v["eval"]], "--", color=c,
                     label=f"{arm}: EM (retrieved)")
        tg = v["teacher_gold"]
        axes[2].plot([s for s, _ in tg], _smooth([x for _, x in tg], 50), color=c, label=arm)
    n_ctx = res.get("n_ctx", 4)
    axes[0].axhline(1 / n_ctx, color="gray", lw=0.8, ls=":", label=f"chance (1/{n_ctx})")
    axes[2].axhline(1 / n_ctx, color="gray", lw=0.8, ls=":", label=f"uniform (1/{n_ctx})")
    titles = ["gold top-1 among the question's own docs (dev)", "over the corpus (dev): retrieval and EM",
              "teacher mass on gold (train, 50-step mean)"]
    for ax, t in zip(axes, titles):
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    m = res.get("machine", {})
    fig.suptitle(f"ReAtt demo ablation, tiny T5 from random init, CPU ({m.get('cpu', '?')}, 1 torch thread per arm)",
                 fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run_ablation(out_dir: str, arms: list, steps: int, time_budget: float, extra_args: list, parallel: bool = True):
    """Train every arm (``reatt-train --demo`` with the arm's flags, one torch thread each, all at once when
    ``parallel``), then summarise into OUT/ablation.{json,md,png}. Everything goes under ``out_dir``."""
    import subprocess
    import sys
    import time

    os.makedirs(out_dir, exist_ok=True)
    load_before = machine_info().get("load_average")
    procs, t0 = [], time.time()
    for arm in arms:
        cmd = [sys.executable, "-m", "reatt.train", "--demo", "--out", os.path.join(out_dir, arm), "--threads", "1",
               "--no-progress", "--steps", str(steps), "--time-budget", str(time_budget), *ARMS[arm][0], *extra_args]
        log = open(os.path.join(out_dir, f"{arm}.log"), "w")
        print(f"[{arm}] {' '.join(cmd[1:])}  (log: {log.name})", flush=True)
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        procs.append((arm, p, log))
        if not parallel:
            p.wait()
    failed = []
    for arm, p, log in procs:
        if p.wait() != 0:
            failed.append(arm)
        log.close()
    res = summarize(out_dir, arms, {"command": "reatt-demo " + " ".join(sys.argv[1:]), "steps": steps,
                                    "time_budget_min": time_budget, "n_ctx": 4, "parallel_arms": parallel,
                                    "torch_threads_per_arm": 1, "wall_seconds": round(time.time() - t0, 1),
                                    "load_average_before": load_before})
    with open(os.path.join(out_dir, "ablation.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out_dir, "ablation.md"), "w") as f:
        f.write(res["table"] + "\n")
    print(res["table"])
    if "reader_minus_uniform_own_top1" in res:
        print(f"reader - uniform, gold top-1 among own docs: {res['reader_minus_uniform_own_top1']:+.3f} "
              f"(target >= +0.3: {'met' if res['target_met'] else 'NOT met'})")
    if plot_ablation(res, os.path.join(out_dir, "ablation.png")):
        print(f"plot: {os.path.join(out_dir, 'ablation.png')}")
    if failed:
        raise SystemExit(f"arms failed: {failed} (see their logs in {out_dir})")
    return res


def main(argv=None) -> int:
    """The console script; returns the exit status."""
    ap = argparse.ArgumentParser(prog="reatt-demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory: data, one run per arm, ablation.{json,md,png}")
    ap.add_argument("--data-only", action="store_true", help="only write train/dev/corpus JSONL to OUT")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated world (--data-only)")
    ap.add_argument("--rebuild-tokenizer", action="store_true", help="rewrite reatt/demo_data/tokenizer")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {list(ARMS)}")
    ap.add_argument("--steps", type=int, default=1500, help="training steps per arm")
    ap.add_argument("--time-budget", type=float, default=10.0, help="minutes per arm at most (the arms run at once)")
    ap.add_argument("--sequential", action="store_true", help="run the arms one after another, not at once")
    ap.add_argument("--summarize-only", action="store_true", help="re-read OUT's finished arms, write the outputs")
    args, extra = ap.parse_known_args(argv)
    if args.rebuild_tokenizer:
        build_tokenizer(generate(seed=args.seed)[2])
    if args.data_only:
        print(write_demo(args.out, seed=args.seed))
        return 0
    arms = [a for a in args.arms.split(",") if a]
    bad = [a for a in arms if a not in ARMS]
    if bad:
        raise SystemExit(f"--arms: unknown {bad}; known: {list(ARMS)}")
    if args.summarize_only:
        res = summarize(args.out, arms)
        print(res["table"])
        plot_ablation(res, os.path.join(args.out, "ablation.png"))
        return 0
    run_ablation(args.out, arms, args.steps, args.time_budget, extra, parallel=not args.sequential)
    return 0


if __name__ == "__main__":
    sys.exit(main())
