"""Which kernels serve which device.

- CPU tensors: the C++ kernels (csrc/cpu), always registered by ``_C``.
- CUDA tensors: cls_attention, attention_received, scores_and_metric, dominant_topk and
  varlen_scores_and_metric run the Triton kernels in triton_ops/, registered here under the CUDA
  key of the same ops (so the C++-defined schemas, the Python fake kernels, opcheck and
  torch.compile all keep working).
- ``VISIONZIP_BACKEND=triton`` (read once, at import) also routes CPU tensors of those ops
  through Triton. That needs ``TRITON_INTERPRET=1`` in the environment before the import; it is how
  the tests, and anyone without a GPU, check the Triton kernels.

triton_ops is imported at the first launch, not here, so that TRITON_INTERPRET can still be set
after ``import visionzip_kernels`` and before the first Triton call.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

BACKEND_ENV = "VISIONZIP_BACKEND"
TRITON_OPS = ("cls_attention", "attention_received", "scores_and_metric", "dominant_topk", "varlen_scores_and_metric")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _cls_attention(q_cls: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    import triton_ops

    return triton_ops.cls_attention(q_cls, k, scale)


def _attention_received(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    import triton_ops

    return triton_ops.attention_received(q, k, scale)


def _scores_and_metric(q: torch.Tensor, k: torch.Tensor, scale: float,
                       keep_cls: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    import triton_ops

    return triton_ops.scores_and_metric(q, k, scale, keep_cls)


def _dominant_topk(scores: torch.Tensor, dominant: int, keep_cls: bool = True) -> torch.Tensor:
    import triton_ops

    return triton_ops.dominant_topk(scores, dominant, keep_cls)


def _varlen_scores_and_metric(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, scale: float,
                              unit: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    import triton_ops

    return triton_ops.varlen_scores_and_metric(q, k, cu_seqlens, scale, unit)


_LAUNCHERS = {"cls_attention": _cls_attention, "attention_received": _attention_received,
              "scores_and_metric": _scores_and_metric, "dominant_topk": _dominant_topk,
              "varlen_scores_and_metric": _varlen_scores_and_metric}


def requested_cpu_backend() -> str:
    """The CPU backend asked for through VISIONZIP_BACKEND: "cpp" (default) or "triton"."""
    backend = os.environ.get(BACKEND_ENV, "cpp").strip().lower() or "cpp"
    if backend not in ("cpp", "triton"):
        raise ValueError(f"{BACKEND_ENV} must be 'cpp' or 'triton', got {backend!r}")
    return backend


def register() -> None:
    """Registers the Triton launchers (CUDA always when triton is installed; CPU on request)."""
    cpu_triton = requested_cpu_backend() == "triton"
    if cpu_triton and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{BACKEND_ENV}=triton on CPU tensors needs TRITON_INTERPRET=1 set before import")
    if not triton_available():
        if cpu_triton:
            raise RuntimeError(f"{BACKEND_ENV}=triton needs the triton package")
        return
    for op, launcher in _LAUNCHERS.items():
        torch.library.register_kernel(f"visionzip::{op}", "cuda", launcher)
        if cpu_triton:
            with warnings.catch_warnings():
                # Replacing the C++ CPU kernel is the point of the switch; torch warns about it.
                warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
                torch.library.register_kernel(f"visionzip::{op}", "cpu", launcher)
