"""Real-text corpora for the benchmarks, one module per job (docs/data.md):

- :mod:`.fetch`: pinned downloads (name + sha256) under ``$REATT_DATA/dl``, and the true cause when pip fails;
- :mod:`.sources`: one file per source (the installed docstrings, the bigbench sdist's SQuAD / SQuADShifts / NQ,
  a user's BEIR folder or FiD/DPR JSONL), turned into paragraphs and questions;
- :mod:`.text`: 100-word passages, gold passages, the FiD JSONL files;
- :mod:`.encode`: the encoder (the pinned all-MiniLM-L6-v2, or ``--encoder DIR``) and resumable token encoding;
- :mod:`.pca`: optional PCA-projected vectors;
- :mod:`.cache`: build, check (size + sha256 of every file) and load (``load_corpus(name)``);
- :mod:`.cli`: ``reatt-data``.
"""
