"""Getting keep from q/k, three ways (issue 3), at N = 577, H = 16, d = 64:

- ours: on CUDA the fused Triton kernel (CLS attention + top-k in one launch); on CPU the C++
  cls_attention + dominant_topk (the Triton interpreter is no speed path);
- upstream-style: eager softmax(QK^T) for every query, then the CLS row, head-sum and topk;
- reference: the PyTorch CLS-row computation, then topk.

    python -m pytest benchmarks/bench_scores.py --benchmark-columns=median
"""

from __future__ import annotations

import pytest
import torch

from visionzip_kernels import cls_attention, dominant_topk, reference
from visionzip_kernels.upstream import full_attention

from helpers import make_case

N, H, HEAD_DIM, DOMINANT = 577, 16, 64, 54
ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
BATCHES = (1, 32, 256) if ON_CUDA else (1, 8, 32)
DTYPE = torch.float16 if ON_CUDA else torch.float32


def _ours(q, k, scale):
    if ON_CUDA:
        import triton_ops

        return triton_ops.cls_attention_topk(q[:, 0], k, scale, DOMINANT)[1]
    return dominant_topk(cls_attention(q[:, 0], k, scale), DOMINANT)


def _upstream(q, k, scale):
    attn = full_attention(q, k, scale)
    return attn[:, :, 0, 1:].sum(dim=1).topk(DOMINANT - 1, dim=1).indices + 1


def _reference(q, k, scale):
    return reference.cls_attention(q[:, 0], k, scale)[:, 1:].topk(DOMINANT - 1, dim=1).indices + 1


@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("path", ["ours", "upstream-style", "reference"])
def test_keep_from_qk(side_by_side, path: str, B: int) -> None:
    case = make_case(B, N, 8, H=H, d=HEAD_DIM, dtype=DTYPE, seed=B, device=DEVICE)
    fn = {"ours": _ours, "upstream-style": _upstream, "reference": _reference}[path]
    rounds = 5 if path == "upstream-style" and not ON_CUDA else None
    side_by_side(f"keep from q/k B={B} {str(DTYPE)[6:]} {DEVICE}", path, lambda: fn(case.q, case.k, case.scale),
                 device=DEVICE, rounds=rounds)
