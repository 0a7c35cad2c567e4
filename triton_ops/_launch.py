"""Launch plumbing shared by the Triton ops (device context, strides, SM count)."""

from __future__ import annotations

import contextlib
import functools

import torch


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


@functools.lru_cache(maxsize=16)
def multiprocessor_count(device: torch.device) -> int:
    """SMs of a CUDA device (block sizes are chosen to fill them); 1 elsewhere (the interpreter)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
