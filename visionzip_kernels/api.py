"""The convenience entry point: hidden states plus q/k (or precomputed scores) and a budget."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .budget import BUDGETS, CONTEXTUAL_SHARE, DOMINANT_SHARE, split_budget
from .ops import attention_received, cls_attention, scores_and_metric, select_merge, varlen_select_merge

# The budget names live in .budget; they are re-exported here, where they have always been importable.
__all__ = ["BUDGETS", "CONTEXTUAL_SHARE", "DOMINANT_SHARE", "compress", "split_budget", "varlen_select_merge_many"]


def compress(
    hidden: torch.Tensor,
    *,
    dominant: int,
    contextual: int,
    q: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
    metric: torch.Tensor | None = None,
    keep_cls: bool = True,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress one layer's visual tokens to ``dominant + contextual`` tokens.

    Args:
        hidden: [B, N, C] output hidden states of the layer (LLaVA: the second-to-last).
        dominant, contextual: the budget D + K, e.g. ``*BUDGETS[64]`` = 54 + 10.
        q, k: [B, N, H, d] that layer's query and key projections (after the bias, before scaling).
            Needed unless both ``scores`` and ``metric`` are given.
        scores: [B, N] precomputed token scores; default: ``cls_attention`` of token 0 when
            ``keep_cls``, else ``attention_received``.
        metric: [B, N, d] merge metric; default: ``k`` averaged over heads. When neither is given,
            both come from one :func:`scores_and_metric` call (one read of ``k``).
        keep_cls: the encoder has a CLS token at index 0 (CLIP: True; SigLIP: False).
        scale: softmax scale; default ``d ** -0.5``.

    Returns:
        (tokens [B, D+K, C] in ``hidden.dtype``, keep [B, D] int64 ascending).
    """
    if scores is None or metric is None:
        if k is None:
            raise ValueError("visionzip.compress: k is required unless both scores and metric are given")
        for name, t in (("q", q), ("k", k)):
            # [B, H, N, d] (heads before tokens, as attention kernels take them) is the likely mix-up.
            # With a CLS token, q may be the CLS row alone, [B, 1, H, d].
            rows = (hidden.shape[1], 1) if name == "q" and keep_cls else (hidden.shape[1],)
            if t is not None and (t.dim() != 4 or t.shape[1] not in rows):
                raise ValueError(f"visionzip.compress: {name} must be [B, N, H, d] with N = hidden.size(1) "
                                 f"({hidden.shape[1]}), got shape {list(t.shape)}"
                                 + ("; a [B, H, N, d] tensor needs .transpose(1, 2)"
                                    if t.dim() == 4 and t.shape[2] == hidden.shape[1] else ""))
    if scores is None and q is None:
        raise ValueError("visionzip.compress: q is required unless scores is given")
    if scale is None and q is not None:
        scale = q.shape[-1] ** -0.5
    if scores is None and metric is None:
        # One read of k for both.
        scores, metric = scores_and_metric(q, k, scale, keep_cls)
    elif scores is None:
        scores = cls_attention(q[:, 0], k, scale) if keep_cls else attention_received(q, k, scale)
    elif metric is None:
        metric = k.mean(dim=2)
    return select_merge(hidden, scores, metric, dominant, contextual, keep_cls)


def varlen_select_merge_many(
    hiddens: Sequence[torch.Tensor],
    scores: torch.Tensor,
    metric: torch.Tensor,
    cu_seqlens: torch.Tensor,
    dominant: int | Sequence[int],
    contextual: int | Sequence[int],
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """:func:`varlen_select_merge` with ONE plan (the same kept tokens, the same contextual
    assignment) applied to several token tensors of the same packed images, e.g. Qwen3-VL's main
    features and its DeepStack features (docs/SPEC.md "Packed (varlen) ops").

    The tensors are concatenated along channels and the op runs once: the top-k and the assignment
    are computed once, and since merging is per channel, each returned slice equals its own
    ``varlen_select_merge`` call bit for bit. It inherits the op's kernels (CPU, CUDA, fake),
    autograd (to every tensor of ``hiddens``), torch.compile support and host-sync rules.

    Args:
        hiddens: m >= 1 tensors [T, C_j], same T, dtype and device (image i = rows
            ``cu_seqlens[i]:cu_seqlens[i+1]`` in each).
        scores, metric, cu_seqlens, dominant, contextual: as for :func:`varlen_select_merge`.

    Returns:
        (tokens: list of m tensors [sum(D_i+K_i), C_j], keep [sum(D_i+K_i)] int64, cu_seqlens_out [n+1]).
    """
    op = "varlen_select_merge_many"
    if isinstance(hiddens, torch.Tensor) or not isinstance(hiddens, Sequence):
        raise TypeError(f"visionzip.{op}: hiddens must be a sequence (list or tuple) of tensors, "
                        f"got {type(hiddens).__name__}")
    if len(hiddens) == 0:
        raise ValueError(f"visionzip.{op}: hiddens must hold at least one tensor")
    first = hiddens[0]
    for j, hidden in enumerate(hiddens):
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
            raise ValueError(f"visionzip.{op}: hiddens[{j}] must be a [T, C] tensor, got "
                             f"{getattr(hidden, 'shape', type(hidden).__name__)}")
        if hidden.shape[0] != first.shape[0] or hidden.dtype != first.dtype or hidden.device != first.device:
            raise ValueError(f"visionzip.{op}: hiddens[{j}] is {list(hidden.shape)} {hidden.dtype} on {hidden.device}; "
                             f"every tensor must have hiddens[0]'s T = {first.shape[0]}, dtype {first.dtype} "
                             f"and device {first.device}")
    widths = [hidden.shape[1] for hidden in hiddens]
    packed = first if len(hiddens) == 1 else torch.cat(list(hiddens), dim=1)
    tokens, keep, cu_seqlens_out = varlen_select_merge(packed, scores, metric, cu_seqlens, dominant, contextual)
    return list(tokens.split(widths, dim=1)), keep, cu_seqlens_out
