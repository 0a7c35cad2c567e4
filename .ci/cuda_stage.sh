#!/usr/bin/env bash
# CI stage: prove the CUDA sources compile, link and register on this GPU-less machine.
# Builds the extension with FORCE_CUDA=1 against the CUDA build of torch (torch==2.14.1, cu130, in a
# venv cached between runs), in a copy of the tracked tree so the in-tree CPU build is untouched,
# then imports the package and checks that every op has a CUDA kernel.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${VISIONZIP_CUDA_VENV:-$HOME/.cache/visionzip-cuda-venv}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"  # torch's guess from PATH's nvcc wrapper misleads
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "cuda stage: no nvcc under $CUDA_HOME, skipped"
  exit 0
fi
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q torch==2.14.1 ninja setuptools wheel
fi

build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
git ls-files -z | tar --null -cf - -T - | tar -xf - -C "$build"
start=$SECONDS
(cd "$build" && FORCE_CUDA=1 MAX_JOBS=2 "$venv/bin/python" setup.py -q build_ext --inplace >build.log 2>&1) || {
  grep -E "error|Error" "$build/build.log" | head -40
  exit 1
}
echo "cuda stage: built for TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0} in $((SECONDS - start)) s"
(cd "$build" && PYTHONPATH="$build" "$venv/bin/python" .ci/check_cuda_registration.py)
