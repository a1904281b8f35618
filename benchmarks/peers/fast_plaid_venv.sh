#!/usr/bin/env bash
# Create the side venv that runs fast-plaid (the peer of benchmarks/bench_index.py).
#
# fast-plaid 1.7.0.2110 pins torch==2.11.0, so it cannot share the project's environment. This script makes its own
# venv (about 5 GB with torch's CUDA libraries, a few minutes) and prints its path. The benchmark finds it through
# REATT_FAST_PLAID_VENV, or at the default path below.
#
#   benchmarks/peers/fast_plaid_venv.sh [VENV_DIR]     # default: $REATT_FAST_PLAID_VENV or ~/.cache/reatt/fast-plaid-venv
set -euo pipefail
VENV="${1:-${REATT_FAST_PLAID_VENV:-$HOME/.cache/reatt/fast-plaid-venv}}"
PY="${PYTHON:-python3}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import fast_plaid" 2>/dev/null; then
  echo "fast-plaid venv already present: $VENV"
  exit 0
fi
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --upgrade pip >/dev/null
# numpy < 2.3: the fast-plaid wheel was built against it.
"$VENV/bin/python" -m pip install "fast-plaid==1.7.0.2110" "numpy<2.3"
"$VENV/bin/python" -c "import fast_plaid, torch; print('fast-plaid venv ready:', '$VENV', 'torch', torch.__version__)"
