"""Loads the compiled kernels (``_C``) only under the torch they were built against.

``_C`` is C++ compiled against one torch's headers: under another torch it fails to load with an
undefined symbol (or worse, loads and misbehaves). setup.py records the build's torch in
``_build_info.py`` next to ``_C``; importing this module compares that record with the running
torch *before* loading ``_C`` and raises one ``ImportError`` that names both versions and the
command that rebuilds the extension. A ``_C`` that fails to load for another reason (not built, or
built without a record) gets the same command in its message.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

PACKAGE_ROOT = Path(__file__).resolve().parent


def describe(torch_version: str, cuda_version: str | None) -> str:
    """'torch 2.13.0+cpu (CPU)' or 'torch 2.14.1+cu130 (CUDA 13.0)'."""
    return f"torch {torch_version} ({'CPU' if cuda_version in (None, 'cpu') else f'CUDA {cuda_version}'})"


def rebuild_command() -> str:
    """The command that rebuilds _C against the running torch, for this kind of install."""
    python = sys.executable
    checkout = PACKAGE_ROOT.parent
    if (checkout / "setup.py").is_file():  # an in-place or editable build inside a checkout
        return f"cd {checkout} && {python} -m pip install --no-build-isolation -e .    (or `make setup` there)"
    return (f"{python} -m pip install --no-build-isolation --no-deps --no-cache-dir --force-reinstall "
            "<the visionzip-kernels checkout or sdist>")


def mismatch(built: tuple[str, str], running: tuple[str, str]) -> str | None:
    """The ImportError message when the build's (torch, CUDA) differs from the running one, else None."""
    if tuple(built) == tuple(running):
        return None
    return (
        f"visionzip_kernels was compiled against {describe(*built)}, but this Python runs {describe(*running)}; "
        "its C++ kernels load only under the torch they were built with. Rebuild them against this torch "
        f"(with build isolation off, so the build uses this torch):\n    {rebuild_command()}"
    )


def running_torch() -> tuple[str, str]:
    return torch.__version__, torch.version.cuda or "cpu"


def check_and_load() -> None:
    """Compares the build record with the running torch, then imports _C; raises ImportError on failure."""
    try:
        info = importlib.import_module(f"{__package__}._build_info")
    except ModuleNotFoundError:
        info = None  # built before the record existed, or by other means: loading _C decides
    if info is not None:
        message = mismatch((info.TORCH_VERSION, info.TORCH_CUDA_VERSION), running_torch())
        if message is not None:
            raise ImportError(message)
    try:
        importlib.import_module(f"{__package__}._C")
    except ImportError as exc:
        raise ImportError(
            f"visionzip_kernels could not load its C++ kernels (_C) under {describe(*running_torch())}: {exc}\n"
            f"If _C is missing or was built against another torch, rebuild it against this one:\n"
            f"    {rebuild_command()}"
        ) from exc


check_and_load()
