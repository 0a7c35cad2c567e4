"""The upstream-style path: VisionZip's reference op sequence on a full attention map.

Rewritten after dvlab-research/VisionZip (visionzip/clip_encoder.py): eager attention with every
N x N map materialised, head-sum of the CLS row, topk, masked_select (a host sync), bmm similarity
and a one-hot bmm merge. It is the independent oracle of the tests and the baseline of the demo and
the benchmarks; it is not used by the ops.
"""

from __future__ import annotations

import torch


def full_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """[B,N,H,d] x2 -> the whole softmax map [B,H,N,N], as eager attention with output_attentions."""
    qh, kh = q.transpose(1, 2), k.transpose(1, 2)
    return torch.softmax(torch.matmul(qh * scale, kh.transpose(-1, -2)), dim=-1)


def upstream_select_merge(
    attn: torch.Tensor,
    hidden: torch.Tensor,
    metric: torch.Tensor,
    dominant: int,
    contextual: int,
    keep_cls: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream's sequence: head-sum of the CLS row (or, without CLS, of the column means), topk,
    scatter a mask, masked_select, L2-normalise, strided targets, isin, bmm similarity, argmax,
    one-hot bmm merge, target + mean. Returns (tokens [B,D+K,C], keep [B,D] sorted)."""
    B, N, C = hidden.shape
    if keep_cls:
        cls_attention_sum = attn[:, :, 0, 1:].sum(dim=1)
        topk_indices = cls_attention_sum.topk(dominant - 1, dim=1).indices + 1
        all_indices = torch.cat(
            [torch.zeros(B, 1, dtype=topk_indices.dtype, device=hidden.device), topk_indices], dim=1
        )
    else:
        received = attn.mean(dim=2).sum(dim=1)
        all_indices = received.topk(dominant, dim=1).indices
    mask = torch.ones_like(hidden[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
    dominant_tokens = hidden.masked_select(~mask.unsqueeze(-1)).view(B, dominant, C)
    if contextual == 0:
        return dominant_tokens, all_indices.sort(dim=1).values
    metric_filtered = metric[mask].view(B, N - dominant, metric.shape[2])
    hidden_filtered = hidden.masked_select(mask.unsqueeze(-1)).view(B, N - dominant, C)
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual)
    target_indices = torch.arange(0, metric_normalized.shape[1], step, device=hidden.device)[:contextual]
    target_tokens = metric_normalized[:, target_indices, :]
    not_target = ~torch.isin(torch.arange(metric_normalized.shape[1], device=hidden.device), target_indices)
    tokens_to_merge = metric_normalized[:, not_target, :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(B, tokens_to_merge.shape[1], contextual, dtype=hidden.dtype, device=hidden.device)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    aggregated = torch.bmm(assign_one_hot.transpose(1, 2), hidden_filtered[:, not_target, :]) / counts
    contextual_tokens = hidden_filtered[:, target_indices, :] + aggregated
    return torch.cat([dominant_tokens, contextual_tokens], dim=1), all_indices.sort(dim=1).values




def varlen_scores_and_metric(
    q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, scale: float, unit: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream's Qwen2.5-VL way (after dvlab-research/VisionZip, Qwen2_5_VL/qwen2_5vl_visionzip.py),
    in q's dtype: the whole [H, T, T] eager softmax over every packed token, here with a
    block-diagonal mask so that each image attends only to itself (as the model's full-attention
    block does; upstream's port leaves images attending to each other), mean over heads, sum over
    query rows, ``view(-1, unit).mean``; the metric as ``k.view(-1, unit, H, d).mean(1).mean(1)``.
    q, k [T, H, d] -> (scores [T/unit], metric [T/unit, d])."""
    T, H, d = k.shape
    qh, kh = q.transpose(0, 1), k.transpose(0, 1)  # [H, T, d]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long().to(q.device)
    image_of = torch.repeat_interleave(torch.arange(len(lengths), device=q.device), lengths)
    mask = torch.zeros(T, T, dtype=q.dtype, device=q.device)
    mask.masked_fill_(image_of[:, None] != image_of[None, :], float("-inf"))
    attn = torch.softmax(torch.matmul(qh * scale, kh.transpose(-1, -2)) + mask, dim=-1)  # [H, T, T]
    received = attn.mean(dim=0).sum(dim=0)
    return received.view(-1, unit).mean(dim=-1), k.view(-1, unit, H, d).mean(1).mean(1)
