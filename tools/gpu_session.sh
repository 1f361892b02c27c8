#!/usr/bin/env bash
# One GPU session in one call (what `make gpu` runs): build for sm_90 only, then the GPU tests, the
# independent verify.py, compute-sanitizer on the kernels and the full benchmarks. Every step runs
# even when an earlier one failed (device time is scarce: one call must bring back everything), and
# the exit status is non-zero if any step failed. Logs and result files go under $OUT (default
# ./gpu-out); the device tool brings back at most 8 files, so they are packed into results.tar.gz
# beside summary.txt and the two logs most worth reading at once.
#
#   make gpu                                  # on the GPU machine, in the repository root
#   GPU_STEPS="build test verify" make gpu    # a subset, when one call cannot hold them all
#
# Steps: build (sm_90 only), test (the GPU tests, then the rest of the suite on torch 2.11),
# verify, sanitizer (compute-sanitizer memcheck over the CUDA tests), bench (every benchmark,
# full sizes). A warm machine keeps the build between calls, so later calls may skip it.
#
# Expects python3 with torch (CUDA), Triton, pytest and ninja (the GPU image has them).
# Wheels in .whl/ (e.g. torchdeq) are installed into /tmp/site first; verify.py is read from
# .gpu/verify.py (a copy of ../shared/gpu/verify.py: ../shared does not travel).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-$PWD/gpu-out}
PY=${PYTHON:-python3}
LOGS="$OUT/logs"
RESULTS="$OUT/results"
mkdir -p "$LOGS" "$RESULTS"
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
failed=0
STEPS=${GPU_STEPS:-build test verify sanitizer bench}
want() { [[ " $STEPS " == *" $1 "* ]]; }

step() {  # step NAME COMMAND...: run it, log it, record its status and duration
    local name=$1; shift
    local start=$SECONDS
    echo "=== $name: $*" | tee -a "$SUMMARY"
    "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    echo "    $name: exit $rc in $((SECONDS - start)) s" | tee -a "$SUMMARY"
    [ $rc -eq 0 ] || failed=1
    tail -n 15 "$LOGS/$name.log"
    return 0
}

if compgen -G ".whl/*.whl" >/dev/null; then
    step wheels "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

{
    git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
    nvidia-smi 2>&1 | head -15
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} >"$LOGS/environment.log" 2>&1

if want build; then
    step build env REVDEQ_FORCE_CUDA=1 REVDEQ_CUDA_ARCHS=9.0 MAX_JOBS=${MAX_JOBS:-16} \
        "$PY" -m pip install --no-build-isolation --no-deps -v -e .
fi
step backends "$PY" -c "import revdeq_kernels as rk; print(rk.available_backends())"
if want test; then
    step test-gpu "$PY" -m pytest -m gpu -rs -q
    step test-rest "$PY" -m pytest -q -m "not gpu"
fi
want verify && step verify "$PY" .gpu/verify.py --out "$RESULTS"
if want sanitizer && command -v compute-sanitizer >/dev/null; then
    step sanitizer compute-sanitizer --tool memcheck --error-exitcode 1 \
        "$PY" -m pytest -m gpu -q -x tests/backends/test_cuda.py tests/backends/test_cuda_exact.py
fi
want bench && step bench "$PY" -m benchmarks --out "$RESULTS"

echo "overall: $([ $failed -eq 0 ] && echo ok || echo FAILED)" | tee -a "$SUMMARY"
for f in test-gpu verify; do [ -f "$LOGS/$f.log" ] && cp "$LOGS/$f.log" "$OUT/"; done
tar -czf "$OUT/results.tar.gz" -C "$OUT" logs results
exit $failed
