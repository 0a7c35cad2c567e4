"""Launch plumbing shared by the Triton ops."""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from visionzip_kernels import checks as check


def device_context(t: torch.Tensor):
    """Launch under the tensor's own device (explicit, as flash-attention does). Entering a device
    context costs microseconds a launch, so it is skipped where that device is already current (and
    on CPU)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """Kernels index every dim but the last by stride; only a non-unit last stride forces a copy."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def head_block(head_dim: int) -> int:
    """Head dims such as 72 or 80 are padded to a power of two and masked; tl.dot needs >= 16."""
    return max(16, triton.next_power_of_2(head_dim))


def head_split(head_dim: int) -> tuple[int, int]:
    """A head dim as two power-of-two column tiles for tl.dot (each >= 16, the second 0 when one
    suffices): 64 -> (64, 0), 72 -> (64, 16), 80 -> (64, 16), 96 -> (64, 32), so a d = 72 head does
    80 columns of MMA work rather than the 128 of one padded tile."""
    if head_dim <= 16:
        return 16, 0
    low = triton.next_power_of_2(head_dim) // 2 if head_dim & (head_dim - 1) else head_dim
    rest = head_dim - low
    return low, (max(16, triton.next_power_of_2(rest)) if rest else 0)


def accumulator_dtype(dtype: torch.dtype):
    """Sums run in fp32 for every input dtype but fp64, which keeps its precision."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@functools.lru_cache(maxsize=16)
def multiprocessor_count(device: torch.device) -> int:
    """SMs of a CUDA device (block sizes are chosen to fill them); 1 elsewhere (the interpreter)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def check_finite_on_host(op: str, scores: torch.Tensor) -> None:
    """Non-finite scores are rejected where it costs no device sync: CPU tensors (the interpreter).
    On CUDA the kernels order NaN above +inf, as the order-preserving key of its bits does, and
    never read out of bounds; checking there would need a host sync."""
    if not scores.is_cuda and scores.numel() > 0:
        check.finite_scores(op, scores)
