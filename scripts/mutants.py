#!/usr/bin/env python
"""Mutation gate: inject small realistic bugs, one at a time, and check that the tests of their own backend catch them.

Each mutant is ``dict(name=, path=, old=, new=, tests=[pytest args], build=None | "cpu" | "emu" | "emu-tsan")``:
``old`` must occur exactly once in ``path``. ``build="cpu"`` rebuilds ``reatt_kernels._C`` (CPU kernels only) after
patching; ``"emu-tsan"`` runs the tests through scripts/tsan_emu.sh (a ThreadSanitizer build of ``_C_emu`` in its own
folder: for races, which an emulated run catches only by timing luck); ``"emu"``
rebuilds the CUDA-emulation module ``reatt_kernels._C_emu`` (the same CMake project) and is reported as "not built"
only while the source tree has no ``_C_emu`` module at all (CMakeLists.txt does not name it); otherwise a missing
``_C_emu`` fails the gate. Besides ``MUTANTS`` below, every
``scripts/mutants_*.py`` next to this file may define its own ``MUTANTS`` list. Adding a kernel means adding its
mutants.

The gate works on a temporary copy of the repository (git's tracked and unignored files) with its own CMake build:
1. build the copy once (REATT_CUDA=0) and run every distinct target test set on the UNMUTATED copy: they must pass,
   or a "caught" mutant would prove nothing;
2. per mutant: patch -> incremental rebuild when C++ changed -> the targeted tests (pytest -x, with a timeout) ->
   restore. Exit status 1 = caught; 0 = survived; a timeout counts as caught (the mutant hangs the kernel), and so do
   a ThreadSanitizer report (exit status 66) and a death by signal (the CUDA emulator aborts on undefined behaviour: a
   divergent barrier, a deadlock); any other pytest status (no tests collected, usage error) is an error of the gate;
3. print one line per mutant and a summary; exit non-zero if any mutant survived, the baseline failed or a mutant
   could not be applied.

Usage: python scripts/mutants.py [--ci] [--only NAME[,NAME]] [--list] [--keep]

``--ci`` (what CI runs, to stay within its time budget on 2 cores): the seven mutants of issue 13 plus the first
mutant listed for every other file, so every kernel file keeps at least one mutant on every commit. Without it the
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

ROOT = Path(__file__).resolve().parents[1]
TEST_TIMEOUT_S = int(os.environ.get("REATT_MUTANT_TIMEOUT", "300"))

MAXSIM = "tests/test_maxsim.py"
DISTILL = "tests/test_distill.py"
INDEX = "tests/test_index.py"

MUTANTS = [
    # ---- the seven bugs of issue 13 (each once passed the suite, or was caught only by another backend's tests) ----
    dict(name="triton-bias-beyond-R-reads-0", path="reatt_kernels/triton/maxsim.py",
         old="""        r = tl.minimum(tl.maximum(na[:, None] + j[None, :] - i[:, None], 0), R - 1)
        s += tl.load(bias_ptr + r)""",
         new="""        r = tl.maximum(na[:, None] + j[None, :] - i[:, None], 0)
        s += tl.load(bias_ptr + r, mask=r < R, other=0.0)""",
         tests=[MAXSIM, "-k", "test_maxsim_fwd and triton and dtype0"]),
    dict(name="reduce_rows-batchmean-is-sum/(B*M)", path="reatt_kernels/reference/distill.py",
         old="return loss_rows.sum() / max(B, 1), 1.0 / max(B, 1)",
         new="return loss_rows.sum() / max(B * M, 1), 1.0 / max(B * M, 1)",
         tests=[DISTILL, "-k", "test_distill_kl and torch and dtype0"]),
    dict(name="torch-packed-bwd-offset+1", path="reatt_kernels/reference/maxsim.py",
         old="        base = d_offsets[doc]\n", new="        base = d_offsets[doc] + 1\n",
         tests=[MAXSIM, "-k", "test_maxsim_bwd and torch and packed"]),
    dict(name="distill_kl-grad-without-1/B", path="reatt_kernels/ops/distill.py",
         old="_, grad_scale = reduce_rows(student.new_empty((B,)), reduction, M)",
         new="_, grad_scale = reduce_rows(student.new_empty((B,)), 'sum', M)",
         tests=[DISTILL, "-k", "test_distill_kl and torch and dtype0"]),
    dict(name="triton-scores-through-bf16", path="reatt_kernels/triton/maxsim.py",
         old="qa.to(tl.int64) * C + col64, score, mask=qa < Bq)",
         new="qa.to(tl.int64) * C + col64, score.to(tl.bfloat16).to(tl.float32), mask=qa < Bq)",
         tests=[MAXSIM, "-k", "test_maxsim_fwd and triton and dtype0"]),
    dict(name="cpp-avx512-tie-break->=", path="csrc/maxsim/maxsim_cpu_avx512.h",
         old="_mm512_cmp_ps_mask(s, m, _CMP_GT_OQ)", new="_mm512_cmp_ps_mask(s, m, _CMP_GE_OQ)", build="cpu",
         tests=[MAXSIM, "-k", "test_maxsim_bwd and cpu"]),
    dict(name="cpp-bias-clamp-R-2", path="csrc/maxsim/maxsim_cpu_isa.h",
         old="r = r < 0 ? 0 : (r > A.R - 1 ? A.R - 1 : r);", new="r = r < 0 ? 0 : (r > A.R - 2 ? A.R - 2 : r);",
         build="cpu", tests=[MAXSIM, "-k", "test_maxsim_fwd and cpu"]),
    # ---- at least one per kernel file ----------------------------------------------------------------------------
    dict(name="cpp-bf16-store-truncates", path="csrc/maxsim/maxsim_cpu.cpp",
         old="  x += 0x7fffu + ((x >> 16) & 1u);\n", new="  x += 0u;\n", build="cpu",
         tests=[MAXSIM, "-k", "test_maxsim_bwd and cpu and dtype2"]),
    dict(name="cpp-avx2-tie-break->=", path="csrc/maxsim/maxsim_cpu.cpp",
         old="_mm256_cmp_ps(s, m, _CMP_GT_OQ)", new="_mm256_cmp_ps(s, m, _CMP_GE_OQ)", build="cpu",
         tests=["tests/test_maxsim_cpu.py", "-k", "isa_fwd_bwd and avx2-"]),
    dict(name="cpp-bwd-dbias-distance-sign", path="csrc/maxsim/maxsim_cpu_isa.h",
         old="int64_t r = n_valid[a] + j - i;", new="int64_t r = n_valid[a] + i - j;",
         build="cpu", tests=[MAXSIM, "-k", "test_maxsim_bwd and cpu and dtype0"]),
    dict(name="cpp-reader-teacher-mean-over-R-1", path="csrc/distill/distill_cpu.cpp",
         old="const double inv_r = 1.0 / static_cast<double>(std::max<int64_t>(R, 1));",
         new="const double inv_r = 1.0 / static_cast<double>(std::max<int64_t>(R - 1, 1));", build="cpu",
         tests=[DISTILL, "-k", "test_reader_teacher and cpu"]),
    dict(name="cpp-residual-tile-tail-dropped", path="csrc/index/residual_cpu.cpp",
         old="for (int j = 0; j < nt; ++j) m = std::max(m, acc[k][j]);",
         new="for (int j = 0; j < nt - 1; ++j) m = std::max(m, acc[k][j]);", build="cpu",
         tests=[INDEX, "-k", "residual_maxsim_matches and cpu"]),
    dict(name="triton-dq-mean-not-divided", path="reatt_kernels/triton/maxsim.py",
         old="""        g = tl.load(grad_ptr + a64 * stride_gb + c64 * stride_gc, mask=c_ok, other=0.0)
        if MEAN:
            g = g / tl.maximum(na, 1).to(tl.float32)
        if GROUPED:""",
         new="""        g = tl.load(grad_ptr + a64 * stride_gb + c64 * stride_gc, mask=c_ok, other=0.0)
        if GROUPED:""",
         tests=[MAXSIM, "-k", "test_maxsim_bwd and triton and dtype0"]),
    dict(name="triton-kl-dense-grad-unscaled", path="reatt_kernels/triton/distill.py",
         old="(g * grad_scale).to(grad_ptr.dtype.element_ty), mask=ok)",
         new="g.to(grad_ptr.dtype.element_ty), mask=ok)",
         tests=[DISTILL, "-k", "test_distill_kl and triton and dtype0"]),
    dict(name="triton-residual-buckets-msb-first", path="reatt_kernels/triton/residual.py",
         old="shift_d = (offs_d * NBITS) % 8", new="shift_d = 8 - NBITS - (offs_d * NBITS) % 8",
         tests=[INDEX, "-k", "residual_maxsim_matches and triton"]),
    dict(name="ref-reader-teacher-mean-over-R-1", path="reatt_kernels/reference/distill.py",
         old="    return out / max(R, 1)\n", new="    return out / max(R - 1, 1)\n",
         tests=[DISTILL, "-k", "test_reader_teacher and torch"]),
    dict(name="ops-maxsim-upstream-grad-in-input-dtype", path="reatt_kernels/ops/maxsim.py",
         old="g = g_scores.to(_score_dtype(q))", new="g = g_scores.to(q.dtype)",
         tests=[MAXSIM, "-k", "test_maxsim_bwd and torch and dtype2"]),
    dict(name="codec-pack-order-reversed", path="reatt_kernels/index/codec.py",
         old="shifts = (torch.arange(per, device=b.device, dtype=torch.int32) * nbits)",
         new="shifts = (torch.arange(per, device=b.device, dtype=torch.int32) * nbits).flip(0)",
         tests=[INDEX, "-k", "codec_pack_layout"]),
    dict(name="index-ref-token-offset-off-by-doc", path="reatt_kernels/index/reference.py",
         old="torch.repeat_interleave(torch.cumsum(dl, 0) - dl, dl)",
         new="torch.repeat_interleave(torch.cumsum(dl, 0) - dl + 1, dl).clamp(max=n_tok - 1)",
         tests=[INDEX, "-k", "residual_maxsim_matches and torch"]),
    dict(name="token-index-deleted-not-masked", path="reatt_kernels/index/token_index.py",
         old='s = s.masked_fill(self.deleted[None, :], float("-inf"))', new="s = s",
         tests=[INDEX, "-k", "deleted_documents_never_returned_small"]),
]


def load_mutants() -> list[dict]:
    """MUTANTS above plus every scripts/mutants_*.py's MUTANTS (added by other kernels' authors)."""
    out = [dict(m, origin="mutants.py") for m in MUTANTS]
    for f in sorted(glob.glob(str(Path(__file__).with_name("mutants_*.py")))):
        spec = importlib.util.spec_from_file_location(Path(f).stem, f)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        out += [dict(m, origin=Path(f).name) for m in getattr(mod, "MUTANTS", [])]
    names = [m["name"] for m in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise SystemExit(f"duplicate mutant names: {sorted(dup)}")
    return out


# The seven bugs of issue 13 stay in the CI selection whatever else is trimmed.
ISSUE13_SEVEN = {m["name"] for m in MUTANTS[:7]}


def ci_selection(mutants: list[dict]) -> list[dict]:
    """The issue-13 seven, plus the first mutant (in list order) of every file none of them covers."""
    covered = {m["path"] for m in mutants if m["name"] in ISSUE13_SEVEN}
    out = []
    for m in mutants:
        if m["name"] in ISSUE13_SEVEN or m["path"] not in covered:
            out.append(m)
            covered.add(m["path"])
    return out


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
    env = dict(os.environ, REATT_CUDA="0", REATT_REQUIRE_EXT="1", REATT_BUILD_DIR=str(tree / "build" / "mutants"))
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


def run_tests(tree: Path, args: list[str], log: Path, stop_first: bool = True, tsan: bool = False) -> tuple[str, float]:
    """'pass', 'fail', 'tsan', 'crash:<signal>', 'timeout' or 'error:<code>' for pytest on the copy (under
    ThreadSanitizer, through the copy's scripts/tsan_emu.sh, with ``tsan``)."""
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1", PY=sys.executable)
    if tsan:
        cmd = ["bash", "scripts/tsan_emu.sh", *(["-x"] if stop_first else []), *args]
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
    if opts.ci:
        mutants = ci_selection(mutants)
    if opts.list:
        for m in mutants:
            print(f"{m['name']:45s} {m['path']}  build={m.get('build')}  tests={' '.join(m['tests'])}")
        return 0
    t_start = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="reatt-mutants-"))
    tree, log = tmp / "repo", tmp / "log.txt"
    tree.mkdir()
    print(f"mutation gate: {len(mutants)} mutants; copy and logs in {tmp}", flush=True)
    problems: list[str] = []
    try:
        copy_tree(tree)
        print(f"  build (CPU kernels) {build(tree, log):.0f} s", flush=True)
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
        for args in tsan_sets:  # builds the copy's ThreadSanitizer _C_emu (build/emu-tsan) on the first call
            status, dt = run_tests(tree, list(args), log, stop_first=False, tsan=True)
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
                status, _ = run_tests(tree, m["tests"], log, tsan=m.get("build") == "emu-tsan")
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
              f"{len(skipped)} not built, in {time.time() - t_start:.0f} s")
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
