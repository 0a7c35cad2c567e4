"""CPU benchmark of varlen_select_merge (issue 12): packed images at Qwen2.5-VL geometry, ours (C++)
vs the PyTorch reference vs the upstream-style path (topk, masks, masked_select, bmm, one-hot per
image, written back in token order; the oracle of tests/test_varlen_merge.py).

    python -m pytest benchmarks/bench_varlen_merge.py --benchmark-columns=median,min,max

Tokens are the patch merger's outputs (C = 2048, Qwen2.5-VL-3B's LLM width), the metric has the
ViT's head dim (80), the budget is upstream's default (dominant int(0.65 N_i), contextual
max(int(0.05 N_i), 1)). Groups: one image of 1024 tokens, and 4 images of different sizes.
"""

from __future__ import annotations

import pytest
import torch

from test_varlen_merge import upstream_style_varlen
from visionzip_kernels import reference, varlen_select_merge

C, METRIC_DIM = 2048, 80
IMAGES = {"1 image": [1024], "4 images": [1024, 576, 780, 330]}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _inputs(sizes: list[int], dtype: torch.dtype):
    g = torch.Generator().manual_seed(len(sizes))
    T = sum(sizes)
    hidden = torch.randn(T, C, generator=g).to(dtype)
    scores = torch.rand(T, generator=g)
    metric = torch.randn(T, METRIC_DIM, generator=g).to(dtype)
    cu = torch.tensor([0] + sizes).cumsum(0)
    dominant = [int(0.65 * n) for n in sizes]
    contextual = [max(int(0.05 * n), 1) for n in sizes]
    return hidden, scores, metric, cu, dominant, contextual


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("images", IMAGES)
@pytest.mark.parametrize("path", ["ours", "reference", "upstream-style", "floor: hidden.sum(dim=0)"])
def test_varlen_select_merge(side_by_side, path: str, images: str, dtype_name: str) -> None:
    hidden, scores, metric, cu, dominant, contextual = _inputs(IMAGES[images], DTYPES[dtype_name])
    paths = {
        "ours": lambda: varlen_select_merge(hidden, scores, metric, cu, dominant, contextual),
        "reference": lambda: reference.varlen_select_merge(hidden, scores, metric, cu, dominant, contextual),
        # upstream computes in the model's dtype; fp32 here, so that bf16 has no bf16 bmm penalty
        "upstream-style": lambda: upstream_style_varlen(hidden.float(), scores, metric.float(), cu, dominant,
                                                        contextual),
        "floor: hidden.sum(dim=0)": lambda: hidden.sum(dim=0),
    }
    side_by_side(f"varlen_select_merge {images} {dtype_name}", path, paths[path])
