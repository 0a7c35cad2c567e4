"""Shape, dtype and budget rules shared by the fake kernels and the Python (Triton) launchers.

They mirror csrc/checks.cpp, which guards the C++ backends, message for message: every error names
the argument and the rule, and is raised before any kernel runs.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _fail(op: str, message: str, error: type[Exception] = ValueError) -> None:
    raise error(f"visionzip.{op}: {message}")


def check_rank(op: str, name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    if t.dim() != rank:
        _fail(op, f"{name} must be a {rank}-D tensor {layout}, got shape {list(t.shape)}")


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        _fail(op, f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}", TypeError)


def check_same_device(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        _fail(op, f"{name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")


def check_dim(op: str, name: str, t: torch.Tensor, dim: int, ref_name: str, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        _fail(op, f"{name}.size({dim}) must equal {what} of {ref_name} ({expected}), got {t.shape[dim]}")


def check_not_empty(op: str, name: str, t: torch.Tensor) -> None:
    # Dim 0 is the batch: B == 0 is allowed and gives empty outputs.
    if any(s == 0 for s in t.shape[1:]):
        _fail(op, f"{name} must not be empty, got shape {list(t.shape)}")


def check_budget(op: str, num_tokens: int, dominant: int, contextual: int, keep_cls: bool) -> None:
    if dominant < 1:
        why = " (keep_cls=True always keeps token 0)" if keep_cls else ""
        _fail(op, f"dominant must be >= 1{why}, got {dominant}")
    if dominant > num_tokens:
        _fail(op, f"dominant must be <= N ({num_tokens}), got {dominant}")
    if contextual < 0:
        _fail(op, f"contextual must be >= 0, got {contextual}")
    if contextual > num_tokens - dominant:
        _fail(
            op,
            f"contextual must be <= N - dominant ({num_tokens} - {dominant} = {num_tokens - dominant}), "
            f"got {contextual}",
        )


def _check_metric(op: str, metric: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    check_rank(op, "metric", metric, 3, "[B, N, d]")
    check_float(op, "metric", metric)
    check_same_device(op, "metric", metric, ref_name, ref)
    check_not_empty(op, "metric", metric)


def _check_keep(op: str, keep: torch.Tensor, metric: torch.Tensor) -> None:
    check_rank(op, "keep", keep, 2, "[B, D]")
    if keep.dtype != torch.int64:
        _fail(op, f"keep must be int64, got {keep.dtype}", TypeError)
    check_same_device(op, "keep", keep, "metric", metric)
    check_dim(op, "keep", keep, 0, "metric", metric.shape[0], "the batch size")
    if not 1 <= keep.shape[1] <= metric.shape[1]:
        _fail(op, f"keep.size(1) (D) must be between 1 and N ({metric.shape[1]}), got {keep.shape[1]}")


def _check_query_key(op: str, q_name: str, q: torch.Tensor, q_rank: int, q_layout: str, k: torch.Tensor) -> None:
    """A query tensor [B, ..., H, d] against k [B, N, H, d]: ranks, dtypes, device, batch, heads, head dim."""
    check_rank(op, q_name, q, q_rank, q_layout)
    check_rank(op, "k", k, 4, "[B, N, H, d]")
    check_float(op, q_name, q)
    if k.dtype != q.dtype:
        _fail(op, f"k must have the dtype of {q_name} ({q.dtype}), got {k.dtype}", TypeError)
    check_same_device(op, "k", k, q_name, q)
    check_dim(op, "k", k, 0, q_name, q.shape[0], "the batch size")
    check_dim(op, "k", k, 2, q_name, q.shape[-2], "the head count")
    check_dim(op, "k", k, 3, q_name, q.shape[-1], "the head dim")
    check_not_empty(op, "k", k)


def cls_attention_args(q_cls: torch.Tensor, k: torch.Tensor) -> None:
    _check_query_key("cls_attention", "q_cls", q_cls, 3, "[B, H, d]", k)


def attention_received_args(q: torch.Tensor, k: torch.Tensor) -> None:
    op = "attention_received"
    check_rank(op, "q", q, 4, "[B, N, H, d]")
    check_rank(op, "k", k, 4, "[B, N, H, d]")
    check_float(op, "q", q)
    if k.dtype != q.dtype:
        _fail(op, f"k must have the dtype of q ({q.dtype}), got {k.dtype}", TypeError)
    check_same_device(op, "k", k, "q", q)
    for dim in range(4):
        check_dim(op, "k", k, dim, "q", q.shape[dim], "the same size")
    check_not_empty(op, "k", k)


def scores_and_metric_args(q: torch.Tensor, k: torch.Tensor, keep_cls: bool) -> None:
    op = "scores_and_metric"
    _check_query_key(op, "q", q, 4, "[B, M, H, d]", k)
    if keep_cls:
        check_not_empty(op, "q", q)
    elif q.shape[1] != k.shape[1]:
        # Without a CLS token every token is a query.
        _fail(op, f"with keep_cls=False q.size(1) must equal the token count of k ({k.shape[1]}), got {q.shape[1]}")


def dominant_topk_args(scores: torch.Tensor, dominant: int, keep_cls: bool) -> None:
    op = "dominant_topk"
    check_rank(op, "scores", scores, 2, "[B, N]")
    check_float(op, "scores", scores)
    check_not_empty(op, "scores", scores)
    check_budget(op, scores.shape[1], dominant, 0, keep_cls)


def contextual_merge_args(hidden: torch.Tensor, metric: torch.Tensor, keep: torch.Tensor, contextual: int) -> None:
    op = "contextual_merge"
    check_rank(op, "hidden", hidden, 3, "[B, N, C]")
    check_float(op, "hidden", hidden)
    check_not_empty(op, "hidden", hidden)
    _check_metric(op, metric, "hidden", hidden)
    check_dim(op, "metric", metric, 0, "hidden", hidden.shape[0], "the batch size")
    check_dim(op, "metric", metric, 1, "hidden", hidden.shape[1], "the token count")
    _check_keep(op, keep, metric)
    check_budget(op, hidden.shape[1], keep.shape[1], contextual, keep_cls=False)


def contextual_merge_backward_args(
    grad_tokens: torch.Tensor, metric: torch.Tensor, keep: torch.Tensor, num_tokens: int
) -> None:
    op = "contextual_merge_backward"
    check_rank(op, "grad_tokens", grad_tokens, 3, "[B, D+K, C]")
    check_float(op, "grad_tokens", grad_tokens)
    check_not_empty(op, "grad_tokens", grad_tokens)
    _check_metric(op, metric, "grad_tokens", grad_tokens)
    check_dim(op, "metric", metric, 0, "grad_tokens", grad_tokens.shape[0], "the batch size")
    check_dim(op, "metric", metric, 1, "num_tokens", num_tokens, "the value")
    _check_keep(op, keep, metric)
    contextual = grad_tokens.shape[1] - keep.shape[1]
    if contextual < 0:
        _fail(op, f"grad_tokens.size(1) must be >= D ({keep.shape[1]}), got {grad_tokens.shape[1]}")
    check_budget(op, num_tokens, keep.shape[1], contextual, keep_cls=False)


def select_merge_args(
    hidden: torch.Tensor, scores: torch.Tensor, metric: torch.Tensor, dominant: int, contextual: int, keep_cls: bool
) -> None:
    op = "select_merge"
    check_rank(op, "hidden", hidden, 3, "[B, N, C]")
    check_float(op, "hidden", hidden)
    check_not_empty(op, "hidden", hidden)
    check_rank(op, "scores", scores, 2, "[B, N]")
    check_float(op, "scores", scores)
    check_same_device(op, "scores", scores, "hidden", hidden)
    check_dim(op, "scores", scores, 0, "hidden", hidden.shape[0], "the batch size")
    check_dim(op, "scores", scores, 1, "hidden", hidden.shape[1], "the token count")
    _check_metric(op, metric, "hidden", hidden)
    check_dim(op, "metric", metric, 0, "hidden", hidden.shape[0], "the batch size")
    check_dim(op, "metric", metric, 1, "hidden", hidden.shape[1], "the token count")
    check_budget(op, hidden.shape[1], dominant, contextual, keep_cls)
