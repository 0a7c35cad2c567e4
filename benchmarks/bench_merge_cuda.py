"""select_merge on CUDA (issue 4): ours vs the PyTorch reference vs the upstream-style path, at
N = 577, C = 1024, D/K = 54/10, B in {1, 32, 256}, fp16 and bf16. Skipped without a GPU.

    python -m pytest benchmarks/bench_merge_cuda.py --benchmark-columns=median

The floor is a device-to-device copy of hidden measured in the same run: the summary's ratio of the
copy's time to ours is the fraction of copy bandwidth that select_merge achieves (it reads hidden
once and writes (D+K)/N of it).
"""

from __future__ import annotations

import pytest
import torch

from helpers import merge_inputs
from visionzip_kernels import reference, select_merge
from visionzip_kernels.upstream import upstream_select_merge

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

N, C, DOMINANT, CONTEXTUAL = 577, 1024, 54, 10


@pytest.mark.parametrize("dtype_name", ["fp16", "bf16"])
@pytest.mark.parametrize("B", [1, 32, 256])
@pytest.mark.parametrize("path", ["ours", "reference", "upstream-style (merge from the map)", "copy of hidden"])
def test_select_merge_cuda(side_by_side, path: str, B: int, dtype_name: str) -> None:
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
    side_by_side(f"select_merge cuda B={B} {dtype_name}", path, paths[path], device="cuda")
