"""Builds visionzip_kernels._C: the C++ CPU kernels, plus the CUDA kernels when CUDA is wanted.

CUDA is built when torch has CUDA and either a GPU is visible or FORCE_CUDA=1 (for build machines
without a GPU); the arch list defaults to "8.0;9.0" and follows TORCH_CUDA_ARCH_LIST when set.
Install with `pip install --no-build-isolation .` once torch is importable: build isolation would
pull a second, multi-GB torch into the build environment.
"""

import os
from pathlib import Path

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, include_paths

ROOT = Path(__file__).parent


def sources(*patterns: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for pattern in patterns for p in ROOT.glob(pattern))


def want_cuda() -> bool:
    return torch.version.cuda is not None and (torch.cuda.is_available() or os.environ.get("FORCE_CUDA") == "1")


def extension():
    # No FMA contraction: the CPU kernels round each product and sum as the CUDA ones do (merge_math.h).
    # -Wshadow for our sources (the CUDA stage fails on any warning in csrc/); torch's headers, which
    # would trip it, are named system headers, and a system header's warnings are not shown.
    system_headers = [flag for path in include_paths() for flag in ("-isystem", path)]
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-Wshadow", *system_headers]
    cpu_sources = sources("csrc/*.cpp", "csrc/cpu/*.cpp")
    if not want_cuda():
        return CppExtension("visionzip_kernels._C", cpu_sources, extra_compile_args={"cxx": cxx_flags},
                            extra_link_args=["-fopenmp"])
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    return CUDAExtension(
        "visionzip_kernels._C",
        cpu_sources + sources("csrc/cuda/*.cu"),
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr",
                                                         "-Xcompiler", "-Wshadow", *system_headers]},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="visionzip-kernels",
    version="0.1.0",
    description="Fused VisionZip token selection and merging as torch.ops.visionzip.* ops",
    packages=find_packages(include=["visionzip_kernels*", "triton_ops*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
)
