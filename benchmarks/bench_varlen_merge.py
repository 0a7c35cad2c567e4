"""Benchmark of varlen_select_merge (issue 12): packed images at Qwen2.5-VL geometry, ours (C++ on the
CPU; on CUDA, when present, one set of launches for all images) vs the PyTorch reference vs the
upstream-style path (topk, masks, masked_select, bmm, one-hot per image, written back in token order;
the oracle of tests/test_varlen_merge.py).

    python -m pytest benchmarks/bench_varlen_merge.py --benchmark-columns=median,min,max

Tokens are the patch merger's outputs (C = 2048, Qwen2.5-VL-3B's LLM width), the metric has the
ViT's head dim (80), the budget is upstream's default (dominant int(0.65 N_i), contextual
max(int(0.05 N_i), 1)). Groups: one image of 1024 tokens, and 4 images of different sizes. The
dense select_merge per image (keep_cls=False, rows not reordered) shows what the placement costs on
the CPU and, on CUDA, what one call saves over a launch set per image. The floor is one read of
hidden (a sum over tokens). ``VZ_BENCH_DEVICE`` (default cuda when available, else cpu).
"""

from __future__ import annotations

import os

import pytest
import torch
from test_varlen_merge import upstream_style_varlen

from visionzip_kernels import reference, select_merge, varlen_select_merge

C, METRIC_DIM = 2048, 80
IMAGES = {"1 image": [1024], "4 images": [1024, 576, 780, 330]}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEVICE = os.environ.get("VZ_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")


def _inputs(sizes: list[int], dtype: torch.dtype):
    g = torch.Generator().manual_seed(len(sizes))
    T = sum(sizes)
    hidden = torch.randn(T, C, generator=g).to(dtype)
    scores = torch.rand(T, generator=g)
    metric = torch.randn(T, METRIC_DIM, generator=g).to(dtype)
    cu = torch.tensor([0] + sizes).cumsum(0)
    dominant = [int(0.65 * n) for n in sizes]
    contextual = [max(int(0.05 * n), 1) for n in sizes]
    hidden, scores, metric = (t.to(DEVICE) for t in (hidden, scores, metric))
    return hidden, scores, metric, cu, dominant, contextual  # cu on the CPU: no host sync on CUDA


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("images", IMAGES)
@pytest.mark.parametrize(
    "path", ["ours", "dense select_merge per image", "reference", "upstream-style", "floor: hidden.sum(dim=0)"]
)
def test_varlen_select_merge(side_by_side, path: str, images: str, dtype_name: str) -> None:
    hidden, scores, metric, cu, dominant, contextual = _inputs(IMAGES[images], DTYPES[dtype_name])
    bounds = cu.tolist()
    paths = {
        "ours": lambda: varlen_select_merge(hidden, scores, metric, cu, dominant, contextual),
        # the same selection and merge without the placement in token order: what the reordering costs
        "dense select_merge per image": lambda: [
            select_merge(hidden[None, a:b], scores[None, a:b], metric[None, a:b], d, k, False)
            for a, b, d, k in zip(bounds[:-1], bounds[1:], dominant, contextual)
        ],
        "reference": lambda: reference.varlen_select_merge(hidden, scores, metric, cu, dominant, contextual),
        # upstream computes in the model's dtype; fp32 here, so that bf16 has no bf16 bmm penalty
        "upstream-style": lambda: upstream_style_varlen(hidden.float(), scores, metric.float(), cu, dominant,
                                                        contextual),
        "floor: hidden.sum(dim=0)": lambda: hidden.sum(dim=0),
    }
    side_by_side(f"varlen_select_merge {images} {dtype_name} {DEVICE}", path, paths[path], device=DEVICE)
