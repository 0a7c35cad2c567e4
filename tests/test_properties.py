"""Property tests (hypothesis): random B, N, C, D, K, d, dtype and layout within bounds.

Scores come from ``separated_scores`` and the metric goes through ``separate_assignment`` so that
ties cannot make a correct kernel disagree with the reference. Example counts are modest (the
"default" profile in conftest.py); ``HYPOTHESIS_PROFILE=thorough`` runs many more.
"""

from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, note  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from visionzip_kernels import reference  # noqa: E402

from helpers import (  # noqa: E402
    DTYPES,
    FP32_RTOL,
    assert_close_verbose,
    assert_equal_verbose,
    assert_tokens_match_reference,
    separate_assignment,
    separated_scores,
)

ops = torch.ops.visionzip


def strided_view(t: torch.Tensor) -> torch.Tensor:
    """Like helpers.strided_view (a padded, non-unit-stride view), without its non-contiguity
    assertion: with size-1 dims the padded view can still count as contiguous."""
    padded = torch.zeros(*(s + 1 for s in t.shape[:-1]), t.shape[-1] + 3, dtype=t.dtype)
    view = padded[(slice(1, None),) * (t.dim() - 1) + (slice(0, t.shape[-1]),)]
    view.copy_(t)
    return view


@st.composite
def merge_problems(draw, max_n: int = 300):
    N = draw(st.integers(1, max_n))
    D = draw(st.integers(1, N))
    K = draw(st.integers(0, N - D))
    return dict(
        B=draw(st.integers(1, 4)), N=N, C=draw(st.integers(1, 96)), D=D, K=K,
        d=draw(st.integers(8, 32)), keep_cls=draw(st.booleans()), dtype=draw(st.sampled_from(DTYPES)),
        strided=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
    )


def build(p: dict):
    B, N, C, D, K, d, dtype = p["B"], p["N"], p["C"], p["D"], p["K"], p["d"], p["dtype"]
    g = torch.Generator().manual_seed(p["seed"])
    hidden = torch.randn(B, N, C, generator=g).to(dtype)
    if p["strided"]:
        hidden = strided_view(hidden)
    scores = separated_scores(B, N, seed=p["seed"])
    keep = reference.dominant_topk(scores, D, p["keep_cls"])
    # A near-parallel pair of targets can make an assignment impossible to separate: draw again
    # (deterministically) a few times, and fail loudly if that never works.
    for attempt in range(5):
        try:
            metric = separate_assignment(torch.randn(B, N, d, generator=g).to(dtype), keep, K, margin=1e-4)
            break
        except AssertionError:
            note(f"metric draw {attempt} could not be separated")
    else:
        raise AssertionError("precondition: no separable metric in 5 draws")
    if p["strided"]:
        metric = strided_view(metric)
    return hidden, scores, metric, keep


@given(merge_problems())
def test_select_merge_properties(p):
    B, N, C, D, K, keep_cls = p["B"], p["N"], p["C"], p["D"], p["K"], p["keep_cls"]
    hidden, scores, metric, ref_keep = build(p)
    tokens, keep = ops.select_merge(hidden, scores, metric, D, K, keep_cls)

    assert tokens.shape == (B, D + K, C) and tokens.dtype == hidden.dtype
    assert keep.shape == (B, D) and keep.dtype == torch.int64
    assert tokens.shape[1] - keep.shape[1] == K, "contextual-row count"
    assert bool((keep[:, 1:] > keep[:, :-1]).all()), "keep strictly ascending (sorted and unique)"
    assert bool(((keep >= 0) & (keep < N)).all()), "keep in range"
    if keep_cls:
        assert bool((keep[:, 0] == 0).all()), "token 0 kept"
    # The kept tokens are the top scores: every kept candidate beats every dropped one.
    first = 1 if keep_cls else 0
    kept = torch.zeros(B, N, dtype=torch.bool).scatter_(1, keep, True)
    kept[:, :first] = False
    dropped = ~kept
    dropped[:, :first] = False
    if D > first and N > D:
        lowest_kept = scores.masked_fill(~kept, float("inf")).min(dim=1).values
        highest_dropped = scores.masked_fill(~dropped, -float("inf")).max(dim=1).values
        assert bool((lowest_kept > highest_dropped).all()), "keep is not the top-D"

    assert_equal_verbose(keep, ref_keep, "keep vs reference")
    assert_equal_verbose(tokens[:, :D], hidden.gather(1, keep[..., None].expand(B, D, C)), "dominant rows")
    assert_tokens_match_reference(tokens, hidden, metric, ref_keep, K, "select_merge")


@given(merge_problems(max_n=120))
def test_contextual_merge_and_backward_properties(p):
    B, N, C, D, K = p["B"], p["N"], p["C"], p["D"], p["K"]
    hidden, _, metric, keep = build(p)
    # Any distinct indices work as keep, in any order: shuffle the reference's.
    perm = torch.randperm(D, generator=torch.Generator().manual_seed(p["seed"]))
    keep = keep[:, perm]
    tokens = ops.contextual_merge(hidden, metric, keep, K)
    assert tokens.shape == (B, D + K, C)
    assert_tokens_match_reference(tokens, hidden, metric, keep, K, "contextual_merge")

    grad = torch.randn(B, D + K, C, generator=torch.Generator().manual_seed(p["seed"] + 1)).to(p["dtype"])
    got = ops.contextual_merge_backward(grad, metric, keep, N)
    expected = reference.contextual_merge_backward(grad, metric, keep, N)
    rtol = FP32_RTOL if p["dtype"] == torch.float32 else torch.finfo(p["dtype"]).eps
    assert_close_verbose(got, expected, atol=1e-6, rtol=rtol, name="contextual_merge_backward")
    if K == 0:  # dominant rows copy their gradient back, every other token gets exactly zero
        assert_equal_verbose(got.gather(1, keep[..., None].expand(B, D, C)), grad, "K = 0: dominant gradient")
        dropped = torch.ones(B, N, dtype=torch.bool).scatter_(1, keep, False)
        assert bool((got[dropped] == 0).all()), "K = 0: dropped tokens get no gradient"


@given(
    B=st.integers(1, 3), N=st.integers(1, 200), H=st.integers(1, 4), d=st.integers(1, 80),
    dtype=st.sampled_from(DTYPES), strided=st.booleans(), seed=st.integers(0, 2**16),
)
def test_score_ops_properties(B, N, H, d, dtype, strided, seed):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, N, H * d, generator=g) * 1.5).to(dtype)
    k = (torch.randn(B, N, H * d, generator=g) * 1.5).to(dtype)
    if strided:
        q, k = strided_view(q), strided_view(k)
    q, k = q.unflatten(-1, (H, d)), k.unflatten(-1, (H, d))
    scale = d ** -0.5
    for name, got, expected in [
        ("cls_attention", ops.cls_attention(q[:, 0], k, scale), reference.cls_attention(q[:, 0], k, scale)),
        ("attention_received", ops.attention_received(q, k, scale), reference.attention_received(q, k, scale)),
    ]:
        assert got.shape == (B, N) and got.dtype == torch.float32
        assert bool((got >= 0).all()), name
        assert_close_verbose(got.sum(dim=1), torch.ones(B), atol=1e-5, rtol=0, name=f"{name} sums to 1")
        assert_close_verbose(got, expected, atol=1e-9, rtol=FP32_RTOL, name=name)


# ---------------------------------------------------------------------------------------------
# Metric scale (docs/SPEC.md "Merging" step 1): every metric row is brought to max |m| in [1, 2) by a
# power of two before it is normalised, so the assignment does not depend on the metric's scale. A
# power-of-two factor gives the same bits; another factor rounds the metric, so it gives the same
# assignment on a separated metric. fp32 and fp64 take every factor below; bf16 only powers of two
# (its rounding of metric * 1e20 moves directions by ~1e-3); fp16 only a small one (its range).

SCALE_FACTORS = {
    torch.float32: [2.0**-100, 1e-15, 1e-36, 1e20, 2.0**100],
    torch.float64: [2.0**-100, 1e-15, 1e-36, 1e20],
    torch.bfloat16: [2.0**-100, 2.0**100],
    torch.float16: [2.0**12],
}


@st.composite
def scaled_problems(draw):
    p = draw(merge_problems(max_n=160))
    p["dtype"] = draw(st.sampled_from(list(SCALE_FACTORS)))
    return p, draw(st.sampled_from(SCALE_FACTORS[p["dtype"]]))


@given(scaled_problems())
def test_assignment_does_not_depend_on_the_metric_scale(problem):
    p, factor = problem
    D, K, keep_cls = p["D"], p["K"], p["keep_cls"]
    hidden, scores, metric, keep = build(p)
    scaled = metric * factor
    assert bool(torch.isfinite(scaled).all()) and bool(((scaled == 0) == (metric == 0)).all()), "precondition"
    note(f"factor {factor}, dtype {p['dtype']}")
    # The merged rows depend on the metric only through the assignment: equal bits = equal assignment.
    for name, merge in (("CPU kernel", ops.select_merge), ("reference", reference.select_merge)):
        tokens, got_keep = merge(hidden, scores, metric, D, K, keep_cls)
        scaled_tokens, scaled_keep = merge(hidden, scores, scaled, D, K, keep_cls)
        assert_equal_verbose(scaled_keep, got_keep, f"{name}: keep, metric * {factor}")
        assert_equal_verbose(scaled_tokens, tokens, f"{name}: tokens (the assignment), metric * {factor}")
    scaled_tokens, _ = ops.select_merge(hidden, scores, scaled, D, K, keep_cls)
    assert_tokens_match_reference(scaled_tokens, hidden, scaled, keep, K, f"CPU vs reference, metric * {factor}")


@given(merge_problems(max_n=120), st.integers(-100, 100))
def test_power_of_two_scale_gives_the_same_bits_even_with_ties(p, exponent):
    """Without separating the assignment (ties and near-ties left in, duplicated rows added): a power of
    two leaves every bit of the plan as it is, on the CPU kernel and on the reference alike."""
    p = dict(p, dtype=torch.float32)
    D, K, keep_cls = p["D"], p["K"], p["keep_cls"]
    g = torch.Generator().manual_seed(p["seed"])
    hidden = torch.randn(p["B"], p["N"], p["C"], generator=g)
    scores = separated_scores(p["B"], p["N"], seed=p["seed"])
    metric = torch.randn(p["B"], p["N"], p["d"], generator=g)
    metric[:, 1::3] = metric[:, ::3][:, : metric[:, 1::3].shape[1]]  # exact ties between targets
    scaled = metric * 2.0**exponent
    assert torch.equal(scaled * 2.0**-exponent, metric), "precondition: no element under- or overflows"
    for name, merge in (("CPU kernel", ops.select_merge), ("reference", reference.select_merge)):
        tokens, _ = merge(hidden, scores, metric, D, K, keep_cls)
        assert_equal_verbose(merge(hidden, scores, scaled, D, K, keep_cls)[0], tokens, f"{name}, metric * 2^{exponent}")
