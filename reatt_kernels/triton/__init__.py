"""Backend ``triton``: the launcher objects of the Triton kernels.

The kernel modules (maxsim.py, distill.py, residual_maxsim.py) import triton at module level, so the launchers here
import them inside their methods: ``import reatt_kernels`` (which imports these objects through ops/<op>.py) never
imports triton. A missing or broken triton shows up as the backend's reason (reatt_kernels._dispatch), not as an
import error of the package.
"""
from __future__ import annotations

from .._launcher import DistillKlLauncher, MaxsimLauncher, ReaderTeacherLauncher, ResidualMaxsimLauncher


class TritonMaxsim(MaxsimLauncher):
    """The `triton` backend of maxsim: reatt_kernels/triton/maxsim.py."""

    def not_supported_reasons(self, tensors, **facts):
        from .maxsim import _maxsim_not_supported_reasons

        return _maxsim_not_supported_reasons(tensors, **facts)

    def forward(self, q, d, q_mask, d_mask, d_offsets, pos_bias, group_size, mean, screen=None):
        from .maxsim import _maxsim_fwd

        return _maxsim_fwd(q, d, q_mask, d_mask, d_offsets, pos_bias, group_size, mean)

    def backward(self, grad, q, d, q_mask, d_offsets, argmax, n_bias, group_size, mean, deterministic):
        from .maxsim import _maxsim_bwd

        return _maxsim_bwd(grad, q, d, q_mask, d_offsets, argmax, n_bias, group_size, mean, deterministic)


class TritonReaderTeacher(ReaderTeacherLauncher):
    """The `triton` backend of reader_teacher: reatt_kernels/triton/distill.py."""

    def forward(self, attn, doc_index, attn_mask, n_docs, is_logits):
        from .distill import _reader_teacher_fwd

        return _reader_teacher_fwd(attn, doc_index, attn_mask, n_docs, is_logits)


class TritonDistillKl(DistillKlLauncher):
    """The `triton` backend of distill_kl: reatt_kernels/triton/distill.py."""

    def forward(self, student, teacher, teacher_probs, teacher_cols, normalize, grad_scale, compute_grad):
        from .distill import _distill_kl_fwd

        return _distill_kl_fwd(student, teacher, teacher_probs, teacher_cols, normalize, grad_scale, compute_grad)


class TritonResidualMaxsim(ResidualMaxsimLauncher):
    """The `triton` backend of residual_maxsim: reatt_kernels/triton/residual_maxsim.py."""

    def not_supported_reasons(self, tensors, **facts):
        from .residual_maxsim import _residual_maxsim_not_supported_reasons

        return _residual_maxsim_not_supported_reasons(tensors, **facts)

    def forward(self, q, q_mask, centroids, weights, codes, packed, d_offsets, cand, nbits, centroid_scores=None):
        # centroid_scores (the cpu kernel's table) is not used here
        from .residual_maxsim import _residual_maxsim_fwd

        return _residual_maxsim_fwd(q, q_mask, centroids, weights, codes, packed, d_offsets, cand, nbits)


MAXSIM = TritonMaxsim()
READER_TEACHER = TritonReaderTeacher()
DISTILL_KL = TritonDistillKl()
RESIDUAL_MAXSIM = TritonResidualMaxsim()
