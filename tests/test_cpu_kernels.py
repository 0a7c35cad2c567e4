"""C++ CPU kernels against the pure-PyTorch reference (visionzip_kernels/reference.py).

Shapes are a covering set, not the cartesian product: every value of every axis of issue 2
(B in {1,3,8}, N in {17,577,729,2881}, C in {64,1024,1152}, D/K in {54/10,108/20,162/30,1/0},
contiguous / strided) appears, and each of fp32/fp16/bf16 meets the realistic N = 577/729/2881 and
C = 1024/1152 (checked by ``test_the_shape_table_covers_every_axis``). Tolerances are docs/SPEC.md's, via
``helpers.assert_tokens_match_reference``; keep must be identical.
"""

from __future__ import annotations

import pytest
import torch

from visionzip_kernels import reference

from helpers import (
    DTYPES,
    FP32_ATOL,
    FP32_RTOL,
    assert_close_verbose,
    assert_equal_verbose,
    assert_metric_is_head_mean,
    assert_tokens_match_reference,
    budget_fits,
    cases_id,
    make_case,
    merge_inputs,
    separate_assignment,
    separated_scores,
)

ops = torch.ops.visionzip

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (dtype, B, N, C, D, K, keep_cls, strided)
MERGE_SHAPES = [
    (F32, 1, 17, 64, 1, 0, True, False),
    (F32, 3, 577, 1024, 54, 10, True, False),
    (F32, 8, 577, 1152, 108, 20, False, True),
    (F32, 1, 729, 1152, 162, 30, True, True),
    (F32, 3, 2881, 1024, 54, 10, False, False),
    (F32, 1, 2881, 64, 1, 0, False, True),
    (F16, 8, 577, 1024, 54, 10, True, True),
    (F16, 3, 729, 1152, 108, 20, False, False),
    (F16, 1, 2881, 1152, 162, 30, True, True),
    (F16, 3, 17, 64, 1, 0, False, False),
    (F16, 1, 729, 1024, 1, 0, True, False),
    (BF16, 1, 577, 1152, 162, 30, False, False),
    (BF16, 8, 729, 1024, 54, 10, True, True),
    (BF16, 3, 2881, 1152, 108, 20, True, False),
    (BF16, 8, 17, 1152, 1, 0, True, True),
    (BF16, 1, 2881, 64, 54, 10, False, True),
]
MERGE_IDS = [cases_id(*s) for s in MERGE_SHAPES]


def test_the_shape_table_covers_every_axis():
    axes = {
        "B": ({1, 3, 8}, 1), "N": ({17, 577, 729, 2881}, 2), "C": ({64, 1024, 1152}, 3),
    }
    for name, (values, i) in axes.items():
        assert {s[i] for s in MERGE_SHAPES} == values, name
    assert {(s[4], s[5]) for s in MERGE_SHAPES} == {(54, 10), (108, 20), (162, 30), (1, 0)}
    for dtype in DTYPES:
        rows = [s for s in MERGE_SHAPES if s[0] == dtype]
        assert {577, 729, 2881} <= {s[2] for s in rows}, dtype
        assert {1024, 1152} <= {s[3] for s in rows}, dtype
        assert {True, False} == {s[7] for s in rows}, dtype
        assert {(s[4], s[5]) for s in rows} == {(54, 10), (108, 20), (162, 30), (1, 0)}, dtype
    assert all(budget_fits(s[2], s[4], s[5]) for s in MERGE_SHAPES)


@pytest.mark.parametrize("dtype,B,N,C,D,K,keep_cls,strided", MERGE_SHAPES, ids=MERGE_IDS)
def test_select_merge(dtype, B, N, C, D, K, keep_cls, strided):
    hidden, scores, metric, keep_ref = merge_inputs(B, N, C, D, K, keep_cls, dtype, strided)
    assert hidden.is_contiguous() != strided
    tokens, keep = ops.select_merge(hidden, scores, metric, D, K, keep_cls)
    assert tokens.shape == (B, D + K, C) and keep.shape == (B, D)
    assert_equal_verbose(keep, keep_ref, "keep")
    assert_tokens_match_reference(tokens, hidden, metric, keep_ref, K, "select_merge")
    ref_tokens, _ = reference.select_merge(hidden, scores, metric, D, K, keep_cls)
    assert_equal_verbose(tokens[:, :D], ref_tokens[:, :D], "dominant rows vs reference.select_merge")


@pytest.mark.parametrize("dtype,B,N,C,D,K,keep_cls,strided", MERGE_SHAPES[::2], ids=MERGE_IDS[::2])
def test_dominant_topk_then_contextual_merge(dtype, B, N, C, D, K, keep_cls, strided):
    hidden, scores, metric, keep_ref = merge_inputs(B, N, C, D, K, keep_cls, dtype, strided, seed=1)
    keep = ops.dominant_topk(scores, D, keep_cls)
    assert_equal_verbose(keep, keep_ref, "dominant_topk")
    tokens = ops.contextual_merge(hidden, metric, keep, K)
    assert_tokens_match_reference(tokens, hidden, metric, keep_ref, K, "contextual_merge")


# ---------------------------------------------------------------------------------------------
# dominant_topk on its own: ties, score dtypes.


@pytest.mark.parametrize("keep_cls", [True, False])
@pytest.mark.parametrize("score_dtype", [F32, F16, BF16, torch.float64], ids=cases_id)
def test_dominant_topk_ties_go_to_the_lower_index(score_dtype, keep_cls):
    g = torch.Generator().manual_seed(3)
    # Only 5 distinct values over 577 tokens: nearly every rank is a tie.
    scores = torch.randint(0, 5, (4, 577), generator=g).to(score_dtype)
    for D in (1, 2, 54, 108, 577):
        keep = ops.dominant_topk(scores, D, keep_cls)
        assert_equal_verbose(keep, reference.dominant_topk(scores, D, keep_cls), f"D={D}")
    # Hand-checked: all scores equal -> the lowest indices win.
    flat = torch.zeros(2, 9, dtype=score_dtype)
    assert ops.dominant_topk(flat, 3, keep_cls).tolist() == [[0, 1, 2]] * 2


def test_dominant_topk_non_contiguous_scores():
    scores = separated_scores(5, 729).t().contiguous().t()  # [B, N] with strides (1, B)
    assert not scores.is_contiguous()
    for keep_cls in (True, False):
        assert_equal_verbose(
            ops.dominant_topk(scores, 108, keep_cls), reference.dominant_topk(scores, 108, keep_cls), "keep"
        )


@pytest.mark.parametrize("dtype", [F32, BF16], ids=cases_id)
def test_assignment_ties_go_to_the_first_target(dtype):
    """Targets with identical (or parallel) metric rows tie exactly for every member: the first
    maximum wins (docs/SPEC.md "Merging" step 3), in the kernel as in the reference."""
    B, N, C, D, K = 2, 64, 16, 4, 6
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(B, N, C, generator=g).to(dtype)
    keep = torch.tensor([[0, 5, 9, 30], [0, 1, 2, 3]])
    # Two metric rows only, so tied targets are bit-identical: every member ties exactly between
    # the targets that share its row.
    directions = torch.randn(2, 8, generator=g)
    choice = torch.randint(0, 2, (B, N), generator=g)
    metric = directions[choice].to(dtype)
    tokens = ops.contextual_merge(hidden, metric, keep, K)
    expected = reference.contextual_merge(hidden, metric, keep, K)
    if dtype == F32:
        assert_close_verbose(tokens, expected, atol=FP32_ATOL, rtol=FP32_RTOL, name="tied assignment")
    else:
        assert_close_verbose(tokens, expected, atol=1e-6, rtol=torch.finfo(dtype).eps, name="tied assignment")
    # The backward rebuilds the same assignment: its member counts must agree too.
    grad = ops.contextual_merge_backward(torch.ones(B, D + K, C, dtype=dtype), metric, keep, N)
    assert_close_verbose(
        grad,
        reference.contextual_merge_backward(torch.ones(B, D + K, C, dtype=dtype), metric, keep, N),
        atol=0,
        rtol=0,
        name="tied assignment gradient",
    )


# ---------------------------------------------------------------------------------------------
# Layouts: strided, transposed, expanded and non-contiguous arguments.

LAYOUTS = [
    "hidden_padded", "hidden_last_dim_strided", "hidden_expanded", "metric_transposed", "metric_expanded",
    "metric_fp32_hidden_low", "scores_transposed", "keep_noncontiguous", "keep_unsorted",
]


def _layout_inputs(layout: str, dtype: torch.dtype):
    B, N, C, D, K, keep_cls = 3, 577, 1024, 54, 10, True
    hidden, scores, metric, keep = merge_inputs(B, N, C, D, K, keep_cls, dtype, strided=(layout == "hidden_padded"))
    if layout == "hidden_last_dim_strided":
        hidden = hidden.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "hidden_expanded":
        hidden = hidden[:1].expand(B, N, C)
    elif layout == "metric_transposed":
        metric = metric.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "metric_expanded":
        # One image's scores and metric broadcast over the batch (stride 0), so keep is shared too.
        scores = scores[:1].expand(B, N)
        keep = reference.dominant_topk(scores, D, keep_cls)
        metric = separate_assignment(metric[:1], keep[:1], K).expand(B, N, metric.shape[2])
    elif layout == "metric_fp32_hidden_low":
        metric = metric.float()
    elif layout == "scores_transposed":
        scores = scores.t().contiguous().t()
    elif layout == "keep_noncontiguous":
        keep = torch.stack([keep, torch.full_like(keep, -1)], dim=-1)[..., 0]
    elif layout == "keep_unsorted":
        keep = keep.flip(1)
    elif layout != "hidden_padded":
        raise AssertionError(layout)
    return hidden, scores, metric, keep, D, K, keep_cls


@pytest.mark.parametrize("dtype", [F32, BF16], ids=cases_id)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts(layout, dtype):
    hidden, scores, metric, keep, D, K, keep_cls = _layout_inputs(layout, dtype)
    if layout.startswith("keep_"):
        assert not keep.is_contiguous() or layout == "keep_unsorted"
    elif layout.startswith("scores_"):
        assert not scores.is_contiguous()
    elif layout.startswith("metric_") and layout != "metric_fp32_hidden_low":
        assert not metric.is_contiguous()
    elif layout.startswith("hidden_"):
        assert not hidden.is_contiguous()
    snapshot = [t.clone() for t in (hidden, scores, metric, keep)]

    # contextual_merge follows keep's order, sorted or not (dominant rows = hidden[b, keep[b]]).
    tokens = ops.contextual_merge(hidden, metric, keep, K)
    assert_tokens_match_reference(tokens, hidden, metric, keep, K, f"contextual_merge[{layout}]")
    ref_sorted = reference.dominant_topk(scores, D, keep_cls)
    tokens, got_keep = ops.select_merge(hidden, scores, metric, D, K, keep_cls)
    assert_equal_verbose(got_keep, ref_sorted, "select_merge keep")
    assert_tokens_match_reference(tokens, hidden, metric, ref_sorted, K, f"select_merge[{layout}]")
    # The same values laid out contiguously give the same answer.
    contiguous = ops.select_merge(hidden.contiguous(), scores.contiguous(), metric.contiguous(), D, K, keep_cls)
    assert_tokens_match_reference(contiguous[0], hidden, metric, ref_sorted, K, "contiguous copy")
    for before, after in zip(snapshot, (hidden, scores, metric, keep)):
        assert torch.equal(before, after), "an input was modified"


def test_float64_inputs():
    hidden, scores, metric, keep = merge_inputs(2, 577, 64, 54, 10, True, torch.float64)
    tokens, got_keep = ops.select_merge(hidden, scores, metric, 54, 10, True)
    assert_equal_verbose(got_keep, keep, "keep")
    expected = reference.contextual_merge(hidden, metric, keep, 10)
    assert tokens.dtype == torch.float64
    assert_close_verbose(tokens, expected, atol=1e-12, rtol=1e-12, name="float64 tokens")


# ---------------------------------------------------------------------------------------------
# Score ops. q and k are views of projection outputs: [B, N, H*d] (contiguous view) or a fused
# qkv [B, N, 3*H*d] split (row stride 3*H*d). d = 64 (CLIP) and 72 (SigLIP so400m).

# (dtype, B, N, H, d, strided)
CLS_SHAPES = [
    (F32, 2, 577, 16, 64, True),
    (F32, 8, 17, 4, 72, False),
    (F16, 1, 2881, 16, 64, True),
    (F16, 3, 577, 16, 72, False),
    (BF16, 3, 729, 16, 72, True),
    (BF16, 1, 577, 16, 64, False),
]


@pytest.mark.parametrize("dtype,B,N,H,d,strided", CLS_SHAPES, ids=[cases_id(*s) for s in CLS_SHAPES])
def test_cls_attention(dtype, B, N, H, d, strided):
    case = make_case(B, N, 1, H=H, d=d, dtype=dtype, strided=strided)
    q_cls, k = case.q[:, 0], case.k
    assert k.is_contiguous() != strided and (B == 1 or not q_cls.is_contiguous())
    got = ops.cls_attention(q_cls, k, case.scale)
    expected = reference.cls_attention(q_cls, k, case.scale)
    assert got.dtype == torch.float32 and got.shape == (B, N)
    # Inputs widen exactly to fp32, so every input dtype gets the fp32 tolerance.
    assert_close_verbose(got, expected, atol=1e-9, rtol=FP32_RTOL, name="cls_attention")
    assert_close_verbose(got.sum(dim=1), torch.ones(B), atol=1e-5, rtol=0, name="rows sum to 1")


# attention_received is O(N^2): the N = 2881 case uses B = 1 and H = 2.
RECEIVED_SHAPES = [
    (F32, 2, 577, 4, 64, True),
    (F32, 3, 17, 4, 72, False),
    (F16, 1, 729, 4, 72, False),
    (F16, 1, 2881, 2, 64, True),
    (BF16, 1, 729, 4, 72, True),
    (BF16, 8, 17, 2, 64, False),
]


@pytest.mark.parametrize("dtype,B,N,H,d,strided", RECEIVED_SHAPES, ids=[cases_id(*s) for s in RECEIVED_SHAPES])
def test_attention_received(dtype, B, N, H, d, strided):
    case = make_case(B, N, 1, H=H, d=d, dtype=dtype, strided=strided)
    assert case.q.is_contiguous() != strided
    got = ops.attention_received(case.q, case.k, case.scale)
    expected = reference.attention_received(case.q, case.k, case.scale)
    assert got.dtype == torch.float32 and got.shape == (B, N)
    assert_close_verbose(got, expected, atol=1e-9, rtol=FP32_RTOL, name="attention_received")
    assert_close_verbose(got.sum(dim=1), torch.ones(B), atol=1e-4, rtol=0, name="mean of rows sums to 1")


# (dtype, B, N, H, d, strided, keep_cls); keep_cls=False is O(N^2) and keeps H small at large N.
SCORES_AND_METRIC_SHAPES = [
    (F32, 2, 577, 16, 64, True, True),
    (F16, 3, 577, 16, 72, False, True),
    (BF16, 1, 729, 16, 72, True, True),
    (F16, 1, 2881, 16, 64, False, True),
    (torch.float64, 2, 17, 3, 16, True, True),
    (F32, 3, 17, 4, 72, False, False),
    (F16, 1, 729, 4, 72, True, False),
    (BF16, 2, 577, 2, 64, False, False),
]


@pytest.mark.parametrize("dtype,B,N,H,d,strided,keep_cls", SCORES_AND_METRIC_SHAPES,
                         ids=[cases_id(*s) for s in SCORES_AND_METRIC_SHAPES])
def test_scores_and_metric(dtype, B, N, H, d, strided, keep_cls):
    """The scores are the score op's bits; the metric is k's head mean, the reference's bits (fp32
    sum in head order, one rounding) and within one rounding of the upstream-style oracle."""
    case = make_case(B, N, 1, H=H, d=d, dtype=dtype, strided=strided)
    # A CLS encoder may hand over its CLS query row alone, [B, 1, H, d].
    q = case.q[:, :1] if keep_cls and B > 1 else case.q
    scores, metric = ops.scores_and_metric(q, case.k, case.scale, keep_cls)
    if keep_cls:
        expected_scores = ops.cls_attention(case.q[:, 0], case.k, case.scale)
    else:
        expected_scores = ops.attention_received(case.q, case.k, case.scale)
    assert_equal_verbose(scores, expected_scores, "scores vs the score op")
    ref_scores, ref_metric = reference.scores_and_metric(q, case.k, case.scale, keep_cls)
    assert_close_verbose(scores, ref_scores, atol=1e-9, rtol=FP32_RTOL, name="scores vs reference")
    assert_equal_verbose(metric, ref_metric, "metric vs reference")
    assert_metric_is_head_mean(metric, case.k, "metric vs oracle")
    assert_metric_is_head_mean(ref_metric, case.k, "reference metric vs oracle")


def test_score_ops_with_a_last_dim_strided_k():
    """A k whose last dim is not the fastest (the ops copy it) still gives the reference's answer."""
    case = make_case(2, 577, 1, H=4, d=64)
    k = case.k.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    assert k.stride(-1) != 1
    assert_close_verbose(ops.cls_attention(case.q[:, 0], k, case.scale),
                         reference.cls_attention(case.q[:, 0], k, case.scale), atol=1e-9, rtol=FP32_RTOL, name="cls")
    assert_close_verbose(ops.attention_received(case.q, k, case.scale),
                         reference.attention_received(case.q, k, case.scale), atol=1e-9, rtol=FP32_RTOL,
                         name="received")


# ---------------------------------------------------------------------------------------------
# Backward: the op, and autograd through contextual_merge / select_merge.

# (dtype, B, N, C, D, K)
GRAD_SHAPES = [
    (F32, 3, 577, 1024, 54, 10),
    (F32, 1, 17, 64, 1, 0),
    (F16, 1, 729, 1152, 162, 30),
    (F16, 8, 577, 64, 108, 20),
    (BF16, 3, 2881, 1024, 108, 20),
    (BF16, 3, 17, 1152, 1, 0),
]


def _assert_grad_close(got: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if got.dtype == torch.float32:
        assert_close_verbose(got, expected, atol=FP32_ATOL, rtol=FP32_RTOL, name=name)
    else:
        # g / count in fp32, one rounding: at most one output step from the reference.
        assert_close_verbose(got, expected, atol=1e-6, rtol=torch.finfo(got.dtype).eps, name=name)


@pytest.mark.parametrize("strided_grad", [False, True])
@pytest.mark.parametrize("dtype,B,N,C,D,K", GRAD_SHAPES, ids=[cases_id(*s) for s in GRAD_SHAPES])
def test_contextual_merge_backward(dtype, B, N, C, D, K, strided_grad):
    _, _, metric, keep = merge_inputs(B, N, 8, D, K, True, dtype, d=16, seed=2)
    g = torch.randn(B, D + K, C, generator=torch.Generator().manual_seed(5)).to(dtype)
    if strided_grad:
        g = g.transpose(1, 2).contiguous().transpose(1, 2)
    got = ops.contextual_merge_backward(g, metric, keep, N)
    expected = reference.contextual_merge_backward(g, metric, keep, N)
    _assert_grad_close(got, expected, "contextual_merge_backward")
    if K == 0:  # dropped tokens get exactly zero
        dropped = torch.ones(B, N, dtype=torch.bool).scatter_(1, keep, False)
        assert bool((got[dropped] == 0).all())


@pytest.mark.parametrize("entry", ["contextual_merge", "select_merge"])
@pytest.mark.parametrize("dtype,B,N,C,D,K", GRAD_SHAPES[::2] + GRAD_SHAPES[3:4],
                         ids=[cases_id(*s) for s in GRAD_SHAPES[::2] + GRAD_SHAPES[3:4]])
def test_autograd(entry, dtype, B, N, C, D, K):
    hidden, scores, metric, keep = merge_inputs(B, N, C, D, K, True, dtype, d=16, seed=4)
    hidden = hidden.detach().clone().requires_grad_()
    scores = scores.clone().requires_grad_()
    metric = metric.clone().requires_grad_()
    if entry == "select_merge":
        tokens, got_keep = ops.select_merge(hidden, scores, metric, D, K, True)
        assert_equal_verbose(got_keep, keep, "keep")
        assert not got_keep.requires_grad
    else:
        tokens = ops.contextual_merge(hidden, metric, keep, K)
    g = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(6)).to(dtype)
    tokens.backward(g)
    expected = reference.contextual_merge_backward(g, metric.detach(), keep, N)
    _assert_grad_close(hidden.grad, expected, f"{entry} hidden.grad")
    # And the reference's own autograd agrees.
    ref_hidden = hidden.detach().clone().requires_grad_()
    reference.contextual_merge(ref_hidden, metric.detach(), keep, K).backward(g)
    _assert_grad_close(hidden.grad, ref_hidden.grad, f"{entry} vs reference autograd")
    assert scores.grad is None and metric.grad is None, "scores and metric must get no gradient"
    assert not keep.requires_grad


def test_autograd_with_an_expanded_gradient():
    """tokens.sum().backward() hands the backward a stride-0 gradient."""
    hidden, scores, metric, keep = merge_inputs(2, 577, 256, 54, 10, True)
    hidden.requires_grad_()
    tokens, _ = ops.select_merge(hidden, scores, metric, 54, 10, True)
    tokens.sum().backward()
    expected = reference.contextual_merge_backward(torch.ones(tokens.shape), metric, keep, 577)
    _assert_grad_close(hidden.grad, expected, "hidden.grad")


# ---------------------------------------------------------------------------------------------
# Determinism: the same bits whatever the thread count (and the reference's answer).

DETERMINISM = [
    "select_merge_B1",
    "select_merge_B1_fp16",
    "select_merge_B3",
    "backward",
    "cls_attention",
    "attention_received",
    "scores_and_metric",
]


def _run_for_determinism(name: str):
    if name.startswith("select_merge"):
        # B < threads: the plan splits an image's members and the merge its columns across threads.
        B = 3 if name.endswith("B3") else 1
        dtype = F16 if name.endswith("fp16") else BF16
        hidden, scores, metric, keep = merge_inputs(B, 729, 1152, 108, 20, True, dtype, strided=True)
        tokens, got_keep = ops.select_merge(hidden, scores, metric, 108, 20, True)
        assert_equal_verbose(got_keep, keep, "keep")
        assert_tokens_match_reference(tokens, hidden, metric, keep, 20, name)
        return tokens
    if name == "backward":
        _, _, metric, keep = merge_inputs(2, 577, 8, 54, 10, True, F32)
        g = torch.randn(2, 64, 1024, generator=torch.Generator().manual_seed(1))
        out = ops.contextual_merge_backward(g, metric, keep, 577)
        _assert_grad_close(out, reference.contextual_merge_backward(g, metric, keep, 577), name)
        return out
    case = make_case(3, 577, 1, H=4, d=64, strided=True)
    if name == "scores_and_metric":
        scores, metric = ops.scores_and_metric(case.q, case.k, case.scale, True)
        assert_equal_verbose(metric, reference.head_mean(case.k), name)
        return torch.cat([scores, metric.flatten(1)], dim=1)
    if name == "cls_attention":
        out = ops.cls_attention(case.q[:, 0], case.k, case.scale)
        expected = reference.cls_attention(case.q[:, 0], case.k, case.scale)
    else:
        out = ops.attention_received(case.q, case.k, case.scale)
        expected = reference.attention_received(case.q, case.k, case.scale)
    assert_close_verbose(out, expected, atol=1e-9, rtol=FP32_RTOL, name=name)
    return out


@pytest.mark.parametrize("name", DETERMINISM)
def test_deterministic_across_thread_counts(name, num_threads):
    results = {}
    for threads in (1, 2, 3):
        num_threads(threads)
        assert torch.get_num_threads() == threads
        results[threads] = _run_for_determinism(name)
    for threads in (2, 3):
        assert_equal_verbose(_bits(results[threads]), _bits(results[1]), f"{name}: {threads} threads vs 1")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that -0.0 vs 0.0 or differing NaN payloads count as differences."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("dtype", [F16, BF16], ids=cases_id)
def test_every_half_value_is_widened_exactly(dtype):
    """The merge widens fp16/bf16 from the raw bits (csrc/cpu/tensor_views.h): every finite value,
    subnormals and both zeros included, must come out as the reference's exact fp32 widening."""
    values = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    values = values[torch.isfinite(values.float())]
    hidden = torch.zeros(1, 3, values.numel(), dtype=dtype)
    hidden[0, 2] = values
    metric = torch.ones(1, 3, 4, dtype=dtype)
    keep = torch.tensor([[0]])
    # rest = [1, 2], K = 1: the contextual row is token 1 (zeros) + the mean of its one member, token 2.
    got = ops.contextual_merge(hidden, metric, keep, 1)
    expected = reference.contextual_merge(hidden, metric, keep, 1)
    assert_equal_verbose(got.view(torch.int16), expected.view(torch.int16), f"{dtype} bits")
    grad = ops.contextual_merge_backward(got, metric, keep, 3)
    assert_equal_verbose(grad.view(torch.int16), reference.contextual_merge_backward(got, metric, keep, 3)
                         .view(torch.int16), f"{dtype} gradient bits")


@pytest.mark.parametrize("dtype", [F16, BF16], ids=cases_id)
def test_rounding_to_half_matches_torch(dtype):
    """The merge rounds its fp32 results to fp16/bf16 branch-free (tensor_views.h narrow): ties to
    even, subnormal results, overflow to inf must all give torch's bits. A contextual row here is
    target + (v + w) / 2 over every finite value v, with w and the target other finite values."""
    values = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    values = values[torch.isfinite(values.float())]
    hidden = torch.zeros(1, 4, values.numel(), dtype=dtype)
    hidden[0, 1], hidden[0, 2], hidden[0, 3] = values.flip(0), values, values.roll(1)
    metric = torch.ones(1, 4, 4, dtype=dtype)
    keep = torch.tensor([[0]])
    # rest = [1, 2, 3], K = 1: the target is token 1, tokens 2 and 3 its members.
    got = ops.contextual_merge(hidden, metric, keep, 1)
    expected = reference.contextual_merge(hidden, metric, keep, 1)
    assert_equal_verbose(got.view(torch.int16), expected.view(torch.int16), f"{dtype} merged bits")
    # A member's gradient is grad / 2: every value halved, subnormal ties included. (Only the members'
    # rows, and no -0.0: the reference's autograd accumulates into zeros, which turns -0.0 into 0.0.)
    values = values[values.view(torch.int16) != torch.tensor(-0.0, dtype=dtype).view(torch.int16)]
    grad = torch.stack([values, values.roll(7)])[None]
    got_grad = ops.contextual_merge_backward(grad, metric, keep, 4)[:, 2:]
    expected_grad = reference.contextual_merge_backward(grad, metric, keep, 4)[:, 2:]
    assert_equal_verbose(got_grad.view(torch.int16), expected_grad.view(torch.int16), f"{dtype} gradient bits")
