"""The ``bigbench==1.0.0`` sdist: SQuAD v1.1 dev, the four SQuADShifts sets and Natural Questions (corpora
``squad-dev`` and ``real-all``).

The package index no longer serves this release (only 0.0.1), so these corpora work from a local copy of the sdist
put into ``$REATT_DATA/dl`` (its name and sha256 are below, and in the error a missing copy raises)."""
from __future__ import annotations

from ..fetch import Source, extract
from ..text import assemble
from . import CorpusSpec
from .nq import read_nq
from .squad import read_squad

_BB = "bigbench-1.0.0/bigbench/benchmark_tasks/"
SQUAD_FILES = {  # part -> (file in squad_shifts/, keep the title)
    "squad-dev": ("squaddev_v1.1.json", True),
    "new_wiki": ("new_wiki_v1.0.json", True),
    "nyt": ("nyt_v1.0.json", False),
    "reddit": ("reddit_v1.0.json", False),
    "amazon": ("amazon_reviews_v1.0.json", False),
}
NQ_FILE = "contextual_parametric_knowledge_conflicts/task.json"
LICENCE = "SQuAD v1.1: CC BY-SA 4.0; SQuADShifts: CC BY 4.0; Natural Questions: CC BY-SA 3.0"

BIGBENCH = Source(
    key="bigbench", spec="bigbench==1.0.0", filename="bigbench-1.0.0.tar.gz",
    sha256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
    members=tuple(_BB + "squad_shifts/" + f for f, _ in SQUAD_FILES.values()) + (_BB + NQ_FILE,),
    strip=_BB, licence=LICENCE)

# corpus name -> its parts, in order
CORPORA = {
    "squad-dev": ("squad-dev",),
    "real-all": ("squad-dev", "new_wiki", "nyt", "reddit", "amazon", "nq"),
}


def read_part(part: str, folder) -> tuple[list, list]:
    """(paragraphs, questions) of one part from the extracted sdist folder."""
    if part == "nq":
        return read_nq(folder / NQ_FILE)
    fname, keep_title = SQUAD_FILES[part]
    return read_squad(folder / "squad_shifts" / fname, keep_title)


def spec(name: str) -> CorpusSpec:
    parts = CORPORA[name]

    def read(root, download, log):
        folder = extract(BIGBENCH, root, download=download)
        return assemble([(p, *read_part(p, folder)) for p in parts])

    pins = {"bigbench": {"spec": BIGBENCH.spec, "file": BIGBENCH.filename, "sha256": BIGBENCH.sha256},
            "parts": list(parts)}
    desc = ("SQuAD v1.1 dev" if name == "squad-dev" else
            "SQuAD v1.1 dev + SQuADShifts new_wiki, nyt, reddit, amazon + Natural Questions")
    return CorpusSpec(name=name, slug=name, description=desc + " (bigbench==1.0.0 sdist)", pins=lambda: pins,
                      read=read, licence=LICENCE, sources=(BIGBENCH,))
