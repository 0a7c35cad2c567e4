"""Triton kernels (triton_ops) vs the reference and the C++ kernels.

Without a GPU they run on CPU tensors under TRITON_INTERPRET=1 (set by conftest.py), at small
grids: the interpreter costs milliseconds per program. The same comparisons run on CUDA when a GPU
is present (marked ``cuda``). The dispatcher route (VISIONZIP_BACKEND=triton) runs in a subprocess,
because the switch is read at import.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import triton_ops  # noqa: E402
from visionzip_kernels import backends, reference  # noqa: E402

from helpers import (  # noqa: E402
    assert_close_verbose,
    assert_equal_verbose,
    assert_metric_is_head_mean,
    assert_within_torch_error,
    full_attention,
    make_case,
    topk_is_separated,
)

ops = torch.ops.visionzip
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Triton runs on CPU tensors only under its interpreter, which conftest.py turns on where CUDA is
# absent; on a GPU machine the CPU-tensor cases skip and the CUDA ones run.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="Triton on CPU tensors needs TRITON_INTERPRET=1 "
                                       "(set by conftest.py on machines without CUDA)")
SCORE_RTOL, SCORE_ATOL = 1e-5, 1e-7

# (dtype, B, N, H, d, strided k): every N, H, d, layout and B of the issue appears; each dtype meets
# a realistic N.
SCORE_CASES = [
    (torch.float32, 1, 17, 1, 64, False),
    (torch.float32, 3, 1025, 1, 72, True),
    (torch.float16, 1, 577, 16, 64, True),
    (torch.float16, 3, 2881, 1, 64, False),
    (torch.bfloat16, 1, 729, 16, 72, False),
    (torch.bfloat16, 3, 577, 1, 64, True),
]


def _device_marks(device: str):
    return pytest.param(device, marks=pytest.mark.cuda if device == "cuda" else needs_interpreter)


@pytest.mark.parametrize("device", [_device_marks(d) for d in DEVICES])
@pytest.mark.parametrize("dtype,B,N,H,d,strided", SCORE_CASES)
def test_cls_attention_topk_vs_reference_and_cpp(dtype, B, N, H, d, strided, device):
    case = make_case(B, N, 8, H=H, d=d, dtype=dtype, seed=N + H, strided=strided, device=device)
    q_cls = case.q[:, 0]
    expected = reference.cls_attention(q_cls.cpu(), case.k.cpu(), case.scale)
    cpp = ops.cls_attention(q_cls.cpu(), case.k.cpu(), case.scale)
    dominant = min(54, N - 1)
    assert topk_is_separated(expected, dominant), "precondition: no near-tie at the top-k boundary"

    scores = triton_ops.cls_attention(q_cls, case.k, case.scale)
    fused_scores, keep = triton_ops.cls_attention_topk(q_cls, case.k, case.scale, dominant)

    assert_close_verbose(scores, expected, atol=SCORE_ATOL, rtol=SCORE_RTOL, name="scores vs reference")
    assert_close_verbose(scores, cpp, atol=SCORE_ATOL, rtol=SCORE_RTOL, name="scores vs C++")
    assert_close_verbose(fused_scores, expected, atol=SCORE_ATOL, rtol=SCORE_RTOL, name="fused scores")
    assert_equal_verbose(keep, reference.dominant_topk(expected, dominant), "keep vs reference")
    assert_equal_verbose(keep, ops.dominant_topk(cpp, dominant), "keep vs C++")


@pytest.mark.parametrize("device", [_device_marks(d) for d in DEVICES])
@pytest.mark.parametrize("keep_cls", [True, False])
@pytest.mark.parametrize("N,dominant", [(17, 1), (17, 17), (577, 54), (2881, 162)])
def test_topk_with_ties_and_signs(N, dominant, keep_cls, device):
    if keep_cls and dominant == N + 1:
        pytest.skip("budget does not fit")
    g = torch.Generator().manual_seed(N + dominant)
    # Few distinct values, both signs and both zeros: ties everywhere, which must go to the lower index.
    scores = torch.randint(-4, 5, (3, N), generator=g).float() / 2
    scores[:, ::7] = -0.0
    scores[:, 1::11] = 0.0
    expected = reference.dominant_topk(scores, dominant, keep_cls)
    keep = triton_ops.dominant_topk(scores.to(device), dominant, keep_cls=keep_cls)
    assert_equal_verbose(keep, expected, "keep")
    assert_equal_verbose(keep, ops.dominant_topk(scores, dominant, keep_cls), "keep vs C++")


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_topk_low_precision_scores(dtype):
    scores = (torch.randperm(300).float() / 4 - 30).to(dtype).view(2, 150)
    assert_equal_verbose(triton_ops.dominant_topk(scores, 20, keep_cls=False),
                         reference.dominant_topk(scores, 20, False), "keep")


@pytest.mark.parametrize("device", [_device_marks(d) for d in DEVICES])
@pytest.mark.parametrize("dtype,B,N,H,d", [(torch.float32, 2, 17, 2, 64), (torch.bfloat16, 1, 65, 3, 72),
                                           (torch.float16, 2, 40, 1, 16)])
def test_attention_received_vs_full_map(dtype, B, N, H, d, device):
    case = make_case(B, N, 8, H=H, d=d, dtype=dtype, seed=N, strided=True, device=device)
    q, k = case.q.double(), case.k.double()
    expected = full_attention(q, k, case.scale).mean(dim=2).mean(dim=1).float()  # [B,H,N,N] -> [B,N]
    got = triton_ops.attention_received(case.q, case.k, case.scale)
    assert_close_verbose(got, expected, atol=SCORE_ATOL, rtol=SCORE_RTOL, name="attention_received vs full map")
    assert_close_verbose(got.sum(dim=1), torch.ones(B, device=got.device), atol=1e-5, rtol=0, name="sums to 1")


# (dtype, B, N, H, d, strided, keep_cls): small grids for the interpreter; d = 72 and 80 are split
# into two column tiles, 64 into one.
SCORES_AND_METRIC_CASES = [
    (torch.float32, 1, 17, 2, 64, False, True),
    (torch.float16, 1, 577, 16, 64, True, True),
    (torch.bfloat16, 2, 129, 3, 72, False, True),
    (torch.float16, 2, 40, 2, 80, True, False),
    (torch.bfloat16, 1, 65, 3, 72, True, False),
]


@pytest.mark.parametrize("device", [_device_marks(d) for d in DEVICES])
@pytest.mark.parametrize("dtype,B,N,H,d,strided,keep_cls", SCORES_AND_METRIC_CASES)
def test_scores_and_metric_vs_reference_and_cpp(dtype, B, N, H, d, strided, keep_cls, device):
    case = make_case(B, N, 8, H=H, d=d, dtype=dtype, seed=N + H, strided=strided, device=device)
    q = case.q[:, :1] if keep_cls else case.q
    scores, metric = triton_ops.scores_and_metric(q, case.k, case.scale, keep_cls=keep_cls)
    cpp_scores, cpp_metric = ops.scores_and_metric(q.cpu(), case.k.cpu(), case.scale, keep_cls)
    ref_scores, _ = reference.scores_and_metric(q.cpu(), case.k.cpu(), case.scale, keep_cls)
    assert_close_verbose(scores, ref_scores, atol=SCORE_ATOL, rtol=SCORE_RTOL, name="scores vs reference")
    assert_close_verbose(scores, cpp_scores, atol=SCORE_ATOL, rtol=SCORE_RTOL, name="scores vs C++")
    if dtype == torch.bfloat16 and INTERPRETED:
        # The interpreter's bf16 stores truncate where the GPU's round: one bf16 step at most.
        assert_close_verbose(metric, cpp_metric, atol=0, rtol=torch.finfo(dtype).eps, name="metric vs C++")
    else:
        assert_equal_verbose(metric, cpp_metric, "metric vs C++ (fp32 sum in head order, one rounding)")
    assert_metric_is_head_mean(metric.cpu(), case.k.cpu(), "metric vs oracle")


@pytest.mark.parametrize("device", [_device_marks(d) for d in DEVICES])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_received_error_within_sdpa_error(dtype, device):
    """The tensor-core kernel against an fp64 oracle, bounded by 2x the error PyTorch makes doing the
    same in dtype through SDPA (with V = identity, its output is the probability map)."""
    B, N, H, d = 1, 129, 2, 72
    case = make_case(B, N, 8, H=H, d=d, dtype=dtype, seed=11, device=device)
    exact = full_attention(case.q.double(), case.k.double(), case.scale).mean(dim=2).mean(dim=1)
    identity = torch.eye(N, dtype=dtype, device=device).expand(B, H, N, N)
    probs = F.scaled_dot_product_attention(case.q.transpose(1, 2), case.k.transpose(1, 2), identity,
                                           scale=case.scale)
    native = probs.float().mean(dim=2).mean(dim=1)
    got = triton_ops.attention_received(case.q, case.k, case.scale)
    assert_within_torch_error(got, exact, native, name=f"attention_received {dtype}")


@needs_interpreter
@pytest.mark.parametrize("dtype,N,d,strided", [(torch.float32, 577, 72, True), (torch.bfloat16, 1025, 64, False),
                                               (torch.float16, 2881, 64, True)])
def test_attention_received_vs_cpp(dtype, N, d, strided):
    case = make_case(1, N, 8, H=1, d=d, dtype=dtype, seed=N, strided=strided)
    got = triton_ops.attention_received(case.q, case.k, case.scale)
    assert_close_verbose(got, ops.attention_received(case.q, case.k, case.scale), atol=SCORE_ATOL, rtol=SCORE_RTOL,
                         name="attention_received vs C++")


@needs_interpreter
def test_empty_batch():
    k = torch.randn(0, 9, 2, 16)
    assert triton_ops.cls_attention(k[:, 0], k, 0.25).shape == (0, 9)
    assert triton_ops.attention_received(k, k, 0.25).shape == (0, 9)
    for keep_cls in (True, False):
        scores, metric = triton_ops.scores_and_metric(k, k, 0.25, keep_cls=keep_cls)
        assert scores.shape == (0, 9) and metric.shape == (0, 9, 16)
    assert triton_ops.dominant_topk(torch.randn(0, 9), 3).shape == (0, 3)


@needs_interpreter
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scores_rejected_before_launch(bad):
    """The host-side data rule runs in visionzip_kernels, before the launcher (triton_ops takes
    validated arguments)."""
    scores = torch.rand(2, 30)
    scores[1, 7] = bad
    with pytest.raises(ValueError, match=r"dominant_topk: scores must be finite, got scores\[1, 7\]"):
        backends.triton_kernel("dominant_topk")(scores, 5, True)


def test_validation_runs_before_launch():
    """The kernel registered for a Triton op checks its arguments (the C++ rules) before launching."""
    with pytest.raises(ValueError, match="k must be a 4-D tensor"):
        backends.triton_kernel("cls_attention")(torch.randn(1, 2, 8), torch.randn(1, 9, 16), 0.3)
    with pytest.raises(TypeError, match="k must have the dtype of q"):
        backends.triton_kernel("attention_received")(torch.randn(1, 9, 2, 8), torch.randn(1, 9, 2, 8).half(), 0.3)
    with pytest.raises(ValueError, match="dominant must be <= N"):
        backends.triton_kernel("dominant_topk")(torch.randn(1, 9), 10, True)
    with pytest.raises(ValueError, match="N must be <= 16384"):
        backends.triton_kernel("dominant_topk")(torch.randn(1, 16385), 10, True)
    with pytest.raises(ValueError, match="has no Triton kernel"):
        backends.triton_kernel("select_merge")


def test_triton_ops_is_a_leaf():
    """No module of triton_ops imports visionzip_kernels (checked in a fresh interpreter, as a user
    who imports triton_ops alone)."""
    script = ("import sys, triton_ops\n"
              "assert 'visionzip_kernels' not in sys.modules, sorted(m for m in sys.modules if 'visionzip' in m)\n"
              "print('leaf ok')")
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                            env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "leaf ok" in result.stdout, result.stdout + result.stderr
    imports = re.compile(r"^\s*(from|import)\s+visionzip_kernels\b", re.MULTILINE)
    sources = Path(__file__).resolve().parents[1].glob("triton_ops/*.py")
    assert not [p.name for p in sources if imports.search(p.read_text())]


_DISPATCH_SCRIPT = textwrap.dedent(
    """
    import torch, visionzip_kernels as vz
    from helpers import make_case, assert_close_verbose, assert_equal_verbose
    from visionzip_kernels import reference
    import triton_ops
    ops = torch.ops.visionzip
    case = make_case(2, 33, 16, H=2, d=16, seed=5)
    # the ops dispatch to the Python (Triton) kernels, not to the C++ ones
    calls = []
    original = triton_ops.cls_attention
    triton_ops.cls_attention = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    scores = ops.cls_attention(case.q[:, 0], case.k, case.scale)
    assert calls, "cls_attention did not run the Triton kernel"
    assert_close_verbose(scores, reference.cls_attention(case.q[:, 0], case.k, case.scale), atol=1e-7, rtol=1e-5,
                         name="scores")
    assert_close_verbose(ops.attention_received(case.q, case.k, case.scale),
                         reference.attention_received(case.q, case.k, case.scale), atol=1e-7, rtol=1e-5, name="recv")
    assert_equal_verbose(ops.dominant_topk(scores, 7), reference.dominant_topk(scores, 7), "keep")
    sm_scores, sm_metric = ops.scores_and_metric(case.q, case.k, case.scale, True)
    assert_close_verbose(sm_scores, scores, atol=1e-7, rtol=1e-5, name="scores_and_metric")
    assert_equal_verbose(sm_metric, reference.head_mean(case.k), "metric")
    for op, args in (("cls_attention", (case.q[:, 0], case.k, case.scale)),
                     ("attention_received", (case.q, case.k, case.scale)),
                     ("scores_and_metric", (case.q, case.k, case.scale, False)), ("dominant_topk", (scores, 7, True))):
        result = torch.library.opcheck(getattr(ops, op).default, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)
    compiled = torch.compile(lambda q, k: vz.dominant_topk(vz.cls_attention(q, k, 0.25), 7), fullgraph=True)
    assert_equal_verbose(compiled(case.q[:, 0], case.k),
                         reference.dominant_topk(reference.cls_attention(case.q[:, 0], case.k, 0.25), 7), "compiled")
    print("dispatch ok")
    """
)


def test_backend_switch_routes_ops_through_triton():
    env = dict(os.environ, VISIONZIP_BACKEND="triton", TRITON_INTERPRET="1")
    tests_dir = Path(__file__).resolve().parent
    result = subprocess.run([sys.executable, "-c", _DISPATCH_SCRIPT], cwd=tests_dir, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dispatch ok" in result.stdout


def test_backend_switch_rejects_unknown_value():
    env = dict(os.environ, VISIONZIP_BACKEND="cuda-graphs")
    result = subprocess.run([sys.executable, "-c", "import visionzip_kernels"], env=env, capture_output=True,
                            text=True)
    assert result.returncode != 0 and "VISIONZIP_BACKEND must be 'cpp' or 'triton'" in result.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_ops_dispatch_to_triton_and_conform():
    case = make_case(2, 577, 64, H=16, d=64, seed=0, device="cuda")
    scores = ops.cls_attention(case.q[:, 0], case.k, case.scale)
    assert_close_verbose(scores, reference.cls_attention(case.q[:, 0], case.k, case.scale), atol=SCORE_ATOL,
                         rtol=SCORE_RTOL, name="scores")
    for op, args in (("cls_attention", (case.q[:, 0], case.k, case.scale)),
                     ("attention_received", (case.q, case.k, case.scale)),
                     ("scores_and_metric", (case.q, case.k, case.scale, True)),
                     ("scores_and_metric", (case.q, case.k, case.scale, False)), ("dominant_topk", (scores, 54, True))):
        torch.library.opcheck(getattr(ops, op).default, args)
    compiled = torch.compile(lambda q, k: ops.dominant_topk(ops.cls_attention(q, k, case.scale), 54), fullgraph=True)
    assert_equal_verbose(compiled(case.q[:, 0], case.k), reference.dominant_topk(scores, 54), "compiled keep")
