"""Launch plumbing shared by the Triton ops."""

from __future__ import annotations

import contextlib

import torch
import triton


def device_context(t: torch.Tensor):
    """Launch under the tensor's own device (explicit, as flash-attention does); a no-op on CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """Kernels index every dim but the last by stride; only a non-unit last stride forces a copy."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def head_block(head_dim: int) -> int:
    """Head dims such as 72 or 80 are padded to a power of two and masked; tl.dot needs >= 16."""
    return max(16, triton.next_power_of_2(head_dim))


def check_finite_on_host(op: str, scores: torch.Tensor) -> None:
    """Non-finite scores are rejected where it costs no device sync: CPU tensors (the interpreter).
    On CUDA the kernels order NaN above +inf, as the order-preserving key of its bits does, and
    never read out of bounds; checking there would need a host sync."""
    if scores.is_cuda or scores.numel() == 0:
        return
    finite = torch.isfinite(scores)
    if not bool(finite.all()):
        b, j = (~finite).nonzero()[0].tolist()
        raise ValueError(f"visionzip.{op}: scores must be finite, got scores[{b}, {j}] = {scores[b, j].item()}")
