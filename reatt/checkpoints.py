"""Load the author's ReAtt checkpoints into :class:`reatt.model.ReAttModel`.

Two layouts exist (read from the author's code; the weights themselves are not obtainable here):

1. **Training checkpoints of the FiD fork** (``FiDT5.save_pretrained``: ``checkpoint/<step>/``, what ``init_from``
   passes between rounds). ``config.json`` is a T5 config plus the fork's fields; the ones that matter here:
   ``n_layer_two_tower`` (the retrieval layer B: blocks < B are the bi-encoder), ``layer_for_retrieval`` ("first":
   block B), ``keep_ctx_in_decoder_head_tau`` (tau of the head weights, 0.001), ``head_weights_norm_func``
   ("softmax"), ``encoder_decoder_kl_method`` ("merge" -> head weights [H]; "separate"/"cross" -> [1, H]),
   ``keep_ctx_in_decoder_with_head`` (None: learned head weights; an index: fixed one-hot weights),
   ``attention_mask`` ("separate"), ``retrieval_aggregation_method`` ("all-avg-max"). The retrieval HEAD is not
   recorded: the fork derives it from the shape (``get_single_head_idx``: 12 heads at layer 6 -> head 3; 16 heads
   at layer 6 / 12 / 18 -> head 5 / 6 / 11). The state dict holds the wrappers' names:

   ====================================================  =============================================
   FiD fork                                              ReAttModel
   ====================================================  =============================================
   ``shared.weight``, ``lm_head.weight``                 ``t5.shared.weight``, ``t5.lm_head.weight``
   ``encoder.encoder.block.{i}.module.layer.*``          ``t5.encoder.block.{i}.layer.*``
   ``encoder.encoder.final_layer_norm.weight``           ``t5.encoder.final_layer_norm.weight``
   ``decoder.decoder.block.{i}.layer.*`` (``decoder.``   ``t5.decoder.block.{i}.layer.*``
   ``block`` when no KL was trained: no decoder wrapper)
   ``decoder.head_weights`` [H] or [1, H]                ``head_logits`` [H] (w)
   ``decoder.combine_weight`` (0-d)                      ``log_scale`` (c): the student is exp(c) * ...
   ====================================================  =============================================

2. **Released models** (``neulab/reatt-large-nq``, ``-nq-fiqa``, ``-nq-bioasq``: the ReAtt repository's
   ``ReAttForConditionalGeneration``). Plain T5 parameter names (``shared``, ``encoder.block.{i}.layer.*``,
   ``decoder.*``, ``lm_head``); ``config.json`` adds ``retrieval_layer``, ``retrieval_head`` and
   ``distillation_tau``. No head weights and no combine weight are saved (inference scores by the raw MaxSim): they
   load as w = 0, c = 0, the original's start values, so a KL round continued from such a model re-learns them.

Either layout loads with :func:`load_original`; ``python -m reatt.checkpoints SRC OUT`` converts one into a
``save_pretrained`` directory that ``reatt-train --model``, ``reatt-index`` and ``reatt-eval`` read.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Optional

import torch

from .config import ReAttConfig

# The fork's get_single_head_idx: (heads, retrieval layer) -> head.
ORIGINAL_HEADS = {(12, 6): 3, (16, 6): 5, (16, 12): 6, (16, 18): 11}
_T5_EXTRA = ("retrieval_corpus", "retrieval_layer", "retrieval_head", "distillation_tau")


def _read_state_dict(path: str) -> dict:
    for name in ("model.safetensors", "pytorch_model.bin"):
        f = os.path.join(path, name)
        if os.path.exists(f):
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(f)
            return torch.load(f, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin")


def _fork_key(k: str) -> Optional[str]:
    """A FiD-fork state-dict key -> the T5 key (None for the student's own parameters)."""
    if k in ("decoder.head_weights", "decoder.combine_weight"):
        return None
    k = re.sub(r"^encoder\.encoder\.", "encoder.", k)
    k = re.sub(r"^decoder\.decoder\.", "decoder.", k)
    return re.sub(r"^(encoder\.block\.\d+)\.module\.", r"\1.", k)


def load_original(path: str, tokenizer_dir: Optional[str] = None, retrieval_head: Optional[int] = None):
    """A FiD-fork training checkpoint or a released ReAtt model (directory with config.json and weights) ->
    ReAttModel (eval mode). ``retrieval_head`` overrides the fork's derived head (needed for other shapes)."""
    from transformers import T5Config, T5ForConditionalGeneration

    from .model import ReAttModel

    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    sd = _read_state_dict(path)
    if "n_layer_two_tower" in cfg:  # the FiD fork
        for field, want in (("layer_for_retrieval", "first"), ("attention_mask", "separate"),
                            ("retrieval_aggregation_method", "all-avg-max"), ("head_weights_norm_func", "softmax")):
            if cfg.get(field, want) != want:
                raise ValueError(f"{path}: {field}={cfg[field]!r}; ReAttModel implements the paper's {want!r} only")
        B, H = int(cfg["n_layer_two_tower"]), int(cfg["num_heads"])
        head = retrieval_head if retrieval_head is not None else ORIGINAL_HEADS.get((H, B))
        if head is None:
            raise ValueError(f"{path}: the fork records no retrieval head and has none for {H} heads at layer {B} "
                             f"(known: {ORIGINAL_HEADS}); pass retrieval_head")
        rc = ReAttConfig(retrieval_layer=B, retrieval_head=head,
                         head_temperature=float(cfg.get("keep_ctx_in_decoder_head_tau", 1.0)))
        t5_sd = {}
        for k, v in sd.items():
            nk = _fork_key(k)
            if nk is not None:
                t5_sd[nk] = v
        w = sd.get("decoder.head_weights")
        if w is not None and w.dim() == 2:
            if w.shape[0] != 1:
                raise ValueError(f"{path}: decoder.head_weights {tuple(w.shape)} combines {w.shape[0]} layers; "
                                 "ReAttModel has one retrieval layer")
            w = w[0]
        c = sd.get("decoder.combine_weight")
    elif "retrieval_layer" in cfg and "retrieval_head" in cfg:  # a released model
        rc = ReAttConfig(retrieval_layer=int(cfg["retrieval_layer"]), retrieval_head=int(cfg["retrieval_head"]))
        t5_sd, w, c = dict(sd), None, None
    else:
        raise ValueError(f"{path}: neither a FiD-fork checkpoint (n_layer_two_tower) nor a released ReAtt model "
                         "(retrieval_layer, retrieval_head) in config.json")
    t5_cfg = T5Config(**{k: v for k, v in cfg.items() if k not in _T5_EXTRA and not k.startswith("_")})
    t5_cfg._attn_implementation = "eager"
    t5 = T5ForConditionalGeneration(t5_cfg)
    missing, unexpected = t5.load_state_dict(t5_sd, strict=False)
    tied = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    if t5_cfg.tie_word_embeddings:
        tied.add("lm_head.weight")
    missing = [k for k in missing if k not in tied]
    unexpected = [k for k in unexpected if not k.endswith("EncDecAttention.relative_attention_bias.weight")]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the T5 of its config: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    tok = None
    tdir = tokenizer_dir or path
    if any(os.path.exists(os.path.join(tdir, f)) for f in ("tokenizer.json", "spiece.model")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tdir, local_files_only=True)
    model = ReAttModel(t5, rc, tok)
    with torch.no_grad():
        if w is not None:
            if w.shape != model.head_logits.shape:
                raise ValueError(f"{path}: head weights {tuple(w.shape)}, expected [{model.head_logits.numel()}]")
            model.head_logits.copy_(w)
        if c is not None:
            model.log_scale.copy_(c.reshape(()))
    return model.eval()


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m reatt.checkpoints", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="the author's checkpoint directory (config.json + weights)")
    ap.add_argument("out", help="output directory (ReAttModel.save_pretrained)")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: SRC)")
    ap.add_argument("--retrieval-head", type=int, help="override the retrieval head derived for a fork checkpoint")
    a = ap.parse_args(argv)
    model = load_original(a.src, a.tokenizer, a.retrieval_head)
    model.save_pretrained(a.out)
    c = model.config
    print(f"{a.out}: retrieval layer {c.retrieval_layer}, head {c.retrieval_head}, tau {c.head_temperature}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
