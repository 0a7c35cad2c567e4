"""The CMake build: the same C++ ops as a plain libtorch library, loaded with torch.ops.load_library.

The library registers the `visionzip` namespace itself, so it is loaded in a fresh interpreter that
has not imported visionzip_kernels (a namespace can be defined once per process); that interpreter
saves the op outputs, and this process compares them with the reference.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from visionzip_kernels import reference

from helpers import assert_close_verbose, assert_equal_verbose, make_case, separated_scores

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")


@pytest.fixture(scope="module")
def cmake_library(tmp_path_factory) -> Path:
    build = tmp_path_factory.mktemp("cmake-build")
    import torch.utils

    subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
         "-DCMAKE_BUILD_TYPE=Release"],
        check=True, capture_output=True, text=True,
    )
    subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)], check=True, capture_output=True,
                   text=True)
    libraries = list(build.glob("libvisionzip_ops*.so"))
    assert libraries, f"no libvisionzip_ops*.so in {build}"
    return libraries[0]


def test_cmake_library_loads_and_matches_reference(cmake_library: Path, tmp_path: Path) -> None:
    case = make_case(2, 97, 48, H=4, d=16, seed=3)
    scores = separated_scores(2, 97, seed=3)
    inputs = tmp_path / "inputs.pt"
    outputs = tmp_path / "outputs.pt"
    torch.save({"hidden": case.hidden, "q": case.q.contiguous(), "k": case.k.contiguous(), "metric": case.metric,
                "scores": scores}, inputs)
    script = textwrap.dedent(
        f"""
        import torch
        torch.ops.load_library({str(cmake_library)!r})
        x = torch.load({str(inputs)!r})
        ops = torch.ops.visionzip
        tokens, keep = ops.select_merge(x["hidden"], x["scores"], x["metric"], 9, 4, True)
        torch.save({{
            "cls": ops.cls_attention(x["q"][:, 0], x["k"], 0.25),
            "received": ops.attention_received(x["q"], x["k"], 0.25),
            "tokens": tokens, "keep": keep,
        }}, {str(outputs)!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    got = torch.load(outputs)
    expected_tokens, expected_keep = reference.select_merge(case.hidden, scores, case.metric, 9, 4, True)
    assert_equal_verbose(got["keep"], expected_keep, "keep")
    assert_close_verbose(got["tokens"], expected_tokens, atol=1e-6, rtol=1e-5, name="tokens")
    assert_close_verbose(got["cls"], reference.cls_attention(case.q[:, 0], case.k, 0.25), atol=1e-7, rtol=1e-5,
                         name="cls_attention")
    assert_close_verbose(got["received"], reference.attention_received(case.q, case.k, 0.25), atol=1e-7, rtol=1e-5,
                         name="attention_received")
