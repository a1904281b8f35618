#!/usr/bin/env python
"""Mutation gate: inject small realistic bugs, one at a time, and check that the tests of their own backend catch them.

The mutants live next to this file, one module per op or area (``maxsim.py``, ``distill.py``, ``residual_maxsim.py``,
``index.py``, ...), each defining ``MUTANTS``: ``dict(name=, path=, old=, new=, tests=[pytest args], build=None | "cpu"
| "emu" | "emu-tsan")``. ``old`` must occur exactly once in ``path``. ``build="cpu"`` rebuilds ``reatt_kernels._C`` (CPU kernels
only) after patching; ``"emu"`` rebuilds the CUDA-emulation module ``reatt_kernels._C_emu`` (the same CMake project)
and is reported as "not built" only while the source tree has no ``_C_emu`` module at all (CMakeLists.txt does not
name it); otherwise a missing ``_C_emu`` fails the gate. ``"emu-tsan"`` runs the tests through
scripts/sanitize/tsan_emu.sh instead (a ThreadSanitizer build of ``_C_emu`` in its own folder: for races, which an
emulated run catches only by timing luck). Adding a kernel means adding its mutants to its op's file
(or a new ``<op>.py`` here: every ``*.py`` in this folder but this one is loaded).

The gate works on a temporary copy of the repository (git's tracked and unignored files) with its own CMake build:
1. build the copy once (REATT_CUDA=0) and run every distinct target test set on the UNMUTATED copy: they must pass,
   or a "caught" mutant would prove nothing;
2. per mutant: patch -> incremental rebuild when C++ changed -> the targeted tests (pytest -x, with a timeout) ->
   restore. Exit status 1 = caught; 0 = survived; a timeout counts as caught (the mutant hangs the kernel), and so do
   a ThreadSanitizer report (exit status 66) and a death by signal (the CUDA emulator aborts on undefined behaviour: a
   divergent barrier, a deadlock); any other pytest status (no tests collected, usage error) is an error of the gate;
3. print one line per mutant and a summary; exit non-zero if any mutant survived, the baseline failed or a mutant
   could not be applied.

A mutant whose code runs only on some CPUs declares the instruction-set level it needs, ``isa="avx2" | "avx512" |
"avx512_bf16"`` (the levels of csrc/cpu_isa.h; a file that holds only such code is listed in ``ISA_FILES`` and its
mutants must declare it). The gate asks the copy's own extension which level this CPU runs (``_C.cpu_isa_info()``,
so ``REATT_CPU_ISA_CAP`` counts) and reports a mutant above it as "not runnable on this CPU (needs ...)", never as
caught or survived: no test can execute its code here. A mutant the CPU can run is never skipped.

Usage: python scripts/mutation/gate.py [--ci] [--only NAME[,NAME]] [--list] [--keep]

``--ci`` (what CI runs, to stay within its time budget on 2 cores): the seven mutants of issue 13 (``issue13=True``),
those marked ``ci=True``, plus the first mutant listed for every other file (the first this CPU can run, where the
file has one), so every kernel file keeps at least one mutant on every commit. Without it the
gate runs every mutant (682 s on the quiet 2-core machine): run it before landing a change to a kernel or its tests.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TEST_TIMEOUT_S = int(os.environ.get("REATT_MUTANT_TIMEOUT", "300"))
ISA_LEVELS = ("scalar", "avx2", "avx512", "avx512_bf16")  # csrc/cpu_isa.h
# Files whose every line is compiled only for one level and up: their mutants must declare it.
ISA_FILES = {"csrc/maxsim/maxsim_cpu_avx512.h": "avx512"}


def load_mutants() -> list[dict]:
    """Every ``MUTANTS`` list of the modules in this folder (one per op or area), in file-name order."""
    out = []
    for f in sorted(HERE.glob("*.py")):
        if f.name in ("gate.py", "__init__.py"):
            continue
        spec = importlib.util.spec_from_file_location(f"reatt_mutants_{f.stem}", f)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        out += [dict(m, origin=f.name) for m in getattr(mod, "MUTANTS", [])]
    names = [m["name"] for m in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise SystemExit(f"duplicate mutant names: {sorted(dup)}")
    if sum(bool(m.get("issue13")) for m in out) != 7:
        raise SystemExit("the seven mutants of issue 13 (issue13=True) must all be listed")
    for m in out:
        if m.get("isa") is not None and m["isa"] not in ISA_LEVELS:
            raise SystemExit(f"{m['name']}: isa must be one of {ISA_LEVELS}, got {m['isa']!r}")
        need = ISA_FILES.get(m["path"])
        if need and ISA_LEVELS.index(m.get("isa") or "scalar") < ISA_LEVELS.index(need):
            raise SystemExit(f"{m['name']}: {m['path']} runs only on {need} CPUs and up: declare isa={need!r}")
    return out


def runs_here(m: dict, best: str) -> bool:
    """Whether a CPU whose best level is ``best`` executes the mutant's code."""
    return ISA_LEVELS.index(m.get("isa") or "scalar") <= ISA_LEVELS.index(best)


def ci_selection(mutants: list[dict], best: str = ISA_LEVELS[-1]) -> list[dict]:
    """The issue-13 seven and those marked ``ci=True``, plus, for every file none of them covers, its first mutant (in
    list order) that a CPU whose best level is ``best`` runs (its first mutant, if it has none)."""
    keep = [m for m in mutants if m.get("issue13") or m.get("ci")]
    covered = {m["path"] for m in keep}
    first = {}
    for m in mutants:
        if m["path"] not in covered:
            if m["path"] not in first or (not runs_here(first[m["path"]], best) and runs_here(m, best)):
                first[m["path"]] = m
    chosen = {id(m) for m in keep} | {id(m) for m in first.values()}
    return [m for m in mutants if id(m) in chosen]


def copy_isa(tree: Path) -> dict:
    """The copy's ``_C.cpu_isa_info()``: the level this CPU runs, as the kernels under test see it."""
    res = subprocess.run([sys.executable, "-c", "import json, reatt_kernels._C as c; print(json.dumps(c.cpu_isa_info()))"],
                         cwd=tree, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(tree)))
    if res.returncode != 0:
        raise RuntimeError(f"could not ask the copy's extension for the CPU's ISA level: {res.stderr.strip()[-500:]}")
    import json

    return json.loads(res.stdout.strip().splitlines()[-1])


def copy_tree(dst: Path) -> None:
    """git's tracked + untracked-unignored files (no build outputs, no venv)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for f in files:
        src = ROOT / f
        if not f or not src.is_file():
            continue  # deleted in the work tree, or a submodule
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst / f)


def build(tree: Path, log: Path) -> float:
    """(Re)build the copy's extension in place, CPU kernels only (incremental after the first call)."""
    # REATT_REQUIRE_EXT=1: a C++ mutant that does not compile must be an error, not a silent pure-Python fallback
    # that leaves the previous .so in place.
    # No link-time optimisation here: pybind11 adds -flto to release modules, and an LTO link re-optimises every object
    # of _C on each mutant's rebuild (about a minute on 2 cores); without it a mutant recompiles one file and relinks.
    # (Setting CMAKE_INTERPROCEDURAL_OPTIMIZATION at all makes pybind11 leave its own LTO flags out.)
    env = dict(os.environ, REATT_CUDA="0", REATT_REQUIRE_EXT="1", REATT_BUILD_DIR=str(tree / "build" / "mutants"),
               REATT_CMAKE_ARGS=(os.environ.get("REATT_CMAKE_ARGS", "") +
                                 " -DCMAKE_INTERPROCEDURAL_OPTIMIZATION=OFF").strip())
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--inplace"]
    t0 = time.time()
    with open(log, "a") as fh:
        res = None
        if shutil.which("flock"):
            # On a shared machine, take turns with scripts/build_ext.sh (same lock), but wait at most 60 s: this build
            # has its own folder, so the lock only spares CPU, and must not stall the gate behind a long CUDA build.
            res = subprocess.run(["flock", "-w", "60", "-E", "75", "/tmp/reatt-build.lock"] + cmd, cwd=tree, env=env,
                                 stdout=fh, stderr=subprocess.STDOUT)
        if res is None or res.returncode == 75:
            res = subprocess.run(cmd, cwd=tree, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        raise RuntimeError(f"build failed (see {log})")
    if not glob.glob(str(tree / "reatt_kernels" / "_C*.so")):
        raise RuntimeError(f"build produced no reatt_kernels/_C*.so (see {log})")
    return time.time() - t0


def build_tsan(tree: Path, log: Path) -> str:
    """(Re)build the copy's ThreadSanitizer _C_emu in build/emu-tsan (outside the test timeout); its path."""
    with open(log, "a") as fh:
        res = subprocess.run(["bash", "scripts/sanitize/emu_sanitized_build.sh", "thread", str(tree / "build" / "emu-tsan")],
                             cwd=tree, env=dict(os.environ, PY=sys.executable), stdout=subprocess.PIPE, stderr=fh,
                             text=True)
    if res.returncode != 0 or not res.stdout.strip():
        raise RuntimeError(f"ThreadSanitizer build failed (see {log})")
    return res.stdout.strip().splitlines()[-1]


def run_tests(tree: Path, args: list[str], log: Path, stop_first: bool = True, tsan: str = "") -> tuple[str, float]:
    """'pass', 'fail', 'tsan', 'crash:<signal>', 'timeout' or 'error:<code>' for pytest on the copy (under
    ThreadSanitizer, through the copy's scripts/sanitize/tsan_emu.sh, when ``tsan`` names the TSan _C_emu)."""
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1", PY=sys.executable)
    env.pop("REATT_ISA_REPORT", None)  # a mutated run must not enter CI's record of the ISA paths tested
    if tsan:
        env["REATT_EMU_TSAN_LIB"] = tsan
        cmd = ["bash", "scripts/sanitize/tsan_emu.sh", *(["-x"] if stop_first else []), *args]
    else:
        cmd = [sys.executable, "-m", "pytest", "-q", *(["-x"] if stop_first else []), "-p", "no:cacheprovider", *args]
    t0 = time.time()
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        try:
            code = subprocess.run(cmd, cwd=tree, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                  timeout=TEST_TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            return "timeout", time.time() - t0
    if code < 0:
        return f"crash:{-code}", time.time() - t0
    return {0: "pass", 1: "fail", 66: "tsan"}.get(code, f"error:{code}"), time.time() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ci", action="store_true",
                    help="the issue-13 seven plus the first mutant of every other file (CI's time budget)")
    ap.add_argument("--only", default="", help="comma-separated mutant names")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy")
    opts = ap.parse_args()
    mutants = load_mutants()
    if opts.only:
        want = set(opts.only.split(","))
        unknown = want - {m["name"] for m in mutants}
        if unknown:
            raise SystemExit(f"unknown mutants: {sorted(unknown)}")
        mutants = [m for m in mutants if m["name"] in want]
    if opts.list:
        for m in (ci_selection(mutants) if opts.ci else mutants):
            isa = f"  isa={m['isa']}" if m.get("isa") else ""
            print(f"{m['name']:45s} {m['path']}  build={m.get('build')}{isa}  tests={' '.join(m['tests'])}")
        return 0
    t_start = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="reatt-mutants-"))
    tree, log = tmp / "repo", tmp / "log.txt"
    tree.mkdir()
    problems: list[str] = []
    not_runnable: list[str] = []
    try:
        copy_tree(tree)
        print(f"mutation gate: copy and logs in {tmp}", flush=True)
        print(f"  build (CPU kernels) {build(tree, log):.0f} s", flush=True)
        isa = copy_isa(tree)
        best = isa["best"]
        if opts.ci:
            mutants = ci_selection(mutants, best)
        cap = f", capped by REATT_CPU_ISA_CAP={isa['cap']}" if isa.get("cap") else ""
        print(f"  {len(mutants)} mutants; this CPU runs the {best} level (detected {isa['detected']}{cap})", flush=True)
        clean_so = {p: p.read_bytes() for p in (tree / "reatt_kernels").glob("_C*.so")}
        # The tests must import the copy (and its extension), not an installed reatt_kernels.
        where = subprocess.run([sys.executable, "-c", "import reatt_kernels, reatt_kernels._C as c; "
                                "print(reatt_kernels.__file__); print(c.__file__)"], cwd=tree, capture_output=True,
                               text=True, env=dict(os.environ, PYTHONPATH=str(tree)))
        if where.returncode != 0 or any(not line.startswith(str(tree)) for line in where.stdout.split()):
            raise RuntimeError(f"the copy's reatt_kernels is not the one imported: {where.stdout} {where.stderr}")
        # Which mutants can run at all: the patched file must exist, and its text occur exactly once. An "emu" mutant
        # is skipped only while the source tree has no _C_emu module at all; once it has one, it must have been built.
        emu_in_tree = "_C_emu" in (tree / "CMakeLists.txt").read_text()
        emu_built = bool(glob.glob(str(tree / "reatt_kernels" / "_C_emu*.so")))
        if emu_in_tree and not emu_built:
            problems.append("CMakeLists.txt defines _C_emu but the build produced no reatt_kernels/_C_emu*.so")
        runnable, skipped = [], []
        for m in mutants:
            f = tree / m["path"]
            if not runs_here(m, best):
                why = f"not runnable on this CPU (needs {m['isa']}: {isa['missing'][m['isa']]})"
                print(f"  NOT RUNNABLE {m['name']}: {why}", flush=True)
                not_runnable.append(f"{m['name']}: {why}")
                continue
            if m.get("build") in ("emu", "emu-tsan") and not emu_in_tree:
                print(f"  SKIP     {m['name']}: not built (no _C_emu module in this source tree)", flush=True)
                skipped.append(m["name"])
                continue
            if m.get("build") not in (None, "cpu", "emu", "emu-tsan"):
                problems.append(f"{m['name']}: unknown build {m.get('build')!r}")
                continue
            n = f.read_text().count(m["old"]) if f.exists() else -1
            if n != 1:
                problems.append(f"{m['name']}: 'old' occurs {n} times in {m['path']} (must be exactly once)")
                continue
            runnable.append(m)
        # The unmutated copy must pass every target test set, or a caught mutant proves nothing. Sets of the form
        # [file, "-k", expr] run together in one pytest (one start-up); any other form runs on its own.
        sets = list(dict.fromkeys(tuple(m["tests"]) for m in runnable if m.get("build") != "emu-tsan"))
        tsan_sets = list(dict.fromkeys(tuple(m["tests"]) for m in runnable if m.get("build") == "emu-tsan"))
        simple = [a for a in sets if len(a) == 3 and a[1] == "-k" and not a[0].startswith("-")]
        groups = [list(a) for a in sets if a not in simple]
        if simple:
            groups.insert(0, [*dict.fromkeys(a[0] for a in simple), "-k", " or ".join(f"({a[2]})" for a in simple)])
        for args in groups:
            status, dt = run_tests(tree, args, log, stop_first=False)
            print(f"  baseline {status:8s} {dt:5.0f} s  ({len(simple) if args is groups[0] and simple else 1} "
                  f"test sets)", flush=True)
            if status != "pass":
                problems.append(f"baseline {status} for: {' '.join(args)}")
        for args in tsan_sets:
            status, dt = run_tests(tree, list(args), log, stop_first=False, tsan=build_tsan(tree, log))
            print(f"  baseline {status:8s} {dt:5.0f} s  (ThreadSanitizer: {' '.join(args)})", flush=True)
            if status != "pass":
                problems.append(f"baseline (ThreadSanitizer) {status} for: {' '.join(args)}")
        if problems:
            raise RuntimeError("baseline")
        # Python mutants first (against the clean build), then the C++ ones grouped by folder, so that consecutive
        # rebuilds mostly recompile one translation unit (the restored file of the previous mutant and the new one).
        runnable.sort(key=lambda m: (m.get("build") is not None, str(Path(m["path"]).parent) if m.get("build") else ""))
        results = []
        so_dirty = False  # the in-place .so was built from a mutated source
        for m in runnable:
            f = tree / m["path"]
            orig = f.read_text()
            t0 = time.time()
            try:
                f.write_text(orig.replace(m["old"], m["new"]))
                if m.get("build") in ("cpu", "emu"):
                    build(tree, log)
                    so_dirty = True
                    if m.get("build") == "emu" and not glob.glob(str(tree / "reatt_kernels" / "_C_emu*.so")):
                        raise RuntimeError("the build produced no reatt_kernels/_C_emu*.so")
                elif so_dirty:
                    for p, data in clean_so.items():  # a Python mutant runs against the clean kernels
                        p.write_bytes(data)
                    so_dirty = False
                tsan = build_tsan(tree, log) if m.get("build") == "emu-tsan" else ""
                status, _ = run_tests(tree, m["tests"], log, tsan=tsan)
            except RuntimeError as exc:
                status = f"error:{exc}"
            finally:
                # Rewriting the file bumps its mtime, so the next C++ build recompiles it clean.
                f.write_text(orig)
            verdict = {"fail": "CAUGHT", "timeout": "CAUGHT", "tsan": "CAUGHT", "pass": "SURVIVED"}.get(
                status, "CAUGHT" if status.startswith("crash:") else "ERROR")
            results.append((m, verdict, status))
            print(f"  {verdict:8s} {m['name']:45s} {time.time() - t0:5.0f} s  ({status}; {' '.join(m['tests'])})",
                  flush=True)
        survived = [m["name"] for m, v, _ in results if v == "SURVIVED"]
        errors = [f"{m['name']}: {s}" for m, v, s in results if v == "ERROR"]
        caught = sum(v == "CAUGHT" for _, v, _ in results)
        print(f"mutation gate: {caught} caught, {len(survived)} survived, {len(errors)} errors, "
              f"{len(skipped)} not built, {len(not_runnable)} not runnable on this CPU, in {time.time() - t_start:.0f} s")
        for line in not_runnable:
            print(f"  NOT RUNNABLE: {line}")
        for name in survived:
            print(f"  SURVIVED: {name}: no test of its backend catches it; write one")
        problems += errors
        if survived:
            problems.append(f"{len(survived)} mutants survived")
    except RuntimeError as exc:
        if str(exc) != "baseline":
            problems.append(str(exc))
    finally:
        if not opts.keep and not problems:
            shutil.rmtree(tmp, ignore_errors=True)
    for p in problems:
        print(f"FAILED: {p}")
    if problems:
        print(f"(log: {log})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
