"""select_merge on CUDA (issue 4): ours vs the PyTorch reference vs the upstream-style path, at
N = 577, C = 1024, D/K = 54/10, B in {1, 32, 256}, fp16 and bf16. Skipped without a GPU.

    python -m pytest benchmarks/bench_merge_cuda.py --benchmark-columns=median

Besides the side-by-side table (median time, ratio to ours, peak memory per path), the summary gives
ours' achieved bandwidth as a fraction of a device-to-device copy of hidden timed in the same run
(CUDA events, back to back): select_merge reads hidden once and writes (D + K) / N of it, the copy
reads and writes all of it. Targets (issue 4): >= 20x faster than the upstream-style path at B = 1,
>= 70% of copy bandwidth at B = 256.

A second summary (issue 10) splits ours into its kernels: the device time of each plan kernel
(plan_select_kernel, plan_assign_kernel, plan_lists_kernel) and of the row kernel
(merge_forward_kernel) per call, from torch.profiler, next to the whole op eager and replayed from a
CUDA graph and a copy of hidden (CUDA events, same run). Targets: select_merge <= 15 us at B = 1
under a CUDA graph; the plan cheap next to the row kernel at B = 256.
"""

from __future__ import annotations

import pytest
import torch

from visionzip_kernels import reference, select_merge
from visionzip_kernels.upstream import upstream_select_merge

from helpers import merge_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

N, C, DOMINANT, CONTEXTUAL = 577, 1024, 54, 10
_BANDWIDTH: dict[str, str] = {}


_KERNELS: dict[str, str] = {}
PLAN_KERNELS = ("plan_select_kernel", "plan_assign_kernel", "plan_lists_kernel")
ROW_KERNEL = "merge_forward_kernel"


class _Summary:
    """Prints the bandwidth lines and the per-kernel lines after the side-by-side table."""

    @staticmethod
    def pytest_terminal_summary(terminalreporter) -> None:
        if _BANDWIDTH:
            terminalreporter.section("select_merge cuda: bandwidth vs a copy of hidden (same run)")
            for line in _BANDWIDTH.values():
                terminalreporter.write_line(line)
        if _KERNELS:
            terminalreporter.section("select_merge cuda: plan vs row kernel, eager vs CUDA graph (same run)")
            for line in _KERNELS.values():
                terminalreporter.write_line(line)


@pytest.fixture(scope="module", autouse=True)
def _bandwidth_summary(register_summary):
    register_summary("visionzip-bandwidth-summary", _Summary())


def _event_time(fn, iters: int = 50) -> float:
    """Seconds per call, averaged over back-to-back calls between two CUDA events."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


@pytest.mark.parametrize("dtype_name", ["fp16", "bf16"])
@pytest.mark.parametrize("B", [1, 32, 256])
@pytest.mark.parametrize("path", ["ours", "reference", "upstream-style (merge from the map)", "copy of hidden"])
def test_select_merge_cuda(side_by_side, benchmark, path: str, B: int, dtype_name: str) -> None:
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    hidden, scores, metric, _ = merge_inputs(B, N, C, DOMINANT, CONTEXTUAL, dtype=dtype, seed=B)
    hidden, scores, metric = hidden.cuda(), scores.cuda(), metric.cuda()
    # The upstream path starts from the CLS row of its attention map; only that row matters here.
    attn = torch.zeros(B, 1, N, N, device="cuda", dtype=dtype) if path.startswith("upstream") else None
    if attn is not None:
        attn[:, 0, 0] = scores.to(dtype)
    paths = {
        "ours": lambda: select_merge(hidden, scores, metric, DOMINANT, CONTEXTUAL),
        "reference": lambda: reference.select_merge(hidden, scores, metric, DOMINANT, CONTEXTUAL),
        "upstream-style (merge from the map)": lambda: upstream_select_merge(attn, hidden, metric, DOMINANT,
                                                                            CONTEXTUAL),
        "copy of hidden": lambda: hidden.clone(),
    }
    group = f"select_merge cuda B={B} {dtype_name}"
    side_by_side(group, path, paths[path], device="cuda")
    if path == "ours":
        ours = _event_time(paths["ours"])
        copy = _event_time(paths["copy of hidden"])
        size = hidden.element_size()
        ours_bytes = B * N * C * size + B * (DOMINANT + CONTEXTUAL) * C * size + metric.numel() * metric.element_size()
        fraction = (ours_bytes / ours) / (2 * hidden.numel() * size / copy)
        benchmark.extra_info["copy_bandwidth_fraction"] = fraction
        _BANDWIDTH[group] = (f"    {group:<34} ours {ours * 1e6:9.1f} us  {ours_bytes / ours / 1e9:7.1f} GB/s   "
                             f"copy {copy * 1e6:9.1f} us  {2 * hidden.numel() * size / copy / 1e9:7.1f} GB/s   "
                             f"fraction {fraction:5.1%}")


def _kernel_times(fn, iters: int = 20) -> dict[str, float]:
    """Device seconds per call of each kernel whose name contains one of PLAN_KERNELS or ROW_KERNEL
    (torch.profiler, CUDA activity), summed over template instances."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    times = dict.fromkeys((*PLAN_KERNELS, ROW_KERNEL), 0.0)
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "cuda_time_total", 0.0)
        for name in times:
            if name in event.key:
                times[name] += device_us / 1e6 / iters
    return times


def _graph_time(fn, iters: int = 50) -> float:
    """Seconds per replay of fn captured in a CUDA graph (one call per replay), CUDA events."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return _event_time(graph.replay, iters)


@pytest.mark.parametrize("B", [1, 32, 256])
def test_select_merge_cuda_kernels(benchmark, B: int) -> None:
    """The plan kernels alone vs the row kernel (profiler device time), the whole op eager and under
    a CUDA graph, and a copy of hidden (events), fp16, same shapes as above."""
    hidden, scores, metric, _ = merge_inputs(B, N, C, DOMINANT, CONTEXTUAL, dtype=torch.float16, seed=B)
    hidden, scores, metric = hidden.cuda(), scores.cuda(), metric.cuda()

    def ours():
        return select_merge(hidden, scores, metric, DOMINANT, CONTEXTUAL)

    kernels = _kernel_times(ours)
    eager = _event_time(ours)
    graph = _graph_time(ours)
    copy = _event_time(lambda: hidden.clone())
    plan = sum(kernels[name] for name in PLAN_KERNELS)
    benchmark.extra_info.update({f"{name}_us": t * 1e6 for name, t in kernels.items()})
    benchmark.extra_info.update({"eager_us": eager * 1e6, "graph_us": graph * 1e6, "copy_us": copy * 1e6})
    benchmark.pedantic(ours, rounds=1, iterations=1)
    parts = "  ".join(f"{name.removesuffix('_kernel')} {kernels[name] * 1e6:7.1f}" for name in PLAN_KERNELS)
    _KERNELS[B] = (f"    B={B:<4} fp16  {parts}  = plan {plan * 1e6:7.1f} us   "
                   f"row {kernels[ROW_KERNEL] * 1e6:7.1f} us   op eager {eager * 1e6:7.1f} us  "
                   f"graph {graph * 1e6:7.1f} us   copy {copy * 1e6:7.1f} us")
