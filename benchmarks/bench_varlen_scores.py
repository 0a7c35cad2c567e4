"""Packed (varlen) scores and metric for Qwen2.5-VL's vision tower (H = 16, d = 80, merge unit 4),
three ways, side by side in one run:

- ours: ``visionzip_kernels.varlen_scores_and_metric`` (C++ on CPU, Triton on CUDA);
- reference: ``visionzip_kernels.reference.varlen_scores_and_metric`` (a dense softmax per image);
- upstream-style: ``visionzip_kernels.upstream.varlen_scores_and_metric``, the eager [H, T, T]
  softmax over every packed token (with a block-diagonal mask per image), as upstream's port does.

Shapes: 1 image of 1024 tokens; 4 images of different sizes (1024, 768, 1296, 576 tokens, T = 3664);
4 images of 1024 tokens (T = 4096, the issue's memory target: >= 10x less than upstream's way).

Peak memory is what ``examples.profiling.peak_memory_bytes`` measures: on CUDA the caching
allocator's peak above the level at entry; on CPU the process's resident-set high-water mark
(VmHWM after a reset through /proc/self/clear_refs, glibc's free pages trimmed first) above the
resident size at entry. That counts every page the call touches, the kernel's own scratch
(std::vector, not torch allocations) and the outputs included, so it is an upper bound for ours;
pages already resident and reused are not counted, so the baseline is honest only as "at least".

    python -m pytest benchmarks/bench_varlen_scores.py --benchmark-columns=median -p no:cacheprovider
"""

from __future__ import annotations

import pytest
import torch

from examples.profiling import format_bytes
from visionzip_kernels import reference, upstream, varlen_scores_and_metric

H, HEAD_DIM, UNIT = 16, 80, 4
ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
DTYPE = torch.bfloat16 if ON_CUDA else torch.float32
IMAGES = {"1x1024": (1024,), "4 sizes": (1024, 768, 1296, 576), "4x1024": (1024, 1024, 1024, 1024)}
PATHS = {
    "ours": lambda q, k, cu, scale: varlen_scores_and_metric(q, k, cu, scale, UNIT),
    "reference": lambda q, k, cu, scale: reference.varlen_scores_and_metric(q, k, cu, scale, UNIT),
    "upstream-style": lambda q, k, cu, scale: upstream.varlen_scores_and_metric(q, k, cu, scale, UNIT),
}


def packed_inputs(lengths, seed=0):
    """q, k [T, H, d] as slices of a fused qkv [T, 3, H, d] (Qwen's vision blocks), cu_seqlens int32."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(sum(lengths), 3, H, HEAD_DIM, generator=g).to(dtype=DTYPE, device=DEVICE)
    cu = torch.tensor([0, *lengths]).cumsum(0).to(dtype=torch.int32, device=DEVICE)
    return qkv[:, 0], qkv[:, 1], cu


class PeakRatios:
    """Prints each shape's peak memory of upstream's way and of the reference over ours."""

    def __init__(self):
        self.peaks: dict[str, dict[str, int | None]] = {}

    def pytest_terminal_summary(self, terminalreporter):
        terminalreporter.section("varlen scores: peak memory relative to ours")
        for shape, paths in self.peaks.items():
            ours = paths.get("ours")
            parts = []
            for path, peak in paths.items():
                ratio = f" ({peak / ours:.1f}x ours)" if ours and peak is not None and path != "ours" else ""
                parts.append(f"{path} {format_bytes(peak)}{ratio}")
            terminalreporter.write_line(f"{shape}: " + ", ".join(parts))


@pytest.fixture(scope="module")
def peak_ratios(register_summary):
    plugin = PeakRatios()
    register_summary("bench_varlen_scores_peaks", plugin)
    return plugin


@pytest.mark.parametrize("shape", list(IMAGES))
@pytest.mark.parametrize("path", list(PATHS))
def test_varlen_scores(side_by_side, benchmark, peak_ratios, path: str, shape: str) -> None:
    q, k, cu = packed_inputs(IMAGES[shape])
    fn = PATHS[path]
    scale = HEAD_DIM**-0.5
    rounds = 3 if path == "upstream-style" and not ON_CUDA else None
    group = f"varlen scores {shape} (T={q.shape[0]}) {str(DTYPE)[6:]} {DEVICE}"
    side_by_side(group, path, lambda: fn(q, k, cu, scale), device=DEVICE, rounds=rounds)
    peak_ratios.peaks.setdefault(shape, {})[path] = benchmark.extra_info["peak_bytes"]
