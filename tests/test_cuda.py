"""The CUDA kernels (csrc/cuda) vs the reference, plus CPU checks of the arithmetic they share with
the C++ CPU kernels through csrc/merge_math.h.

The CUDA tests are marked ``cuda`` and skipped without a GPU (`pytest -m cuda` on a GPU machine).
The CPU tests run everywhere: the CPU kernels compute with the same merge_math.h helpers
(target_step, clamped_norm, add_product, member_divisor), so edge cases of those formulas are
checked against the reference here.
"""

from __future__ import annotations

import pytest
import torch

from helpers import (
    assert_close_verbose,
    assert_equal_verbose,
    assert_tokens_match_reference,
    make_case,
    merge_inputs,
)
from visionzip_kernels import reference

ops = torch.ops.visionzip
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# ---------------------------------------------------------------------------------------------
# CPU, always: the shared formulas at their edges.


@pytest.mark.parametrize("N,D,K", [(20, 5, 15), (20, 5, 7), (21, 1, 20), (64, 54, 10), (577, 54, 10)])
def test_target_step_edges(N, D, K):
    """step = max(1, M // K): K == M (step 1), M // K rounding down, K not dividing M."""
    case = make_case(2, N, 24, seed=N + K)
    keep = reference.dominant_topk(torch.rand(2, N, generator=torch.Generator().manual_seed(K)), D)
    got = ops.contextual_merge(case.hidden, case.metric, keep, K)
    assert_close_verbose(got, reference.contextual_merge(case.hidden, case.metric, keep, K), atol=1e-6, rtol=1e-5,
                         name="tokens")


def test_zero_norm_target_and_empty_target():
    """A zero metric row as a target (clamped_norm's eps) and a target no member picks
    (member_divisor(0) = 1: the row is the target itself)."""
    B, N, C, d = 1, 12, 8, 4
    hidden = torch.randn(B, N, C)
    metric = torch.zeros(B, N, d)
    metric[0, 1:, 0] = 1.0  # every token but 0 points the same way
    keep = torch.tensor([[11]])
    got = ops.contextual_merge(hidden, metric, keep, 3)
    expected = reference.contextual_merge(hidden, metric, keep, 3)
    assert_close_verbose(got, expected, atol=1e-6, rtol=1e-5, name="tokens")
    # target 0 is token 0 (zero metric): all members tie on similarity 0 with it, and 1 with the
    # other targets, so target 0 keeps no member and its row is the token itself.
    assert_close_verbose(got[0, 1], hidden[0, 0], atol=0, rtol=0, name="empty target row")


# ---------------------------------------------------------------------------------------------
# CUDA


CUDA_SHAPES = [  # (B, N, C, D, K)
    (1, 577, 1024, 54, 10),
    (3, 729, 1152, 108, 20),
    (8, 577, 1024, 162, 30),
    (3, 2881, 1024, 54, 10),
    (1, 17, 64, 1, 0),
    (2, 577, 1000, 54, 10),  # C not a multiple of the 16-byte pack: the scalar path
]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,N,C,D,K", CUDA_SHAPES)
@pytest.mark.parametrize("strided", [False, True])
def test_cuda_select_merge_forward_backward(B, N, C, D, K, dtype, strided):
    hidden, scores, metric, expected_keep = merge_inputs(B, N, C, D, K, dtype=dtype, seed=N + K, strided=strided)
    h = hidden.cuda().requires_grad_()
    tokens, keep = ops.select_merge(h, scores.cuda(), metric.cuda(), D, K, True)
    assert_equal_verbose(keep.cpu(), expected_keep, "keep")
    assert_tokens_match_reference(tokens.detach().cpu(), hidden, metric, expected_keep, K, "select_merge")
    merged = ops.contextual_merge(hidden.cuda(), metric.cuda(), keep, K)
    assert_tokens_match_reference(merged.cpu(), hidden, metric, expected_keep, K, "contextual_merge")
    grad = torch.randn_like(tokens)
    (grad_hidden,) = torch.autograd.grad(tokens, h, grad)
    expected_grad = reference.contextual_merge_backward(grad.cpu(), metric, expected_keep, N)
    # Each gradient element is one copy or one division: one rounding step of the dtype at most.
    eps = torch.finfo(dtype).eps
    assert_close_verbose(grad_hidden.cpu(), expected_grad, atol=0, rtol=eps, name="grad hidden")


@pytest.mark.cuda
@needs_cuda
def test_cuda_deterministic_bits():
    hidden, scores, metric, _ = merge_inputs(8, 577, 1024, 54, 10, dtype=torch.bfloat16, seed=0)
    hidden, scores, metric = hidden.cuda(), scores.cuda(), metric.cuda()
    first, keep = ops.select_merge(hidden, scores, metric, 54, 10, True)
    for _ in range(10):
        again, again_keep = ops.select_merge(hidden, scores, metric, 54, 10, True)
        assert torch.equal(again, first) and torch.equal(again_keep, keep)


@pytest.mark.cuda
@needs_cuda
def test_cuda_opcheck_compile_and_graph_capture():
    hidden, scores, metric, keep = merge_inputs(2, 577, 1024, 54, 10, dtype=torch.float16, seed=1)
    hidden, scores, metric, keep = hidden.cuda(), scores.cuda(), metric.cuda(), keep.cuda()
    torch.library.opcheck(ops.select_merge.default, (hidden.requires_grad_(), scores, metric, 54, 10, True))
    torch.library.opcheck(ops.contextual_merge.default, (hidden, metric, keep, 10))
    hidden = hidden.detach()
    expected = reference.select_merge(hidden.cpu(), scores.cpu(), metric.cpu(), 54, 10)[0]
    compiled = torch.compile(lambda h, s, m: ops.select_merge(h, s, m, 54, 10, True)[0], fullgraph=True)
    assert_close_verbose(compiled(hidden, scores, metric).cpu(), expected, atol=1e-3, rtol=1e-3, name="compiled")
    reduce_overhead = torch.compile(lambda h, s, m: ops.select_merge(h, s, m, 54, 10, True)[0],
                                    mode="reduce-overhead")
    for _ in range(3):
        out = reduce_overhead(hidden, scores, metric)
    assert_close_verbose(out.cpu(), expected, atol=1e-3, rtol=1e-3, name="reduce-overhead")
    # Capture and replay: nothing on the path syncs with the host.
    static_out = None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.select_merge(hidden, scores, metric, 54, 10, True)  # warm-up on a side stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_keep = ops.select_merge(hidden, scores, metric, 54, 10, True)
    graph.replay()
    torch.cuda.synchronize()
    assert_close_verbose(static_out.cpu(), expected, atol=1e-3, rtol=1e-3, name="graph replay")
