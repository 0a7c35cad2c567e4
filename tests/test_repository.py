"""The repository is self-contained: the contract lives in docs/SPEC.md, names every op, and no
tracked file points outside the checkout (e.g. at a ../shared folder a clone does not have)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch

import visionzip_kernels  # noqa: F401  (registers the ops)

ROOT = Path(__file__).resolve().parents[1]


def _tracked_files() -> list[Path]:
    try:
        listing = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / name for name in listing.splitlines()]


def test_no_tracked_file_points_outside_the_repository():
    # ../shared held the contract before docs/SPEC.md; /work/ is where the authors' checkouts sit.
    outside = re.compile(r"\.\./shared\b|/work/")
    offenders = []
    for path in _tracked_files():
        if path == Path(__file__).resolve():
            continue  # this file names the patterns
        try:
            text = path.read_text()
        except (UnicodeDecodeError, FileNotFoundError):
            continue
        offenders += [f"{path.relative_to(ROOT)}:{i}" for i, line in enumerate(text.splitlines(), 1)
                      if outside.search(line)]
    assert offenders == [], f"paths outside the repository: {offenders}"


def _whole_name(op: str) -> re.Pattern:
    """op as a whole identifier: `select_merge` must not be found inside `varlen_select_merge`, nor
    `contextual_merge` inside `contextual_merge_backward`."""
    return re.compile(rf"(?<!\w){re.escape(op)}(?!\w)")


def ops_missing_from(text: str, ops) -> list[str]:
    """The ops of ``ops`` that ``text`` never names as a whole word."""
    return sorted(op for op in ops if not _whole_name(op).search(text))


def _registered_ops() -> set[str]:
    return {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("visionzip::")}


def test_the_spec_names_every_op():
    spec = (ROOT / "docs" / "SPEC.md").read_text()
    ops = _registered_ops()
    assert {"select_merge", "varlen_select_merge", "contextual_merge_backward"} <= ops
    missing = ops_missing_from(spec, ops)
    assert missing == [], f"ops the contract does not mention: {missing}"


# (op, a longer op whose name contains it, or None)
MISSING_OP_CASES = [("select_merge", "varlen_select_merge"), ("contextual_merge", "contextual_merge_backward"),
                    ("varlen_select_merge", "varlen_select_merge_backward"), ("dominant_topk", None)]


@pytest.mark.parametrize("op,longer", MISSING_OP_CASES, ids=[c[0] for c in MISSING_OP_CASES])
def test_the_spec_check_fails_for_a_missing_op(op, longer):
    """The check sees an op go missing from the contract, also when a longer op's name contains it."""
    spec = (ROOT / "docs" / "SPEC.md").read_text()
    without = _whole_name(op).sub("REMOVED", spec)
    if longer is not None:
        assert longer in without and op in without  # a substring check would still find op
    assert ops_missing_from(without, _registered_ops()) == [op]
