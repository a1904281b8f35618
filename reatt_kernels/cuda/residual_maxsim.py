"""The `cuda` backend of residual_maxsim: launcher for csrc/residual_maxsim/residual_maxsim_cuda.cu."""
from __future__ import annotations

import torch

from .. import _ext
from .._alloc import empty
from .._launcher import ResidualMaxsimLauncher

MAX_QUERIES = 65535  # grid y


# Both launchers take ``ext``: the loader of the compiled module (_ext.ext: reatt_kernels._C; _ext.emu from
# reatt_kernels/cuda_emu/residual_maxsim.py: the same kernel under CPU emulation), as in reatt_kernels/cuda/maxsim.py.
def _residual_maxsim_not_supported_reasons(tensors, ext=_ext.ext, **facts):
    if not _ext.has("residual_maxsim_fwd_cuda", ext):
        return ["reatt_kernels._C has no residual_maxsim_fwd_cuda (build with REATT_CUDA=1)" if ext is _ext.ext
                else "reatt_kernels._C_emu has no residual_maxsim_fwd_cuda"]
    q = tensors[0]
    if q is None:
        return []
    Bq, Lq, D = q.shape
    reasons = []
    if Bq > MAX_QUERIES:
        reasons.append(f"{Bq} queries > {MAX_QUERIES} per call (grid y)")
    # The whole query, a decoded token tile and the row maxima live in shared memory: the kernel's own formula against
    # the current device's opt-in limit (cudaDevAttrMaxSharedMemoryPerBlockOptin), so an A100 or an L4 is judged by
    # its own limit, not an H100's.
    try:
        need, limit = ext().residual_maxsim_smem_cuda(Lq, D)
    except RuntimeError as exc:  # no usable device: say so instead of failing the selection
        return reasons + [str(exc)]
    if need > limit:
        reasons.append(f"a query of {Lq} x {D} fp32 needs {need} bytes of shared memory (query tile, token tile, row "
                       f"maxima); this device allows {limit} per block")
    return reasons


def _residual_maxsim_fwd(q, q_mask, centroids, weights, codes, packed, d_offsets, cand, nbits, centroid_scores=None,
                         ext=_ext.ext):
    # centroid_scores (the CPU kernel's table) is not used: this kernel decodes centroid + residual in shared memory
    Bq, Lq, D = q.shape
    out = empty(cand.shape, torch.float32, q.device)
    P = _ext.ptr
    ext = ext()
    ext.residual_maxsim_fwd_cuda(_ext.fill(
        ext.ResidualMaxsimArgs(), q=P(q), q_mask=P(q_mask), centroids=P(centroids), weights=P(weights), codes=P(codes),
        packed=P(packed), offsets=P(d_offsets), cand=P(cand), out=P(out), Bq=Bq, Lq=Lq, D=D, C=centroids.shape[0],
        Nd=d_offsets.shape[0] - 1, Nc=cand.shape[1], nbits=nbits, stream=_ext.stream(q)))
    return out


class CudaResidualMaxsim(ResidualMaxsimLauncher):
    """The `cuda` backend of residual_maxsim: csrc/residual_maxsim/residual_maxsim_cuda.cu (``ext``: as in
    cuda/maxsim.py)."""

    def __init__(self, ext=_ext.ext):
        self.ext = ext

    def not_supported_reasons(self, tensors, **facts):
        return _residual_maxsim_not_supported_reasons(tensors, ext=self.ext, **facts)

    def forward(self, q, q_mask, centroids, weights, codes, packed, d_offsets, cand, nbits, centroid_scores=None):
        # centroid_scores (the cpu kernel's table) is not used here
        return _residual_maxsim_fwd(q, q_mask, centroids, weights, codes, packed, d_offsets, cand, nbits,
                                    ext=self.ext)


RESIDUAL_MAXSIM = CudaResidualMaxsim(_ext.ext)
