#!/usr/bin/env bash
# The mutation gate: every mutant in scripts/mutants.py (and scripts/mutants_*.py) is applied to a temporary copy of
# the repository, which is rebuilt (CPU kernels only) when C++ changed, and its targeted tests must fail. Fails if any
# mutant survives or if the unmutated copy's targeted tests fail. About 5-6 minutes on the 2-core CI machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PY:-python}" scripts/mutants.py
