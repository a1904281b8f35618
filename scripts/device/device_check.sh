#!/usr/bin/env bash
# The whole GPU check, in one run on a lent GPU machine. The machine it was written for: Python 3.12, torch 2.11+cu130,
# triton 3.6, nvcc 13, no network, nothing kept between runs (docs/testing.md, "GPU check").
#
#   1. install the carried wheels (.device-wheels/*.whl: faiss-cpu, fast-plaid, late-interaction-kernels, ...)
#   2. build this checkout (CUDA for sm_90 only: H100 and H200 are both sm_90; a CUDA build failure is recorded and the
#      build retried without CUDA so the Triton checks still run)
#   3. print available_backends() and the build info
#   4. pytest -m gpu (every engineer's GPU-marked tests)
#   5. the benchmarks in quick mode: bench_maxsim, reatt-bench, bench_distill, bench_index, bench_train
#      (each when present), each under its own `timeout`; then the index at scale (bench_index --device cuda)
#   6. copy the JSON/PNG results to $OUT: $OUT/device_check.log, $OUT/<gpu-slug>/{summary.json, *.json, *.png}
#      (at most 8 files, at most 1 folder deep; JSONs are merged into summary.json when they would not fit)
#
# Every step has a timeout, and the script as a whole keeps to REATT_DEVICE_BUDGET_S seconds (default 450, so the
# run fits in 8 minutes on an H100 with the machine's start); a step that fails or times out is recorded in
# summary.json and the script goes on. It always exits 0 once the results are collected.
#
# Run it on the device with:  bash scripts/device_check.sh            ($OUT is set there; that path execs this file)
# Dry run on a CPU machine:   REATT_DEVICE_DRY=1 PYTHON=.venv/bin/python OUT=/tmp/dc bash scripts/device_check.sh
#   (skips the wheel install and the build, runs the GPU tests (they skip cleanly), runs bench_maxsim and reatt-bench
#   quick on CPU into $OUT only, and only checks that the other benchmarks answer --help, so no committed CPU result
#   is overwritten).
# REATT_DEVICE_SKIP=gpu_tests,bench_train (a comma list of step names) skips steps, e.g. to rerun only the benchmarks.
# Afterwards, on the CPU machine: copy $OUT/<gpu-slug>/*.json and *.png into benchmarks/results/<gpu-slug>/ and commit.
# When the JSONs were merged (more than 6 result files), split them there with:
#   python3 -c "import json; d = json.load(open('summary.json'))
#   [open(k, 'w').write(json.dumps(v, indent=1)) for k, v in d['results'].items()]"
set -uo pipefail
cd "$(dirname "$0")/../.."
# The benchmarks import the checkout's package even before (or without) the editable install below.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/device-out}
DRY=${REATT_DEVICE_DRY:-0}
TOTAL=${REATT_DEVICE_BUDGET_S:-450}
RESERVE=25                                   # seconds kept for collecting the results
START=$SECONDS
mkdir -p "$OUT"
LOG="$OUT/device_check.log"
STAGE=$(mktemp -d)                           # benchmark outputs before they are copied to $OUT
STAMP="$STAGE/.start"
touch "$STAMP"

# pip there is the system Python's (PEP 668 may mark it externally managed); nothing can be downloaded anyway.
export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_ROOT_USER_ACTION=ignore
export PYTHONUNBUFFERED=1                    # keep the log in order
STEPS=()                                     # "name|status|seconds"
left() { echo $((TOTAL - (SECONDS - START))); }

# step NAME BUDGET_S CMD...: run CMD under `timeout`, capped by the time left; record ok / FAILED / TIMEOUT / skipped.
step() {
  local name=$1 budget=$2
  shift 2
  if [[ ",${REATT_DEVICE_SKIP:-}," == *",$name,"* ]]; then
    echo "=== [$name] skipped (REATT_DEVICE_SKIP)"
    STEPS+=("$name|skipped (REATT_DEVICE_SKIP)|0")
    return 0
  fi
  local cap=$(($(left) - RESERVE))
  ((budget > cap)) && budget=$cap
  if ((budget < 10)); then
    echo "=== [$name] skipped: out of time ($(left)s left)"
    STEPS+=("$name|skipped (out of time)|0")
    return 0
  fi
  echo "=== [$name] timeout ${budget}s: $*"
  local t0=$SECONDS rc status
  timeout --kill-after=10 "$budget" "$@"
  rc=$?
  case $rc in
    0) status="ok" ;;
    124 | 137) status="TIMEOUT after ${budget}s" ;;
    *) status="FAILED rc=$rc" ;;
  esac
  echo "=== [$name] $status ($((SECONDS - t0))s; $(left)s of the budget left)"
  STEPS+=("$name|$status|$((SECONDS - t0))")
  return 0
}

main() {
echo "device_check: $(date -u +%FT%TZ), git $(git rev-parse --short HEAD 2>/dev/null || echo '?'), budget ${TOTAL}s, dry=$DRY"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"

# 1. wheels
if [[ $DRY == 1 ]]; then
  STEPS+=("wheels|skipped (dry run)|0")
elif compgen -G ".device-wheels/*.whl" >/dev/null; then
  step wheels 90 "$PY" -m pip install --no-index --no-deps --quiet .device-wheels/*.whl
else
  echo "=== [wheels] no .device-wheels/ folder: peers will be reported n/a"
  STEPS+=("wheels|skipped (no .device-wheels/)|0")
fi

# 2. build (in place, editable); CUDA required first so a compile error is visible, then a CPU-only fallback
if [[ $DRY == 1 ]]; then
  STEPS+=("build|skipped (dry run)|0")
else
  step build 240 env REATT_CUDA="${REATT_CUDA:-1}" REATT_CUDA_ARCHS="${REATT_CUDA_ARCHS:-90}" \
    REATT_BUILD_JOBS="${REATT_BUILD_JOBS:-16}" "$PY" -m pip install --no-build-isolation --no-deps -e .
  if [[ ${STEPS[-1]} == "build|FAILED"* || ${STEPS[-1]} == "build|TIMEOUT"* ]]; then
    step build_without_cuda 120 env REATT_CUDA=0 REATT_BUILD_JOBS="${REATT_BUILD_JOBS:-16}" \
      "$PY" -m pip install --no-build-isolation --no-deps -e .
  fi
fi

# 3. what runs here
step info 60 "$PY" - <<'EOF'
import json, torch, reatt_kernels as rk
from reatt_kernels import _ext
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
try:
    import triton; print("triton", triton.__version__)
except Exception as exc:
    print("triton n/a:", exc)
print("available_backends:", json.dumps(rk.available_backends(), indent=1))
print("build_info:", _ext.build_info())
mod = _ext.ext()
if mod is not None and hasattr(mod, "cuda_runtime_info"):
    print("cuda_runtime_info:", mod.cuda_runtime_info())
for peer in ("late_interaction_kernels", "fast_plaid", "faiss", "maxsim_cpu"):
    try:
        m = __import__(peer); print("peer", peer, getattr(m, "__version__", "?"))
    except Exception as exc:
        print("peer", peer, "n/a:", type(exc).__name__)
EOF

# 4. every GPU-marked test
step gpu_tests 150 "$PY" -m pytest -m gpu -q -rfEs -p no:cacheprovider tests
# The model/training tests are not GPU-marked, but the device image has transformers 5.17 (5.24 here): run them there.
step reatt_tests 60 "$PY" -m pytest -q -rfEs -p no:cacheprovider tests/reatt/test_reatt_model.py tests/reatt/test_reatt_train.py

# 5. benchmarks, quick mode. Ours write to $STAGE in a dry run (no committed CPU result is touched).
OUT_FLAG=()
[[ $DRY == 1 ]] && OUT_FLAG=(--out "$STAGE/cpu")
step bench_maxsim 150 "$PY" benchmarks/bench_maxsim.py --quick "${OUT_FLAG[@]}"
# The main job without --index, on the synthetic corpus (the device has no network for the real-text sources): bench_index
# below measures the index modes under its own timeout.
step reatt_bench 90 "$PY" -m reatt_kernels.bench.main --corpus synthetic --quick "${OUT_FLAG[@]}"
for b in bench_distill bench_residual_maxsim bench_index bench_train; do
  if [[ ! -f benchmarks/$b.py ]]; then
    STEPS+=("$b|n/a (benchmarks/$b.py not present)|0")
  elif [[ $DRY == 1 ]]; then
    step "$b" 60 "$PY" "benchmarks/$b.py" --help
  else
    case $b in bench_distill|bench_residual_maxsim) budget=60 ;; bench_index) budget=90 ;; *) budget=75 ;; esac
    step "$b" "$budget" "$PY" "benchmarks/$b.py" --quick
  fi
done
# The index at scale on the GPU: the headline corpus (noise 0.124) at REATT_INDEX_GPU_DOCS documents (default 200k,
# 17.6M tokens: the corpus is generated on the CPU, about a minute per 100k documents there, so 1M documents do not
# fit this script's budget; raise it with REATT_DEVICE_BUDGET_S and REATT_INDEX_GPU_DOCS=1000000), exact vs residual
# (default and sweep), plus fast-plaid at 20k documents on the same GPU when its wheel is installed.
if [[ $DRY != 1 && -f benchmarks/bench_index.py ]]; then
  step bench_index_gpu 240 "$PY" benchmarks/bench_index.py --device cuda --sections headline,peer \
    --docs "${REATT_INDEX_GPU_DOCS:-200000}" --peer-docs 20000 --threads 16
fi

# 6. collect: results written during this run (newer than $STAMP), flat, into $OUT/<slug>/
echo "=== [collect] $(left)s left"
STEP_LINES=$(printf '%s\n' "${STEPS[@]}")
STEP_LINES="$STEP_LINES" timeout 60 "$PY" - "$OUT" "$STAMP" "$STAGE" <<'EOF' || echo "collect failed (rc=$?)"
import json, os, shutil, sys
from pathlib import Path
out, stamp, stage = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
t0 = stamp.stat().st_mtime
try:
    import torch
    from reatt_kernels.bench.util import device_slug, env_info
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    slug, env = device_slug(dev), env_info(dev)
except Exception as exc:
    slug, env = "unknown-device", {"error": repr(exc)}
steps = [dict(zip(("step", "status", "seconds"), line.split("|"))) for line in os.environ["STEP_LINES"].splitlines() if line]
found = []
for root in (Path("benchmarks/results"), stage):
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix in (".json", ".png") and p.stat().st_mtime >= t0:
            found.append(p)
dest = out / slug
dest.mkdir(parents=True, exist_ok=True)
jsons = [p for p in found if p.suffix == ".json"]
pngs = [p for p in found if p.suffix == ".png"]
room = 8 - 2  # the log and summary.json
summary = {"steps": steps, "env": env, "results": {}, "left_out": []}
if len(jsons) + len(pngs) <= room:
    copy = jsons + pngs
else:  # merge the JSONs into summary.json, keep as many plots as fit
    for p in jsons:
        try:
            summary["results"][p.name] = json.loads(p.read_text())
        except Exception as exc:
            summary["results"][p.name] = f"unreadable: {exc}"
    copy = pngs[:room]
    summary["left_out"] = [str(p) for p in pngs[room:]]
names = set()
for p in copy:
    name = p.name if p.name not in names else f"{p.parent.name}-{p.name}"
    names.add(name)
    shutil.copy2(p, dest / name)
summary["files"] = sorted(names)
(dest / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
print("steps:")
for s in steps:
    print(f"  {s['step']:<20} {s['status']}  ({s['seconds']}s)")
print(f"results in {dest}: {sorted(names) + ['summary.json']}")
EOF
echo "device_check done in $((SECONDS - START))s"
}

# A pipeline, not `exec > >(tee)`, so the log is complete when the script exits.
main 2>&1 | tee "$LOG"
rm -rf "$STAGE"
exit 0
