#!/usr/bin/env bash
# CI stage: prove the CUDA sources compile (warning-free), link and register on this GPU-less
# machine. Builds the extension with FORCE_CUDA=1 against the CUDA build of torch (torch==2.14.1,
# cu130, in a venv cached between runs), in a copy of the tracked tree so the in-tree CPU build is
# untouched, then imports the package and checks that every op has a CUDA kernel.
#
# Then, with that CUDA build loaded, it runs the error-path, CPU kernel and conformance tests: issue 10
# saw bad input crash a CUDA build's process on a GPU machine, so every rule's error path is walked
# through a CUDA build here too (compiler flags, ABI and link differences show without a GPU).
#
# Caches (where the machine keeps $HOME): the venv, and the built library keyed by the hash of the
# sources, the torch version and the arch list (VISIONZIP_CUDA_REBUILD=1 builds anyway).
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${VISIONZIP_CUDA_VENV:-$HOME/.cache/visionzip-cuda-venv}"
cache="${VISIONZIP_CUDA_BUILD_CACHE:-$HOME/.cache/visionzip-cuda-build}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"  # torch's guess from PATH's nvcc wrapper misleads
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "cuda stage: no nvcc under $CUDA_HOME, skipped"
  exit 0
fi
start=$SECONDS
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q torch==2.14.1 ninja setuptools wheel
  echo "cuda stage: created $venv in $((SECONDS - start)) s"
fi
# The test tools (a venv cached from before they were needed gets them too).
"$venv/bin/python" -c "import pytest, hypothesis, numpy" 2>/dev/null ||
  "$venv/bin/python" -m pip install -q -r requirements-dev.txt
torch_version="$("$venv/bin/python" -c "import torch; print(torch.__version__)" 2>/dev/null)"

build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
git ls-files -z | tar --null -cf - -T - | tar -xf - -C "$build"
key="$( (cd "$build" && cat setup.py $(find csrc -type f | sort); echo "$torch_version $TORCH_CUDA_ARCH_LIST") | sha256sum | cut -c1-16)"
lib="_C.cpython-$("$venv/bin/python" -c "import sys; print(f'{sys.version_info.major}{sys.version_info.minor}')")-x86_64-linux-gnu.so"
if [ -f "$cache/$key/$lib" ] && [ "${VISIONZIP_CUDA_REBUILD:-0}" != 1 ]; then
  cp "$cache/$key/$lib" "$build/visionzip_kernels/"
  echo "cuda stage: sources unchanged since build $key, reused it"
else
  built=$SECONDS
  (cd "$build" && FORCE_CUDA=1 MAX_JOBS=2 "$venv/bin/python" setup.py build_ext --inplace >build.log 2>&1) || {
    grep -E -A3 "error|Error" "$build/build.log" | head -60
    exit 1
  }
  # Warning-free: any compiler warning about our own sources fails the stage.
  if grep -E "csrc/.*(warning|Warning)" "$build/build.log" >"$build/warnings.txt"; then
    cat "$build/warnings.txt"
    echo "cuda stage: the CUDA build has warnings"
    exit 1
  fi
  echo "cuda stage: built for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST in $((SECONDS - built)) s"
  mkdir -p "$cache/$key" && cp "$build/visionzip_kernels/$lib" "$cache/$key/"
  ls -1dt "$cache"/*/ | tail -n +4 | xargs -r rm -rf  # keep the three newest builds
fi
(cd "$build" && PYTHONPATH="$build" "$venv/bin/python" .ci/check_cuda_registration.py)
tested=$SECONDS
(cd "$build" && PYTHONPATH="$build" "$venv/bin/python" -X faulthandler -m pytest -q -p no:cacheprovider \
  tests/test_loading.py tests/test_bad_input.py tests/test_cpu_kernels.py tests/test_op_conformance.py | tail -3)
echo "cuda stage: error-path and CPU tests with the CUDA build loaded in $((SECONDS - tested)) s"
echo "cuda stage: done in $((SECONDS - start)) s"
