"""The install can't go wrong silently: the import-time torch check and setup.py without torch.

Under a torch other than the build's, `import visionzip_kernels` must raise one ImportError naming both
versions and the rebuild command, before _C is loaded (its undefined symbol would say neither). The
other torch is faked in a fresh interpreter by a build record (``visionzip_kernels._build_info``) put
in sys.modules first. setup.py without an importable torch (pip's isolated build) must stop with the
command to run, and still give the metadata an sdist needs.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import visionzip_kernels
from visionzip_kernels import _build_check

ROOT = Path(__file__).resolve().parents[1]


def _run_python(code: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_the_same_torch_passes_and_another_is_named_with_the_fix():
    running = (torch.__version__, torch.version.cuda or "cpu")
    assert _build_check.mismatch(running, running) is None
    message = _build_check.mismatch(("2.14.1+cu130", "13.0"), ("2.13.0+cpu", "cpu"))
    assert "torch 2.14.1+cu130 (CUDA 13.0)" in message and "torch 2.13.0+cpu (CPU)" in message
    assert "--no-build-isolation" in message and sys.executable in message


def test_import_under_another_torch_raises_before_loading_the_kernels():
    result = _run_python(
        """
        import sys, types
        record = types.ModuleType("visionzip_kernels._build_info")
        record.TORCH_VERSION, record.TORCH_CUDA_VERSION, record.WITH_CUDA_KERNELS = "1.99.0+cu999", "99.9", True
        sys.modules[record.__name__] = record
        try:
            import visionzip_kernels
        except ImportError as exc:
            print("ImportError:", exc)
            print("_C loaded:", "visionzip_kernels._C" in sys.modules)
        """
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "ImportError: visionzip_kernels was compiled against torch 1.99.0+cu999 (CUDA 99.9)" in out, out
    assert f"this Python runs torch {torch.__version__}" in out, out
    assert "pip install --no-build-isolation" in out, out
    assert "_C loaded: False" in out, out


def test_a_kernel_library_that_does_not_load_gets_the_rebuild_command():
    # No build record (a _C built or copied by other means) and a _C that fails to load.
    result = _run_python(
        """
        import sys
        sys.modules["visionzip_kernels._build_info"] = None  # import of it raises ModuleNotFoundError
        sys.modules["visionzip_kernels._C"] = None  # as a _C with an undefined symbol would
        try:
            import visionzip_kernels
        except ImportError as exc:
            print("ImportError:", exc)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "could not load its C++ kernels (_C) under torch" in result.stdout, result.stdout
    assert "pip install --no-build-isolation" in result.stdout, result.stdout


def test_the_build_record_matches_the_running_torch_when_present():
    try:
        from visionzip_kernels import _build_info
    except ModuleNotFoundError:
        return  # _C built without setup.py's record (copied in): nothing recorded to compare
    assert (_build_info.TORCH_VERSION, _build_info.TORCH_CUDA_VERSION) == (torch.__version__,
                                                                           torch.version.cuda or "cpu")


_WITHOUT_TORCH = """
    import runpy, sys
    sys.modules["torch"] = None  # as in pip's isolated build environment: import torch fails
    sys.argv = ["setup.py", *{args!r}]
    runpy.run_path("setup.py", run_name="__main__")
"""


def test_setup_without_torch_stops_the_build_with_the_command_to_run(tmp_path):
    result = _run_python(_WITHOUT_TORCH.format(args=["build_ext", "--build-temp", str(tmp_path)]))
    assert result.returncode != 0
    assert "torch is not importable" in result.stderr, result.stderr
    assert "pip install --no-build-isolation" in result.stderr, result.stderr
    assert not list(tmp_path.iterdir()), "nothing may be compiled without torch"


def test_setup_without_torch_still_gives_the_metadata():
    result = _run_python(_WITHOUT_TORCH.format(args=["--version"]))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == visionzip_kernels.__version__


def test_one_version_read_by_the_build_and_the_package():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    dynamic = pyproject["tool"]["setuptools"]["dynamic"]
    assert dynamic["version"] == {"attr": "visionzip_kernels.__version__"}
