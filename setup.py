"""Builds visionzip_kernels._C: the C++ CPU kernels, plus the CUDA kernels when CUDA is wanted.

The project's metadata (name, version, dependencies) is in pyproject.toml; this file only adds the
extension, which is compiled against the torch importable here and only runs with that same torch.
So the build needs torch installed first and build isolation off:

    pip install torch==2.13.0                       # or the torch build you run (CUDA, ...)
    pip install --no-build-isolation <checkout or sdist>

With build isolation on (pip's default), pip would build in a fresh environment without torch (or
with the newest torch, not the one that runs the extension: an undefined symbol at import); the build
then stops with a message saying the command above. An sdist (`python -m build --sdist`) and the
metadata need no torch.

CUDA is built when torch has CUDA and either a GPU is visible or FORCE_CUDA=1 (for build machines
without a GPU); the arch list defaults to "8.0;9.0" and follows TORCH_CUDA_ARCH_LIST when set.
The build writes visionzip_kernels/_build_info.py next to _C (torch and CUDA versions it was built
against); `import visionzip_kernels` compares it with the running torch before loading _C.
"""

import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, include_paths
except ImportError:  # an isolated build environment, or torch not installed yet
    torch = None

ROOT = Path(__file__).parent
EXTENSION_NAME = "visionzip_kernels._C"
NO_TORCH_MESSAGE = """
visionzip-kernels: torch is not importable in this build environment.

The extension is compiled against the torch that will run it, so build it with that torch and
without build isolation (pip's isolated build would use no torch, or another version of it):

    {python} -m pip install torch==2.13.0 ninja "setuptools>=77"   # any torch >= 2.6; keep yours if installed
    {python} -m pip install --no-build-isolation {target}
"""


def sources(*patterns: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for pattern in patterns for p in ROOT.glob(pattern))


CPU_SOURCES = sources("csrc/*.cpp", "csrc/cpu/*.cpp")


def want_cuda() -> bool:
    return torch.version.cuda is not None and (torch.cuda.is_available() or os.environ.get("FORCE_CUDA") == "1")


def extension() -> Extension:
    # No FMA contraction: the CPU kernels round each product and sum as the CUDA ones do (merge_math.h).
    # -Wshadow for our sources (the CUDA stage fails on any warning in csrc/); torch's headers, which
    # would trip it, are named system headers, and a system header's warnings are not shown.
    system_headers = [flag for path in include_paths() for flag in ("-isystem", path)]
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-Wshadow", *system_headers]
    if not want_cuda():
        return CppExtension(EXTENSION_NAME, CPU_SOURCES, extra_compile_args={"cxx": cxx_flags},
                            extra_link_args=["-fopenmp"])
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    return CUDAExtension(
        EXTENSION_NAME,
        CPU_SOURCES + sources("csrc/cuda/*.cu"),
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr",
                                                         "-Xcompiler", "-Wshadow", *system_headers]},
        extra_link_args=["-fopenmp"],
    )


def build_info(with_cuda_kernels: bool) -> str:
    """The text of visionzip_kernels/_build_info.py: what _C was compiled against."""
    return (
        '"""Written by setup.py when _C was built (not tracked by git): the torch it was compiled against.\n\n'
        "visionzip_kernels/__init__.py compares these with the running torch before it loads _C, whose\n"
        'C++ symbols exist only in that torch."""\n\n'
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"TORCH_CUDA_VERSION = {torch.version.cuda or 'cpu'!r}  # the CUDA version torch was built with\n"
        f"WITH_CUDA_KERNELS = {with_cuda_kernels!r}\n"
    )


if torch is not None:

    class BuildExtensionWithInfo(BuildExtension):
        """torch's BuildExtension, which then records the build's torch in _build_info.py beside _C,
        so that every install that has _C has the record of what _C needs."""

        def run(self) -> None:
            super().run()
            with_cuda = any(source.endswith(".cu") for ext in self.extensions for source in ext.sources)
            # The build directory feeds wheels (bdist_wheel copies all of it); an in-place or editable
            # build imports from the source tree, where setuptools has copied _C.
            targets = {Path(self.build_lib) / "visionzip_kernels" / "_build_info.py"}
            if self.inplace:
                targets.add(Path(self.get_ext_fullpath(EXTENSION_NAME)).parent / "_build_info.py")
            for target in targets:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(build_info(with_cuda))

    ext_modules = [extension()]
    build_ext_command = BuildExtensionWithInfo
else:

    class BuildExtensionWithInfo(build_ext):
        """Stands in for the build without torch: stops it with the message above, before compiling."""

        def run(self) -> None:
            # A checkout is built where it is (pip >= 21.3), so its path is known; an sdist is unpacked to a
            # temporary folder, whose path would not help.
            target = str(ROOT.resolve()) if (ROOT / ".git").exists() else "<path to the checkout or sdist>"
            if self.inplace or getattr(self, "editable_mode", False):
                target = f"-e {target}"
            sys.exit(NO_TORCH_MESSAGE.format(python="python", target=target))

    # The same sources, so that the metadata and the sdist are complete without torch.
    ext_modules = [Extension(EXTENSION_NAME, CPU_SOURCES)]
    build_ext_command = BuildExtensionWithInfo

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext_command})
