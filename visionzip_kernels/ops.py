"""Fake kernels and typed Python wrappers for the torch.ops.visionzip.* ops.

The schemas, the C++ kernels and the autograd formulas live in csrc/ (one TORCH_LIBRARY block;
csrc/autograd.cpp); this module is imported after visionzip_kernels._C has been loaded. The fake
kernels and the checks before a Triton launch are registered from the op table
(visionzip_kernels/op_table.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import checks as check

__all__ = [
    "cls_attention",
    "attention_received",
    "scores_and_metric",
    "dominant_topk",
    "contextual_merge",
    "contextual_merge_backward",
    "select_merge",
    "varlen_scores_and_metric",
    "varlen_select_merge",
]

_ops = torch.ops.visionzip


# --------------------------------------------------------------------------------------------
# Fake (meta) kernels: output shapes follow from input shapes and int arguments alone.
# Registered from the op table (op_table.py).


def cls_attention_fake(q_cls: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    check.cls_attention_args(q_cls, k)
    return k.new_empty(k.shape[:2], dtype=torch.float32)


def attention_received_fake(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    check.attention_received_args(q, k)
    return k.new_empty(k.shape[:2], dtype=torch.float32)


def scores_and_metric_fake(
    q: torch.Tensor, k: torch.Tensor, scale: float, keep_cls: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    check.scores_and_metric_args(q, k, keep_cls)
    B, N, _, d = k.shape
    return k.new_empty((B, N), dtype=torch.float32), k.new_empty((B, N, d))


def dominant_topk_fake(scores: torch.Tensor, dominant: int, keep_cls: bool = True) -> torch.Tensor:
    check.dominant_topk_args(scores, dominant, keep_cls)
    return scores.new_empty((scores.shape[0], dominant), dtype=torch.int64)


def contextual_merge_fake(
    hidden: torch.Tensor, metric: torch.Tensor, keep: torch.Tensor, contextual: int
) -> torch.Tensor:
    check.contextual_merge_args(hidden, metric, keep, contextual)
    return hidden.new_empty((hidden.shape[0], keep.shape[1] + contextual, hidden.shape[2]))


def contextual_merge_backward_fake(
    grad_tokens: torch.Tensor, metric: torch.Tensor, keep: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    check.contextual_merge_backward_args(grad_tokens, metric, keep, num_tokens)
    return grad_tokens.new_empty((grad_tokens.shape[0], num_tokens, grad_tokens.shape[2]))


def select_merge_fake(
    hidden: torch.Tensor, scores: torch.Tensor, metric: torch.Tensor, dominant: int, contextual: int,
    keep_cls: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    check.select_merge_args(hidden, scores, metric, dominant, contextual, keep_cls)
    tokens = hidden.new_empty((hidden.shape[0], dominant + contextual, hidden.shape[2]))
    keep = hidden.new_empty((hidden.shape[0], dominant), dtype=torch.int64)
    return tokens, keep


def varlen_scores_and_metric_fake(
    q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, scale: float, unit: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    # Shapes only: cu_seqlens' values are data (the CPU kernel checks them; a fake tensor has none).
    check.varlen_scores_and_metric_args(q, k, cu_seqlens, unit)
    units = k.shape[0] // unit
    return k.new_empty((units,), dtype=torch.float32), k.new_empty((units, k.shape[2]))


def varlen_select_merge_fake(
    hidden: torch.Tensor, scores: torch.Tensor, metric: torch.Tensor, cu_seqlens: torch.Tensor,
    dominant: list[int], contextual: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # The rules on cu_seqlens' values (and so D_i + K_i <= N_i) need its data: the kernels check them.
    # Under torch.compile(dynamic=True) the budgets are SymInts: the check compares them symbolically
    # and the output size is their symbolic sum, so a new budget list needs no new graph.
    check.varlen_select_merge_args(hidden, scores, metric, cu_seqlens, dominant, contextual)
    kept = sum(dominant) + sum(contextual)
    tokens = hidden.new_empty((kept, hidden.shape[1]))
    keep = hidden.new_empty((kept,), dtype=torch.int64)
    return tokens, keep, torch.empty_like(cu_seqlens)


def varlen_select_merge_backward_fake(
    grad_tokens: torch.Tensor, scores: torch.Tensor, metric: torch.Tensor, cu_seqlens: torch.Tensor,
    dominant: list[int], contextual: list[int],
) -> torch.Tensor:
    check.varlen_select_merge_backward_args(grad_tokens, scores, metric, cu_seqlens, dominant, contextual)
    return grad_tokens.new_empty((scores.shape[0], grad_tokens.shape[1]))


# --------------------------------------------------------------------------------------------
# Checks before a Triton launch (visionzip_kernels/backends.py): the launchers in triton_ops/ take
# validated arguments. Each takes its op's arguments by the schema's names and defaults (the conformance
# tests compare them with the schema), applies the C++ rules and,
# on tensors whose data the host reads without a device sync (CPU tensors, i.e. the interpreter),
# the data rules of the C++ kernels. On CUDA the Triton top-k orders NaN above +inf and the packed
# kernels clamp cu_seqlens' offsets: wrong numbers for bad data, never an out-of-bounds access.


def cls_attention_launch_checks(q_cls: torch.Tensor, k: torch.Tensor, scale: float) -> None:
    check.cls_attention_args(q_cls, k)


def attention_received_launch_checks(q: torch.Tensor, k: torch.Tensor, scale: float) -> None:
    check.attention_received_args(q, k)


def scores_and_metric_launch_checks(q: torch.Tensor, k: torch.Tensor, scale: float, keep_cls: bool = True) -> None:
    check.scores_and_metric_args(q, k, keep_cls)


def dominant_topk_launch_checks(scores: torch.Tensor, dominant: int, keep_cls: bool = True) -> None:
    check.dominant_topk_args(scores, dominant, keep_cls)
    if not scores.is_cuda and scores.numel() > 0:
        check.finite_scores("dominant_topk", scores)


def varlen_scores_and_metric_launch_checks(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, scale: float,
                                            unit: int = 1) -> None:
    check.varlen_scores_and_metric_args(q, k, cu_seqlens, unit)
    if cu_seqlens.device.type == "cpu":
        check.cu_seqlens_offsets("varlen_scores_and_metric", cu_seqlens, k.shape[0], unit)


# --------------------------------------------------------------------------------------------
# Autograd of contextual_merge, contextual_merge_backward and select_merge is registered in C++
# (csrc/autograd.cpp), so that inference calls never enter Python; the score ops and dominant_topk
# are not differentiable (docs/SPEC.md "Gradients").


# --------------------------------------------------------------------------------------------
# Typed wrappers with docstrings; each calls the dispatcher op, so any registered backend runs.
# They also check the Python types of the int and bool arguments, which the dispatcher's parser
# would convert silently (True -> 1, tensor(5) -> 5) or reject with its own words (2**63).


def _int_arg(op: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"visionzip.{op}: {name} must be an int, got {type(value).__name__}")
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        raise ValueError(f"visionzip.{op}: {name} must fit in 64 bits, got {value}")
    return value


def _bool_arg(op: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"visionzip.{op}: {name} must be a bool, got {type(value).__name__}")
    return value


def budget_list(op: str, name: str, budget, num_images: int) -> list[int]:
    """A per-image budget given as an int (the same for every image) or a sequence of ints -> a list
    of ``num_images`` ints (a sequence keeps its length: the op checks it against the image count)."""
    if isinstance(budget, (int, torch.SymInt)) and not isinstance(budget, bool):
        return [_int_arg(op, name, budget)] * num_images
    if isinstance(budget, (torch.Tensor, str, bytes)) or not isinstance(budget, Sequence):
        raise TypeError(f"visionzip.{op}: {name} must be an int or a sequence of ints, got {type(budget).__name__}")
    return [_int_arg(op, f"{name}[{i}]", b) for i, b in enumerate(budget)]


def cls_attention(q_cls: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Head-mean softmax attention of the CLS query over all tokens.

    Args:
        q_cls: [B, H, d] the CLS token's query (after the bias, before scaling).
        k: [B, N, H, d] keys; the last dim must be the fastest, any other strides are read in place.
        scale: the softmax scale, usually d ** -0.5.

    Returns:
        [B, N] float32, ``mean_h softmax_j(scale * q_cls[b, h] . k[b, j, h])``.
    """
    return _ops.cls_attention(q_cls, k, scale)


def attention_received(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention each token receives, for encoders without a CLS token (SigLIP, Qwen2-VL ViT).

    Args:
        q, k: [B, N, H, d].
        scale: the softmax scale.

    Returns:
        [B, N] float32, ``mean_h mean_i softmax_j(scale * q[b, i, h] . k[b, j, h])``; no N x N map is
        ever materialised.
    """
    return _ops.attention_received(q, k, scale)


def scores_and_metric(
    q: torch.Tensor, k: torch.Tensor, scale: float, keep_cls: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token scores and the merge metric from one read of ``k``.

    Args:
        q: [B, M, H, d] queries. With ``keep_cls`` only the CLS row ``q[:, 0]`` is used (M >= 1, so a
            [B, 1, H, d] CLS row is enough); without it M = N and every row is a query.
        k: [B, N, H, d] keys; the last dim must be the fastest, any other strides are read in place.
        scale: the softmax scale, usually d ** -0.5.
        keep_cls: True: scores = :func:`cls_attention` of ``q[:, 0]``; False: scores =
            :func:`attention_received`.

    Returns:
        (scores [B, N] float32, metric [B, N, d] in ``k.dtype``): the metric is ``k`` averaged over
        heads (summed in float32 in head order, divided by H, rounded once).
    """
    return _ops.scores_and_metric(q, k, scale, _bool_arg("scores_and_metric", "keep_cls", keep_cls))


def dominant_topk(scores: torch.Tensor, dominant: int, keep_cls: bool = True) -> torch.Tensor:
    """Indices of the dominant tokens.

    Args:
        scores: [B, N] finite scores (any float dtype).
        dominant: D, the number of tokens kept, token 0 included when ``keep_cls``.
        keep_cls: always keep token 0 and pick D - 1 of tokens 1..N-1.

    Returns:
        keep [B, D] int64 in ascending order; ties go to the lower index.
    """
    op = "dominant_topk"
    return _ops.dominant_topk(scores, _int_arg(op, "dominant", dominant), _bool_arg(op, "keep_cls", keep_cls))


def contextual_merge(hidden: torch.Tensor, metric: torch.Tensor, keep: torch.Tensor, contextual: int) -> torch.Tensor:
    """Dominant rows followed by K contextual tokens merged from the rest (docs/SPEC.md "Merging").

    Args:
        hidden: [B, N, C] hidden states of the chosen layer.
        metric: [B, N, d] head-mean keys of that layer.
        keep: [B, D] int64 distinct token indices, e.g. from :func:`dominant_topk`.
        contextual: K, 0 <= K <= N - D.

    Returns:
        [B, D + K, C] in ``hidden.dtype``; differentiable w.r.t. ``hidden``.
    """
    return _ops.contextual_merge(hidden, metric, keep, _int_arg("contextual_merge", "contextual", contextual))


def contextual_merge_backward(
    grad_tokens: torch.Tensor, metric: torch.Tensor, keep: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """Gradient of :func:`contextual_merge` w.r.t. ``hidden``: [B, D+K, C] -> [B, N, C]."""
    num_tokens = _int_arg("contextual_merge_backward", "num_tokens", num_tokens)
    return _ops.contextual_merge_backward(grad_tokens, metric, keep, num_tokens)


def select_merge(
    hidden: torch.Tensor, scores: torch.Tensor, metric: torch.Tensor, dominant: int, contextual: int,
    keep_cls: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip in one op: :func:`dominant_topk` then :func:`contextual_merge`.

    Args:
        hidden: [B, N, C]; scores: [B, N]; metric: [B, N, d].
        dominant, contextual: the budget D + K (e.g. 54 + 10 of 577 for LLaVA-1.5).
        keep_cls: always keep token 0 (CLS encoders).

    Returns:
        (tokens [B, D+K, C] in ``hidden.dtype``, keep [B, D] int64 ascending).
    """
    op = "select_merge"
    return _ops.select_merge(hidden, scores, metric, _int_arg(op, "dominant", dominant),
                             _int_arg(op, "contextual", contextual), _bool_arg(op, "keep_cls", keep_cls))


def varlen_scores_and_metric(
    q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, scale: float | None = None, unit: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token scores and the merge metric of packed images (Qwen2-VL's NaViT layout), per image.

    Images are concatenated along the token axis: image i is tokens ``cu_seqlens[i]:cu_seqlens[i+1]``
    and attends only to itself, as the encoder's full-attention block does. No T x T (nor L x L)
    map is materialised: O(T * H) extra memory.

    Args:
        q, k: [T, H, d] queries and keys of the scoring layer (after the vision rotary embedding);
            the last dim must be the fastest, any other strides (e.g. views of a fused qkv
            [T, 3, H, d]) are read in place.
        cu_seqlens: [n + 1] int32 or int64 offsets: 0 first, non-decreasing, T last; on q's device or
            on the CPU (only a CPU cu_seqlens has its values checked: on CUDA that would be a sync).
        scale: the softmax scale; None gives d ** -0.5.
        unit: tokens per merge unit, 1 or 4 (Qwen's 2x2 patch merger); every image's length must be
            a multiple of it.

    Returns:
        (scores [T / unit] float32, metric [T / unit, d] in ``k.dtype``), in input token order:
        ``raw[t] = sum_i mean_h softmax_t(scale * q_i . k_t)`` over the queries i of t's image,
        ``scores[j] = mean(raw[j*unit:(j+1)*unit])``; ``metric[j]`` = k over the unit's tokens
        averaged, then over heads (float32 sums, float64 for float64 input, rounded once).
        Neither output requires grad.
    """
    op = "varlen_scores_and_metric"
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _ops.varlen_scores_and_metric(q, k, cu_seqlens, float(scale), _int_arg(op, "unit", unit))


def varlen_select_merge(
    hidden: torch.Tensor,
    scores: torch.Tensor,
    metric: torch.Tensor,
    cu_seqlens: torch.Tensor,
    dominant: int | Sequence[int],
    contextual: int | Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VisionZip on packed images (NaViT encoders such as Qwen2-VL's): per image, :func:`select_merge`
    with ``keep_cls=False``, the kept tokens staying in original token order (docs/SPEC.md "Packed
    (varlen) select_merge").

    Args:
        hidden: [T, C] the tokens of n images concatenated, image i being rows
            ``cu_seqlens[i]:cu_seqlens[i+1]`` (N_i tokens).
        scores: [T] finite scores (any float dtype, ranked in float32); metric: [T, d].
        cu_seqlens: [n+1] int32 or int64, 0 first, non-decreasing, T last; on hidden's device or on
            the CPU. Its values are read on the host once, to check them (a CUDA tensor costs one
            small device-to-host copy; pass a CPU one to avoid it).
        dominant, contextual: per-image budgets D_i, K_i: an int (the same for every image) or a
            sequence of n ints, with D_i >= 0, K_i >= 0 and D_i + K_i <= N_i.

    Returns:
        (tokens [sum(D_i+K_i), C] in ``hidden.dtype``, keep [sum(D_i+K_i)] int64, cu_seqlens_out
        [n+1]). Per image, keep holds the packed indices (into T) of its top-D_i tokens and its K_i
        contextual targets, ascending; the token of a target position is the merged contextual token.
        cu_seqlens_out is the cumulative sum of D_i + K_i, in cu_seqlens' dtype and device.
        Differentiable w.r.t. ``hidden``.
    """
    op = "varlen_select_merge"
    num_images = cu_seqlens.shape[0] - 1 if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dim() == 1 else 0
    return _ops.varlen_select_merge(
        hidden, scores, metric, cu_seqlens,
        budget_list(op, "dominant", dominant, num_images), budget_list(op, "contextual", contextual, num_images),
    )
