"""PCA of a corpus's token vectors (``--pca 128``: ColBERT-sized vectors). The projected vectors are L2-normalised
again, so MaxSim stays a cosine."""
from __future__ import annotations

import torch

PCA_SAMPLE_TOKENS = 262_144


def fit_pca(x: torch.Tensor, dim: int, sample: int = PCA_SAMPLE_TOKENS, seed: int = 0) -> dict:
    """PCA of the rows of ``x`` [T, H] (a seeded sample of at most ``sample`` rows), in float64 ->
    ``{"mean": [H], "components": [H, dim], "explained": fraction of variance kept}``."""
    if not 1 <= dim <= x.shape[1]:
        raise ValueError(f"pca dim must be in [1, {x.shape[1]}], got {dim}")
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(x.shape[0], generator=g)[:sample] if x.shape[0] > sample else torch.arange(x.shape[0])
    s = x[rows].double()
    mean = s.mean(0)
    cov = (s - mean).T @ (s - mean) / max(1, s.shape[0] - 1)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    top = evecs[:, -dim:].flip(1)
    return {"mean": mean.float(), "components": top.float(),
            "explained": float(evals[-dim:].sum() / evals.sum().clamp_min(1e-30))}


def apply_pca(x: torch.Tensor, pca: dict, chunk: int = 1 << 18) -> torch.Tensor:
    """[..., H] -> [..., dim] fp16: centred, projected, L2-normalised again (rows of zeros stay zero)."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.empty(flat.shape[0], pca["components"].shape[1], dtype=torch.float16)
    for s in range(0, flat.shape[0], chunk):
        y = (flat[s:s + chunk].float() - pca["mean"]) @ pca["components"]
        zero = flat[s:s + chunk].float().abs().sum(-1, keepdim=True) == 0  # padding rows of the query tensor
        out[s:s + chunk] = torch.nn.functional.normalize(y, dim=-1).masked_fill(zero, 0).to(torch.float16)
    return out.reshape(*x.shape[:-1], -1)
