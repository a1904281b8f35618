"""Plain-PyTorch references: the spec of every op (their docstrings define the semantics)."""
from .maxsim import maxsim_bwd_ref, maxsim_fwd_ref, maxsim_grouped_ref, maxsim_packed_ref, maxsim_ref

__all__ = ["maxsim_ref", "maxsim_packed_ref", "maxsim_grouped_ref", "maxsim_fwd_ref", "maxsim_bwd_ref"]
