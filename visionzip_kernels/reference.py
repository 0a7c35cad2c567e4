"""Pure-PyTorch reference of every visionzip op (docs/SPEC.md), used by the correctness tests.

Each function takes ``upcast``: True (default) computes in float32 whatever the input dtype, as the
kernels do; False computes in the input dtype, which measures PyTorch's own error in that dtype and
sets the tolerance for low-precision comparisons. float64 inputs are always computed in float64.
Validation is the same as the ops', so the reference raises the same errors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import checks as check
from .ops import budget_list

# The attention_received reference works on this many query rows at a time.
_QUERY_CHUNK = 512


def _compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    if dtype == torch.float64:
        return torch.float64
    return torch.float32 if upcast else dtype


def cls_attention(q_cls: torch.Tensor, k: torch.Tensor, scale: float, upcast: bool = True) -> torch.Tensor:
    """[B,H,d], [B,N,H,d] -> [B,N] float32: mean over heads of softmax_j(scale * q_cls . k_j)."""
    check.cls_attention_args(q_cls, k)
    dt = _compute_dtype(k.dtype, upcast)
    logits = torch.einsum("bhd,bnhd->bhn", q_cls.to(dt), k.to(dt)) * scale
    return logits.softmax(dim=-1).mean(dim=1).float()


def attention_received(q: torch.Tensor, k: torch.Tensor, scale: float, upcast: bool = True) -> torch.Tensor:
    """[B,N,H,d] x2 -> [B,N] float32: mean over heads and queries of the attention each key receives."""
    check.attention_received_args(q, k)
    dt = _compute_dtype(k.dtype, upcast)
    queries = q.to(dt).transpose(1, 2)  # [B, H, N, d]
    keys_t = k.to(dt).permute(0, 2, 3, 1)  # [B, H, d, N]
    B, H, N, _ = queries.shape
    received = torch.zeros(B, H, N, dtype=dt, device=q.device)
    for start in range(0, N, _QUERY_CHUNK):
        probs = (queries[:, :, start : start + _QUERY_CHUNK] @ keys_t * scale).softmax(dim=-1)
        received += probs.sum(dim=2)
    return (received.mean(dim=1) / N).float()


def _mean_in_order(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The mean of x over dim with a stated summation order: from zero, adding the slices one at a time in
    ascending index order, each add rounded in x.dtype, then one division by the size. (torch.mean picks
    its own order, pairwise or vectorised, and its last bits differ from the kernels' once the size is 9
    or more.) Starting from +0 as the kernels' accumulators do also maps a sum of -0.0s to +0.0."""
    total = torch.zeros_like(x.select(dim, 0))
    for i in range(x.shape[dim]):
        total = total + x.select(dim, i)
    return total / x.shape[dim]


def head_mean(k: torch.Tensor, upcast: bool = True) -> torch.Tensor:
    """[B,N,H,d] -> [B,N,d] in k.dtype: the merge metric, k averaged over heads (docs/SPEC.md "Notation"):
    summed over h in ascending order in fp32 (fp64 for fp64), divided by H, rounded once to k.dtype."""
    return _mean_in_order(k.to(_compute_dtype(k.dtype, upcast)), dim=2).to(k.dtype)


def scores_and_metric(
    q: torch.Tensor, k: torch.Tensor, scale: float, keep_cls: bool = True, upcast: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B,M,H,d], [B,N,H,d] -> (scores [B,N] float32, metric [B,N,d]): CLS attention of q[:, 0]
    (keep_cls) or the attention received, and the head-mean keys."""
    check.scores_and_metric_args(q, k, keep_cls)
    scores = cls_attention(q[:, 0], k, scale, upcast) if keep_cls else attention_received(q, k, scale, upcast)
    return scores, head_mean(k, upcast)


def dominant_topk(scores: torch.Tensor, dominant: int, keep_cls: bool = True) -> torch.Tensor:
    """[B,N] -> keep [B,D] int64 ascending; token 0 always kept when keep_cls; ties to the lower index."""
    check.dominant_topk_args(scores, dominant, keep_cls)
    check.finite_scores("dominant_topk", scores)
    return _dominant_topk(scores, dominant, keep_cls)


def _dominant_topk(scores: torch.Tensor, dominant: int, keep_cls: bool) -> torch.Tensor:
    """dominant_topk on checked arguments (dominant may be 0 without keep_cls)."""
    s = scores.float()
    first = 1 if keep_cls else 0
    # A stable descending sort keeps equal scores in index order: ties go to the lower index.
    ranked = torch.sort(s[:, first:], dim=1, descending=True, stable=True).indices[:, : dominant - first] + first
    if keep_cls:
        # (not zeros_like(ranked[:, :1]): with D = 1, ranked has no columns to take the shape from)
        cls = torch.zeros(ranked.shape[0], 1, dtype=ranked.dtype, device=ranked.device)
        ranked = torch.cat([cls, ranked], dim=1)
    return ranked.sort(dim=1).values


def _unit_rows(rows: torch.Tensor) -> torch.Tensor:
    """[..., d] -> the rows' unit vectors as docs/SPEC.md "Merging" step 1 defines them: each row times
    the power of two 2^-e, e = ilogb(max |row|) (e at least the dtype's smallest normal exponent), then
    divided by max(norm, 1e-12). The power of two brings max |row| into [1, 2) exactly, so the result is
    the same for the row times any power of two, and tiny or huge rows neither underflow nor overflow
    (their norm is >= 1: the eps only keeps a zero row zero). A row that is not finite is left as it
    is (its unit vector holds NaNs, as F.normalize gives)."""
    max_abs = rows.abs().amax(dim=-1, keepdim=True).double()
    smallest_normal_exponent = round(math.log2(torch.finfo(rows.dtype).tiny))
    exponent = (torch.frexp(max_abs).exponent - 1).clamp(min=smallest_normal_exponent)  # max = f * 2^e, f in [1, 2)
    scaled = torch.isfinite(max_abs) & (max_abs > 0)
    scale = torch.where(scaled, torch.exp2(-exponent.double()), 1.0).to(rows.dtype)  # exact powers of two
    return F.normalize(rows * scale, dim=-1, eps=1e-12)


def _assignment(metric: torch.Tensor, rest: torch.Tensor, contextual: int, dt: torch.dtype):
    """Positions of the targets within the rest, and each rest token's target (targets map to themselves)."""
    B, M = rest.shape
    d = metric.shape[2]
    unit = _unit_rows(metric.to(dt).gather(1, rest[..., None].expand(B, M, d)))
    step = max(1, M // contextual)
    target_pos = torch.arange(contextual, device=metric.device) * step
    similarity = unit @ unit[:, target_pos].transpose(1, 2)  # [B, M, K]
    assign = similarity.argmax(dim=-1)  # first maximum wins
    assign[:, target_pos] = torch.arange(contextual, device=metric.device)
    return target_pos, assign


def contextual_merge(
    hidden: torch.Tensor, metric: torch.Tensor, keep: torch.Tensor, contextual: int, upcast: bool = True
) -> torch.Tensor:
    """[B,N,C], [B,N,d], [B,D] -> [B,D+K,C]: dominant rows in keep's order, then K contextual rows."""
    check.contextual_merge_args(hidden, metric, keep, contextual)
    check.keep_values("contextual_merge", keep, hidden.shape[1])
    return _contextual_merge(hidden, metric, keep, contextual, upcast)


def _contextual_merge(
    hidden: torch.Tensor, metric: torch.Tensor, keep: torch.Tensor, contextual: int, upcast: bool
) -> torch.Tensor:
    """contextual_merge on checked arguments (keep may have no columns)."""
    B, N, C = hidden.shape
    D = keep.shape[1]
    dt = _compute_dtype(hidden.dtype, upcast)
    h = hidden.to(dt)
    dominant_rows = h.gather(1, keep[..., None].expand(B, D, C))
    if contextual == 0:
        return dominant_rows.to(hidden.dtype)
    kept = torch.zeros(B, N, dtype=torch.int8, device=hidden.device).scatter_(1, keep, 1)
    rest = torch.argsort(kept, dim=1, stable=True)[:, : N - D]  # not-kept tokens, ascending
    target_pos, assign = _assignment(metric, rest, contextual, _compute_dtype(metric.dtype, upcast))
    h_rest = h.gather(1, rest[..., None].expand(B, N - D, C))
    is_member = torch.ones(N - D, dtype=torch.bool, device=hidden.device)
    is_member[target_pos] = False
    member_assign = assign[:, is_member]
    counts = torch.zeros(B, contextual, dtype=dt, device=hidden.device)
    counts.scatter_add_(1, member_assign, torch.ones_like(member_assign, dtype=dt))
    sums = torch.zeros(B, contextual, C, dtype=dt, device=hidden.device)
    sums.scatter_add_(1, member_assign[..., None].expand(-1, -1, C), h_rest[:, is_member])
    contextual_rows = h_rest[:, target_pos] + sums / counts.clamp(min=1)[..., None]
    return torch.cat([dominant_rows, contextual_rows], dim=1).to(hidden.dtype)


def contextual_merge_backward(
    grad_tokens: torch.Tensor, metric: torch.Tensor, keep: torch.Tensor, num_tokens: int, upcast: bool = True
) -> torch.Tensor:
    """[B,D+K,C] -> [B,N,C]: the vector-Jacobian product of :func:`contextual_merge`, by autograd."""
    check.contextual_merge_backward_args(grad_tokens, metric, keep, num_tokens)
    check.keep_values("contextual_merge_backward", keep, num_tokens)
    B, _, C = grad_tokens.shape
    contextual = grad_tokens.shape[1] - keep.shape[1]
    hidden = torch.zeros(B, num_tokens, C, dtype=grad_tokens.dtype, device=grad_tokens.device, requires_grad=True)
    with torch.enable_grad():
        tokens = _contextual_merge(hidden, metric, keep, contextual, upcast)
        (grad_hidden,) = torch.autograd.grad(tokens, hidden, grad_tokens)
    return grad_hidden


def select_merge(
    hidden: torch.Tensor,
    scores: torch.Tensor,
    metric: torch.Tensor,
    dominant: int,
    contextual: int,
    keep_cls: bool = True,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dominant_topk then contextual_merge: -> (tokens [B,D+K,C], keep [B,D])."""
    check.select_merge_args(hidden, scores, metric, dominant, contextual, keep_cls)
    check.finite_scores("select_merge", scores)  # named as select_merge's, as the kernels do
    keep = _dominant_topk(scores, dominant, keep_cls)
    return _contextual_merge(hidden, metric, keep, contextual, upcast), keep


def varlen_scores_and_metric(
    q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, scale: float, unit: int = 1, upcast: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed q, k [T,H,d] with cu_seqlens [n+1] -> (scores [T/unit] float32, metric [T/unit, d]):
    per image, the dense softmax over its own tokens, mean over heads, sum over query rows, then the
    mean over each merge unit; the metric is k averaged over the unit, then over heads."""
    op = "varlen_scores_and_metric"
    check.varlen_scores_and_metric_args(q, k, cu_seqlens, unit)
    offsets = cu_seqlens.cpu()  # the loop over images below needs the offsets on the host anyway
    check.cu_seqlens_offsets(op, offsets, q.shape[0], unit)
    dt = _compute_dtype(k.dtype, upcast)
    T, H, d = k.shape
    received = torch.zeros(T, dtype=dt, device=q.device)
    for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        queries = q[start:end].to(dt).transpose(0, 1)  # [H, L, d]
        keys = k[start:end].to(dt).transpose(0, 1)
        probs = (queries @ keys.transpose(1, 2) * scale).softmax(dim=-1)  # [H, L, L]
        received[start:end] = probs.mean(dim=0).sum(dim=0)
    scores = received.view(-1, unit).mean(dim=1).float()
    # The kernels' order: per head, the unit's tokens summed in order and divided by unit, then the heads
    # summed in order and divided by H; one rounding to k.dtype.
    metric = _mean_in_order(_mean_in_order(k.to(dt).reshape(T // unit, unit, H, d), dim=1), dim=1).to(k.dtype)
    return scores, metric
def _targets(keep: torch.Tensor, num_tokens: int, contextual: int) -> torch.Tensor:
    """[D] ascending dominant indices of one image -> [K] its targets' token indices, ascending: the
    not-kept tokens at positions 0, step, ..., (K-1)*step, step = max(1, M // K) (docs/SPEC.md)."""
    kept = torch.zeros(num_tokens, dtype=torch.bool, device=keep.device)
    kept[keep] = True
    rest = (~kept).nonzero().flatten()
    step = max(1, rest.numel() // contextual) if contextual else 1
    return rest[torch.arange(contextual, device=keep.device) * step]


def varlen_select_merge(
    hidden: torch.Tensor,
    scores: torch.Tensor,
    metric: torch.Tensor,
    cu_seqlens: torch.Tensor,
    dominant,
    contextual,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed images [T, ...] with per-image budgets (docs/SPEC.md "Packed (varlen) select_merge"):
    per image, select_merge with keep_cls=False, then the kept rows in original token order.
    -> (tokens [sum(D_i+K_i), C], keep [sum(D_i+K_i)] int64 packed indices, cu_seqlens_out [n+1])."""
    op = "varlen_select_merge"
    num_images = cu_seqlens.shape[0] - 1 if cu_seqlens.dim() == 1 else 0
    dominant = budget_list(op, "dominant", dominant, num_images)
    contextual = budget_list(op, "contextual", contextual, num_images)
    check.varlen_select_merge_args(hidden, scores, metric, cu_seqlens, dominant, contextual)
    return _varlen_select_merge(op, hidden, scores, metric, cu_seqlens, dominant, contextual, upcast)


def _varlen_select_merge(
    op: str,
    hidden: torch.Tensor,
    scores: torch.Tensor,
    metric: torch.Tensor,
    cu_seqlens: torch.Tensor,
    dominant: list[int],
    contextual: list[int],
    upcast: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """varlen_select_merge on arguments whose metadata op (the forward or the backward) has checked:
    the value rules are checked here, under op's name."""
    cu = check.read_cu_seqlens_and_check_budgets(op, cu_seqlens, hidden.shape[0], dominant, contextual)
    check.finite_scores(op, scores)
    tokens, keep = [], []
    for i, (D, K) in enumerate(zip(dominant, contextual)):
        start, end = cu[i], cu[i + 1]
        if D + K == 0:
            continue
        image_keep = _dominant_topk(scores[None, start:end], D, keep_cls=False)
        merged = _contextual_merge(hidden[None, start:end], metric[None, start:end], image_keep, K, upcast)[0]
        positions = torch.cat([image_keep[0], _targets(image_keep[0], end - start, K)])
        order = positions.argsort()  # dominant rows then contextual rows -> original token order
        tokens.append(merged[order])
        keep.append(positions[order] + start)
    counts = [D + K for D, K in zip(dominant, contextual)]
    cu_out = torch.tensor([0] + counts, dtype=torch.int64).cumsum(0).to(cu_seqlens.dtype).to(cu_seqlens.device)
    if not tokens:
        return hidden.new_empty(0, hidden.shape[1]), torch.empty(0, dtype=torch.int64, device=hidden.device), cu_out
    return torch.cat(tokens), torch.cat(keep), cu_out


def varlen_select_merge_backward(
    grad_tokens: torch.Tensor,
    scores: torch.Tensor,
    metric: torch.Tensor,
    cu_seqlens: torch.Tensor,
    dominant: list[int],
    contextual: list[int],
    upcast: bool = True,
) -> torch.Tensor:
    """[sum(D_i+K_i), C] -> [T, C]: the vector-Jacobian product of :func:`varlen_select_merge`, by autograd."""
    op = "varlen_select_merge_backward"
    check.varlen_select_merge_backward_args(grad_tokens, scores, metric, cu_seqlens, dominant, contextual)
    hidden = grad_tokens.new_zeros((scores.shape[0], grad_tokens.shape[1]), requires_grad=True)
    with torch.enable_grad():
        dominant, contextual = list(dominant), list(contextual)
        tokens = _varlen_select_merge(op, hidden, scores, metric, cu_seqlens, dominant, contextual, upcast)[0]
        if not tokens.requires_grad:  # no budget anywhere: nothing depends on hidden
            return torch.zeros_like(hidden, requires_grad=False)
        (grad_hidden,) = torch.autograd.grad(tokens, hidden, grad_tokens)
    return grad_hidden
