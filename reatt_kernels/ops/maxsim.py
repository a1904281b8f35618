"""MaxSim custom ops ``reatt::maxsim_fwd`` / ``reatt::maxsim_bwd``, their autograd, and the functional API.

Every backend registered below is a :class:`reatt_kernels._launcher.MaxsimLauncher`::

    forward(q, d, q_mask, d_mask, d_offsets, pos_bias, group_size, mean, screen=None) -> (scores, argmax)
    backward(grad, q, d, q_mask, d_offsets, argmax, n_bias, group_size, mean, deterministic) -> (dq, dd, dbias)
    not_supported_reasons(tensors, **facts) -> list[str]

with the canonical layout of :mod:`reatt_kernels.reference.maxsim` (``q_mask`` is always a bool tensor here; ``d`` is
padded [Nd, Ld, D] with optional ``d_mask``, or packed [T, D] with ``d_offsets``; grouped = padded + ``group_size``).
Scores are fp32 [Bq, C] and argmax int32 [Bq, C, Lq]; dq/dd come back in the inputs' dtypes and shapes, dbias fp32.

A corpus searched again and again can be prepared once (:func:`prepare_corpus` -> :class:`PreparedCorpus`), and
:func:`maxsim` / :func:`maxsim_packed` take it in place of the documents.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import triton as triton_launchers
from .._dispatch import get_impl, register_impl, select
from .._utils import device_guard
from ..cpu import maxsim as cpu_maxsim
from ..cuda import maxsim as cuda_maxsim
from ..cuda_emu import maxsim as cuda_emu_maxsim
from ..reference import maxsim as reference_maxsim

register_impl("maxsim", "torch", reference_maxsim.MAXSIM)
register_impl("maxsim", "cpu", cpu_maxsim.MAXSIM)
register_impl("maxsim", "triton", triton_launchers.MAXSIM)  # imports reatt_kernels/triton/maxsim.py on first call
register_impl("maxsim", "cuda", cuda_maxsim.MAXSIM)
register_impl("maxsim", "cuda_emu", cuda_emu_maxsim.MAXSIM)  # the CUDA kernels under CPU emulation (tests)

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _score_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _n_cols(q: Tensor, d: Tensor, d_offsets: Optional[Tensor], group_size: int):
    if group_size:
        return group_size
    return d_offsets.shape[0] - 1 if d_offsets is not None else d.shape[0]


@torch.library.custom_op("reatt::maxsim_fwd", mutates_args=())
def maxsim_fwd(
    q: Tensor,
    d: Tensor,
    q_mask: Tensor,
    d_mask: Optional[Tensor],
    d_offsets: Optional[Tensor],
    pos_bias: Optional[Tensor],
    group_size: int,
    mean: bool,
    deterministic: bool,
    backend: str,
    d_screen: Optional[Tensor] = None,
    d_norm: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Scores fp32 [Bq, C] and argmax int32 [Bq, C, Lq] (C = Nd, or group_size when grouped). ``d_screen`` /
    ``d_norm``: the screen of a prepared packed corpus (:func:`prepare_corpus`), or None."""
    Bq, Lq = q.shape[0], q.shape[1]
    C = _n_cols(q, d, d_offsets, group_size)
    if Bq == 0 or C == 0 or Lq == 0:
        # Nothing to launch: a query with no tokens scores 0 against everything.
        return (torch.zeros((Bq, C), dtype=_score_dtype(q), device=q.device),
                torch.full((Bq, C, Lq), -1, dtype=torch.int32, device=q.device))
    screen = (d_screen, d_norm) if d_screen is not None else None
    with device_guard(q):
        impl = get_impl("maxsim", backend)
        if screen is None:
            scores, argmax = impl.forward(q, d, q_mask, d_mask, d_offsets, pos_bias, group_size, mean)
        else:
            scores, argmax = impl.forward(q, d, q_mask, d_mask, d_offsets, pos_bias, group_size, mean, screen=screen)
    return scores, argmax


@maxsim_fwd.register_fake
def _maxsim_fwd_fake(q, d, q_mask, d_mask, d_offsets, pos_bias, group_size, mean, deterministic, backend,
                     d_screen=None, d_norm=None):
    Bq, Lq = q.shape[0], q.shape[1]
    C = _n_cols(q, d, d_offsets, group_size)
    return q.new_empty((Bq, C), dtype=_score_dtype(q)), q.new_empty((Bq, C, Lq), dtype=torch.int32)


@torch.library.custom_op("reatt::maxsim_bwd", mutates_args=())
def maxsim_bwd(
    grad: Tensor,
    q: Tensor,
    d: Tensor,
    q_mask: Tensor,
    d_offsets: Optional[Tensor],
    argmax: Tensor,
    n_bias: int,
    group_size: int,
    mean: bool,
    deterministic: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq (like q), dd (like d), dbias [n_bias] (fp32, fp64 for fp64 inputs), all contiguous."""
    if grad.numel() == 0 or q.shape[1] == 0:
        return (torch.zeros(q.shape, dtype=q.dtype, device=q.device), torch.zeros(d.shape, dtype=d.dtype, device=d.device),
                torch.zeros((n_bias,), dtype=_score_dtype(q), device=q.device))
    with device_guard(q):
        dq, dd, db = get_impl("maxsim", backend).backward(
            grad, q, d, q_mask, d_offsets, argmax, n_bias, group_size, mean, deterministic
        )
    return dq.contiguous(), dd.contiguous(), db.contiguous()


@maxsim_bwd.register_fake
def _maxsim_bwd_fake(grad, q, d, q_mask, d_offsets, argmax, n_bias, group_size, mean, deterministic, backend):
    return q.new_empty(q.shape), d.new_empty(d.shape), q.new_empty((n_bias,), dtype=_score_dtype(q))


def _setup_context(ctx, inputs, output):
    q, d, q_mask, d_mask, d_offsets, pos_bias, group_size, mean, deterministic, backend = inputs[:10]
    _, argmax = output
    ctx.save_for_backward(q, d, q_mask, d_offsets, argmax)
    ctx.n_bias = pos_bias.shape[0] if pos_bias is not None else 0
    ctx.bias_dtype = pos_bias.dtype if pos_bias is not None else None
    ctx.group_size, ctx.mean, ctx.deterministic, ctx.backend = group_size, mean, deterministic, backend
    ctx.mark_non_differentiable(argmax)


def _backward(ctx, g_scores, g_argmax):
    q, d, q_mask, d_offsets, argmax = ctx.saved_tensors
    g = g_scores.to(_score_dtype(q))
    dq, dd, db = torch.ops.reatt.maxsim_bwd(
        g, q, d, q_mask, d_offsets, argmax, ctx.n_bias, ctx.group_size, ctx.mean, ctx.deterministic, ctx.backend
    )
    dbias = db.to(ctx.bias_dtype) if ctx.n_bias else None
    return (dq if ctx.needs_input_grad[0] else None, dd if ctx.needs_input_grad[1] else None,
            None, None, None, dbias, None, None, None, None, None, None)


maxsim_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---- validation --------------------------------------------------------------------------------------------------------
def _check_tensor(name: str, t, ndim: int, shape_desc: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape_desc}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {shape_desc}, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 (float64: torch backend only), got {t.dtype}")


def _check_mask(name: str, m, shape: tuple, ref: Tensor) -> None:
    if m is None:
        return
    if not isinstance(m, Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor of shape {shape}, got {type(m).__name__}")
    if m.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = real token), got {m.dtype}")
    if tuple(m.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(m.shape)}")
    if m.device != ref.device:
        raise ValueError(f"{name} is on {m.device} but q is on {ref.device}")


def _check_common(q, d, pos_bias, reduce, d_name="d") -> None:
    if q.dtype != d.dtype:
        raise TypeError(f"q and {d_name} must have the same dtype, got {q.dtype} and {d.dtype}")
    if q.device != d.device:
        raise ValueError(f"q is on {q.device} but {d_name} is on {d.device}")
    if q.shape[-1] != d.shape[-1]:
        raise ValueError(f"q and {d_name} must have the same dim (last axis), got {q.shape[-1]} and {d.shape[-1]}")
    if q.shape[-1] == 0:
        raise ValueError("q must have dim >= 1")
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    if pos_bias is not None:
        if not isinstance(pos_bias, Tensor):
            raise TypeError(f"pos_bias must be a float torch.Tensor [R], got {type(pos_bias).__name__}")
        if pos_bias.dim() != 1 or pos_bias.shape[0] == 0:
            raise ValueError(f"pos_bias must be 1-D [R] with R >= 1, got shape {tuple(pos_bias.shape)}")
        if not pos_bias.is_floating_point():
            raise TypeError(f"pos_bias must be a float tensor, got {pos_bias.dtype}")
        if pos_bias.device != q.device:
            raise ValueError(f"pos_bias is on {pos_bias.device} but q is on {q.device}")


def check_offsets(d_offsets, n_tokens: int, ref: Tensor, name: str = "d_offsets") -> None:
    """Offsets must be int64 [Nd + 1], start at 0, never decrease, and end at the token count."""
    if not isinstance(d_offsets, Tensor):
        raise TypeError(f"{name} must be an int64 torch.Tensor [Nd + 1], got {type(d_offsets).__name__}")
    if d_offsets.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {d_offsets.dtype}")
    if d_offsets.dim() != 1 or d_offsets.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D [Nd + 1] with at least one entry, got shape {tuple(d_offsets.shape)}")
    if d_offsets.device != ref.device:
        raise ValueError(f"{name} is on {d_offsets.device} but q is on {ref.device}")
    if torch.compiler.is_compiling():
        return  # data-dependent checks would break the graph; eager calls check them
    # One device sync for all three facts (this runs on every packed search call).
    decreasing = (d_offsets[1:] < d_offsets[:-1]).any().to(torch.int64)
    first, last, bad = torch.stack([d_offsets[0], d_offsets[-1], decreasing]).tolist()
    if first != 0:
        raise ValueError(f"{name} must start at 0, got {first}")
    if last != n_tokens:
        raise ValueError(f"{name} must end at the number of token rows ({n_tokens}), got {last}")
    if bad:
        raise ValueError(f"{name} must be non-decreasing (document b is rows offsets[b]:offsets[b+1])")


def _q_mask(q: Tensor, q_mask: Optional[Tensor]) -> Tensor:
    if q_mask is None:
        return torch.ones(q.shape[:2], dtype=torch.bool, device=q.device)
    return q_mask


# ---- a corpus prepared once ----------------------------------------------------------------------------------------------
class PreparedCorpus:
    """A packed corpus stored once for repeated search, in the layout the kernels read (:func:`prepare_corpus`).

    - ``tokens`` [T, dim] (fp32, fp16 or bf16; contiguous): the document rows, as given. Every backend reads them; the
      cpu kernel's bf16 screen reads them only to rescore its candidates (exactly, in fp32), about 1.3 dot products per
      (query token, document) on clustered data.
    - ``offsets`` int64 [Nd + 1], validated once here (never again per call).
    - ``screen`` bf16 [T, Dq] (Dq = dim rounded up to 32, zero past dim) and ``norm`` fp32 [Nd] (an upper bound of the
      largest row norm of each document), only with ``prepare_corpus(..., screen=True)``: what the cpu kernel's fp32
      filter otherwise computes from every document on every call (csrc/maxsim/maxsim_cpu_isa.h: filt_prepare). None
      by default, and where that kernel does not run: tokens in bf16 (read as they are), another device, or a CPU
      without AVX512_BF16.

    Frozen: search only. No gradient flows into it (queries still get theirs); rebuild it after the tokens change.
    """

    def __init__(self, tokens: Tensor, offsets: Tensor, screen: Optional[Tensor] = None,
                 norm: Optional[Tensor] = None):
        self.tokens, self.offsets, self.screen, self.norm = tokens, offsets, screen, norm

    @property
    def n_docs(self) -> int:
        return self.offsets.shape[0] - 1

    @property
    def dim(self) -> int:
        return self.tokens.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def nbytes(self) -> int:
        """Bytes held: the rows, the offsets and, where built, the screen (2 * Dq bytes a token) and the bounds."""
        return sum(t.numel() * t.element_size() for t in (self.tokens, self.offsets, self.screen, self.norm)
                   if t is not None)

    def __repr__(self) -> str:
        return (f"PreparedCorpus(docs={self.n_docs}, tokens={self.tokens.shape[0]}, dim={self.dim}, dtype={self.dtype}, "
                f"screen={'yes' if self.screen is not None else 'no'}, device={self.device})")


def prepare_corpus(d_tokens: Tensor, d_offsets: Optional[Tensor] = None, *, screen: bool = False) -> PreparedCorpus:
    """Store a corpus once for repeated :func:`maxsim` / :func:`maxsim_packed` calls (pass the result as ``d`` or
    ``d_tokens``): contiguous rows and offsets validated once, never again per call.

    ``screen=True`` also stores what the cpu kernel's bf16 screen computes from every document on every call (fp32 /
    fp16 tokens on a CPU with AVX512_BF16): bf16 rows and per-document norm bounds (+2 bytes per dimension per token).
    Off by default because, measured, it does not pay yet: the kernel then streams the bf16 rows but reads the rows it
    rescores from DRAM one document at a time, where the unprepared call has just streamed (and converted) them. On the
    dev VM (AMD EPYC Zen 5, 2 threads, 8000 docs x 128 tokens x 128 fp32, quiet; indicative): 1 query 18.3 ms
    unprepared, 18.0 prepared, 25.6 with the screen; 16 queries 219, 218, 244 ms (fp16 alike). It pays once the rows
    to rescore are prefetched a document ahead (issue 29, item 3: the batched exact fold); the layout, the kernel path
    and its tests are in place for that.

    Args:
        d_tokens: packed [T, dim] with ``d_offsets`` int64 [Nd + 1], or padded [Nd, Ld, dim] without a mask (every
            document Ld tokens long; offsets are made). fp32, fp16 or bf16; made contiguous.
        screen: build the cpu kernel's bf16 screen (above).
    Returns:
        :class:`PreparedCorpus`. Results are those of the unprepared call, bit for bit (the screen only decides which
        dot products the kernel computes exactly; tests/kernels/test_maxsim_prepared.py).
    """
    if isinstance(d_tokens, Tensor) and d_tokens.dim() == 3 and d_offsets is None:
        Nd, Ld, D = d_tokens.shape
        d_offsets = torch.arange(Nd + 1, dtype=torch.int64, device=d_tokens.device) * Ld
        d_tokens = d_tokens.reshape(Nd * Ld, D)
    _check_tensor("d_tokens", d_tokens, 2, "[T, dim] (or padded [Nd, Ld, dim] without d_offsets)")
    if d_tokens.dtype == torch.float64:
        raise TypeError("prepare_corpus: float64 corpora are for the torch reference only")
    if d_tokens.shape[1] == 0:
        raise ValueError("d_tokens must have dim >= 1")
    if d_offsets is None:
        raise ValueError("prepare_corpus: packed d_tokens [T, dim] need d_offsets int64 [Nd + 1]")
    check_offsets(d_offsets, d_tokens.shape[0], d_tokens)
    tokens, offsets = d_tokens.detach().contiguous(), d_offsets.contiguous()
    rows16 = norm = None
    if screen and tokens.device.type == "cpu" and cpu_maxsim.screen_useful(tokens.dtype):
        rows16, norm = cpu_maxsim._maxsim_prepare(tokens, offsets)
    return PreparedCorpus(tokens, offsets, rows16, norm)


# ---- functional API ----------------------------------------------------------------------------------------------------
def _prepared_maxsim(q, corpus: PreparedCorpus, q_mask, pos_bias, reduce, backend, return_argmax, deterministic):
    """maxsim_packed against a prepared corpus: no offsets check (done once), the screen passed to the op."""
    _check_tensor("q", q, 3, "[Bq, Lq, dim]")
    _check_common(q, corpus.tokens, pos_bias, reduce, "the prepared corpus")
    _check_mask("q_mask", q_mask, q.shape[:2], q)
    qm = _q_mask(q, q_mask)
    name = select("maxsim", [q, corpus.tokens, qm, corpus.offsets, pos_bias], backend, dim=q.shape[-1],
                  layout="packed", n_q=q.shape[0])
    scores, argmax = torch.ops.reatt.maxsim_fwd(q, corpus.tokens, qm, None, corpus.offsets, pos_bias, 0,
                                               reduce == "mean", deterministic, name, corpus.screen, corpus.norm)
    return (scores, argmax) if return_argmax else scores


def maxsim(q, d, q_mask=None, d_mask=None, *, pos_bias=None, reduce="sum", backend="auto", return_argmax=False,
           deterministic=False):
    """All-pairs MaxSim: every query against every padded document.

    Args:
        q: [Bq, Lq, dim] float32/float16/bfloat16 (any strides).
        d: [Nd, Ld, dim], same dtype and device as q.
        d: or a :class:`PreparedCorpus` (:func:`prepare_corpus`; then no d_mask): scores [Bq, its Nd].
        q_mask: bool [Bq, Lq] or None (True = real token). d_mask: bool [Nd, Ld] or None.
        pos_bias: float [R] or None: ReAtt's relative-position bias per distance r = n_a + j - i (clamped to [0, R-1]).
        reduce: "sum" (search) or "mean" (over valid query tokens; ReAtt training).
        backend: "auto", "torch", "cpu", "triton", "cuda", or "cuda_emu" (the CUDA kernels on CPU tensors under
            emulation: a test tool) (``REATT_BACKEND`` overrides "auto").
        return_argmax: also return the winning document token per (query, doc, query token), int32 [Bq, Nd, Lq]
            (-1 for a masked query token or an empty document).
        deterministic: make the backward's dd accumulation bitwise reproducible.
    Returns:
        float32 scores [Bq, Nd] (and the argmax). An empty document scores -inf; a query with no valid token scores 0.
        Differentiable w.r.t. q, d and pos_bias (through the argmax; no token-pair scores are stored).
    """
    if isinstance(d, PreparedCorpus):
        if d_mask is not None:
            raise ValueError("a PreparedCorpus takes no d_mask (its documents are packed rows)")
        return _prepared_maxsim(q, d, q_mask, pos_bias, reduce, backend, return_argmax, deterministic)
    _check_tensor("q", q, 3, "[Bq, Lq, dim]")
    _check_tensor("d", d, 3, "[Nd, Ld, dim]")
    _check_common(q, d, pos_bias, reduce)
    _check_mask("q_mask", q_mask, q.shape[:2], q)
    _check_mask("d_mask", d_mask, d.shape[:2], q)
    qm = _q_mask(q, q_mask)
    name = select("maxsim", [q, d, qm, d_mask, pos_bias], backend, dim=q.shape[-1], layout="padded", n_q=q.shape[0])
    scores, argmax = torch.ops.reatt.maxsim_fwd(q, d, qm, d_mask, None, pos_bias, 0, reduce == "mean", deterministic, name)
    return (scores, argmax) if return_argmax else scores


def maxsim_packed(q, d_tokens, d_offsets=None, q_mask=None, *, pos_bias=None, reduce="sum", backend="auto",
                  return_argmax=False, deterministic=False):
    """All-pairs MaxSim against ragged documents stored back to back (the index layout; no work on padding).

    Args:
        q: [Bq, Lq, dim]. d_tokens: [T, dim]. d_offsets: int64 [Nd + 1]; document b is rows d_offsets[b]:d_offsets[b+1]
            (offsets start at 0, never decrease, end at T). Or ``d_tokens`` a :class:`PreparedCorpus` and
            ``d_offsets`` None. Other arguments as in :func:`maxsim`.
    Returns:
        float32 scores [Bq, Nd] (and int32 argmax [Bq, Nd, Lq], positions inside each document).
    """
    if isinstance(d_tokens, PreparedCorpus):
        if d_offsets is not None:
            raise ValueError("a PreparedCorpus carries its offsets: pass d_offsets=None")
        return _prepared_maxsim(q, d_tokens, q_mask, pos_bias, reduce, backend, return_argmax, deterministic)
    if d_offsets is None:
        raise ValueError("maxsim_packed needs d_offsets int64 [Nd + 1] (or a PreparedCorpus as d_tokens)")
    _check_tensor("q", q, 3, "[Bq, Lq, dim]")
    _check_tensor("d_tokens", d_tokens, 2, "[T, dim]")
    _check_common(q, d_tokens, pos_bias, reduce, "d_tokens")
    _check_mask("q_mask", q_mask, q.shape[:2], q)
    check_offsets(d_offsets, d_tokens.shape[0], q)
    qm = _q_mask(q, q_mask)
    name = select("maxsim", [q, d_tokens, qm, d_offsets, pos_bias], backend, dim=q.shape[-1], layout="packed",
                  n_q=q.shape[0])
    scores, argmax = torch.ops.reatt.maxsim_fwd(q, d_tokens, qm, None, d_offsets, pos_bias, 0, reduce == "mean",
                                               deterministic, name)
    return (scores, argmax) if return_argmax else scores


def maxsim_grouped(q, d, q_mask=None, d_mask=None, *, pos_bias=None, reduce="sum", backend="auto",
                   return_argmax=False, deterministic=False):
    """Grouped MaxSim for training: each query scores only its own n documents.

    Args:
        q: [B, Lq, dim]. d: [B, n, Ld, dim]. q_mask: bool [B, Lq]. d_mask: bool [B, n, Ld]. Others as in :func:`maxsim`.
    Returns:
        float32 scores [B, n] (and int32 argmax [B, n, Lq]).
    """
    _check_tensor("q", q, 3, "[B, Lq, dim]")
    _check_tensor("d", d, 4, "[B, n, Ld, dim]")
    _check_common(q, d, pos_bias, reduce)
    if d.shape[0] != q.shape[0]:
        raise ValueError(f"d must be [B, n, Ld, dim] with B = q.shape[0] = {q.shape[0]}, got {tuple(d.shape)}")
    _check_mask("q_mask", q_mask, q.shape[:2], q)
    _check_mask("d_mask", d_mask, d.shape[:3], q)
    B, n, Ld, D = d.shape
    qm = _q_mask(q, q_mask)
    d_flat = d.reshape(B * n, Ld, D)
    dm_flat = d_mask.reshape(B * n, Ld) if d_mask is not None else None
    name = select("maxsim", [q, d_flat, qm, dm_flat, pos_bias], backend, dim=D, layout="grouped", n_q=B)
    if n == 0:
        scores = torch.zeros((B, 0), dtype=_score_dtype(q), device=q.device)
        argmax = torch.zeros((B, 0, q.shape[1]), dtype=torch.int32, device=q.device)
    else:
        scores, argmax = torch.ops.reatt.maxsim_fwd(q, d_flat, qm, dm_flat, None, pos_bias, n, reduce == "mean",
                                                   deterministic, name)
    return (scores, argmax) if return_argmax else scores
