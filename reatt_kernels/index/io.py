"""Durable on-disk format of a :class:`~reatt_kernels.index.TokenIndex`.

Layout of an index directory::

    <dir>/CURRENT            one line: the name of the live generation (replaced atomically by os.replace)
    <dir>/g<ns>/manifest.json   format name and version, kind, dim, nbits, counts, and per array: file, dtype, shape,
                                byte size and sha256 of the whole .npy file
    <dir>/g<ns>/<name>.npy      one array each, loadable with np.load(mmap_mode=...)

``save`` writes a new generation into ``<dir>/.tmp-<uuid>``, fsyncs every file and the directory, renames it to
``g<ns>`` and only then swaps ``CURRENT``. A crash at any point leaves the previous generation live and loadable (a
stale ``.tmp-*`` is ignored and removed by the next save). ``load`` checks the format version, every file's size and
checksum, dtype and shape, and raises :class:`IndexCorruptedError` naming the file on any mismatch.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

import numpy as np

FORMAT = "reatt-token-index"
FORMAT_VERSION = 1

# Test hook: called with the array name after each array file is written (tests inject crashes here).
_AFTER_WRITE_HOOK: Optional[Callable[[str], None]] = None


class IndexCorruptedError(RuntimeError):
    """An index file is missing, truncated, has the wrong checksum, dtype, shape or format version."""


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def save_arrays(directory, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Write ``arrays`` + ``meta`` as a new generation of ``directory``, atomically. Returns the generation path."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    entries = {}
    for name, arr in arrays.items():
        path = tmp / f"{name}.npy"
        arr = np.ascontiguousarray(arr)
        with open(path, "wb") as f:
            np.save(f, arr, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        entries[name] = {"file": path.name, "dtype": arr.dtype.str, "shape": list(arr.shape),
                         "bytes": path.stat().st_size, "sha256": _sha256(path)}
        if _AFTER_WRITE_HOOK is not None:
            _AFTER_WRITE_HOOK(name)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "arrays": entries}
    with open(tmp / "manifest.json", "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    _fsync_path(tmp)
    gen = root / f"g{time.time_ns()}"
    os.rename(tmp, gen)
    _fsync_path(root)
    cur_tmp = root / f".CURRENT-{uuid.uuid4().hex}"
    with open(cur_tmp, "w") as f:
        f.write(gen.name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(cur_tmp, root / "CURRENT")  # the commit point
    _fsync_path(root)
    for old in root.iterdir():  # best effort: older generations and stale temp dirs
        if old != gen and old.is_dir() and (re.fullmatch(r"g\d+", old.name) or old.name.startswith(".tmp-")):
            shutil.rmtree(old, ignore_errors=True)
    return gen


def load_arrays(directory, mmap: bool = True, verify: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """Read the live generation: (arrays, manifest). Arrays are copy-on-write memory maps when ``mmap``."""
    root = Path(directory)
    cur = root / "CURRENT"
    if not cur.is_file():
        raise FileNotFoundError(f"{root} is not a saved index (no {cur})")
    gen = root / cur.read_text().strip()
    mpath = gen / "manifest.json"
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as exc:
        raise IndexCorruptedError(f"{mpath}: unreadable manifest ({type(exc).__name__}: {exc})") from exc
    if manifest.get("format") != FORMAT:
        raise IndexCorruptedError(f"{mpath}: not a {FORMAT} manifest (format={manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexCorruptedError(f"{mpath}: format version {manifest.get('format_version')!r}, this code reads "
                                  f"{FORMAT_VERSION}")
    arrays = {}
    for name, e in manifest["arrays"].items():
        path = gen / e["file"]
        if not path.is_file():
            raise IndexCorruptedError(f"{path}: missing array file")
        size = path.stat().st_size
        if size != e["bytes"]:
            raise IndexCorruptedError(f"{path}: {size} bytes, manifest says {e['bytes']} (truncated or overwritten)")
        if verify and _sha256(path) != e["sha256"]:
            raise IndexCorruptedError(f"{path}: sha256 checksum mismatch (corrupted file)")
        try:
            arr = np.load(path, mmap_mode="c" if mmap else None, allow_pickle=False)
        except Exception as exc:
            raise IndexCorruptedError(f"{path}: cannot be read as .npy ({type(exc).__name__}: {exc})") from exc
        if arr.dtype.str != e["dtype"] or list(arr.shape) != e["shape"]:
            raise IndexCorruptedError(f"{path}: dtype/shape {arr.dtype.str} {list(arr.shape)} != manifest "
                                      f"{e['dtype']} {e['shape']}")
        arrays[name] = arr
    return arrays, manifest
