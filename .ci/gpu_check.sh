#!/usr/bin/env bash
# The project's GPU check, for a machine with an NVIDIA GPU: builds the extension for the local
# GPU's arch against the installed torch, runs the error-path tests alone, then the whole test suite
# (compute-sanitizer where installed), then the GPU benchmarks, each stage under its own time limit.
# Every log goes under $OUT (default out/gpu-check), so a run cut off midway still leaves what it did.
#
#   make gpu-check            # or: bash .ci/gpu_check.sh
#
# Uses the python3 on PATH as it is (no venv, no downloads): the GPU machine's own torch and triton.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
OUT=${OUT:-out/gpu-check}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
stage() { echo "=== $1 ($(date +%T))"; }
failed=0

stage env
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PYTHON" -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"

stage build
arch=$("$PYTHON" -c "import torch; print('.'.join(map(str, torch.cuda.get_device_capability())))")
FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=16 timeout "${BUILD_TIMEOUT:-300}" \
  "$PYTHON" setup.py build_ext --inplace >"$OUT/build.log" 2>&1
rc=$?; echo "build rc=$rc"; tail -2 "$OUT/build.log"
[ $rc -eq 0 ] || exit 1

stage error-path
# Issue 10: bad input crashed a CUDA build's process on a GPU machine. Serial, one process, with
# faulthandler; on a crash, the first crashing test again under gdb (when installed) for the native
# stack, and the library facts that could explain it (OpenMP runtimes, libstdc++, compiler).
timeout "${ERROR_PATH_TIMEOUT:-120}" "$PYTHON" -X faulthandler -m pytest tests/test_bad_input.py -q -p no:cacheprovider \
  -rf >"$OUT/error_path.log" 2>&1
rc=$?; echo "error-path rc=$rc"; tail -3 "$OUT/error_path.log"
if [ $rc -ne 0 ]; then
  failed=1
  { ldd visionzip_kernels/_C*.so; "$PYTHON" -c "import torch; print(torch.__config__.show())"; c++ --version
  } >"$OUT/error_path_env.txt" 2>&1
  crashed=$(grep -m1 -oE "tests/test_bad_input.py::[^ ]+" "$OUT/error_path.log")
  if [ -n "$crashed" ] && command -v gdb >/dev/null; then
    timeout 120 gdb -batch -ex run -ex bt --args "$PYTHON" -m pytest "$crashed" -q -p no:cacheprovider \
      >"$OUT/error_path_gdb.log" 2>&1
    grep -A25 "SIGSEGV" "$OUT/error_path_gdb.log" | head -40
  fi
fi

stage tests
# The whole suite, as `make test` runs it (in parallel when pytest-xdist is installed, as issue 10's
# crash was seen under -n 8); the Triton cases on CPU tensors skip without the interpreter.
parallel=$("$PYTHON" -c "import xdist" 2>/dev/null && echo "-n 8")
timeout "${TESTS_TIMEOUT:-420}" "$PYTHON" -X faulthandler -m pytest tests -q -p no:cacheprovider -rfs $parallel \
  >"$OUT/tests.log" 2>&1
rc=$?; echo "tests rc=$rc"; tail -15 "$OUT/tests.log"; [ $rc -eq 0 ] || failed=1

stage bench
timeout "${BENCH_TIMEOUT:-400}" "$PYTHON" -m pytest benchmarks/bench_scores_cuda.py benchmarks/bench_merge_cuda.py \
  -q -p no:cacheprovider --benchmark-columns=median --benchmark-max-time=0.3 --benchmark-min-rounds=5 \
  >"$OUT/bench.log" 2>&1
rc=$?; echo "bench rc=$rc"; sed -n '/scoring ops: median/,$p' "$OUT/bench.log" | grep -v "^-\|^Name\|^test_" | head -120
[ $rc -eq 0 ] || failed=1

stage bench-varlen
# The packed merge (Qwen): one call for all images vs a launch set per image vs one read of hidden,
# bf16 only, with its own time limit so that it cannot starve the stages above.
timeout "${VARLEN_BENCH_TIMEOUT:-120}" "$PYTHON" -m pytest benchmarks/bench_varlen_merge.py -k bf16 \
  -q -p no:cacheprovider --benchmark-columns=median --benchmark-max-time=0.3 --benchmark-min-rounds=5 \
  >"$OUT/bench_varlen.log" 2>&1
rc=$?; echo "bench-varlen rc=$rc"; sed -n '/side-by-side ratios/,$p' "$OUT/bench_varlen.log" | head -20
[ $rc -eq 0 ] || failed=1

if [ "${SKIP_END_TO_END:-0}" != 1 ]; then
  stage end-to-end
  timeout "${E2E_TIMEOUT:-400}" "$PYTHON" -m pytest benchmarks/bench_end_to_end.py -q -p no:cacheprovider \
    --benchmark-columns=median >"$OUT/end_to_end.log" 2>&1
  rc=$?; echo "end-to-end rc=$rc"; sed -n '/end to end/,$p' "$OUT/end_to_end.log" | head -30
  [ $rc -eq 0 ] || failed=1
fi

if command -v compute-sanitizer >/dev/null; then
  stage sanitizer
  timeout "${SANITIZER_TIMEOUT:-120}" "$PYTHON" -m pytest tests/test_cuda.py -q -p no:cacheprovider \
    -k compute_sanitizer >"$OUT/sanitizer.log" 2>&1
  rc=$?; echo "sanitizer rc=$rc"; tail -3 "$OUT/sanitizer.log"; [ $rc -eq 0 ] || failed=1
fi
stage done
exit $failed
