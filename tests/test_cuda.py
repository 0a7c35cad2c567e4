"""The CUDA kernels (csrc/cuda) vs the C++ CPU kernels and the reference, plus CPU checks of the
arithmetic they share with the C++ CPU kernels through csrc/merge_math.h.

The CUDA tests are marked ``cuda`` and skipped without a GPU (`pytest -m cuda` on a GPU machine).
The CPU tests run everywhere: the CPU kernels compute with the same merge_math.h helpers
(target_step, target_index, clamped_norm, add_product, member_divisor), so edge cases of those
formulas are checked against the reference here; tests/test_merge_math.py runs the CUDA kernels
themselves on the CPU under an emulation.

On CUDA the plan (top-k, assignment) and the merge use the CPU kernels' formulas in the same order,
so tokens and gradients are expected to equal the CPU kernels' bit for bit, in every dtype.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from visionzip_kernels import reference

from helpers import (
    assert_close_verbose,
    assert_equal_verbose,
    assert_tokens_match_reference,
    make_case,
    merge_inputs,
    strided_view,
)

ops = torch.ops.visionzip
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
ROOT = Path(__file__).resolve().parents[1]


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
    (2, 577, 1000, 54, 10),  # C not a multiple of the 16-byte pack: the one-element path
    (2, 300, 64, 10, 200),  # K * d past the shared-memory budget: unit targets in global scratch
]


def _to_cuda(t: torch.Tensor, strided: bool) -> torch.Tensor:
    """The same values on the GPU; ``strided`` keeps a padded (non-contiguous) layout there too."""
    return strided_view(t.cuda()) if strided else t.cuda()


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,N,C,D,K", CUDA_SHAPES)
@pytest.mark.parametrize("strided", [False, True])
def test_cuda_select_merge_forward_backward(B, N, C, D, K, dtype, strided):
    hidden, scores, metric, expected_keep = merge_inputs(B, N, C, D, K, dtype=dtype, seed=N + K, strided=strided)
    h = _to_cuda(hidden, strided).requires_grad_()
    m = _to_cuda(metric, strided)
    tokens, keep = ops.select_merge(h, scores.cuda(), m, D, K, True)
    assert_equal_verbose(keep.cpu(), expected_keep, "keep")
    cpu_tokens, _ = ops.select_merge(hidden, scores, metric, D, K, True)
    assert_equal_verbose(tokens.detach().cpu(), cpu_tokens, "tokens vs CPU kernel")
    assert_tokens_match_reference(tokens.detach().cpu(), hidden, metric, expected_keep, K, "select_merge")
    merged = ops.contextual_merge(h.detach(), m, keep, K)
    assert_equal_verbose(merged.cpu(), cpu_tokens, "contextual_merge vs CPU kernel")
    grad = torch.randn_like(tokens)
    (grad_hidden,) = torch.autograd.grad(tokens, h, grad)
    cpu_grad = ops.contextual_merge_backward(grad.cpu(), metric, expected_keep, N)
    assert_equal_verbose(grad_hidden.cpu(), cpu_grad, "grad hidden vs CPU kernel")
    expected_grad = reference.contextual_merge_backward(grad.cpu(), metric, expected_keep, N)
    # Each gradient element is one copy or one division: one rounding step of the dtype at most.
    eps = torch.finfo(dtype).eps
    assert_close_verbose(grad_hidden.cpu(), expected_grad, atol=0, rtol=eps, name="grad hidden")


@pytest.mark.cuda
@needs_cuda
def test_cuda_keep_cls_false_and_fp64_gradcheck():
    hidden, scores, metric, keep = merge_inputs(2, 65, 24, 9, 6, keep_cls=False, dtype=torch.float64, d=16, seed=3)
    tokens, got_keep = ops.select_merge(hidden.cuda(), scores.cuda(), metric.cuda(), 9, 6, False)
    assert_equal_verbose(got_keep.cpu(), keep, "keep")
    assert_equal_verbose(tokens.cpu(), ops.select_merge(hidden, scores, metric, 9, 6, False)[0], "tokens")
    h = hidden.cuda().requires_grad_()
    s, m = scores.cuda(), metric.cuda()
    assert torch.autograd.gradcheck(lambda x: ops.select_merge(x, s, m, 9, 6, False)[0], (h,))
    assert torch.autograd.gradgradcheck(lambda x: ops.select_merge(x, s, m, 9, 6, False)[0], (h,))


@pytest.mark.cuda
@needs_cuda
def test_cuda_batch_past_grid_y_limit():
    """More images than a grid dimension other than x may hold (65535)."""
    B, N, C, D, K = 70_000, 8, 8, 2, 2
    g = torch.Generator().manual_seed(0)
    hidden, metric = torch.randn(B, N, C, generator=g), torch.randn(B, N, 4, generator=g)
    scores = torch.rand(B, N, generator=g)
    tokens, keep = ops.select_merge(hidden.cuda(), scores.cuda(), metric.cuda(), D, K, True)
    cpu_tokens, cpu_keep = ops.select_merge(hidden, scores, metric, D, K, True)
    assert_equal_verbose(keep.cpu(), cpu_keep, "keep")
    assert_equal_verbose(tokens.cpu(), cpu_tokens, "tokens")


@pytest.mark.cuda
@needs_cuda
def test_cuda_input_policy_for_bad_keep():
    """Out-of-range keep indices on CUDA (not checked: it would need a sync) give zero dominant rows
    and never fault; the rest of the merge is that of the valid indices."""
    hidden, _, metric, _ = merge_inputs(1, 40, 16, 4, 3, d=8, seed=3)
    keep = torch.tensor([[5, 77, 9, -2]])
    tokens = ops.contextual_merge(hidden.cuda(), metric.cuda(), keep.cuda(), 3)
    torch.cuda.synchronize()
    assert torch.equal(tokens[0, 1].cpu(), torch.zeros(16)) and torch.equal(tokens[0, 3].cpu(), torch.zeros(16))
    expected = ops.contextual_merge(hidden, metric, torch.tensor([[5, 9]]), 3)
    assert_equal_verbose(tokens[0, 4:].cpu(), expected[0, 2:], "contextual rows")


@pytest.mark.cuda
@needs_cuda
def test_cuda_deterministic_bits():
    hidden, scores, metric, _ = merge_inputs(8, 577, 1024, 54, 10, dtype=torch.bfloat16, seed=0)
    hidden, scores, metric = hidden.cuda(), scores.cuda(), metric.cuda()
    first, keep = ops.select_merge(hidden, scores, metric, 54, 10, True)
    grad = torch.randn_like(first)
    first_grad = ops.contextual_merge_backward(grad, metric, keep, 577)
    for _ in range(10):
        again, again_keep = ops.select_merge(hidden, scores, metric, 54, 10, True)
        assert torch.equal(again, first) and torch.equal(again_keep, keep)
        assert torch.equal(ops.contextual_merge_backward(grad, metric, keep, 577), first_grad)


@pytest.mark.cuda
@needs_cuda
def test_cuda_opcheck_compile_and_graph_capture():
    hidden, scores, metric, keep = merge_inputs(2, 577, 1024, 54, 10, dtype=torch.float16, seed=1)
    hidden, scores, metric, keep = hidden.cuda(), scores.cuda(), metric.cuda(), keep.cuda()
    torch.library.opcheck(ops.select_merge.default, (hidden.requires_grad_(), scores, metric, 54, 10, True))
    torch.library.opcheck(ops.contextual_merge.default, (hidden, metric, keep, 10))
    torch.library.opcheck(ops.contextual_merge_backward.default, (torch.randn_like(hidden[:, :64]), metric, keep, 577))
    hidden = hidden.detach()
    expected = reference.select_merge(hidden.cpu(), scores.cpu(), metric.cpu(), 54, 10)[0]
    compiled = torch.compile(lambda h, s, m: ops.select_merge(h, s, m, 54, 10, True)[0], fullgraph=True)
    assert_close_verbose(compiled(hidden, scores, metric).cpu(), expected, atol=1e-3, rtol=1e-3, name="compiled")
    reduce_overhead = torch.compile(lambda h, s, m: ops.select_merge(h, s, m, 54, 10, True)[0],
                                    mode="reduce-overhead")
    for _ in range(3):
        out = reduce_overhead(hidden, scores, metric)
    assert_close_verbose(out.cpu(), expected, atol=1e-3, rtol=1e-3, name="reduce-overhead")
    # Capture and replay: nothing on the path syncs with the host. Replays read new inputs copied
    # into the captured ones.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.select_merge(hidden, scores, metric, 54, 10, True)  # warm-up on a side stream
    torch.cuda.current_stream().wait_stream(stream)
    static_hidden, static_scores, static_metric = hidden.clone(), scores.clone(), metric.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_keep = ops.select_merge(static_hidden, static_scores, static_metric, 54, 10, True)
    graph.replay()
    torch.cuda.synchronize()
    assert_close_verbose(static_out.cpu(), expected, atol=1e-3, rtol=1e-3, name="graph replay")
    other_hidden, other_scores, other_metric, other_keep = merge_inputs(2, 577, 1024, 54, 10, dtype=torch.float16,
                                                                        seed=2)
    static_hidden.copy_(other_hidden.cuda())
    static_scores.copy_(other_scores.cuda())
    static_metric.copy_(other_metric.cuda())
    graph.replay()
    torch.cuda.synchronize()
    assert_equal_verbose(static_keep.cpu(), other_keep, "replayed keep")
    assert_equal_verbose(static_out.cpu(), ops.select_merge(other_hidden, other_scores, other_metric, 54, 10, True)[0],
                         "replayed tokens")


SANITIZER_SCRIPT = textwrap.dedent(
    """
    import torch, visionzip_kernels
    from helpers import merge_inputs
    ops = torch.ops.visionzip
    for B, N, C, D, K, dtype in [(2, 577, 1024, 54, 10, torch.float16), (2, 300, 40, 30, 200, torch.float32),
                                 (1, 17, 64, 1, 0, torch.bfloat16)]:
        hidden, scores, metric, keep = (t.cuda() for t in merge_inputs(B, N, C, D, K, dtype=dtype))
        tokens, keep = ops.select_merge(hidden, scores, metric, D, K, True)
        ops.contextual_merge(hidden[:, :, : C - 1], metric, keep, K)
        ops.contextual_merge_backward(torch.randn_like(tokens), metric, keep, N)
    torch.cuda.synchronize()
    """
)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_cuda_compute_sanitizer(tool, tmp_path):
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    sanitizer = shutil.which("compute-sanitizer") or shutil.which("compute-sanitizer", path=f"{cuda_home}/bin")
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found")
    script = tmp_path / "run_ops.py"
    script.write_text(SANITIZER_SCRIPT)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    result = subprocess.run([sanitizer, f"--tool={tool}", "--error-exitcode=97", sys.executable, str(script)],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
