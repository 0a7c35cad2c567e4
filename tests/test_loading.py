"""How the extension sits in the process: facts behind issue 10's crash of a CUDA build on bad input.

One candidate cause was two OpenMP runtimes (ours linked with -fopenmp beside the one torch
bundles) or two C++ runtimes, whose thread pools or exception machinery would not know each other.
These tests pin that the process maps exactly one of each after `import visionzip_kernels`; the
CUDA stage of CI runs them with the CUDA build of torch too (.ci/cuda_stage.sh)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import visionzip_kernels

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")

RUNTIMES = {"OpenMP": ("libgomp", "libiomp", "libomp."), "C++": ("libstdc++", "libc++.")}


def _mapped_libraries() -> set[str]:
    lines = Path("/proc/self/maps").read_text().splitlines()
    return {line.split()[-1] for line in lines if line.split()[-1].startswith("/")}


@pytest.mark.parametrize("runtime", sorted(RUNTIMES))
def test_one_runtime_of_each_kind_is_loaded(runtime):
    assert Path(visionzip_kernels._C.__file__).resolve() in {Path(p).resolve() for p in _mapped_libraries()}
    names = RUNTIMES[runtime]
    loaded = sorted(p for p in _mapped_libraries() if any(Path(p).name.startswith(n) for n in names))
    assert len(loaded) <= 1, f"{len(loaded)} {runtime} runtimes in one process: {loaded}"
