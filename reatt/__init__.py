"""reatt: a thin ReAtt (Retrieval as Attention, Jiang et al. 2022) model and training loop on Hugging Face T5.

- :class:`reatt.config.ReAttConfig`: retrieval layer/head, KL weight, in-batch negatives, kernel switch.
- :class:`reatt.model.ReAttModel`: bi-encoder (blocks < B), retriever (block B's head), reader (blocks >= B), FiD.
- ``reatt-train`` (:mod:`reatt.train`): training, evaluation, re-retrieval, checkpoints, DDP, and ``--demo``.
- :mod:`reatt.gradcache`: GradCache in-batch negatives over K micro-batches (``reatt-train --ibn-accum K``).
- ``reatt-index build`` / ``search`` (:mod:`reatt.index_cli`, on :mod:`reatt.retrieve`): a trained model's token index
  of a corpus (resumable, sharded across ranks) and ranked ctxs in reatt-train's JSONL.
- ``reatt-eval`` (:mod:`reatt.eval`): answer-containment top-k (DPR/FiD), gold-id top-k, FiD reading EM/F1.
- ``reatt-demo`` (:mod:`reatt.demo`): the CPU demo's data and its ablation (reader vs uniform teacher vs no KL).

``reatt.model`` needs transformers (the "model" extra); importing ``reatt`` alone does not.
"""
from .config import ReAttConfig

__all__ = ["ReAttConfig"]
