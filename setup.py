"""Builds visionzip_kernels._C, the C++ CPU kernels (and, in a later stage, the CUDA kernels).

Install with `pip install --no-build-isolation .` once torch is importable: build isolation would
pull a second, multi-GB torch into the build environment.
"""

from pathlib import Path

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).parent
CPU_SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp")) + sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp")
)


def extension():
    return CppExtension(
        name="visionzip_kernels._C",
        sources=CPU_SOURCES,
        extra_compile_args={"cxx": ["-O3", "-std=c++20", "-fopenmp"]},
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
