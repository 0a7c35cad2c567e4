#!/usr/bin/env bash
# CI stage: the package as a user of another codebase gets it.
#  1. builds the sdist from the tracked files (no torch needed) and checks it holds what a build and
#     the tests need (headers, csrc/cuda, CMakeLists.txt, LICENSE, NOTICE, docs/SPEC.md, tests/);
#  2. builds a wheel from that sdist (pip wheel --no-build-isolation, against the project venv's torch);
#  3. in a fresh venv with only torch: `pip install <sdist>` with pip's default build isolation must
#     fail, with setup.py's message naming --no-build-isolation (never a broken install);
#  4. installs the wheel into that venv and runs .ci/smoke_test.py from another folder, no checkout on
#     the path: every op against the reference, and select_merge under torch.compile(fullgraph=True).
#
# Caches (where the machine keeps $HOME): the wheel, keyed by the hash of the sdist's contents and the
# torch version (VISIONZIP_PACKAGING_REBUILD=1 builds anyway); pip's own cache serves torch's wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
checkout="$(pwd)"
python="${VISIONZIP_PACKAGING_PYTHON:-$checkout/.venv/bin/python}"  # has torch, setuptools, build
cache="${VISIONZIP_PACKAGING_CACHE:-$HOME/.cache/visionzip-packaging}"
start=$SECONDS

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src" "$work/dist" "$work/elsewhere"
git ls-files -z | tar --null -cf - -T - | tar -xf - -C "$work/src"

# 1. The sdist.
(cd "$work/src" && "$python" -m build --sdist --no-isolation --outdir "$work/dist" >"$work/sdist.log" 2>&1) ||
  { tail -30 "$work/sdist.log"; echo "packaging stage: the sdist build failed"; exit 1; }
sdist="$(ls "$work"/dist/*.tar.gz)"
"$python" - "$sdist" "$work/src" <<'EOF'
import sys
import tarfile
from pathlib import Path

sdist, source = Path(sys.argv[1]), Path(sys.argv[2])
with tarfile.open(sdist) as archive:
    names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
# Every tracked file under these paths, and these files, must be in the sdist.
folders = ("csrc/", "tests/", "examples/")
files = ("CMakeLists.txt", "LICENSE", "NOTICE", "README.md", "docs/SPEC.md", "pyproject.toml", "setup.py",
         "requirements-dev.txt", "requirements-integrations.txt", "visionzip_kernels/py.typed")
tracked = (str(p.relative_to(source)) for p in source.rglob("*") if p.is_file())
wanted = {name for name in tracked if name.startswith(folders)}
missing = sorted((wanted | set(files)) - names)
assert not missing, f"missing from {sdist.name}: {missing}"
built = sorted(n for n in names if n.endswith((".so", "_build_info.py")))
assert not built, f"build outputs in {sdist.name}: {built}"
print(f"packaging stage: {sdist.name} has all {len(wanted) + len(files)} required files")
EOF

# 2. A wheel from the sdist.
torch_version="$("$python" -c "import torch; print(torch.__version__)")"
key="$( (tar -xzOf "$sdist"; echo "$torch_version") | sha256sum | cut -c1-16)"
if ls "$cache/$key"/*.whl >/dev/null 2>&1 && [ "${VISIONZIP_PACKAGING_REBUILD:-0}" != 1 ]; then
  echo "packaging stage: sdist contents unchanged since wheel $key, reused it"
else
  built=$SECONDS
  "$python" -m pip wheel -q --no-build-isolation --no-deps "$sdist" -w "$work/wheel" >"$work/wheel.log" 2>&1 ||
    { grep -E -A3 "error|Error" "$work/wheel.log" | head -60; echo "packaging stage: the wheel build failed"; exit 1; }
  rm -rf "${cache:?}/$key" && mkdir -p "$cache/$key" && cp "$work"/wheel/*.whl "$cache/$key/"
  ls -1dt "$cache"/*/ | tail -n +4 | xargs -r rm -rf  # keep the three newest wheels
  echo "packaging stage: built the wheel from the sdist in $((SECONDS - built)) s"
fi
wheel="$(ls "$cache/$key"/*.whl)"

# 3. A fresh venv with torch alone; the default `pip install <sdist>` must stop with the fix.
venv_start=$SECONDS
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "torch==$torch_version"
echo "packaging stage: fresh venv with torch $torch_version in $((SECONDS - venv_start)) s"
if "$work/venv/bin/python" -m pip install "$sdist" >"$work/isolated.log" 2>&1; then
  echo "packaging stage: pip install with build isolation succeeded; it must stop with setup.py's message"
  exit 1
fi
grep -q -- "--no-build-isolation" "$work/isolated.log" ||
  { tail -30 "$work/isolated.log"; echo "packaging stage: the isolated build failed without the message"; exit 1; }
echo "packaging stage: pip install with build isolation stops with the --no-build-isolation message"

# 4. The wheel in that venv, used from another folder.
"$work/venv/bin/python" -m pip install -q "$wheel"
cp .ci/smoke_test.py "$work/elsewhere/"
(cd "$work/elsewhere" && "$work/venv/bin/python" -I smoke_test.py "$checkout")
echo "packaging stage: done in $((SECONDS - start)) s"
