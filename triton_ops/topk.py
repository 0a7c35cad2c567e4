"""Top-k selection of the dominant tokens on the device: no sort, no host sync, fixed shapes.

Each score is mapped to an order-preserving 32-bit key (its float bits, sign-folded). A 32-step
bisection over the key bits finds the D-th largest key T in registers; the kept tokens are every
key > T plus the lowest-index tokens with key == T (ties to the lower index). Their positions in
the output are a prefix sum over the kept mask, so keep comes out in ascending token order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import device_context

# One program holds a whole row of scores in registers.
MAX_TOKENS = 16384


@triton.jit
def select_topk_row(scores, offs, n_tokens, dominant, keep_row_ptr, KEEP_CLS: tl.constexpr):
    """scores: [BLOCK] fp32 (the row, padded); writes keep_row_ptr[0:dominant] ascending."""
    first = 1 if KEEP_CLS else 0
    valid = (offs < n_tokens) & (offs >= first)
    bits = (scores + 0.0).to(tl.int32, bitcast=True)  # + 0.0 folds -0.0 into +0.0
    key = tl.where(bits >= 0, bits.to(tl.int64) + 2147483648, 2147483647 - (bits & 2147483647).to(tl.int64))
    key = tl.where(valid, key, -1)
    picked = dominant - first
    threshold = tl.sum(tl.zeros_like(key), axis=0)  # int64 scalar 0
    for bit in tl.static_range(31, -1, -1):
        candidate = threshold + (1 << bit)
        count = tl.sum((key >= candidate).to(tl.int32), axis=0)
        threshold = tl.where(count >= picked, candidate, threshold)
    above = key > threshold
    ties_needed = picked - tl.sum(above.to(tl.int32), axis=0)
    at = key == threshold
    tie_rank = tl.cumsum(at.to(tl.int32), axis=0)
    kept = above | (at & (tie_rank <= ties_needed))
    position = tl.cumsum(kept.to(tl.int32), axis=0) - 1 + first
    tl.store(keep_row_ptr + position, offs.to(tl.int64), mask=kept)
    if KEEP_CLS:
        tl.store(keep_row_ptr + offs, offs.to(tl.int64), mask=offs == 0)


@triton.jit
def _topk_kernel(scores_ptr, keep_ptr, n_tokens, dominant, stride_sb, stride_sn, stride_kb,
                 BLOCK: tl.constexpr, KEEP_CLS: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    scores = tl.load(scores_ptr + b * stride_sb + offs * stride_sn, mask=offs < n_tokens, other=0.0).to(tl.float32)
    select_topk_row(scores, offs, n_tokens, dominant, keep_ptr + b * stride_kb, KEEP_CLS)


def check_topk_size(op: str, n_tokens: int) -> None:
    """The Triton top-k's own limit (not a rule of the op: the C++ kernels take any N)."""
    if n_tokens > MAX_TOKENS:
        raise ValueError(f"visionzip.{op}: the Triton top-k holds a row in registers; N must be <= {MAX_TOKENS}, "
                         f"got {n_tokens}")


def dominant_topk(scores: torch.Tensor, dominant: int, *, keep_cls: bool = True) -> torch.Tensor:
    """scores [B, N] (any float dtype) -> keep [B, D] int64 ascending, ties to the lower index.
    Arguments are validated by the caller (visionzip_kernels: the op's rules, and finite scores where
    reading them needs no device sync); N above this top-k's limit raises."""
    check_topk_size("dominant_topk", scores.shape[1])
    B, N = scores.shape
    keep = torch.empty(B, dominant, dtype=torch.int64, device=scores.device)
    if B == 0:
        return keep
    with device_context(scores):
        _topk_kernel[(B,)](scores, keep, N, dominant, scores.stride(0), scores.stride(1), keep.stride(0),
                           BLOCK=triton.next_power_of_2(N), KEEP_CLS=keep_cls, num_warps=8)
    return keep
