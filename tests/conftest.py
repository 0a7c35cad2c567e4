"""Shared pytest setup for the visionzip-kernels suite.

- Loads the package once (the compiled ops and their fake kernels / autograd).
- A hypothesis profile with a modest example count and no deadline (the kernels run at realistic
  sizes on a 2-core machine; timing is never asserted). ``HYPOTHESIS_PROFILE=thorough`` runs more.
- ``TRITON_INTERPRET=1`` on machines without CUDA, so the Triton tests run on CPU tensors.
- ``num_threads``: restores torch's intra-op thread count after a test changes it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import helpers` from any rootdir

# Without a GPU the Triton kernels run under the interpreter; it must be on before triton_ops is
# imported (the package imports it lazily, at the first Triton launch).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import visionzip_kernels  # noqa: E402,F401  (registers torch.ops.visionzip.*)

try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "default",
        max_examples=100,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.register_profile("thorough", max_examples=500, deadline=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
except ImportError:  # pragma: no cover - hypothesis is in requirements-dev.txt
    pass


@pytest.fixture
def num_threads():
    """Yields torch.set_num_threads and puts the original thread count back afterwards."""
    before = torch.get_num_threads()
    try:
        yield torch.set_num_threads
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state (inputs use explicit generators anyway)."""
    torch.manual_seed(0)
    yield
