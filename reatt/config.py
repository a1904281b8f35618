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

# The original's retrieval layer and head per T5 architecture (the author's FiD fork, ``get_single_head_idx``):
# B = half the encoder; the head is the one the paper picked for that size. Keyed by (encoder layers, heads), never by
# a checkpoint's name or path: names such as ``t5-v1_1-large`` or ``my_t5_large`` say nothing reliable.
ARCH_PRESETS = {
    (24, 16): dict(retrieval_layer=12, retrieval_head=6),  # T5-large (t5-large-lm-adapt in the paper)
    (12, 12): dict(retrieval_layer=6, retrieval_head=3),  # T5-base
}
# The same by explicit size name (for ``ReAttConfig.for_t5("t5-large")``; exact names only).
PRESETS = {
    "t5-base": ARCH_PRESETS[(12, 12)],
    "t5-large": ARCH_PRESETS[(24, 16)],
}
# Fields that describe the trained model itself (its saved head_logits are one-hot on the trained head, its retriever
# lives at that layer): a saved model restores them. The others are per-run training choices.
ARCH_FIELDS = ("retrieval_layer", "retrieval_head", "head_temperature")

CONFIG_NAME = "reatt_config.json"

# Token budgets of a (query, document) pair, the same for training, indexing, search and evaluation: the paper's 250
# tokens per pair (the original truncates the pair jointly) as 50 query + 200 document tokens. One pair of constants,
# so that an index is never built with another document length than the model was trained with by default.
MAX_QUERY_LEN = 50
MAX_DOC_LEN = 200


@dataclass
class ReAttConfig:
    """Hyper-parameters of the ReAtt wrapper (the T5 itself keeps its own ``T5Config``).

    Attributes:
        retrieval_layer: B, the encoder block whose self-attention is the retriever (0-based; blocks < B are the
            bi-encoder). 12 for T5-large (24 blocks), 6 for T5-base.
        retrieval_head: the head of block B used for retrieval (6 for T5-large, 3 for T5-base). The defaults
            (layer 6, head 3) are the T5-base preset's; ``for_architecture`` picks the preset of a model's shape.
        kl_weight: weight of the retrieval KL next to the QA cross-entropy (8 in the paper).
        in_batch_negatives: score every query against every document of the (global) batch, not only its own.
        train_pos_bias: let the KL train the retrieval head's relative-position bias (else it is detached).
        backend: kernel backend for the fused path ("auto", "cpu", "triton", "cuda").
        use_fused_kernels: True runs ``backend``; False runs the plain-torch reference ops (backend="torch").
        head_temperature: tau of the learned head weights softmax(w / tau) (0.001, as the original). w starts at 0
            (uniform over heads, as the original), so the starting scale is exp(c) / H and w learns.
        init_log_scale: initial c of the learned temperature exp(c) on the student score (0, as the original).
        teacher_includes_query: the original teacher (default True): the step-0 cross-attention softmaxed over all
            encoder tokens of all pairs and each pair's query tokens counted toward its document. False: only document
            tokens count, each head renormalised over them (this project's earlier default; ``--teacher-docs-only``).
        teacher: "reader" (ReAtt), or "uniform" over each query's present documents: an ablation that shows how much
            retrieval the document sets alone teach, without the reader's attention.
        qa_reduction: how ``--ibn-accum K`` combines the micro-batches' QA losses. "token" (default): the token mean
            over the whole big batch (the gradient of one batch K x world larger). "micro": the mean of the K x world
            micro-batches' token means, as the original (its ``fid_run`` divides each micro-batch's QA loss by the
            number of accumulations, and DDP averages the ranks). The two agree when every micro-batch holds as many
            answer tokens.
    """

    retrieval_layer: int = 6
    retrieval_head: int = 3
    kl_weight: float = 8.0
    in_batch_negatives: bool = True
    train_pos_bias: bool = True
    backend: str = "auto"
    use_fused_kernels: bool = True
    head_temperature: float = 0.001
    init_log_scale: float = 0.0
    teacher_includes_query: bool = True
    teacher: str = "reader"
    qa_reduction: str = "token"

    @classmethod
    def for_t5(cls, name: str, **overrides) -> "ReAttConfig":
        """The original's layer and head for ``"t5-base"`` or ``"t5-large"`` (exact names)."""
        if name not in PRESETS:
            raise ValueError(f"no ReAtt preset named {name!r}; known: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def for_architecture(cls, num_layers: int, num_heads: int, **overrides) -> "ReAttConfig":
        """The original's layer and head for a T5 with ``num_layers`` encoder blocks and ``num_heads`` heads.

        Raises ValueError, naming what to pass, for any other shape (or if only one of layer/head is overridden and the
        shape is unknown): a retriever head is never guessed."""
        preset = ARCH_PRESETS.get((int(num_layers), int(num_heads)))
        given = {k: v for k, v in overrides.items() if v is not None}
        if preset is None and not {"retrieval_layer", "retrieval_head"} <= set(given):
            known = ", ".join(f"{l} layers x {h} heads -> layer {p['retrieval_layer']}, head {p['retrieval_head']}"
                              for (l, h), p in ARCH_PRESETS.items())
            raise ValueError(f"cannot determine the ReAtt retrieval layer and head for a T5 with {num_layers} encoder "
                             f"layers and {num_heads} heads (no saved reatt_config.json, no preset: {known}); pass "
                             "--retrieval-layer B and --retrieval-head H (ReAttConfig(retrieval_layer=..., "
                             "retrieval_head=...))")
        return cls(**{**(preset or {}), **given})

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
