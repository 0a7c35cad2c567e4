"""varlen_select_merge: VisionZip on packed images (docs/SPEC.md "Packed (varlen) select_merge").

The C++ kernel is compared with the reference, and the reference with an independent oracle written
the way upstream's Qwen2.5-VL port computes it (topk, boolean masks, masked_select, normalised
metric, bmm, argmax, one-hot, bmm aggregation, target + mean, then the contextual tokens written back
at their targets' positions). One image must equal the dense select_merge(keep_cls=False) after
reordering; several images must equal per-image calls.
"""

from __future__ import annotations

import re

import pytest
import torch

from visionzip_kernels import reference
from visionzip_kernels import varlen_select_merge as wrapper

from helpers import (
    FP32_ATOL,
    FP32_RTOL,
    assert_close_verbose,
    assert_equal_verbose,
    cases_id,
    packed_inputs,
)

ops = torch.ops.visionzip


# ---------------------------------------------------------------------------------------------
# The upstream-style oracle (per image, in the inputs' dtype; run it in float32 / float64).


def upstream_style_varlen(hidden, scores, metric, cu_seqlens, dominant, contextual):
    tokens, keep = [], []
    cu = cu_seqlens.tolist()
    for i, (D, K) in enumerate(zip(dominant, contextual)):
        start, end = cu[i], cu[i + 1]
        N, C = end - start, hidden.shape[1]
        h, m = hidden[start:end], metric[start:end]
        dominant_mask = torch.zeros(N, dtype=torch.bool, device=h.device)
        dominant_mask[scores[start:end].topk(D).indices] = True
        kept_mask = dominant_mask.clone()
        placed = h.clone()
        if K:
            rest_mask = ~dominant_mask
            m_rest = m.masked_select(rest_mask[:, None]).view(-1, m.shape[1])
            h_rest = h.masked_select(rest_mask[:, None]).view(-1, C)
            m_norm = m_rest / m_rest.norm(dim=-1, keepdim=True)
            M = m_norm.shape[0]
            target_idx = torch.arange(0, M, max(1, M // K), device=h.device)[:K]
            not_target = ~torch.isin(torch.arange(M, device=h.device), target_idx)
            similarity = torch.bmm(m_norm[not_target][None], m_norm[target_idx].T[None])
            one_hot = torch.zeros(1, int(not_target.sum()), K, dtype=h.dtype, device=h.device)
            one_hot.scatter_(2, similarity.argmax(dim=2)[..., None], 1)
            counts = one_hot.sum(dim=1).clamp(min=1)[..., None]
            aggregated = torch.bmm(one_hot.transpose(1, 2), h_rest[not_target][None]) / counts
            target_positions = rest_mask.nonzero().flatten()[target_idx]
            placed[target_positions] = h_rest[target_idx] + aggregated[0]
            kept_mask[target_positions] = True
        tokens.append(placed[kept_mask])
        keep.append(kept_mask.nonzero().flatten() + start)
    counts = torch.tensor([0] + [D + K for D, K in zip(dominant, contextual)]).cumsum(0)
    return torch.cat(tokens), torch.cat(keep), counts


def assert_matches_reference(out, hidden, scores, metric, cu, dominant, contextual, name=""):
    tokens, keep, cu_out = out
    exp_tokens, exp_keep, exp_cu = reference.varlen_select_merge(hidden, scores, metric, cu, dominant, contextual)
    assert tokens.dtype == hidden.dtype and keep.dtype == torch.int64
    assert cu_out.dtype == cu.dtype and cu_out.device == cu.device, f"{name}: cu_seqlens_out {cu_out.dtype}"
    assert_equal_verbose(keep, exp_keep, f"{name} keep")
    assert_equal_verbose(cu_out, exp_cu, f"{name} cu_seqlens_out")
    if hidden.dtype in (torch.float32, torch.float64):
        assert_close_verbose(tokens, exp_tokens, atol=FP32_ATOL, rtol=FP32_RTOL, name=f"{name} tokens")
    else:  # one output rounding step from the fp32 reference
        assert_close_verbose(tokens, exp_tokens, atol=1e-6, rtol=torch.finfo(hidden.dtype).eps, name=f"{name} tokens")


# (sizes, dominant, contextual): sizes not powers of two; D = 0, K = 0, D + K = N_i, an empty image,
# a one-token image.
BUDGET_CASES = [
    ([37], [9], [4]),
    ([61, 23, 100], [12, 5, 30], [5, 2, 7]),
    ([40, 17, 1, 0, 29], [0, 17, 1, 0, 4], [6, 0, 0, 0, 25]),
    ([50, 33], [0, 0], [0, 11]),
    ([10, 12], [4, 0], [6, 12]),
]


@pytest.mark.parametrize("sizes,dominant,contextual", BUDGET_CASES, ids=[cases_id(*c[0]) for c in BUDGET_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=lambda t: str(t)[6:])
def test_kernel_matches_reference(sizes, dominant, contextual, dtype):
    inputs = packed_inputs(sizes, dominant, contextual, dtype=dtype, seed=len(sizes))
    out = ops.varlen_select_merge(*inputs, dominant, contextual)
    assert out[0].shape == (sum(dominant) + sum(contextual), inputs[0].shape[1])
    assert_matches_reference(out, *inputs, dominant, contextual, name=str(dtype))


@pytest.mark.parametrize("sizes,dominant,contextual", BUDGET_CASES, ids=[cases_id(*c[0]) for c in BUDGET_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda t: str(t)[6:])
def test_reference_matches_upstream_style_oracle(sizes, dominant, contextual, dtype):
    hidden, scores, metric, cu = packed_inputs(sizes, dominant, contextual, dtype=dtype, seed=len(sizes))
    tokens, keep, cu_out = reference.varlen_select_merge(hidden, scores, metric, cu, dominant, contextual)
    exp_tokens, exp_keep, exp_cu = upstream_style_varlen(hidden, scores, metric, cu, dominant, contextual)
    assert_equal_verbose(keep, exp_keep, "keep")
    assert_equal_verbose(cu_out, exp_cu, "cu_seqlens_out")
    assert_close_verbose(tokens, exp_tokens, atol=FP32_ATOL, rtol=FP32_RTOL, name="tokens")


@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda t: str(t)[6:])
def test_kernel_matches_upstream_style_oracle(dtype, strided):
    sizes, dominant, contextual = [61, 23, 100], [12, 5, 30], [5, 2, 7]
    hidden, scores, metric, cu = packed_inputs(sizes, dominant, contextual, dtype=dtype, strided=strided)
    tokens, keep, cu_out = ops.varlen_select_merge(hidden, scores, metric, cu, dominant, contextual)
    exp_tokens, exp_keep, exp_cu = upstream_style_varlen(hidden.float(), scores, metric.float(), cu, dominant,
                                                         contextual)
    assert_equal_verbose(keep, exp_keep, "keep")
    assert_equal_verbose(cu_out, exp_cu, "cu_seqlens_out")
    rtol = FP32_RTOL if dtype == torch.float32 else torch.finfo(dtype).eps
    assert_close_verbose(tokens, exp_tokens.to(dtype), atol=FP32_ATOL, rtol=rtol, name="tokens")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("D,K", [(20, 8), (1, 0), (5, 50)])
def test_one_image_equals_dense_select_merge(dtype, D, K):
    """One image is the dense op with keep_cls=False, its rows put in token order."""
    hidden, scores, metric, cu = packed_inputs([55], [D], [K], dtype=dtype)
    tokens, keep, cu_out = ops.varlen_select_merge(hidden, scores, metric, cu, [D], [K])
    dense, dense_keep = ops.select_merge(hidden[None], scores[None], metric[None], D, K, False)
    kept = torch.zeros(55, dtype=torch.bool)
    kept[dense_keep[0]] = True
    targets = (~kept).nonzero().flatten()
    targets = targets[torch.arange(K) * max(1, targets.numel() // K)] if K else targets[:0]
    positions = torch.cat([dense_keep[0], targets])
    order = positions.argsort()
    assert_equal_verbose(keep, positions[order], "keep")
    assert_equal_verbose(tokens, dense[0, order], "tokens")  # the same kernel per image: bit for bit
    assert cu_out.tolist() == [0, D + K]


@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_several_images_equal_per_image_calls(cu_dtype, num_threads):
    sizes, dominant, contextual = [70, 13, 128, 45], [20, 3, 40, 0], [6, 2, 9, 10]
    hidden, scores, metric, cu = packed_inputs(sizes, dominant, contextual, cu_dtype=cu_dtype)
    tokens, keep, cu_out = ops.varlen_select_merge(hidden, scores, metric, cu, dominant, contextual)
    assert cu_out.dtype == cu_dtype and cu_out.tolist() == [0, 26, 31, 80, 90]
    for threads in (1, 2):  # images in parallel or not: the same bits
        num_threads(threads)
        again = ops.varlen_select_merge(hidden, scores, metric, cu, dominant, contextual)
        assert_equal_verbose(again[0], tokens, f"tokens with {threads} threads")
    for i, (n, D, K) in enumerate(zip(sizes, dominant, contextual)):
        s, e = int(cu[i]), int(cu[i + 1])
        one = ops.varlen_select_merge(hidden[s:e], scores[s:e], metric[s:e], torch.tensor([0, n]), [D], [K])
        o0, o1 = int(cu_out[i]), int(cu_out[i + 1])
        assert_equal_verbose(tokens[o0:o1], one[0], f"image {i} tokens")
        assert_equal_verbose(keep[o0:o1], one[1] + s, f"image {i} keep")


def test_no_images_and_empty_budgets():
    hidden, scores, metric = torch.randn(0, 8), torch.randn(0), torch.randn(0, 4)
    tokens, keep, cu_out = ops.varlen_select_merge(hidden, scores, metric, torch.zeros(1, dtype=torch.int64), [], [])
    assert tokens.shape == (0, 8) and keep.shape == (0,) and cu_out.tolist() == [0]
    hidden, scores, metric, cu = packed_inputs([9, 4], [0, 0], [0, 0])
    tokens, keep, cu_out = ops.varlen_select_merge(hidden, scores, metric, cu, [0, 0], [0, 0])
    assert tokens.shape == (0, 24) and cu_out.tolist() == [0, 0, 0]


def test_int32_cu_seqlens_keeps_its_dtype():
    hidden, scores, metric, cu = packed_inputs([30, 20], [5, 4], [3, 2], cu_dtype=torch.int32)
    _, _, cu_out = ops.varlen_select_merge(hidden, scores, metric, cu, [5, 4], [3, 2])
    assert cu_out.dtype == torch.int32 and cu_out.device.type == "cpu"


# ---------------------------------------------------------------------------------------------
# The typed wrapper


def test_wrapper_int_and_sequence_budgets():
    hidden, scores, metric, cu = packed_inputs([30, 41, 25], [6, 6, 6], [3, 3, 3])
    by_int = wrapper(hidden, scores, metric, cu, 6, 3)
    by_list = wrapper(hidden, scores, metric, cu, (6, 6, 6), [3, 3, 3])
    for a, b in zip(by_int, by_list):
        assert_equal_verbose(a, b, "int vs list budgets")
    ref = reference.varlen_select_merge(hidden, scores, metric, cu, 6, 3)
    assert_equal_verbose(by_int[1], ref[1], "keep vs reference with int budgets")


@pytest.mark.parametrize("budget,error", [(True, TypeError), (2.0, TypeError), (torch.tensor([2, 2]), TypeError),
                                          ([2, 2.5], TypeError), ([2, True], TypeError), ("22", TypeError)])
def test_wrapper_rejects_wrong_python_types(budget, error):
    hidden, scores, metric, cu = packed_inputs([10, 10], [2, 2], [1, 1])
    with pytest.raises(error, match=r"visionzip\.varlen_select_merge: dominant"):
        wrapper(hidden, scores, metric, cu, budget, 1)
    with pytest.raises(error, match=r"visionzip\.varlen_select_merge: dominant"):
        reference.varlen_select_merge(hidden, scores, metric, cu, budget, 1)


# ---------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize(
    "sizes,dominant,contextual", BUDGET_CASES[1:4], ids=[cases_id(*c[0]) for c in BUDGET_CASES[1:4]]
)
def test_gradcheck(sizes, dominant, contextual, num_threads):
    num_threads(1)
    hidden, scores, metric, cu = packed_inputs(sizes, dominant, contextual, C=3, d=4, dtype=torch.float64)
    hidden.requires_grad_()
    fn = lambda h: ops.varlen_select_merge(h, scores, metric, cu, dominant, contextual)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden,))
    assert torch.autograd.gradgradcheck(fn, (hidden,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
def test_backward_matches_reference_autograd(dtype, strided):
    sizes, dominant, contextual = [40, 17, 1, 0, 29], [0, 17, 1, 0, 4], [6, 0, 0, 0, 25]
    hidden, scores, metric, cu = packed_inputs(sizes, dominant, contextual, dtype=dtype, strided=strided)
    hidden.requires_grad_()
    grad_out = torch.randn(sum(dominant) + sum(contextual), hidden.shape[1]).to(dtype)
    tokens, keep, cu_out = ops.varlen_select_merge(hidden, scores, metric, cu, dominant, contextual)
    assert not keep.requires_grad and not cu_out.requires_grad
    (grad,) = torch.autograd.grad(tokens, hidden, grad_out)
    ref_tokens = reference.varlen_select_merge(hidden, scores, metric, cu, dominant, contextual)[0]
    (ref_grad,) = torch.autograd.grad(ref_tokens, hidden, grad_out)
    assert grad.dtype == dtype
    rtol = torch.finfo(dtype).eps if dtype == torch.bfloat16 else FP32_RTOL
    assert_close_verbose(grad, ref_grad, atol=FP32_ATOL, rtol=rtol, name="grad of hidden")
    # image 0 (D = 0, K = 6): every token is a target or a member; image 2's one token is dominant
    assert bool((grad[:40] != 0).any(dim=1).all()) and torch.equal(grad[57], grad_out[23])
    direct = ops.varlen_select_merge_backward(grad_out, scores, metric, cu, dominant, contextual)
    assert_equal_verbose(direct, grad, "the backward op vs autograd")
    ref_direct = reference.varlen_select_merge_backward(grad_out, scores, metric, cu, dominant, contextual)
    assert_close_verbose(ref_direct, ref_grad, atol=0, rtol=0, name="reference backward vs reference autograd")


# ---------------------------------------------------------------------------------------------
# Bad input: one case per rule. Shape rules also run on meta tensors (the fake kernel) and through
# the reference, with the same message; value rules (cu_seqlens' values, budgets against image
# sizes, non-finite scores) need data.

T, C_, d_ = 30, 8, 4


def _args(device="cpu", **changes):
    f = (lambda *s, dtype=torch.float32: torch.empty(s, dtype=dtype, device="meta")) if device == "meta" else (
        lambda *s, dtype=torch.float32: torch.randn(s).to(dtype))
    args = {"hidden": f(T, C_), "scores": f(T), "metric": f(T, d_),
            "cu_seqlens": torch.tensor([0, 12, 30]) if device != "meta" else torch.empty(3, dtype=torch.int64,
                                                                                      device="meta"),
            "dominant": [4, 6], "contextual": [2, 3]}
    for name, change in changes.items():
        args[name] = change(f, args[name])
    return args


SHAPE_RULES = [
    ("hidden rank", {"hidden": lambda f, t: f(T, C_, 1)}, ValueError, r"hidden must be a 2-D tensor \[T, C\]"),
    ("scores rank", {"scores": lambda f, t: f(T, 1)}, ValueError, r"scores must be a 1-D tensor \[T\]"),
    ("metric rank", {"metric": lambda f, t: f(T)}, ValueError, r"metric must be a 2-D tensor \[T, d\]"),
    ("cu rank", {"cu_seqlens": lambda f, t: t[None]}, ValueError, r"cu_seqlens must be a 1-D tensor"),
    ("hidden dtype", {"hidden": lambda f, t: t.to(torch.int32)}, TypeError, r"hidden must be float32"),
    ("scores dtype", {"scores": lambda f, t: t.to(torch.int64)}, TypeError, r"scores must be float32"),
    ("metric dtype", {"metric": lambda f, t: t.to(torch.int64)}, TypeError, r"metric must be float32"),
    ("cu dtype", {"cu_seqlens": lambda f, t: t.float()}, TypeError, r"cu_seqlens must be int32 or int64"),
    ("scores size", {"scores": lambda f, t: f(T - 1)}, ValueError, r"scores.size\(0\) must equal the token count"),
    ("metric size", {"metric": lambda f, t: f(T + 1, d_)}, ValueError, r"metric.size\(0\) must equal the token count"),
    ("empty C", {"hidden": lambda f, t: f(T, 0)}, ValueError, r"hidden must not be empty"),
    ("empty d", {"metric": lambda f, t: f(T, 0)}, ValueError, r"metric must not be empty"),
    ("empty cu", {"cu_seqlens": lambda f, t: t[:0]}, ValueError, r"cu_seqlens must hold at least one offset"),
    (
        "dominant length",
        {"dominant": lambda f, t: [4]},
        ValueError,
        r"dominant must hold one count per image \(2 images: cu_seqlens.size\(0\) - 1\), got 1",
    ),
    (
        "contextual length",
        {"contextual": lambda f, t: [2, 3, 1]},
        ValueError,
        r"contextual must hold one count per image",
    ),
    (
        "dominant negative",
        {"dominant": lambda f, t: [4, -1]},
        ValueError,
        r"dominant\[1\] \(image 1\) must be >= 0, got -1",
    ),
    (
        "contextual negative",
        {"contextual": lambda f, t: [-2, 3]},
        ValueError,
        r"contextual\[0\] \(image 0\) must be >= 0, got -2",
    ),
]


def _call(path, args):
    if path == "reference":
        return reference.varlen_select_merge(**args)
    return ops.varlen_select_merge(*args.values())


@pytest.mark.parametrize("path", ["cpu", "meta", "reference"])
@pytest.mark.parametrize("rule,changes,error,message", SHAPE_RULES, ids=[r[0] for r in SHAPE_RULES])
def test_shape_rules(rule, changes, error, message, path):
    args = _args("meta" if path == "meta" else "cpu", **changes)
    with pytest.raises(error, match=r"visionzip\.varlen_select_merge: " + message):
        _call(path, args)


VALUE_RULES = [
    ("cu first", {"cu_seqlens": lambda f, t: torch.tensor([1, 12, 30])}, r"cu_seqlens\[0\] must be 0, got 1"),
    ("cu decreasing", {"cu_seqlens": lambda f, t: torch.tensor([0, 31, 30])},
     r"cu_seqlens must be non-decreasing, got cu_seqlens\[2\] = 30 < cu_seqlens\[1\] = 31"),
    ("cu last", {"cu_seqlens": lambda f, t: torch.tensor([0, 12, 29])},
     r"cu_seqlens\[-1\] must equal the token count T \(30\), got 29"),
    ("dominant above N_i", {"dominant": lambda f, t: [13, 6]},
     r"dominant\[0\] must be <= N_0 \(image 0 has 12 tokens\), got 13"),
    ("D + K above N_i", {"contextual": lambda f, t: [2, 13]},
     r"contextual\[1\] must be <= N_1 - dominant\[1\] \(image 1: 18 - 6 = 12\), got 13"),
    ("nan score", {"scores": lambda f, t: t.index_fill(0, torch.tensor([17]), float("nan"))},
     r"scores must be finite, got scores\[17\] = nan"),
    ("inf score", {"scores": lambda f, t: t.index_fill(0, torch.tensor([3]), float("inf"))},
     r"scores must be finite, got scores\[3\] = inf"),
    ("fp64 score beyond fp32", {"scores": lambda f, t: t.double().index_fill(0, torch.tensor([5]), 1e300)},
     r"scores\[5\] = 1e\+300 is outside float32's range"),
]


@pytest.mark.parametrize("path", ["cpu", "reference"])
@pytest.mark.parametrize("rule,changes,message", VALUE_RULES, ids=[r[0] for r in VALUE_RULES])
def test_value_rules(rule, changes, message, path):
    args = _args(**changes)
    hidden_before = args["hidden"].clone()
    with pytest.raises(ValueError, match=r"visionzip\.varlen_select_merge: " + message):
        _call(path, args)
    assert torch.equal(args["hidden"], hidden_before)


def test_backward_rules():
    grad = torch.randn(14, C_)
    args = _args()
    with pytest.raises(
        ValueError, match=re.escape("grad_tokens.size(0) must equal the sum of dominant + contextual (15)")
    ):
        ops.varlen_select_merge_backward(grad, args["scores"], args["metric"], args["cu_seqlens"], [4, 6], [2, 3])
    with pytest.raises(ValueError, match=r"varlen_select_merge_backward: contextual\[1\] must be <= N_1"):
        ops.varlen_select_merge_backward(torch.randn(25, C_), args["scores"], args["metric"], args["cu_seqlens"],
                                         [4, 6], [2, 13])


# ---------------------------------------------------------------------------------------------
# torch.compile (opcheck of both ops: tests/test_op_conformance.py)


def test_compile_fullgraph_forward_and_backward():
    sizes, dominant, contextual = [40, 17, 29], [5, 17, 4], [6, 0, 5]
    hidden, scores, metric, cu = packed_inputs(sizes, dominant, contextual)

    def step(h, s, m, c):
        tokens, keep, cu_out = wrapper(h * 2, s, m, c, dominant, contextual)
        return tokens.sum(dim=1), keep, cu_out

    compiled = torch.compile(step, fullgraph=True)
    h = hidden.clone().requires_grad_()
    got = compiled(h, scores, metric, cu)
    expected = step(hidden.clone().requires_grad_(), scores, metric, cu)
    for a, b, name in zip(got, expected, ("tokens", "keep", "cu_seqlens_out")):
        assert_close_verbose(a, b, atol=1e-5, rtol=FP32_RTOL, name=f"compiled {name} vs eager")
    (grad,) = torch.autograd.grad(got[0].sum(), h)
    ref_tokens = reference.varlen_select_merge(h * 2, scores, metric, cu, dominant, contextual)[0]
    (ref_grad,) = torch.autograd.grad(ref_tokens.sum(), h)
    assert_close_verbose(grad, ref_grad, atol=1e-5, rtol=FP32_RTOL, name="compiled grad vs reference")
    assert_equal_verbose(got[1], reference.varlen_select_merge(hidden, scores, metric, cu, dominant, contextual)[1],
                         "compiled keep vs reference")


def _count_compilations(fn):
    """fn compiled with dynamic shapes and fullgraph, and the list of graphs its backend was given (one
    per compilation; the backend runs each graph as it is)."""
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    return torch.compile(fn, backend=counting_backend, dynamic=True, fullgraph=True), graphs


def _budget_lists(count: int, seed: int = 0):
    """count distinct (dominant, contextual) pairs of 3-image budget lists, every budget in 2..9 (0 and
    1 are sizes torch.compile always specialises)."""
    g = torch.Generator().manual_seed(seed)
    seen = []
    while len(seen) < count:
        pair = tuple(tuple(torch.randint(2, 10, (3,), generator=g).tolist()) for _ in range(2))
        if pair not in seen:
            seen.append(pair)
    return [(list(d), list(k)) for d, k in seen]


def test_compile_dynamic_does_not_specialise_on_budgets():
    """Packed images of different sizes give different budgets (a compiled Qwen tower meets a new list
    at almost every call): 20 budget lists over 5 total lengths compile at most twice (the budgets are
    SymInt[] in the schema and stay symbols in the fake kernel and the C++ autograd), with results
    equal to eager."""
    compiled, graphs = _count_compilations(wrapper)
    for i, (dominant, contextual) in enumerate(_budget_lists(20)):
        sizes = [24 + 4 * (i % 5), 20, 28]  # 5 total lengths T
        hidden, scores, metric, cu = packed_inputs(sizes, dominant, contextual, seed=i)
        got = compiled(hidden, scores, metric, cu, dominant, contextual)
        expected = wrapper(hidden, scores, metric, cu, dominant, contextual)
        for a, b, name in zip(got, expected, ("tokens", "keep", "cu_seqlens_out")):
            assert_equal_verbose(a, b, f"list {i}: compiled {name} vs eager")
    assert len(graphs) <= 2, f"{len(graphs)} compilations for 20 budget lists and 5 lengths"


def test_compile_dynamic_backward_does_not_specialise_on_budgets():
    """The same with a gradient: the traced graph goes through the C++ autograd (which saves the budgets
    as SymInts) and its backward op; AOTAutograd's joint graph too (aot_eager), results equal to eager."""
    compiled, graphs = _count_compilations(wrapper)
    compiled_aot = torch.compile(wrapper, backend="aot_eager", dynamic=True, fullgraph=True)
    for i, (dominant, contextual) in enumerate(_budget_lists(10, seed=1)):
        sizes = [24 + 4 * (i % 5), 20, 28]
        hidden, scores, metric, cu = packed_inputs(sizes, dominant, contextual, seed=i)
        grads = []
        for fn in (wrapper, compiled, compiled_aot):
            h = hidden.clone().requires_grad_()
            fn(h, scores, metric, cu, dominant, contextual)[0].square().sum().backward()
            grads.append(h.grad)
        assert_equal_verbose(grads[1], grads[0], f"list {i}: compiled grad vs eager")
        assert_equal_verbose(grads[2], grads[0], f"list {i}: aot_eager grad vs eager")
    assert len(graphs) <= 2, f"{len(graphs)} compilations for 10 budget lists and 5 lengths"


def test_compile_dynamic_symbolic_budget_rules():
    """A negative budget still fails under compile, with the C++ rule (checked symbolically: the
    message names the symbol, not its value)."""
    compiled, _ = _count_compilations(wrapper)
    hidden, scores, metric, cu = packed_inputs([24, 20, 28], [3, 4, 5], [2, 2, 2])
    compiled(hidden, scores, metric, cu, [3, 4, 5], [2, 2, 2])
    with pytest.raises(Exception, match=r"varlen_select_merge: contextual\[1\] \(image 1\) must be >= 0, got "):
        compiled(hidden, scores, metric, cu, [3, 4, 5], [2, -2, 2])


# ---------------------------------------------------------------------------------------------
# CUDA (csrc/cuda/varlen_merge_cuda.cu): one set of launches over the images uses the CPU kernels'
# formulas in the same order, so tokens, keep and gradients must equal the CPU kernel's bit for bit
# (tests/test_merge_math.py checks the same under the CPU emulation on every machine).


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("cu_device", ["cpu", "cuda"])
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
def test_cuda_equals_cpu_kernel(dtype, cu_device, strided):
    sizes, dominant, contextual = [40, 17, 1, 0, 29, 300], [0, 17, 1, 0, 4, 195], [6, 0, 0, 0, 25, 15]
    hidden, scores, metric, cu = packed_inputs(sizes, dominant, contextual, dtype=dtype, strided=strided,
                                               cu_dtype=torch.int32)
    expected = ops.varlen_select_merge(hidden, scores, metric, cu, dominant, contextual)
    h = hidden.cuda().requires_grad_()
    tokens, keep, cu_out = ops.varlen_select_merge(h, scores.cuda(), metric.cuda(), cu.to(cu_device), dominant,
                                                   contextual)
    assert cu_out.device.type == cu_device and cu_out.dtype == torch.int32
    assert_equal_verbose(keep.cpu(), expected[1], "keep")
    assert_equal_verbose(cu_out.cpu(), expected[2], "cu_seqlens_out")
    assert_equal_verbose(tokens.detach().cpu(), expected[0], "tokens vs CPU kernel")
    grad_out = torch.randn(tokens.shape).to(dtype)
    (grad,) = torch.autograd.grad(tokens, h, grad_out.cuda())
    cpu_grad = ops.varlen_select_merge_backward(grad_out, scores, metric, cu, dominant, contextual)
    assert_equal_verbose(grad.cpu(), cpu_grad, "grad of hidden vs CPU kernel")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_opcheck_and_gradcheck():
    sizes, dominant, contextual = [40, 17, 29], [5, 17, 0], [6, 0, 5]
    hidden, scores, metric, cu = packed_inputs(sizes, dominant, contextual, C=8, d=4, dtype=torch.float64)
    h, s, m = hidden.cuda().requires_grad_(), scores.cuda(), metric.cuda()
    torch.library.opcheck(ops.varlen_select_merge.default, (h, s, m, cu, dominant, contextual))
    fn = lambda x: ops.varlen_select_merge(x, s, m, cu, dominant, contextual)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h,))


# ---------------------------------------------------------------------------------------------
# varlen_select_merge_many: one plan applied to several tensors (Qwen3-VL's main + DeepStack features)


@pytest.mark.parametrize("sizes,dominant,contextual", BUDGET_CASES, ids=[cases_id(*c[0]) for c in BUDGET_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda t: str(t)[6:])
def test_many_equals_separate_calls_and_reference(sizes, dominant, contextual, dtype):
    from visionzip_kernels import varlen_select_merge_many

    hidden, scores, metric, cu = packed_inputs(sizes, dominant, contextual, dtype=dtype)
    g = torch.Generator().manual_seed(7)
    others = [torch.randn(hidden.shape[0], width, generator=g).to(dtype) for width in (5, 1)]
    hiddens = [hidden, *others]
    tokens, keep, cu_out = varlen_select_merge_many(hiddens, scores, metric, cu, dominant, contextual)
    assert len(tokens) == 3
    for j, h in enumerate(hiddens):
        alone = wrapper(h, scores, metric, cu, dominant, contextual)
        assert_equal_verbose(tokens[j], alone[0], f"tensor {j} vs its own call")
        assert_equal_verbose(keep, alone[1], f"keep vs tensor {j}'s own call")
        assert_equal_verbose(cu_out, alone[2], "cu_seqlens_out")
        assert_matches_reference((tokens[j], keep, cu_out), h, scores, metric, cu, dominant, contextual, f"tensor {j}")


def test_many_gradients_reach_every_tensor():
    from visionzip_kernels import varlen_select_merge_many

    sizes, dominant, contextual = [40, 17, 1, 0, 29], [0, 17, 1, 0, 4], [6, 0, 0, 0, 25]
    hidden, scores, metric, cu = packed_inputs(sizes, dominant, contextual, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    hiddens = [hidden.clone().requires_grad_(), torch.randn(hidden.shape[0], 4, generator=g,
                                                            dtype=torch.float64).requires_grad_()]
    tokens, _, _ = varlen_select_merge_many(hiddens, scores, metric, cu, dominant, contextual)
    grad_outs = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in tokens]
    grads = torch.autograd.grad(tokens, hiddens, grad_outs)
    for j, (h, grad_out, grad) in enumerate(zip(hiddens, grad_outs, grads)):
        ref_tokens = reference.varlen_select_merge(h, scores, metric, cu, dominant, contextual)[0]
        (ref_grad,) = torch.autograd.grad(ref_tokens, h, grad_out)
        assert_close_verbose(grad, ref_grad, atol=FP32_ATOL, rtol=FP32_RTOL, name=f"grad of hiddens[{j}]")
    fn = lambda a, b: torch.cat(varlen_select_merge_many([a, b], scores, metric, cu, dominant, contextual)[0], 1)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(hiddens))


def test_many_compiles_fullgraph():
    from visionzip_kernels import varlen_select_merge_many

    sizes, dominant, contextual = [40, 17, 29], [5, 17, 4], [6, 0, 5]
    hidden, scores, metric, cu = packed_inputs(sizes, dominant, contextual)
    other = torch.randn(hidden.shape[0], 3)

    def step(a, b):
        return varlen_select_merge_many([a, b], scores, metric, cu, dominant, contextual)[0]

    got = torch.compile(step, fullgraph=True)(hidden, other)
    for j, h in enumerate((hidden, other)):
        expected = reference.varlen_select_merge(h, scores, metric, cu, dominant, contextual)[0]
        assert_close_verbose(got[j], expected, atol=1e-5, rtol=FP32_RTOL, name=f"compiled tensor {j}")


def test_many_bad_input():
    from visionzip_kernels import varlen_select_merge_many

    hidden, scores, metric, cu = packed_inputs([10], [3], [2])
    with pytest.raises(TypeError, match="hiddens must be a sequence"):
        varlen_select_merge_many(hidden, scores, metric, cu, 3, 2)
    with pytest.raises(ValueError, match="at least one tensor"):
        varlen_select_merge_many([], scores, metric, cu, 3, 2)
    with pytest.raises(ValueError, match=r"hiddens\[1\] is \[9, 4\]"):
        varlen_select_merge_many([hidden, torch.randn(9, 4)], scores, metric, cu, 3, 2)
    with pytest.raises(ValueError, match=r"hiddens\[1\] is .*float64"):
        varlen_select_merge_many([hidden, torch.randn(10, 4, dtype=torch.float64)], scores, metric, cu, 3, 2)
    with pytest.raises(ValueError, match=r"hiddens\[0\] must be a \[T, C\] tensor"):
        varlen_select_merge_many([hidden[0]], scores, metric, cu, 3, 2)
