"""Triton kernels for the visionzip scoring ops.

- :func:`cls_attention` / :func:`cls_attention_topk`: head-mean CLS attention from q/k, optionally
  fused with the top-k selection of the dominant tokens (triton_ops/cls_attention_topk.py).
- :func:`scores_and_metric`: the scores above and the merge metric (head-mean k) from one read of k
  (triton_ops/scores_and_metric.py).
- :func:`dominant_topk`: the top-k selection alone, for scores from elsewhere (triton_ops/topk.py).
- :func:`attention_received`: flash-style attention each token receives, never N x N
  (triton_ops/attention_received.py).
- :func:`varlen_scores_and_metric`: the same for packed images with cu_seqlens (Qwen2-VL's layout),
  pooled over merge units, with the metric (triton_ops/varlen_scores.py).

The launchers take validated arguments (visionzip_kernels checks them before a launch: the op's
rules, written once in C++); this package imports nothing from visionzip_kernels. The tile helpers
the kernels share are in triton_ops/tiles.py, the launch plumbing in triton_ops/_launch.py.

Import this package only after deciding on TRITON_INTERPRET: the @triton.jit decorators read it
when they run. visionzip_kernels imports it lazily, at the first Triton launch.
"""

from .attention_received import attention_received
from .cls_attention_topk import cls_attention, cls_attention_topk
from .scores_and_metric import scores_and_metric
from .topk import dominant_topk
from .varlen_scores import varlen_scores_and_metric

__all__ = ["attention_received", "cls_attention", "cls_attention_topk", "dominant_topk", "scores_and_metric",
           "varlen_scores_and_metric"]
