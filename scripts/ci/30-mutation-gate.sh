#!/usr/bin/env bash
# The mutation gate (scripts/mutation/gate.py): the mutants of scripts/mutation/<op>.py are applied to a temporary copy of
# the repository, which is rebuilt (CPU kernels / the CUDA emulation module) when C++ changed, and their targeted tests
# must fail. Fails if any mutant survives or if the unmutated copy's targeted tests fail. CI runs `--ci`: the seven of
# issue 13 plus the first mutant of every other kernel file (19 of 36); the whole list (`scripts/mutation/gate.py`, 682 s on
# the quiet 2-core machine, all 36 caught) is over CI's 10-minute share and is run before a kernel change lands.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PY:-python}" scripts/mutation/gate.py --ci
