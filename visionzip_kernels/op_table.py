"""The one table of the torch.ops.visionzip.* ops.

The schemas themselves are C++ (csrc/ops.cpp, which tests/test_op_conformance.py compares with this
table both ways); everything Python knows about an op is read from here:

- the fake (meta) kernels and the Autograd fallthrough of the non-differentiable ops, registered by
  :func:`register` (the differentiable ops' autograd is C++, csrc/autograd.cpp);
- the Triton kernels of the ops whose CUDA backend is ``"triton"`` (visionzip_kernels/backends.py);
- the public wrappers (``visionzip_kernels.__all__``), the CUDA registration check
  (.ci/check_cuda_registration.py) and the conformance tests' op list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from . import ops


@dataclass(frozen=True)
class Op:
    """One op of the visionzip namespace.

    Attributes:
        name: the op's name in ``torch.ops.visionzip``.
        fake: its fake (meta) kernel: output shapes from input shapes, after the argument checks.
        cpu, cuda: which code serves CPU and CUDA tensors: ``"cpp"`` (csrc/cpu), ``"cuda"``
            (csrc/cuda) or ``"triton"`` (triton_ops/). ``VISIONZIP_BACKEND=triton`` moves the CPU
            tensors of the Triton ops to Triton as well.
        differentiable: whether its autograd is registered in csrc/autograd.cpp; the other ops fall
            through the Autograd key (their outputs never require grad, docs/SPEC.md "Gradients").
        wrapper: the typed public wrapper (``visionzip_kernels.<name>``), None for internal ops.
        launch_checks: for a Triton op, its argument checks before a launch (the launchers in
            triton_ops/ take validated arguments), with the op's argument names.
    """

    name: str
    fake: Callable
    cpu: Literal["cpp"]
    cuda: Literal["cuda", "triton"]
    differentiable: bool
    wrapper: Callable | None = None
    launch_checks: Callable | None = None

    @property
    def qualified_name(self) -> str:
        return f"visionzip::{self.name}"


OPS: tuple[Op, ...] = (
    Op("cls_attention", ops.cls_attention_fake, cpu="cpp", cuda="triton", differentiable=False,
       wrapper=ops.cls_attention, launch_checks=ops.cls_attention_launch_checks),
    Op("attention_received", ops.attention_received_fake, cpu="cpp", cuda="triton", differentiable=False,
       wrapper=ops.attention_received, launch_checks=ops.attention_received_launch_checks),
    Op("scores_and_metric", ops.scores_and_metric_fake, cpu="cpp", cuda="triton", differentiable=False,
       wrapper=ops.scores_and_metric, launch_checks=ops.scores_and_metric_launch_checks),
    Op("dominant_topk", ops.dominant_topk_fake, cpu="cpp", cuda="triton", differentiable=False,
       wrapper=ops.dominant_topk, launch_checks=ops.dominant_topk_launch_checks),
    Op("contextual_merge", ops.contextual_merge_fake, cpu="cpp", cuda="cuda", differentiable=True,
       wrapper=ops.contextual_merge),
    Op("contextual_merge_backward", ops.contextual_merge_backward_fake, cpu="cpp", cuda="cuda", differentiable=True,
       wrapper=ops.contextual_merge_backward),
    Op("select_merge", ops.select_merge_fake, cpu="cpp", cuda="cuda", differentiable=True,
       wrapper=ops.select_merge),
    Op("varlen_scores_and_metric", ops.varlen_scores_and_metric_fake, cpu="cpp", cuda="triton",
       differentiable=False, wrapper=ops.varlen_scores_and_metric,
       launch_checks=ops.varlen_scores_and_metric_launch_checks),
    Op("varlen_select_merge", ops.varlen_select_merge_fake, cpu="cpp", cuda="cuda", differentiable=True,
       wrapper=ops.varlen_select_merge),
    Op("varlen_select_merge_backward", ops.varlen_select_merge_backward_fake, cpu="cpp", cuda="cuda",
       differentiable=True),
)
BY_NAME: dict[str, Op] = {op.name: op for op in OPS}
NAMES: tuple[str, ...] = tuple(BY_NAME)
PUBLIC: tuple[str, ...] = tuple(op.name for op in OPS if op.wrapper is not None)

# The registrations below last as long as this library object does: the life of the process.
_AUTOGRAD_LIBRARY = torch.library.Library("visionzip", "IMPL")


def register() -> None:
    """Registers every op's fake kernel, and the Autograd fallthrough of the non-differentiable ops
    (a C++ fallthrough: a call still runs no Python between the op and its kernel)."""
    for op in OPS:
        torch.library.register_fake(op.qualified_name, op.fake)
        if not op.differentiable:
            _AUTOGRAD_LIBRARY.impl(op.name, torch.library.fallthrough_kernel, "Autograd")
