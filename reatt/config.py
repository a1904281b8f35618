"""ReAttConfig: where retrieval happens inside T5 and how the retriever is trained.

ReAtt (Jiang et al. 2022) splits a T5 encoder at block ``retrieval_layer`` (B):

- blocks ``0 .. B-1`` are a bi-encoder: the query and every document are encoded on their own;
- block B's self-attention head ``retrieval_head`` is the retriever: query tokens give q, document tokens give k
  (64-d, no scaling), scored by MaxSim;
- blocks ``B ..`` read each (query, document) pair concatenated, and the decoder fuses all pairs (Fusion-in-Decoder).

The retriever learns from the reader alone: KL(teacher || student) where the teacher is the last decoder layer's
cross-attention at step 0, aggregated per document (``reatt_kernels.reader_teacher``).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

# Paper defaults per T5 size: B = half the encoder, head chosen in the paper for T5-large.
PRESETS = {
    "t5-small": dict(retrieval_layer=3, retrieval_head=6),
    "t5-base": dict(retrieval_layer=6, retrieval_head=6),
    "t5-large": dict(retrieval_layer=12, retrieval_head=6),
}

CONFIG_NAME = "reatt_config.json"


@dataclass
class ReAttConfig:
    """Hyper-parameters of the ReAtt wrapper (the T5 itself keeps its own ``T5Config``).

    Attributes:
        retrieval_layer: B, the encoder block whose self-attention is the retriever (0-based; blocks < B are the
            bi-encoder). 12 for T5-large (24 blocks), 6 for T5-base.
        retrieval_head: the head of block B used for retrieval (6 for T5-large).
        kl_weight: weight of the retrieval KL next to the QA cross-entropy (8 in the paper).
        in_batch_negatives: score every query against every document of the (global) batch, not only its own.
        train_pos_bias: let the KL train the retrieval head's relative-position bias (else it is detached).
        backend: kernel backend for the fused path ("auto", "cpu", "triton", "cuda").
        use_fused_kernels: True runs ``backend``; False runs the plain-torch reference ops (backend="torch").
        head_temperature: tau of the learned head weights softmax(w / tau) (0.001: nearly one-hot).
        init_log_scale: initial c of the learned temperature exp(c) on the student score.
        teacher_includes_query: count the cross-attention on a pair's query tokens toward its document (default:
            document tokens only).
        teacher: "reader" (ReAtt), or "uniform" over each query's present documents: an ablation that shows how much
            retrieval the document sets alone teach, without the reader's attention.
    """

    retrieval_layer: int = 6
    retrieval_head: int = 6
    kl_weight: float = 8.0
    in_batch_negatives: bool = True
    train_pos_bias: bool = True
    backend: str = "auto"
    use_fused_kernels: bool = True
    head_temperature: float = 0.001
    init_log_scale: float = 0.0
    teacher_includes_query: bool = False
    teacher: str = "reader"

    @classmethod
    def for_t5(cls, name: str, **overrides) -> "ReAttConfig":
        """Paper defaults for ``t5-small`` / ``t5-base`` / ``t5-large`` (any name containing one of them)."""
        for key, preset in PRESETS.items():
            if key in name:
                return cls(**{**preset, **overrides})
        raise ValueError(f"no ReAtt preset for {name!r}; known: {sorted(PRESETS)}")

    @property
    def kernel_backend(self) -> str:
        """The backend the ops are called with: the reference ("torch") unless fused kernels are switched on."""
        return self.backend if self.use_fused_kernels else "torch"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ReAttConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ReAttConfig fields: {unknown}")
        return cls(**d)

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, directory: str) -> "ReAttConfig":
        with open(os.path.join(directory, CONFIG_NAME)) as f:
            return cls.from_dict(json.load(f))
