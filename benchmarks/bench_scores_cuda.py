"""The scoring ops on CUDA (issue 9), every path side by side in one run, fp16:

- scores_and_metric (keep_cls, LLaVA-1.5 geometry N=577 H=16 d=64, B in {1, 32, 256}): ours
  (torch.ops.visionzip.scores_and_metric on the CLS query row) vs the reference (CLS row in fp32,
  then k.mean over heads) vs the upstream-style path (the full softmax(QK^T) map, its CLS row, head
  mean, k.mean) vs the floor (k.sum(): reads k once);
- keep from q/k (scores + top-k, D = 54, same geometry): ours (the fused Triton kernel) vs the
  reference vs upstream-style (as benchmarks/bench_scores.py) vs the floor;
- attention_received (no CLS, SigLIP geometry N=729 H=16 d=72, B in {1, 8, 32}): ours vs the
  reference vs upstream-style (full map, mean over heads and queries) vs one SDPA forward of the
  same q/k (v = k), the comparison target, vs the floor.

Per path: median time per call eager (CUDA events, host included) and under a CUDA graph (replay
of captured calls: the kernel time), and peak memory above the inputs. Per group: ours' host
overhead per call and, for the ops that read k once, ours' bandwidth (bytes of k / time) as a
fraction of the floor's. Targets: scores_and_metric >= 70% of the floor's bandwidth at B = 256 and
<= 15 us under a graph at B = 1; attention_received <= 1.5x SDPA. Nothing is asserted.

    python -m pytest benchmarks/bench_scores_cuda.py -q -p no:cacheprovider --benchmark-columns=median

Skipped without CUDA. VZ_BENCH_SCORES_CPU=1 runs the same code on CPU (B in {1, 2}, fp32,
perf_counter timing, no graph mode) to develop the benchmark on a machine without a GPU.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from examples.profiling import format_bytes, median_seconds, peak_memory_bytes
from visionzip_kernels import cls_attention, dominant_topk, reference
from visionzip_kernels.upstream import full_attention

from helpers import Case, make_case

ON_CPU = os.environ.get("VZ_BENCH_SCORES_CPU") == "1"
if not ON_CPU and not torch.cuda.is_available():
    pytest.skip("needs CUDA (VZ_BENCH_SCORES_CPU=1 runs it on CPU for development)", allow_module_level=True)

DEVICE = "cpu" if ON_CPU else "cuda"
DTYPE = torch.float32 if ON_CPU else torch.float16
LLAVA = (577, 16, 64)  # N, H, d
SIGLIP = (729, 16, 72)
LLAVA_BATCHES = (1, 2) if ON_CPU else (1, 32, 256)
SIGLIP_BATCHES = (1, 2) if ON_CPU else (1, 8, 32)
DOMINANT = 54
CALLS = 10 if ON_CPU else 100  # timed calls per median
CALLS_PER_GRAPH = 20  # captured back to back, so one replay's launch cost is spread over many calls
GRAPH_REPLAYS = 20
LABELS = {"floor": "floor: k.sum() reads k once", "sdpa": "SDPA forward (v = k)"}


@dataclass
class Group:
    title: str
    k_bytes: int | None = None  # set where ours reads k once: bandwidth vs the floor is meaningful
    rows: dict[str, dict[str, float | int | str | None]] = field(default_factory=dict)


_GROUPS: dict[str, Group] = {}


@functools.lru_cache(maxsize=1)  # paths vary fastest, so one case serves a whole group
def _case(N: int, H: int, d: int, B: int) -> Case:
    return make_case(B, N, 8, H=H, d=d, dtype=DTYPE, seed=B, device=DEVICE)


def _sync() -> None:
    if not ON_CPU:
        torch.cuda.synchronize()


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median of ``repeats`` calls: on CUDA issued back to back, each between two events, so a call
    whose launch takes longer than the GPU's work shows its host time; on CPU, perf_counter."""
    if ON_CPU:
        return median_seconds(fn, repeats)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    _sync()
    for start, end in events:
        start.record()
        fn()
        end.record()
    _sync()
    return statistics.median(start.elapsed_time(end) for start, end in events) / 1e3


def _graph_seconds(fn: Callable[[], object]) -> float | str:
    """Median seconds per call replaying a CUDA graph of CALLS_PER_GRAPH calls: the kernel time."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(CALLS_PER_GRAPH):
                fn()
    except RuntimeError as exc:  # e.g. a host sync in the path: report it, keep the eager numbers
        return f"capture failed: {type(exc).__name__}: {exc}".splitlines()[0]
    graph.replay()
    return _median_seconds(graph.replay, GRAPH_REPLAYS) / CALLS_PER_GRAPH


def _host_seconds_per_call(fn: Callable[[], object]) -> float:
    """Wall clock of back-to-back calls without a sync, per call: what the host spends launching."""
    _sync()
    start = time.perf_counter()
    for _ in range(CALLS):
        fn()
    elapsed = time.perf_counter() - start
    _sync()
    return elapsed / CALLS


def _measure(benchmark, op: str, B: int, geometry: tuple[int, int, int], path: str, fn: Callable[[], object],
             k_read_once: torch.Tensor | None = None) -> None:
    """Times ``fn`` as ``path`` of the group (op, B) and records its row for the summary."""
    def timed() -> object:
        out = fn()
        _sync()
        return out

    key = f"{op} B={B} {str(DTYPE).removeprefix('torch.')} {DEVICE}"
    k_bytes = None if k_read_once is None else k_read_once.numel() * k_read_once.element_size()
    group = _GROUPS.setdefault(key, Group(f"{key} (N={geometry[0]} H={geometry[1]} d={geometry[2]})", k_bytes))
    benchmark.group = key
    # pytest-benchmark's own rounds (host included, synced) double as the warm-up of what follows
    benchmark.pedantic(timed, rounds=5 if ON_CPU else 20, warmup_rounds=1, iterations=1)
    row: dict[str, float | int | str | None] = {"peak_bytes": peak_memory_bytes(fn, DEVICE),
                                               "eager_s": _median_seconds(fn, CALLS),
                                               "graph_s": None if ON_CPU else _graph_seconds(fn)}
    if path == "ours":
        row["host_s"] = _host_seconds_per_call(fn)
    benchmark.extra_info.update(row)
    group.rows[path] = row


@pytest.mark.parametrize("path", ["ours", "reference", "upstream-style", "floor"])
@pytest.mark.parametrize("B", LLAVA_BATCHES)
def test_scores_and_metric(benchmark, path: str, B: int) -> None:
    if path == "ours" and not hasattr(torch.ops.visionzip, "scores_and_metric"):
        pytest.skip("torch.ops.visionzip.scores_and_metric is not in this build")
    case = _case(*LLAVA, B)
    q, k, scale = case.q, case.k, case.scale
    paths: dict[str, Callable[[], object]] = {
        "ours": lambda: torch.ops.visionzip.scores_and_metric(q[:, :1], k, scale, True),
        "reference": lambda: (reference.cls_attention(q[:, 0], k, scale), k.mean(dim=2)),
        "upstream-style": lambda: (full_attention(q, k, scale)[:, :, 0].mean(dim=1), k.mean(dim=2)),
        "floor": lambda: k.sum(),
    }
    _measure(benchmark, "scores_and_metric", B, LLAVA, path, paths[path], k_read_once=k)


def _keep_ours(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    if ON_CPU:  # the Triton interpreter is no speed path: the C++ ops, as bench_scores.py does
        return dominant_topk(cls_attention(q[:, 0], k, scale), DOMINANT)
    import triton_ops

    return triton_ops.cls_attention_topk(q[:, 0], k, scale, DOMINANT)[1]


@pytest.mark.parametrize("path", ["ours", "reference", "upstream-style", "floor"])
@pytest.mark.parametrize("B", LLAVA_BATCHES)
def test_keep_from_qk(benchmark, path: str, B: int) -> None:
    case = _case(*LLAVA, B)
    q, k, scale = case.q, case.k, case.scale
    paths: dict[str, Callable[[], object]] = {
        "ours": lambda: _keep_ours(q, k, scale),
        "reference": lambda: reference.cls_attention(q[:, 0], k, scale)[:, 1:].topk(DOMINANT - 1, dim=1).indices + 1,
        "upstream-style": lambda: (full_attention(q, k, scale)[:, :, 0, 1:].sum(dim=1)
                                   .topk(DOMINANT - 1, dim=1).indices + 1),
        "floor": lambda: k.sum(),
    }
    _measure(benchmark, f"keep from q/k (D={DOMINANT})", B, LLAVA, path, paths[path], k_read_once=k)


@pytest.mark.parametrize("path", ["ours", "reference", "upstream-style", "sdpa", "floor"])
@pytest.mark.parametrize("B", SIGLIP_BATCHES)
def test_attention_received(benchmark, path: str, B: int) -> None:
    case = _case(*SIGLIP, B)
    q, k, scale = case.q, case.k, case.scale
    q_heads, k_heads = q.transpose(1, 2), k.transpose(1, 2)  # SDPA's [B, H, N, d], last dim unit-stride
    paths: dict[str, Callable[[], object]] = {
        "ours": lambda: torch.ops.visionzip.attention_received(q, k, scale),
        "reference": lambda: reference.attention_received(q, k, scale),
        "upstream-style": lambda: full_attention(q, k, scale).mean(dim=(1, 2)),
        "sdpa": lambda: F.scaled_dot_product_attention(q_heads, k_heads, k_heads, scale=scale),
        "floor": lambda: k.sum(),
    }
    _measure(benchmark, "attention_received", B, SIGLIP, path, paths[path])


def _same_mode_seconds(row: dict, other: dict) -> tuple[float, float]:
    """Both rows' graph times (kernel time) where both have one, else both eager times."""
    mode = "graph_s" if isinstance(row["graph_s"], float) and isinstance(other["graph_s"], float) else "eager_s"
    return row[mode], other[mode]


def _ratio_text(seconds: float, ours_seconds: float) -> str:
    ratio = seconds / ours_seconds
    return f"{ratio:.2f}x" if ratio >= 0.05 else f"{ratio:.4f}x"  # the floor is far below ours on CPU


def _fmt_time(seconds: float | str | None) -> str:
    if not isinstance(seconds, float):
        return "-" if seconds is None else "failed"  # the reason is printed below the group's rows
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:.3f} ms"


class _Summary:
    """Prints one table per group after the run, ratios against ours."""

    @staticmethod
    def pytest_terminal_summary(terminalreporter) -> None:
        if not _GROUPS:
            return
        write = terminalreporter.write_line
        terminalreporter.section("scoring ops: median per call, eager (host included) and CUDA graph (kernel)")
        for group in _GROUPS.values():
            write(group.title)
            write(f"    {'path':<30} {'eager':>12} {'graph':>12} {'time vs ours':>13} {'peak':>11}")
            ours = group.rows.get("ours")
            for path, row in group.rows.items():
                ratio = _ratio_text(*_same_mode_seconds(row, ours)) if ours else "-"
                write(f"    {LABELS.get(path, path):<30} {_fmt_time(row['eager_s']):>12} "
                      f"{_fmt_time(row['graph_s']):>12} {ratio:>13} {format_bytes(row['peak_bytes']):>11}")
            for path, row in group.rows.items():
                if isinstance(row["graph_s"], str):
                    write(f"    {LABELS.get(path, path)}: graph {row['graph_s']}")
            if ours is None:
                continue
            write(f"    ours: host overhead {ours['host_s'] * 1e6:.1f} us/call (back-to-back calls, no sync)")
            floor, sdpa = group.rows.get("floor"), group.rows.get("sdpa")
            if group.k_bytes is not None and floor is not None:
                ours_s, floor_s = _same_mode_seconds(ours, floor)
                ours_bw, floor_bw = group.k_bytes / ours_s, group.k_bytes / floor_s
                write(f"    ours: {ours_bw / 1e9:.1f} GB/s = {ours_bw / floor_bw:.0%} of the floor's "
                      f"{floor_bw / 1e9:.1f} GB/s (k, {format_bytes(group.k_bytes)}, read once)")
            if sdpa is not None:
                ours_s, sdpa_s = _same_mode_seconds(ours, sdpa)
                write(f"    ours / SDPA: {ours_s / sdpa_s:.2f}x (target <= 1.5x)")


@pytest.fixture(scope="module", autouse=True)
def _register_summary(register_summary):
    register_summary("visionzip-scores-summary", _Summary())
