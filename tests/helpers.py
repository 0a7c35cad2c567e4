"""Shared test setup: input generators, the upstream-style oracle, and tolerance-aware comparisons.

Benchmarks import this module too (Liger-Kernel style), so the shapes measured are the shapes tested.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from visionzip_kernels import reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# fp32 kernels vs the fp32 reference: docs/SPEC.md allows 1e-5 relative.
FP32_RTOL = 1e-5
FP32_ATOL = 1e-6


# ---------------------------------------------------------------------------------------------
# Comparisons


def assert_close_verbose(
    actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, name: str = ""
) -> None:
    """allclose that, on failure, names the first bad index, both values and the worst error."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    bad = ~torch.isclose(a, e, atol=atol, rtol=rtol, equal_nan=False)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        err = (a - e).abs()
        worst = tuple(int(i) for i in torch.nonzero(err == err.max())[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {a.numel()} elements differ (atol={atol}, rtol={rtol}); "
            f"first at {first}: got {a[first].item()!r}, expected {e[first].item()!r}; "
            f"worst at {worst}: |diff| = {err[worst].item():.3g}"
        )


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item() if a.numel() else 0.0


def assert_within_torch_error(
    actual: torch.Tensor, exact: torch.Tensor, torch_native: torch.Tensor, name: str = ""
) -> None:
    """Low-precision bound (docs/SPEC.md): the error of ``actual`` against the exact (float64) result is at
    most 2x the error PyTorch makes doing the same computation in the low-precision dtype, plus one
    rounding step of the output dtype for elements PyTorch happens to round exactly."""
    ulp = torch.finfo(actual.dtype).eps * exact.detach().double().abs().cpu()
    bound = 2 * max_abs_err(torch_native, exact)
    err = (actual.detach().double().cpu() - exact.detach().double().cpu()).abs()
    bad = err > bound + ulp
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{name}: error {err.max().item():.3g} exceeds 2x PyTorch's own {actual.dtype} error "
            f"({bound / 2:.3g}); first at {first}: got {actual[first].item()!r}, exact {exact[first].item()!r}"
        )


def assert_metric_is_head_mean(metric: torch.Tensor, k: torch.Tensor, name: str = "metric") -> None:
    """The merge metric against an oracle computed the way upstream does (``k.mean`` over heads, in
    float64 here): within one rounding step of ``k.dtype`` plus the fp32 summation error of H terms."""
    exact = k.double().mean(dim=2)
    H = k.shape[2]
    accumulated = torch.finfo(torch.float32).eps * H * k.double().abs().amax().item()
    rtol = torch.finfo(k.dtype).eps if k.dtype != torch.float32 else 1e-6
    assert metric.dtype == k.dtype and metric.shape == exact.shape
    assert_close_verbose(metric, exact, atol=accumulated, rtol=rtol, name=name)


def assert_equal_verbose(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = actual.cpu() != expected.cpu()
    if bool(diff.any()):
        first = tuple(int(i) for i in diff.nonzero()[0])
        raise AssertionError(
            f"{name}: {int(diff.sum())} elements differ; first at {first}: "
            f"got {actual[first].item()!r}, expected {expected[first].item()!r}"
        )


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass
class Case:
    """One image batch: layer-L hidden states, q/k as views of projection outputs, and the metric."""

    hidden: torch.Tensor  # [B, N, C]
    q: torch.Tensor  # [B, N, H, d] (a view of [B, N, H*d] when strided)
    k: torch.Tensor  # [B, N, H, d]
    metric: torch.Tensor  # [B, N, d]

    @property
    def scale(self) -> float:
        return self.q.shape[-1] ** -0.5


def strided_view(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` in a non-contiguous layout (every dim but the last strided)."""
    padded = torch.zeros(*(s + 1 for s in t.shape[:-1]), t.shape[-1] + 3, dtype=t.dtype, device=t.device)
    view = padded[(slice(1, None),) * (t.dim() - 1) + (slice(0, t.shape[-1]),)]
    view.copy_(t)
    assert not view.is_contiguous()
    return view


def make_case(
    B: int,
    N: int,
    C: int,
    H: int = 4,
    d: int = 16,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    strided: bool = False,
    peaked: float = 1.5,
    device: str = "cpu",
) -> Case:
    """Random inputs shaped like one encoder layer. ``peaked`` scales q and k so that the CLS row
    concentrates on a few tokens, as in a trained CLIP (and so that top-k has no near-ties)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, N, C, generator=g)
    q = torch.randn(B, N, H * d, generator=g) * peaked
    k = torch.randn(B, N, H * d, generator=g) * peaked
    hidden, q, k = (t.to(dtype=dtype, device=device) for t in (hidden, q, k))
    if strided:
        hidden = strided_view(hidden)
        # A fused qkv projection, split: q and k are views with row stride 3*H*d.
        qkv = torch.cat([q, k, torch.zeros_like(k)], dim=-1)
        q, k = qkv[..., : H * d], qkv[..., H * d : 2 * H * d]
    q = q.view(B, N, H, d) if q.is_contiguous() else q.unflatten(-1, (H, d))
    k = k.view(B, N, H, d) if k.is_contiguous() else k.unflatten(-1, (H, d))
    metric = k.mean(dim=2)
    return Case(hidden, q, k, metric)


def separated_scores(B: int, N: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Scores with no near-ties: a random permutation of well-spaced, dtype-exact values."""
    g = torch.Generator().manual_seed(seed)
    ranks = (
        torch.stack([torch.randperm(N, generator=g) for _ in range(B)]) if B else torch.empty(0, N, dtype=torch.long)
    )
    return (ranks.to(torch.float32) / 4).to(dtype)  # multiples of 1/4 are exact in bf16 up to 256


def separate_assignment(
    metric: torch.Tensor, keep: torch.Tensor, contextual: int, margin: float = 1e-3
) -> torch.Tensor:
    """Nudges metric rows until every member's best target beats the second best by ``margin`` in
    cosine similarity, so that backends summing in different orders must agree on the assignment."""
    if contextual < 2:
        return metric
    metric = metric.clone()
    B, N, d = metric.shape
    D = keep.shape[1]
    kept = torch.zeros(B, N, dtype=torch.int8).scatter_(1, keep.cpu(), 1)
    rest = torch.argsort(kept, dim=1, stable=True)[:, : N - D]
    step = max(1, (N - D) // contextual)
    target_pos = torch.arange(contextual) * step
    for _ in range(20):
        m = metric.float().cpu()
        unit = F.normalize(m.gather(1, rest[..., None].expand(B, N - D, d)), dim=-1)
        sims = unit @ unit[:, target_pos].transpose(1, 2)
        top2 = sims.topk(2, dim=-1)
        gap = top2.values[..., 0] - top2.values[..., 1]
        gap[:, target_pos] = 1.0
        tight = gap < margin
        if not bool(tight.any()):
            return metric
        for b, p in tight.nonzero().tolist():
            best = target_pos[top2.indices[b, p, 0]]
            token, target = rest[b, p], rest[b, best]
            metric[b, token] = (0.5 * metric[b, token].float() + 0.5 * metric[b, target].float()).to(metric.dtype)
    raise AssertionError("could not separate the assignment")


def top_indices(scores: torch.Tensor, dominant: int) -> torch.Tensor:
    return scores.float().topk(dominant).indices.sort().values if dominant else torch.empty(0, dtype=torch.int64)


def packed_inputs(sizes, dominant, contextual, C=24, d=16, dtype=torch.float32, seed=0, strided=False,
                  cu_dtype=torch.int64):
    """(hidden [T, C], scores [T] fp32 without ties, metric [T, d] with a separated assignment per
    image, cu_seqlens). ``strided``: hidden is a padded view, metric a column slice of a wider tensor."""
    g = torch.Generator().manual_seed(seed)
    T = sum(sizes)
    hidden = torch.randn(T, C, generator=g)
    scores = torch.cat([torch.randperm(n, generator=g).float() / 4 for n in sizes]) if T else torch.empty(0)
    metric = torch.randn(T, d, generator=g)
    start = 0
    for n, D, K in zip(sizes, dominant, contextual):
        if n:
            keep = top_indices(scores[start:start + n], D)[None]
            metric[start:start + n] = separate_assignment(metric[None, start:start + n], keep, K)[0]
        start += n
    hidden, metric = hidden.to(dtype), metric.to(dtype)
    if strided:
        hidden = strided_view(hidden)
        wide = torch.zeros(T, 3 * d, dtype=dtype)
        wide[:, d:2 * d] = metric
        metric = wide[:, d:2 * d]
        assert not hidden.is_contiguous() and not metric.is_contiguous()
    cu = torch.tensor([0] + list(sizes), dtype=torch.int64).cumsum(0).to(cu_dtype)
    return hidden, scores, metric, cu


# ---------------------------------------------------------------------------------------------
# The independent oracle: upstream VisionZip's op sequence on a full attention map. It lives in the
# package (visionzip_kernels/upstream.py) because the demo and the benchmarks time it too.

from visionzip_kernels.upstream import full_attention, upstream_select_merge  # noqa: E402


def oracle_case(case: Case, dominant: int, contextual: int, keep_cls: bool = True, compute_dtype=torch.float32):
    """Runs the oracle on ``case`` in ``compute_dtype`` (float32/64: exact-ish; the case's dtype:
    what upstream itself computes) and returns (tokens in the case's dtype, keep)."""
    attn = full_attention(case.q.to(compute_dtype), case.k.to(compute_dtype), case.scale)
    tokens, keep = upstream_select_merge(
        attn, case.hidden.to(compute_dtype), case.metric.to(compute_dtype), dominant, contextual, keep_cls
    )
    return tokens.to(case.hidden.dtype), keep


def reference_scores(case: Case, keep_cls: bool = True) -> torch.Tensor:
    if keep_cls:
        return reference.cls_attention(case.q[:, 0], case.k, case.scale)
    return reference.attention_received(case.q, case.k, case.scale)


def topk_is_separated(scores: torch.Tensor, dominant: int, keep_cls: bool = True, rel_gap: float = 1e-4) -> bool:
    """True when the D-th and (D+1)-th best candidate scores differ by more than ``rel_gap``
    relative, so that every backend must pick the same ``keep``."""
    first = 1 if keep_cls else 0
    picked = dominant - first
    candidates = scores[:, first:].double()
    if picked >= candidates.shape[1] or picked == 0:
        return True
    top = candidates.topk(picked + 1, dim=1).values
    gap = top[:, picked - 1] - top[:, picked]
    return bool((gap > rel_gap * top[:, picked - 1].abs().clamp(min=1e-30)).all())


def budget_fits(N: int, dominant: int, contextual: int) -> bool:
    return dominant <= N and contextual <= N - dominant


def cases_id(*parts) -> str:
    return "-".join(str(p).replace("torch.", "") for p in parts)


# ---------------------------------------------------------------------------------------------
# Merge inputs and the kernel-vs-reference comparison used by the kernel and property tests.


def merge_inputs(
    B: int, N: int, C: int, D: int, K: int, keep_cls: bool = True, dtype: torch.dtype = torch.float32,
    strided: bool = False, d: int = 64, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [B,N,C] in ``dtype``, scores [B,N] fp32 without ties, metric [B,N,d] in ``dtype`` with a
    separated assignment, keep [B,D] from the reference) for select_merge / contextual_merge tests.
    ``strided``: hidden is a padded view and metric the head-mean of a fused-qkv key view."""
    case = make_case(B, N, C, H=2, d=d, dtype=dtype, seed=seed, strided=strided)
    scores = separated_scores(B, N, seed=seed)
    assert topk_is_separated(scores, D, keep_cls), "precondition: separated_scores has a near-tie"
    keep = reference.dominant_topk(scores, D, keep_cls)
    metric = separate_assignment(case.metric, keep, K)
    return case.hidden, scores, metric, keep


def assert_tokens_match_reference(
    tokens: torch.Tensor,
    hidden: torch.Tensor,
    metric: torch.Tensor,
    keep: torch.Tensor,
    contextual: int,
    name: str = "",
) -> None:
    """docs/SPEC.md tolerances for kernel tokens against the reference merge of (hidden, metric, keep).
    fp32/fp64: rtol 1e-5. fp16/bf16: at most one output rounding step from the fp32 reference, and
    within 2x PyTorch's own error doing the merge in that dtype (same assignment, from fp32 metric)."""
    expected = reference.contextual_merge(hidden, metric, keep, contextual)
    assert tokens.dtype == hidden.dtype, f"{name}: dtype {tokens.dtype} != {hidden.dtype}"
    D = keep.shape[1]
    assert_equal_verbose(tokens[:, :D], expected[:, :D], f"{name} dominant rows")
    if hidden.dtype in (torch.float32, torch.float64):
        assert_close_verbose(tokens, expected, atol=FP32_ATOL, rtol=FP32_RTOL, name=name)
        return
    eps = torch.finfo(hidden.dtype).eps
    assert_close_verbose(tokens, expected, atol=1e-6, rtol=eps, name=f"{name} vs fp32 reference")
    exact = reference.contextual_merge(hidden.double(), metric.double(), keep, contextual)
    native = reference.contextual_merge(hidden, metric.float(), keep, contextual, upcast=False)
    assert_within_torch_error(tokens, exact, native, name=f"{name} vs float64")


__all__ = [name for name in dir() if not name.startswith("_") and name not in {"math", "F", "torch", "dataclass"}]
