"""Argument checks of every op, for Python callers: the fake (meta) kernels, the checks before a
Triton launch (ops.py; triton_ops itself takes validated arguments) and the reference.

The rules are written once, in C++ (csrc/checks.cpp), and reached here through ``_C``
(csrc/python_module.cpp): the C++ kernels call the same functions, so every backend raises the same
``ValueError`` (shapes, values, devices) or ``TypeError`` (dtypes), naming the argument and the rule,
before any kernel runs. Sizes are read symbolically, so the checks also run under torch.compile.

Each function takes the op's arguments and returns None or raises; ``budget(op, N, D, K, keep_cls)``
checks 1 <= D <= N and 0 <= K <= N - D; ``finite_scores(op, scores)`` and
``keep_values(op, keep, N)`` (keep's entries in [0, N), distinct per row), the data-dependent rules,
read the values (a device sync on CUDA). Packed (varlen) ops: ``varlen_scores_and_metric_args``
checks shapes, dtypes and devices (cu_seqlens included) without reading values;
``cu_seqlens_offsets(op, cu_seqlens, T, unit)`` reads a CPU cu_seqlens (0 first, non-decreasing, T
last, lengths divisible by unit) and is never called on a fake or CUDA one.

Packed (varlen) images: ``varlen_select_merge_args`` checks shapes, dtypes, devices and the budget
lists; ``read_cu_seqlens_and_check_budgets(op, cu_seqlens, T, dominant, contextual)`` reads
cu_seqlens (a small copy to the host), checks its offsets as ``cu_seqlens_offsets`` does (unit 1) and
every image's budget against its size, and returns it as a list of ints. ``finite_scores`` takes dense
[B, N] and packed [T] scores.
"""

from ._C import (  # noqa: F401  (re-exported)
    attention_received_args,
    budget,
    cls_attention_args,
    contextual_merge_args,
    contextual_merge_backward_args,
    cu_seqlens_offsets,
    dominant_topk_args,
    finite_scores,
    keep_values,
    read_cu_seqlens_and_check_budgets,
    scores_and_metric_args,
    select_merge_args,
    varlen_scores_and_metric_args,
    varlen_select_merge_args,
    varlen_select_merge_backward_args,
)
