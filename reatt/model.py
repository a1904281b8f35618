"""ReAttModel: Retrieval as Attention on a Hugging Face T5 (Jiang et al. 2022), thin and built from T5's own modules.

Shapes (B queries, n documents each, Lq query tokens, Ld document tokens, D = d_model, H heads, d = d_kv = 64):

    query ids [B, Lq] ----- blocks 0..B-1 (once per query) -----\\                         retrieval head of block B
                                                                 +-> q [B, Lq, d], k [B*n, Ld, d] --MaxSim--> student
    doc ids [B, n, Ld] ---- blocks 0..B-1 (once per document) --/
                                        |
              pairs [B*n, Lq+Ld, D] = (query, document) concatenated, full attention, blocks B..end
                                        |
              Fusion-in-Decoder: the decoder cross-attends over all n pairs of a query at once [B, n*(Lq+Ld), D]
                                        |
              last decoder layer's cross-attention at step 0 --reader_teacher--> teacher [B, n] (detached)

    loss = QA cross-entropy + kl_weight * KL(teacher || softmax(exp(c) * softmax(w / tau)[head] * MaxSim))

Why the query can be encoded once: T5's only position signal is the relative-position bias, which depends on the
distance between two tokens of the same segment. With the "separate" (block-diagonal) mask of ReAtt's bi-encoder
layers, a query token never sees a document token, so its states are the same in every (query, document) pair.

Positions inside a pair are compact: query token i sits at i, document token j at n_a + j (n_a = real query
tokens), whatever the padding, so the reader's relative distances are those of the unpadded concatenation and the
retrieval bias at distance r = n_a + j - i is exactly the one ``reatt_kernels.maxsim`` applies. An in-batch document
of another query a' keeps ITS pair's offset, r = n_a' + j - i, as in the original (its key vector and position are
those of the pair it was encoded in); :meth:`ReAttModel.student_scores` does this with the same kernels.
"""
from __future__ import annotations

import inspect
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import reatt_kernels as rk

from .config import MAX_DOC_LEN, MAX_QUERY_LEN, ReAttConfig
from .distributed import all_gather_nograd, all_gather_with_grad, all_reduce_max_int, is_distributed, rank_and_world

EXTRA_NAME = "reatt_extra.pt"


def _t5_classes():
    # transformers is an optional dependency of reatt_kernels (the "model" extra): import it only here.
    from transformers import T5Config, T5ForConditionalGeneration
    from transformers.models.t5.modeling_t5 import T5Attention

    return T5Config, T5ForConditionalGeneration, T5Attention


def tiny_t5_config(vocab_size: int = 128, d_model: int = 64, num_layers: int = 4, num_decoder_layers: int = 2,
                   num_heads: int = 2, d_kv: int = 64, d_ff: int = 128, dropout_rate: float = 0.0, **kw):
    """A small random T5 for tests and the CPU demo (pad 0, eos 1, decoder start = pad, as in T5)."""
    T5Config, _, _ = _t5_classes()
    return T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=num_layers,
                    num_decoder_layers=num_decoder_layers, num_heads=num_heads, dropout_rate=dropout_rate,
                    relative_attention_num_buckets=kw.pop("relative_attention_num_buckets", 32),
                    relative_attention_max_distance=kw.pop("relative_attention_max_distance", 128),
                    feed_forward_proj=kw.pop("feed_forward_proj", "relu"), pad_token_id=0, eos_token_id=1,
                    decoder_start_token_id=0, tie_word_embeddings=kw.pop("tie_word_embeddings", True), **kw)


class ReAttModel(nn.Module):
    """T5ForConditionalGeneration plus ReAtt's retriever (block ``retrieval_layer``, head ``retrieval_head``).

    Learned extras: ``log_scale`` (c) and ``head_logits`` (w, [H]); the student logit is
    ``exp(c) * softmax(w / tau)[head] * MaxSim``.
    """

    def __init__(self, t5, config: ReAttConfig, tokenizer=None):
        super().__init__()
        tc = t5.config
        if not 0 <= config.retrieval_layer < tc.num_layers:
            raise ValueError(f"retrieval_layer must be in [0, {tc.num_layers - 1}] for this T5, got "
                             f"{config.retrieval_layer}")
        if not 0 <= config.retrieval_head < tc.num_heads:
            raise ValueError(f"retrieval_head must be in [0, {tc.num_heads - 1}], got {config.retrieval_head}")
        # We add the position bias and the masks ourselves; the eager attention adds both as given (sdpa/flex would
        # need other mask formats), and it also exposes the cross-attention for the teacher.
        t5.config._attn_implementation = "eager"
        for stack in (t5.encoder, t5.decoder):
            stack.config._attn_implementation = "eager"
        self.t5 = t5
        self.config = config
        self.tokenizer = tokenizer
        self.gradient_checkpointing = False
        self.read_max_pairs = 0  # pairs per chunk of the reader's blocks (0: one chunk per query length); see read()
        # w = 0 as in the original: softmax(w / tau) starts uniform (scale exp(c) / H) and w learns. A one-hot start
        # saturates the softmax at tau = 0.001, and its gradient is then exactly 0: w would never move.
        self.head_logits = nn.Parameter(torch.zeros(tc.num_heads))
        self.log_scale = nn.Parameter(torch.tensor(float(config.init_log_scale)))
        self._teacher_logits: Optional[Tensor] = None
        self._capture_teacher = False
        cross = t5.decoder.block[-1].layer[1].EncDecAttention
        self._hook = cross.register_forward_hook(self._teacher_hook, with_kwargs=True)

    # ---- construction ------------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, t5_config=None, reatt_config: Optional[ReAttConfig] = None, tokenizer=None, seed=None,
                    **t5_kw) -> "ReAttModel":
        """Random init: ``t5_config`` (a T5Config), or the tiny config with ``t5_kw`` overrides."""
        _, T5ForConditionalGeneration, _ = _t5_classes()
        cfg = t5_config if t5_config is not None else tiny_t5_config(**t5_kw)
        cfg._attn_implementation = "eager"
        if seed is not None:
            torch.manual_seed(seed)
        t5 = T5ForConditionalGeneration(cfg)
        rc = reatt_config or ReAttConfig(retrieval_layer=cfg.num_layers // 2, retrieval_head=0)
        return cls(t5, rc, tokenizer)

    @classmethod
    def from_pretrained(cls, local_dir: str, reatt_config: Optional[ReAttConfig] = None, tokenizer_dir=None,
                        **kw) -> "ReAttModel":
        """Load a T5 (or a saved ReAttModel) from a local directory, offline. The tokenizer is loaded from
        ``tokenizer_dir`` (default: ``local_dir``) when it holds tokenizer files."""
        from .config import CONFIG_NAME

        from .config import ARCH_FIELDS

        _, T5ForConditionalGeneration, _ = _t5_classes()
        t5 = T5ForConditionalGeneration.from_pretrained(local_dir, local_files_only=True, attn_implementation="eager",
                                                        **kw)
        saved = ReAttConfig.load(local_dir) if os.path.exists(os.path.join(local_dir, CONFIG_NAME)) else None
        if reatt_config is None:
            # A saved ReAttModel restores its own config; a plain T5 gets the original's layer/head for its shape, or
            # an error naming what to pass (never a guess from the directory name).
            reatt_config = saved or ReAttConfig.for_architecture(t5.config.num_layers, t5.config.num_heads)
        elif saved is not None:
            diff = {f: (getattr(saved, f), getattr(reatt_config, f)) for f in ARCH_FIELDS
                    if getattr(saved, f) != getattr(reatt_config, f)}
            if diff:
                raise ValueError(f"{local_dir} holds a ReAttModel trained with " + ", ".join(
                    f"{f}={a}" for f, (a, _) in diff.items()) + "; the reatt_config passed asks for " + ", ".join(
                    f"{f}={b}" for f, (_, b) in diff.items()) + " (its saved head weights belong to the saved "
                    "retriever): pass the saved values or none")
        tok = None
        tdir = tokenizer_dir or local_dir
        if any(os.path.exists(os.path.join(tdir, f)) for f in ("tokenizer.json", "spiece.model")):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(tdir, local_files_only=True)
        model = cls(t5, reatt_config, tok)
        extra = os.path.join(local_dir, EXTRA_NAME)
        if os.path.exists(extra):
            model.load_state_dict(torch.load(extra, map_location="cpu"), strict=False)
        return model

    def save_pretrained(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.t5.save_pretrained(directory)
        self.config.save(directory)
        torch.save({"head_logits": self.head_logits.detach().cpu(), "log_scale": self.log_scale.detach().cpu()},
                   os.path.join(directory, EXTRA_NAME))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)

    # ---- the switch between reference and fused ops ------------------------------------------------------------------
    @property
    def use_fused_kernels(self) -> bool:
        return self.config.use_fused_kernels

    @use_fused_kernels.setter
    def use_fused_kernels(self, on: bool) -> None:
        self.config.use_fused_kernels = bool(on)

    # ---- T5 pieces ---------------------------------------------------------------------------------------------------
    @property
    def t5_config(self):
        return self.t5.config

    @property
    def _rel_attn(self):
        return self.t5.encoder.block[0].layer[0].SelfAttention

    def _rel_bias(self, pos_q: Tensor, pos_k: Tensor) -> Tensor:
        """T5's bucketed bidirectional bias for arbitrary positions: pos_q [N, Lq], pos_k [N, Lk] -> [N, H, Lq, Lk]."""
        _, _, T5Attention = _t5_classes()
        a = self._rel_attn
        bucket = T5Attention._relative_position_bucket(pos_k[:, None, :] - pos_q[:, :, None], bidirectional=True,
                                                       num_buckets=a.relative_attention_num_buckets,
                                                       max_distance=a.relative_attention_max_distance)
        return a.relative_attention_bias(bucket).permute(0, 3, 1, 2)

    @staticmethod
    def _key_mask(valid: Tensor, dtype: torch.dtype) -> Tensor:
        """bool [N, L] -> additive [N, 1, 1, L] (finfo.min, not -inf: an empty document stays NaN-free)."""
        return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(
            ~valid, torch.finfo(dtype).min)[:, None, None, :]

    def _block(self, i: int, h: Tensor, mask: Tensor, bias: Tensor) -> Tensor:
        blk = self.t5.encoder.block[i]

        def run(h, mask, bias):
            return blk(h, attention_mask=mask, position_bias=bias)[0]

        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(run, h, mask, bias, use_reentrant=False)
        return run(h, mask, bias)

    def _embed(self, ids: Tensor) -> Tensor:
        return self.t5.encoder.dropout(self.t5.encoder.embed_tokens(ids))

    def gradient_checkpointing_enable(self) -> None:
        self.gradient_checkpointing = True  # our encoder blocks (we call them ourselves)
        # The decoder runs through HF: 5.24 renamed the switch (the old name still works there, with a warning).
        enable = getattr(self.t5, "activation_checkpointing_enable", None) or self.t5.gradient_checkpointing_enable
        enable()

    # ---- bi-encoder (blocks < B) and the retriever (block B) ---------------------------------------------------------
    def bi_encode(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Blocks 0..B-1 on single segments: ids [N, L], mask bool [N, L] -> hidden [N, L, D]."""
        N, L = ids.shape
        h = self._embed(ids)
        if self.config.retrieval_layer == 0:
            return h
        pos = torch.arange(L, device=ids.device)[None]
        bias = self._rel_bias(pos, pos)  # [1, H, L, L]: the same for every segment
        m = self._key_mask(mask, bias.dtype)
        for i in range(self.config.retrieval_layer):
            h = self._block(i, h, m, bias)
        return h

    def _retrieval_proj(self, h: Tensor, which: str) -> Tensor:
        """Block B's pre-norm states through the retrieval head's q (queries) or k (documents).

        [N, L, D] -> [N, L, d]."""
        layer = self.t5.encoder.block[self.config.retrieval_layer].layer[0]
        attn = layer.SelfAttention
        dk = attn.key_value_proj_dim
        hd = self.config.retrieval_head
        w = (attn.q if which == "q" else attn.k).weight[hd * dk : (hd + 1) * dk]
        return F.linear(layer.layer_norm(h), w)

    def retrieval_pos_bias(self, R: int, device=None, start: int = 0) -> Tensor:
        """The retrieval head's bias per distance r = start .. start+R-1 (key minus query position; negative = key
        before query, T5's other buckets) -> [R], fp32 (fp64 for an fp64 model)."""
        a = self._rel_attn
        device = device or a.relative_attention_bias.weight.device
        r = torch.arange(start, start + R, device=device)
        pb = self._rel_bias(torch.zeros_like(r)[None, :1], r[None])[0, self.config.retrieval_head, 0]
        pb = pb.to(torch.promote_types(pb.dtype, torch.float32))
        return pb if self.config.train_pos_bias else pb.detach()

    def student_scale(self) -> Tensor:
        """exp(c) * softmax(w / tau)[head]: ReAtt's learned temperature on the MaxSim score (0-d)."""
        ct = torch.promote_types(self.head_logits.dtype, torch.float32)  # fp32, or fp64 for an fp64 model
        w = torch.softmax(self.head_logits.to(ct) / self.config.head_temperature, 0)
        return self.log_scale.to(ct).exp() * w[self.config.retrieval_head]

    def encode_query_ids(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """ids [N, Lq], bool mask -> (q vectors [N, Lq, d], mask). Runs only blocks <= B."""
        return self._retrieval_proj(self.bi_encode(ids, mask), "q"), mask

    def encode_document_ids(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """ids [N, Ld], bool mask -> (k vectors [N, Ld, d], mask). Runs only blocks <= B."""
        return self._retrieval_proj(self.bi_encode(ids, mask), "k"), mask

    def encode_queries(self, texts: Sequence[str], max_length: int = MAX_QUERY_LEN) -> tuple[Tensor, Tensor]:
        """Questions (plain text; the "question:" prefix is added) -> (q vectors [N, Lq, d], bool mask [N, Lq])."""
        from .data import tokenize_queries

        ids, mask = tokenize_queries(self._tok(), texts, max_length)
        dev = self.head_logits.device
        return self.encode_query_ids(ids.to(dev), mask.to(dev))

    def encode_documents(self, docs: Sequence, max_length: int = MAX_DOC_LEN) -> tuple[Tensor, Tensor]:
        """Documents ({"title", "text"} dicts, or strings used as text) -> (k vectors [N, Ld, d], bool mask)."""
        from .data import tokenize_docs

        ids, mask = tokenize_docs(self._tok(), docs, max_length)
        dev = self.head_logits.device
        return self.encode_document_ids(ids.to(dev), mask.to(dev))

    def _tok(self):
        if self.tokenizer is None:
            raise ValueError("this ReAttModel has no tokenizer: pass tokenizer= or load one with from_pretrained")
        return self.tokenizer

    def score(self, q: Tensor, q_mask: Tensor, d: Tensor, d_mask: Tensor) -> Tensor:
        """Inference score: MaxSim sum over query tokens, no position bias. [Nq, Lq, d] x [Nd, Ld, d] -> [Nq, Nd]."""
        return rk.maxsim(q, d, q_mask, d_mask, reduce="sum", backend=self.config.kernel_backend)

    # ---- reader (blocks >= B) and Fusion-in-Decoder ------------------------------------------------------------------
    def read(self, hq: Tensor, q_mask: Tensor, hd: Tensor, d_mask: Tensor,
             max_pairs: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
        """Blocks B..end over each (query, document) pair.

        Args: hq [B, Lq, D] and q_mask [B, Lq]; hd [B*n, Ld, D] and d_mask [B*n, Ld] (bi-encoder outputs);
            max_pairs: at most this many pairs per chunk (None: ``self.read_max_pairs``; 0: no limit).
        Returns: encoder states [B, n*(Lq+Ld), D], their bool mask [B, n*(Lq+Ld)], and doc_index [B, n*(Lq+Ld)]
            (document of each token for the teacher; -1 for padding, for every token of an empty document slot, and,
            with teacher_includes_query off, for the query tokens of each pair).

        Memory: no per-pair bias. A pair's positions depend only on its query's length n_a (query token i at i,
        document token j at n_a + j), so the pairs of all queries of one length share ONE bias [1, H, L, L]: the
        pairs run in chunks of queries of equal length (at most ``max_pairs`` pairs each), and a block's attention
        scores exist for one chunk at a time. (Was: a bias [B*n, H, L, L], 25.6 GB at 64 x 100 pairs of 250 tokens.)
        """
        B, Lq, D = hq.shape
        n = hd.shape[0] // max(B, 1)
        Ld = hd.shape[1]
        dev = hq.device
        L = Lq + Ld
        # A missing document (an empty slot: the question has fewer than n) is no pair at all: its query tokens are
        # masked too, so the decoder never reads them and the teacher gives the slot mass 0 (student: -inf).
        present = d_mask.any(1, keepdim=True)
        valid = torch.cat([q_mask.repeat_interleave(n, 0) & present, d_mask], 1)  # [B*n, L]
        nq = q_mask.sum(1)  # [B]
        limit = self.read_max_pairs if max_pairs is None else max_pairs
        per_chunk = max(1, limit // max(n, 1)) if limit else max(B, 1)
        chunks, order = [], []
        for m in torch.unique(nq).tolist():
            qs = torch.nonzero(nq == m).flatten()
            for c in range(0, qs.numel(), per_chunk):
                a = qs[c : c + per_chunk]
                pairs = (a[:, None] * n + torch.arange(n, device=dev)[None]).flatten()
                h = torch.cat([hq.index_select(0, a).repeat_interleave(n, 0), hd.index_select(0, pairs)], 1)
                pos = torch.cat([torch.arange(Lq, device=dev), m + torch.arange(Ld, device=dev)])[None]
                bias = self._rel_bias(pos, pos)  # [1, H, L, L]: every pair of the chunk
                mask = self._key_mask(valid.index_select(0, pairs), bias.dtype)
                for i in range(self.config.retrieval_layer, self.t5.config.num_layers):
                    h = self._block(i, h, mask, bias)
                chunks.append(h)
                order.append(pairs)
        h = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        perm = torch.cat(order)
        if len(chunks) > 1 or not bool((perm == torch.arange(perm.numel(), device=dev)).all()):
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(perm.numel(), device=dev)
            h = h.index_select(0, inv)
        h = self.t5.encoder.dropout(self.t5.encoder.final_layer_norm(h))
        docs = torch.arange(n, device=dev).repeat(B)[:, None]  # [B*n, 1]
        di = torch.cat([docs.expand(B * n, Lq) if self.config.teacher_includes_query
                        else torch.full((B * n, Lq), -1, device=dev, dtype=torch.long),
                        docs.expand(B * n, Ld)], 1)
        di = di.masked_fill(~valid, -1)
        return h.reshape(B, n * L, D), valid.reshape(B, n * L), di.reshape(B, n * L)

    def _teacher_hook(self, module, args, kwargs, output):
        if not self._capture_teacher:
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        kv = kwargs.get("key_value_states", args[2] if len(args) > 2 else None)
        with torch.no_grad():
            H, dk = module.n_heads, module.key_value_proj_dim
            qh = module.q(hidden[:, :1]).view(hidden.shape[0], H, dk)  # decoder step 0
            kh = module.k(kv).view(kv.shape[0], kv.shape[1], H, dk)
            # T5 does not scale q.k, and cross-attention has no position bias: these are the layer's logits. The
            # projections are the reader's own (bf16 under autocast); the product is fp32 (fp64 for an fp64 model):
            # autocast would recast the einsum's inputs to bf16 even after .to(float32), so it is switched off here.
            ct = torch.promote_types(qh.dtype, torch.float32)
            with torch.autocast(qh.device.type, enabled=False):
                self._teacher_logits = torch.einsum("bhd,bshd->bhs", qh.to(ct), kh.to(ct))

    def decode(self, enc: Tensor, enc_mask: Tensor, labels: Optional[Tensor] = None,
               decoder_input_ids: Optional[Tensor] = None, capture_teacher: bool = False):
        """T5's own decoder + LM head over the fused encoder states (HF computes the token-mean cross-entropy)."""
        self._capture_teacher = capture_teacher
        self._teacher_logits = None
        try:
            out = self.t5(encoder_outputs=(enc,), attention_mask=enc_mask.long(), labels=labels,
                          decoder_input_ids=decoder_input_ids, use_cache=False, return_dict=True)
        finally:
            self._capture_teacher = False
        return out

    # ---- training forward --------------------------------------------------------------------------------------------
    def forward_parts(self, q_ids: Tensor, q_mask: Tensor, d_ids: Tensor, d_mask: Tensor, labels: Tensor,
                      teacher: bool = True) -> dict:
        """Everything of one training forward except the retrieval KL (the pieces GradCache caches and re-runs).

        Args: as :meth:`forward` (labels required).
        Returns: dict with "q" [B, Lq, d] and "d" [B*n, Ld, d] retrieval vectors, "q_mask" [B, Lq], "d_mask" [B*n, Ld],
            "d_qlen" int64 [B*n] (real query tokens of each document's own pair: its position offset), "qa_loss" (0-d,
            token mean), "n_tokens" (answer tokens, int), "logits", and "teacher" fp32 [B, n] (detached; None when
            ``teacher`` is False).
        """
        B, n, Ld = d_ids.shape
        d_ids2, d_mask2 = d_ids.reshape(B * n, Ld), d_mask.reshape(B * n, Ld)
        hq = self.bi_encode(q_ids, q_mask)
        hd = self.bi_encode(d_ids2, d_mask2)
        qv = self._retrieval_proj(hq, "q")
        dv = self._retrieval_proj(hd, "k")
        enc, enc_mask, doc_index = self.read(hq, q_mask, hd, d_mask2)
        dec = self.decode(enc, enc_mask, labels=labels, capture_teacher=teacher)
        out = {"q": qv, "d": dv, "q_mask": q_mask, "d_mask": d_mask2, "qa_loss": dec.loss, "logits": dec.logits,
               "n_tokens": int((labels != -100).sum()), "d_qlen": q_mask.sum(1).repeat_interleave(n), "teacher": None}
        if teacher:
            if self.config.teacher == "uniform":
                present = d_mask.any(-1).to(torch.promote_types(qv.dtype, torch.float32))
                t = present / present.sum(1, keepdim=True).clamp(min=1)
            else:
                t = rk.reader_teacher(self._teacher_logits, doc_index, is_logits=True, n_docs=n,
                                      backend=self.config.kernel_backend)
            out["teacher"] = t.detach()
        self._teacher_logits = None
        return out

    def forward(self, q_ids: Tensor, q_mask: Tensor, d_ids: Tensor, d_mask: Tensor, labels: Optional[Tensor] = None,
                compute_kl: bool = True, gold: Optional[Tensor] = None) -> dict:
        """One ReAtt training forward.

        Args:
            q_ids, q_mask: [B, Lq] query ids ("question: ..."; no EOS) and bool mask.
            d_ids, d_mask: [B, n, Ld] document ids ("title: ... context: ... </s>") and bool mask.
            labels: [B, T] answer ids with -100 padding (None: no QA loss and no teacher).
            compute_kl: add kl_weight * KL (needs labels: the teacher reads the decoder at step 0). False: QA only
                (no teacher, no student: the warm-up round).
            gold: ignored (a logging-only field of the batch; retrieval is never supervised).
        Returns:
            dict with "loss", "qa_loss", "kl_loss" (0-d), "teacher" [B, n], "student_scale", and "q", "d" retrieval
            vectors ([B, Lq, d], [B*n, Ld, d]).
        """
        if labels is None:
            B, n, Ld = d_ids.shape
            d_ids2, d_mask2 = d_ids.reshape(B * n, Ld), d_mask.reshape(B * n, Ld)
            hq = self.bi_encode(q_ids, q_mask)
            hd = self.bi_encode(d_ids2, d_mask2)
            enc, enc_mask, _ = self.read(hq, q_mask, hd, d_mask2)
            zero = enc.new_zeros(())
            return {"q": self._retrieval_proj(hq, "q"), "d": self._retrieval_proj(hd, "k"), "loss": zero,
                    "qa_loss": zero, "kl_loss": zero, "encoder_states": enc, "encoder_mask": enc_mask}
        p = self.forward_parts(q_ids, q_mask, d_ids, d_mask, labels, teacher=compute_kl)
        qa = p["qa_loss"]
        out = {"q": p["q"], "d": p["d"], "qa_loss": qa, "logits": p["logits"]}
        if not compute_kl:
            out.update(loss=qa, kl_loss=qa.new_zeros(()))
            return out
        kl = self.retrieval_kl(p["q"], q_mask, p["d"], p["d_mask"], p["teacher"])
        out.update(teacher=p["teacher"], kl_loss=kl, loss=qa + self.config.kl_weight * kl,
                   student_scale=self.student_scale().detach())
        return out

    def retrieval_kl(self, qv: Tensor, q_mask: Tensor, dv: Tensor, d_mask: Tensor, teacher: Tensor) -> Tensor:
        """KL(teacher [B, n] || student) with the student over the query's own documents and (in_batch_negatives)
        every in-batch document, across ranks under torch.distributed. qv [B, Lq, d], dv [B*n, Ld, d]."""
        B, n = teacher.shape
        d_qlen = q_mask.sum(1).repeat_interleave(n)
        cols = None
        if self.config.in_batch_negatives and is_distributed():
            # Same Ld on every rank, then every rank's documents become this rank's negatives.
            Ld = dv.shape[1]
            L_all = all_reduce_max_int(Ld, dv.device)
            if L_all > Ld:
                dv = F.pad(dv, (0, 0, 0, L_all - Ld))
                d_mask = F.pad(d_mask, (0, L_all - Ld), value=False)
            rank, _ = rank_and_world()
            dv = all_gather_with_grad(dv)
            d_mask = all_gather_nograd(d_mask)
            d_qlen = all_gather_nograd(d_qlen)
            cols = rank * B * n + torch.arange(B, device=qv.device)[:, None] * n + torch.arange(n, device=qv.device)
        return self.student_kl(qv, q_mask, dv, d_mask, d_qlen, teacher, teacher_cols=cols)

    def student_kl(self, qv: Tensor, q_mask: Tensor, dv: Tensor, d_mask: Tensor, d_qlen: Optional[Tensor],
                   teacher: Tensor, teacher_cols: Optional[Tensor] = None) -> Tensor:
        """Batch-mean KL(teacher || log_softmax(scale * S)) on given vectors (no communication).

        Args:
            qv [B, Lq, d], q_mask [B, Lq]; dv [Nd, Ld, d], d_mask [Nd, Ld]; teacher [B, n] over each query's own
            documents, at ``teacher_cols`` [B, n] (default a*n .. a*n+n-1); d_qlen int [Nd]: each document's pair
            offset (its own query's length; None: the scoring query's, this project's former choice).
        With in_batch_negatives off, each query scores only its own n documents (d must then be [B*n, ...])."""
        B, n = teacher.shape
        scale = self.student_scale()
        be = self.config.kernel_backend
        if not self.config.in_batch_negatives:
            Ld = dv.shape[1]
            pos_bias = self.retrieval_pos_bias(qv.shape[1] + Ld, qv.device)
            s = rk.maxsim_grouped(qv, dv.reshape(B, n, Ld, -1), q_mask, d_mask.reshape(B, n, Ld), pos_bias=pos_bias,
                                  reduce="mean", backend=be)
            student = torch.where(torch.isneginf(s), s, scale * s.masked_fill(torch.isneginf(s), 0.0))
            return rk.distill_kl(student, teacher, reduction="batchmean", backend=be)
        if d_qlen is None:
            # One maxsim call with r = n_a + j - i, a = the scoring query: the fused loss op does it all.
            pos_bias = self.retrieval_pos_bias(qv.shape[1] + dv.shape[1], qv.device)
            return rk.retrieval_distill_loss(qv, dv, teacher, q_mask=q_mask, d_mask=d_mask, pos_bias=pos_bias,
                                             scale=scale, reduce="mean", teacher_cols=teacher_cols, backend=be)
        s = self.student_scores(qv, q_mask, dv, d_mask, d_qlen)
        if teacher_cols is None:
            teacher_cols = torch.arange(B, device=qv.device)[:, None] * n + torch.arange(n, device=qv.device)
        empty = torch.isneginf(s)
        student = torch.where(empty, s, scale * s.masked_fill(empty, 0.0))
        return rk.distill_kl(student, teacher_probs=teacher, teacher_cols=teacher_cols, reduction="batchmean",
                             backend=be)

    def student_scores(self, qv: Tensor, q_mask: Tensor, dv: Tensor, d_mask: Tensor, d_qlen: Tensor) -> Tensor:
        """Training MaxSim of every query against every document, each document at its own pair's offset:

            S[a, b] = mean_{i < n_a} max_j ( q_a,i . k_b,j + bias(d_qlen[b] + j - i) )

        qv [B, Lq, d] (q_mask a prefix mask, as the collator makes it), dv [Nd, Ld, d], d_qlen int [Nd] -> [B, Nd].

        The kernels apply bias(n_a + j' - i') with the scoring query's n_a. With every query left-padded by
        P_a = n_a - n_min masked slots (i' = i + P_a) and every document left-padded by Q = n_max - n_min (j' = j + Q),
        they see r = n_max + j - i for every query, in [1, n_max + Ld - 1]; a bias table shifted by d_qlen[b] - n_max
        then gives bias(d_qlen[b] + j - i), distances below 0 (key before query) included. One table per distinct
        d_qlen: documents are grouped by it (a few groups per batch; the same total work as one call)."""
        B, Lq, _ = qv.shape
        Nd, Ld = dv.shape[:2]
        be = self.config.kernel_backend
        d_qlen = d_qlen.to(device=qv.device, dtype=torch.long)
        nq = q_mask.sum(1)
        if B == 0 or Nd == 0:
            return qv.new_zeros((B, Nd), dtype=torch.promote_types(qv.dtype, torch.float32))
        lens = torch.unique(d_qlen)
        if lens.numel() == 1 and bool((nq == lens[0]).all()):  # every pair offset is the scoring query's own length
            return rk.maxsim(qv, dv, q_mask, d_mask, pos_bias=self.retrieval_pos_bias(Lq + Ld, qv.device),
                             reduce="mean", backend=be)
        n_min, n_max = int(nq.min()), int(nq.max())
        P = nq - n_min  # [B] left padding of each query
        Pm, Q = int(P.max()), n_max - n_min
        # Scatter query a's tokens to columns P_a .. P_a + Lq - 1 of a [B, Pm + Lq] layout (a gather keeps autograd).
        cols = torch.arange(Pm + Lq, device=qv.device)[None, :] - P[:, None]  # source token of each new column
        ok = (cols >= 0) & (cols < Lq)
        src = cols.clamp(0, Lq - 1)
        q_pad = torch.gather(qv, 1, src[..., None].expand(B, Pm + Lq, qv.shape[2])) * ok[..., None].to(qv.dtype)
        qm_pad = torch.gather(q_mask, 1, src) & ok
        d_pad = F.pad(dv, (0, 0, Q, 0))
        dm_pad = F.pad(d_mask, (Q, 0), value=False)
        R = n_max + Ld
        out = []
        order = []
        for m in lens.tolist():
            idx = torch.nonzero(d_qlen == m).flatten()
            pb = self.retrieval_pos_bias(R, qv.device, start=m - n_max)
            out.append(rk.maxsim(q_pad, d_pad.index_select(0, idx), qm_pad, dm_pad.index_select(0, idx), pos_bias=pb,
                                 reduce="mean", backend=be))
            order.append(idx)
        s = torch.cat(out, 1)
        inv = torch.empty_like(d_qlen)
        inv[torch.cat(order)] = torch.arange(Nd, device=qv.device)
        return s.index_select(1, inv)

    # ---- inference ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_answers(self, q_ids: Tensor, q_mask: Tensor, d_ids: Tensor, d_mask: Tensor,
                         max_new_tokens: int = 16, use_cache: bool = True) -> Tensor:
        """Greedy decoding over the fused pairs -> token ids [B, <= max_new_tokens] (pad after EOS).

        With ``use_cache`` (default) the decoder runs on the newest token only: T5's cross-attention K/V over the
        n*(Lq+Ld) encoder tokens are computed once (step 0) and its self-attention K/V are cached (transformers'
        EncoderDecoderCache), so a step costs O(n*(Lq+Ld)) instead of recomputing every K/V. ``use_cache=False``
        recomputes the whole prefix each step (the reference the cached path is tested against)."""
        B, n, Ld = d_ids.shape
        hq = self.bi_encode(q_ids, q_mask)
        hd = self.bi_encode(d_ids.reshape(B * n, Ld), d_mask.reshape(B * n, Ld))
        enc, enc_mask, _ = self.read(hq, q_mask, hd, d_mask.reshape(B * n, Ld))
        tc = self.t5.config
        start = tc.decoder_start_token_id if tc.decoder_start_token_id is not None else tc.pad_token_id
        cur = torch.full((B, 1), start, dtype=torch.long, device=q_ids.device)
        done = torch.zeros(B, dtype=torch.bool, device=q_ids.device)
        am = enc_mask.long()
        past = None
        # transformers >= 5.2x names the cache argument "cache" (the old "past_key_values" warns).
        cache_kw = "cache" if "cache" in inspect.signature(self.t5.forward).parameters else "past_key_values"
        for _ in range(max_new_tokens):
            if use_cache:
                out = self.t5(encoder_outputs=(enc,), attention_mask=am, decoder_input_ids=cur[:, -1:],
                              use_cache=True, return_dict=True, **{cache_kw: past})
                past = out.past_key_values
            else:
                out = self.decode(enc, enc_mask, decoder_input_ids=cur)
            nxt = out.logits[:, -1].argmax(-1).masked_fill(done, tc.pad_token_id)
            cur = torch.cat([cur, nxt[:, None]], 1)
            done |= nxt == tc.eos_token_id
            if bool(done.all()):
                break
        return cur[:, 1:]


def apply_reatt_kernels(model: ReAttModel, backend: str = "auto"):
    """Switch a model to the fused ops (Liger-style patch). Returns a function that reverts to the previous state."""
    prev = (model.config.use_fused_kernels, model.config.backend)
    model.config.use_fused_kernels, model.config.backend = True, backend

    def revert():
        model.config.use_fused_kernels, model.config.backend = prev

    return revert
