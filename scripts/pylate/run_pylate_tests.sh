#!/usr/bin/env bash
# PyLate 1.6.0's own unit tests and doctests for scores, losses, rank and indexes, run on reatt-kernels through
# reatt_kernels.compat.pylate.patch(), in the PyLate side environment (`make pylate-env`). docs/pylate.md.
#
#   bash scripts/pylate/run_pylate_tests.sh [all|scores|index-residual|index-exact] [extra pytest args]
#
# Runs (each a pytest session in a scratch copy of PyLate's sdist, offline: HF_HUB_OFFLINE=1):
#   scores          scores, losses, rank: PyLate's tests + doctests with patch() (PLAID stays fast-plaid)
#   index-residual  PyLate's index tests + PLAID's doctest with pylate.indexes.PLAID -> PyLateTokenIndex(residual)
#   index-exact     the same on PyLateTokenIndex(kind="exact")
# Hub models load the local MiniLM folder (seeded random Dense). The hub dataset of PyLate's training tests is
# replaced by a local 8-query stand-in (REATT_PYLATE_STANDIN_DATA=1; set it to 0 to see them skipped instead); any other
# test that needs the hub is reported skipped with the name it needed. Writes one JSON report per run to $REATT_PYLATE_OUT (default /tmp/reatt-pylate).
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${PYLATE_VENV:-$ROOT/.venv-pylate}"
PY="$VENV/bin/python"
VERSION=1.6.0
OUT="${REATT_PYLATE_OUT:-/tmp/reatt-pylate}"
WHAT="${1:-all}"; shift || true
if [ ! -x "$PY" ]; then echo "no PyLate side environment at $VENV: run make pylate-env"; exit 2; fi
SRC="$VENV/src/pylate-$VERSION"
if [ ! -d "$SRC/tests" ]; then
  mkdir -p "$VENV/src"
  "$PY" -m pip download -q --no-deps --no-binary :all: "pylate==$VERSION" -d "$VENV/src" &&
    tar -xzf "$VENV/src/pylate-$VERSION.tar.gz" -C "$VENV/src" || { echo "cannot get PyLate's sdist"; exit 2; }
fi
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export REATT_PYLATE_STANDIN_DATA="${REATT_PYLATE_STANDIN_DATA:-1}"
export PYTHONPATH="$ROOT/scripts/pylate${PYTHONPATH:+:$PYTHONPATH}"

SCORE_TESTS="tests/test_colbert_scores.py tests/test_scores_flash.py tests/test_scores_lik.py tests/test_contrastive.py
  tests/test_cached_contrastive.py tests/test_kd.py tests/test_xtr_scoring.py tests/test_plaid.py
  tests/test_fast_plaid.py tests/test_delete_parity.py tests/test_retriever.py"
# PyLate's doctests of colbert_scores & co. are run by our test_colbert_doctests_patched.py: pytest's collector skips
# them while patched (the names then hold functions defined elsewhere).
SCORE_DOCS="pylate/scores pylate/losses pylate/rank pylate/indexes $ROOT/scripts/pylate/test_colbert_doctests_patched.py"
INDEX_TESTS="tests/test_plaid.py tests/test_fast_plaid.py tests/test_delete_parity.py tests/test_retriever.py
  pylate/indexes/plaid.py"

run() {  # name, REATT_PYLATE_INDEX, pytest paths...
  local name="$1" index="$2"; shift 2
  local work; work="$(mktemp -d)"
  cp -r "$SRC/." "$work/"
  echo "== PyLate $VERSION's tests: $name (in $work)"
  local start; start=$(date +%s)
  (cd "$work" && REATT_PYLATE_INDEX="$index" REATT_PYLATE_REPORT="$OUT/$name.json" \
    "$PY" -m pytest -c "$ROOT/scripts/pylate/pytest.ini" --rootdir "$work" "$@" $EXTRA)
  local rc=$?
  echo "== $name: exit $rc in $(( $(date +%s) - start )) s (report: $OUT/$name.json)"
  rm -rf "$work"
  return $rc
}
EXTRA="$*"
status=0
case "$WHAT" in
  all|scores) run scores "" $SCORE_TESTS $SCORE_DOCS || status=1 ;;&
  all|index-residual) run index-residual residual $INDEX_TESTS || status=1 ;;&
  all|index-exact) run index-exact exact $INDEX_TESTS || status=1 ;;
  scores|index-residual) ;;
  *) echo "usage: $0 [all|scores|index-residual|index-exact] [pytest args]"; exit 2 ;;
esac
exit $status
