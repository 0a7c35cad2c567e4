"""Token scores and the merge metric from one read of k (the CLS case), on the Triton kernels.

- keep_cls=True: ``_cls_logits_kernel`` computes the CLS logits and the head-mean keys from the same
  key tiles, then ``_cls_normalize_kernel`` turns the logits into scores (cls_attention_topk.py).
- keep_cls=False: the attention received (attention_received.py) reads k once per query block
  anyway; the metric is the logits kernel with the logits switched off, one more read of k.
"""

from __future__ import annotations

import torch

from ._launch import unit_last_stride
from .attention_received import received_scores
from .cls_attention_topk import cls_scores_and_metric


def scores_and_metric(q: torch.Tensor, k: torch.Tensor, scale: float, *,
                      keep_cls: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B,M,H,d], k [B,N,H,d] -> (scores [B,N] fp32, metric [B,N,d] in k.dtype); see
    visionzip_kernels.scores_and_metric. Arguments are validated by the caller (visionzip_kernels)."""
    q, k = unit_last_stride(q), unit_last_stride(k)
    if keep_cls:
        return cls_scores_and_metric(q[:, 0], k, scale)
    _, metric = cls_scores_and_metric(None, k, scale)
    return received_scores(q, k, scale), metric
