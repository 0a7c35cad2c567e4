"""The convenience entry point: hidden states plus q/k (or precomputed scores) and a budget."""

from __future__ import annotations

import math

import torch

from .ops import attention_received, cls_attention, scores_and_metric, select_merge

# The paper's budgets (dominant + contextual) for 576-patch LLaVA-1.5 images.
BUDGETS: dict[int, tuple[int, int]] = {64: (54, 10), 128: (108, 20), 192: (162, 30)}

# The paper's dominant : contextual proportion (54 : 10 of every 64 tokens).
DOMINANT_SHARE, CONTEXTUAL_SHARE = 54, 10


def split_budget(tokens: int) -> tuple[int, int]:
    """Splits a total of ``tokens`` kept tokens into (dominant, contextual) in the paper's 54:10 ratio.

    Rounding (exact, integer arithmetic): ``contextual = floor(tokens * 10 / 64 + 1/2)`` (10/64 of the
    total, halves rounded up) and ``dominant = tokens - contextual``, so the two always add up to
    ``tokens`` and ``dominant >= 1``. The paper's budgets come out as published: 64 -> 54 + 10,
    128 -> 108 + 20, 192 -> 162 + 30, and LLaVA-NeXT's 32 per crop -> 27 + 5.

    Args:
        tokens: the total D + K, an int >= 1.

    Returns:
        (dominant, contextual).
    """
    if isinstance(tokens, bool) or not isinstance(tokens, int):
        raise TypeError(f"visionzip: tokens must be an int, got {type(tokens).__name__}")
    if tokens < 1:
        raise ValueError(f"visionzip: tokens must be >= 1, got {tokens}")
    return split_checked_budget(tokens)


def split_checked_budget(tokens):
    """:func:`split_budget` without the argument checks, for a count already known to be an int
    >= 1 (also a SymInt: a token count under torch.compile with dynamic shapes)."""
    total = DOMINANT_SHARE + CONTEXTUAL_SHARE
    contextual = (tokens * CONTEXTUAL_SHARE * 2 + total) // (2 * total)
    return tokens - contextual, contextual


def check_ratio(ratio: float) -> float:
    """``ratio`` as a float in (0, 1], or ``TypeError`` / ``ValueError`` naming it."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"visionzip: ratio must be a float in (0, 1], got {type(ratio).__name__}")
    ratio = float(ratio)
    if not (math.isfinite(ratio) and 0.0 < ratio <= 1.0):
        raise ValueError(f"visionzip: ratio must be in (0, 1], got {ratio}")
    return ratio


def tokens_for_ratio(ratio: float, num_tokens: int) -> int:
    """The total budget for ``ratio`` of an encoder's ``num_tokens`` tokens (N, CLS included):
    ``floor(ratio * num_tokens + 1/2)`` (nearest, halves up; in float64). ``ValueError`` when that is 0.

    E.g. ``ratio=0.11`` of CLIP-L/336's 577 tokens: 63.47 -> 63 tokens (53 + 10 by :func:`split_budget`).
    """
    return checked_ratio_tokens(check_ratio(ratio), num_tokens)


def checked_ratio_tokens(ratio: float, num_tokens):
    """:func:`tokens_for_ratio` for a ratio already checked by :func:`check_ratio` (``num_tokens``
    may be a SymInt under torch.compile with dynamic shapes)."""
    tokens = math.floor(ratio * num_tokens + 0.5)
    if tokens < 1:
        raise ValueError(f"visionzip: ratio={ratio} of {num_tokens} tokens rounds to 0 tokens; use a larger ratio")
    return tokens


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
