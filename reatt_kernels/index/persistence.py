"""Saving and loading a :class:`~reatt_kernels.index.TokenIndex`: its arrays and manifest, written and read by
:mod:`.io` (the durable on-disk format: atomic generations, checksums)."""
from __future__ import annotations

import json

import torch

from .codec import ResidualCodec
from .io import IndexCorruptedError, load_arrays, save_arrays

SHARED_ARRAYS = ("offsets", "doc_ids", "deleted")  # every kind's; the payload's own are its ARRAYS


def save(ix, directory) -> None:
    """``TokenIndex.save``."""
    try:
        json.dumps(ix.metadata)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"TokenIndex.metadata must be JSON-serialisable to be saved: {exc}") from exc
    arrays = {n: t.detach().cpu().numpy() for n, t in ix._arrays().items()}
    meta = {"kind": ix.kind, "dim": ix.dim, "nbits": ix.nbits, "n_docs": int(ix.doc_ids.numel()),
            "n_live_docs": ix.n_docs, "n_tokens": ix.n_tokens, "next_id": ix.next_id,
            "n_centroids": int(ix.codec.centroids.shape[0]) if ix.codec is not None else 0,
            "calibration": ix.calibration, "metadata": ix.metadata}
    save_arrays(directory, arrays, meta)


def load(cls, directory, device="cpu", mmap: bool = True, verify: bool = True):
    """``TokenIndex.load`` (``cls``: the index class)."""
    arrays, m = load_arrays(directory, mmap=mmap, verify=verify)
    payload_cls = cls._payload_class(m["kind"])
    for name in SHARED_ARRAYS + payload_cls.ARRAYS:
        if name not in arrays:
            raise IndexCorruptedError(f"{directory}: manifest lists no array {name!r}")
    dev = torch.device(device)
    t = {n: torch.from_numpy(a).to(dev) for n, a in arrays.items()}
    codec = None
    if "centroids" in t:
        codec = ResidualCodec(t["centroids"], t["cutoffs"], t["weights"], m["nbits"])
    index = cls(m["kind"], m["dim"], device=dev, nbits=m["nbits"], codec=codec)
    index.offsets, index.doc_ids, index.deleted = t["offsets"], t["doc_ids"], t["deleted"]
    index.next_id = int(m["next_id"])
    index.calibration = dict(m.get("calibration") or {})
    index.metadata = dict(m.get("metadata") or {})
    index.payload.set_arrays(t)
    n = index.offsets.numel() - 1
    if (index.doc_ids.numel() != n or index.deleted.numel() != n or int(index.offsets[-1]) != m["n_tokens"]
            or n != m["n_docs"]):
        raise IndexCorruptedError(f"{directory}: array sizes disagree with the manifest counts")
    index.validate(where=str(directory))
    return index
