"""Side-by-side benchmark support: every path of a comparison runs in the same session, and the
summary prints each path's median time as a ratio to the group's baseline, with its peak memory.

Benchmarks reuse the tests' setup (tests/helpers.py), so the shapes measured are the shapes tested.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from examples.profiling import format_bytes, peak_memory_bytes  # noqa: E402

_RESULTS = pytest.StashKey[dict]()


@pytest.fixture
def side_by_side(request, benchmark):
    """``run(group, path, fn, device="cpu", rounds=None)`` benchmarks ``fn`` as ``path`` of ``group``
    and records its median and peak memory for the ratio table. The first path recorded in a group
    is the baseline of its ratios."""
    results = request.config.stash.setdefault(_RESULTS, {})

    def run(group: str, path: str, fn: Callable[[], object], device: str = "cpu", rounds: int | None = None):
        sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

        def timed():
            out = fn()
            sync()
            return out

        benchmark.group = group
        if rounds is None:
            benchmark(timed)
        else:
            benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1, iterations=1)
        peak = peak_memory_bytes(fn, device)
        benchmark.extra_info["peak_bytes"] = peak
        results.setdefault(group, {})[path] = (benchmark.stats.stats.median, peak)

    return run


@pytest.fixture(scope="module")
def register_summary(request):
    """``register(name, plugin)`` registers a benchmark module's own summary plugin (an object with a
    pytest_terminal_summary hook) once a run."""

    def register(name: str, plugin: object) -> None:
        if not request.config.pluginmanager.has_plugin(name):
            request.config.pluginmanager.register(plugin, name)

    return register


def pytest_terminal_summary(terminalreporter, config) -> None:
    results = config.stash.get(_RESULTS, {})
    if not results:
        return
    terminalreporter.section("side-by-side ratios (median time / baseline median, same run)")
    for group, paths in results.items():
        baseline = next(iter(paths.values()))[0]
        terminalreporter.write_line(f"{group}")
        for path, (median, peak) in paths.items():
            terminalreporter.write_line(
                f"    {path:<34} {median * 1e3:10.3f} ms   {median / baseline:8.2f}x   peak {format_bytes(peak):>10}"
            )
