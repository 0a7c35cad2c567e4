#!/usr/bin/env bash
# CI stage: the transformers integration tests against the oldest supported transformers (5.17, the
# GPU image's), beside the pinned one `make test` uses. That version is installed into a folder of
# its own (cached where the machine keeps $HOME) and put first on PYTHONPATH; the venv is untouched.
# The compile tests trace with dynamo as on the pinned version but skip inductor's code generation
# (aot_eager): that is the costly part on 2 cores and does not depend on the transformers version.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${VISIONZIP_OLDEST_TRANSFORMERS:-5.17.0}"
target="${VISIONZIP_OLDEST_TRANSFORMERS_DIR:-$HOME/.cache/visionzip-transformers-$version}"
python=.venv/bin/python
if ! PYTHONPATH="$target" "$python" -c "import sys, transformers; sys.exit(transformers.__version__ != '$version')" \
    2>/dev/null; then
  rm -rf "$target"
  # transformers 5.17 wants huggingface-hub 1.x and httpx, where the pinned one has hub 2.x.
  "$python" -m pip install -q --target "$target" --no-deps "transformers==$version" "huggingface-hub>=1.5,<2"
  "$python" -m pip install -q --target "$target" httpx
fi
echo "oldest transformers: $(PYTHONPATH="$target" "$python" -c 'import transformers; print(transformers.__version__)')"
VISIONZIP_TEST_COMPILE_BACKEND=aot_eager PYTHONPATH="$target" "$python" -m pytest tests/test_integrations.py \
  tests/test_integrations_model.py tests/test_llava_next.py tests/test_llava_onevision.py tests/test_qwen_vl.py \
  tests/test_qwen3_vl.py tests/test_qwen_video.py -q -p no:cacheprovider
