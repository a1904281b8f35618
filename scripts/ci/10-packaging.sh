#!/usr/bin/env bash
# CI: `pip install reatt-kernels` from the sdist carries the kernels (issue 14).
#   1. builds the sdist and checks it holds every tracked file the build reads (csrc/**, CMakeLists.txt, ...);
#   2. builds a wheel *from that sdist* in a temporary directory (pip, build isolation, REATT_REQUIRE_EXT=1, so a
#      failed C++ build fails here instead of producing a pure-Python wheel);
#   3. installs it into a fresh venv with torch from the local wheel, outside the checkout, and asserts
#      available_backends()["cpu"] == "ok", OpenMP built in, one C++ op matching torch, and, when nvcc is present,
#      that the CUDA objects are inside: _C.build_info() names the compiled architecture and cuobjdump lists the sm_80
#      cubins and sm_80 PTX.
# CUDA is compiled for sm_80 only here (the release wheels, scripts/release/build_wheels.sh, build sm_80 + sm_90 + PTX): one
# architecture proves the objects land in the wheel at half the compile time.
# Time with nvcc, on the shared 2-core dev machine: 7.7 min wall at load average 13-14 (19.5 min at 15-27), 2.6
# CPU-minutes (user+sys) either way, so roughly 3-5 minutes on an idle 2-core CI machine; the wheel build (it compiles)
# and the torch install into the fresh venv dominate.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY=${PY:-python3}
case $PY in /*) ;; */*) PY=$ROOT/$PY ;; esac   # a relative venv path must survive the cd into $tmp
TORCH=${TORCH:-torch==2.13.0}
tmp=$(mktemp -d /tmp/reatt-packaging.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

if command -v nvcc > /dev/null && [ "${REATT_CUDA:-auto}" != 0 ]; then cuda=1; else cuda=0; fi
echo "packaging check: python $("$PY" -c 'import platform; print(platform.python_version())'), CUDA build: $cuda"

# 1. sdist
# (from $tmp: in the checkout, `-m build` would import the CMake build/ folder instead of pypa's build; no isolation:
# making an sdist runs no compiler, and the dev venv's setuptools saves resolving a build environment)
(cd "$tmp" && "$PY" -m build --sdist --no-isolation --skip-dependency-check --outdir "$tmp/dist" "$ROOT" > "$tmp/sdist.log" 2>&1) || { cat "$tmp/sdist.log"; exit 1; }
sdist=$(ls "$tmp"/dist/reatt_kernels-*.tar.gz)
tar tzf "$sdist" | sed 's|^[^/]*/||' | sort > "$tmp/sdist-files.txt"
if git rev-parse --git-dir > /dev/null 2>&1; then
  need=$(git ls-files csrc CMakeLists.txt setup.py pyproject.toml LICENSE README.md reatt_kernels reatt | sort)
  missing=$(comm -23 <(echo "$need") "$tmp/sdist-files.txt")
  [ -z "$missing" ] || { echo "FAIL: the sdist lacks tracked files the build or the package needs:"; echo "$missing"; exit 1; }
fi
echo "sdist: $(basename "$sdist"), $(wc -l < "$tmp/sdist-files.txt") entries, every tracked build input present"

# 2. wheel from the sdist, in a temporary directory (pip unpacks the sdist there; nothing of the checkout is visible)
start=$(date +%s)
(cd "$tmp" && REATT_REQUIRE_EXT=1 REATT_CUDA=$cuda REATT_CUDA_ARCHS=80 REATT_BUILD_JOBS=${REATT_BUILD_JOBS:-2} \
  "$PY" -m pip wheel -v --no-deps --no-cache-dir -w "$tmp/wheel" "$sdist" > "$tmp/wheel.log" 2>&1) \
  || { tail -60 "$tmp/wheel.log"; echo "FAIL: building a wheel from the sdist"; exit 1; }
whl=$(ls "$tmp"/wheel/reatt_kernels-*.whl)
echo "wheel from sdist: $(basename "$whl") in $(( $(date +%s) - start )) s"

# 3. a fresh venv: torch from the local wheel, then the wheel, imported from outside the checkout
"$PY" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q "$TORCH" "$whl" > "$tmp/venv.log" 2>&1 || { cat "$tmp/venv.log"; exit 1; }
so=$(cd "$tmp" && "$tmp/venv/bin/python" -c "import reatt_kernels._C as c; print(c.__file__)")
case "$so" in "$tmp/venv/"*) ;; *) echo "FAIL: imported $so, not the installed wheel"; exit 1;; esac
(cd "$tmp" && REATT_REQUIRE_EXT=1 EXPECT_CUDA=$cuda "$tmp/venv/bin/python" - <<'EOF'
import os
import warnings

warnings.simplefilter("error")  # a fallback warning at import is a failure here
import torch
import reatt_kernels as rk
from reatt_kernels import _ext

backends = rk.available_backends()
assert backends["cpu"] == "ok", backends
info = _ext.build_info()
assert info["openmp"], info
torch.manual_seed(0)
q, d = torch.randn(3, 5, 16), torch.randn(7, 9, 16)
want = torch.einsum("qid,njd->qnij", q.double(), d.double()).amax(-1).sum(-1)
got = rk.maxsim(q, d, backend="cpu")
assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4), (got, want)
if os.environ["EXPECT_CUDA"] == "1":
    assert info["cuda"] and "800" in info["cuda_compiled_archs"].split(","), info
print(f"installed wheel OK: cpu backend ok, build_info={info}")
EOF
)
if [ "$cuda" = 1 ]; then
  # cuobjdump from the CUDA toolkit when it has one, else NVIDIA's PyPI package (minimal toolkits lack it).
  cuobjdump=$(command -v cuobjdump || ls "$(dirname "$(command -v nvcc)")/cuobjdump" 2>/dev/null || true)
  if [ -z "$cuobjdump" ]; then
    "$tmp/venv/bin/python" -m pip install -q nvidia-cuda-cuobjdump > "$tmp/cuobjdump.log" 2>&1 \
      || { cat "$tmp/cuobjdump.log"; exit 1; }
    cuobjdump=$(find "$tmp/venv" -name cuobjdump -type f | head -1)
  fi
  listing=$("$cuobjdump" --list-elf --list-ptx "$so")
  echo "$listing" | grep -q "sm_80\.cubin" || { echo "FAIL: no sm_80 cubin in $so"; echo "$listing"; exit 1; }
  echo "$listing" | grep -q "sm_80\.ptx" || { echo "FAIL: no sm_80 PTX in $so"; echo "$listing"; exit 1; }
  echo "CUDA objects inside: $(echo "$listing" | grep -c 'sm_80\.cubin') sm_80 cubins, $(echo "$listing" | grep -c '\.ptx') PTX"
fi
echo "packaging check passed"
