#!/usr/bin/env bash
# Run the CPU test subset against a built wheel, outside the checkout, with any Python that has torch (and pytest).
#   scripts/release/test_wheel.sh dist/reatt_kernels-0.1.0-cp311-cp311-manylinux_2_28_x86_64.whl /path/to/venv/bin/python
# The wheel is unpacked into a temporary --target folder put on PYTHONPATH, so the venv (and its torch) is not touched:
# the same wheel can be tried under several torch versions. REATT_REQUIRE_EXT=1: a wheel without _C fails at import.
set -euo pipefail
cd "$(dirname "$0")/../.."
whl=$(realpath "$1")
py=${2:-python3}
tmp=$(mktemp -d /tmp/reatt-test-wheel.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
"$py" -m pip install -q --no-deps --target "$tmp/site" "$whl" > "$tmp/pip.log" 2>&1 || { cat "$tmp/pip.log"; exit 1; }
cp -r tests pyproject.toml "$tmp/"
cd "$tmp"
export PYTHONPATH=$tmp/site REATT_REQUIRE_EXT=1
"$py" -c "import torch, reatt_kernels as rk; from reatt_kernels import _ext
assert rk.__file__.startswith('$tmp/site/'), rk.__file__
print('torch', torch.__version__, '| reatt_kernels from', rk.__file__, '| cpu:', rk.available_backends()['cpu'],
      '| build_info:', _ext.build_info())"
"$py" -m pytest -q -p no:cacheprovider tests/kernels/test_maxsim_cpu.py tests/kernels/test_maxsim.py tests/kernels/test_distill.py \
  tests/kernels/test_residual_maxsim.py tests/index/test_index.py tests/tooling/test_packaging.py -k "cpu or packaging"
