"""The merge metric (k averaged over heads) is the reference's bit for bit on every backend.

docs/SPEC.md ("Notation") fixes the summation order: heads added one at a time in ascending order in
fp32 (fp64 for fp64), from +0, then one division by H and one rounding to k.dtype. The reference
(``reference.head_mean``) states that order; ``k.float().mean(2)`` sums in its own order and differs
from H = 9 on, so these tests use H >= 9 (SigLIP-so400m: H = 16, d = 72). The reference itself is
checked against an independent oracle of the same order (numpy's cumulative sum, sequential by
definition), and the upstream-style ``k.mean`` stays the independent check within a tolerance.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from visionzip_kernels import reference

from helpers import assert_equal_verbose, assert_metric_is_head_mean

ops = torch.ops.visionzip
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _keys(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 1.5).to(dtype)


def _ordered_mean_oracle(k: torch.Tensor, dim: int) -> torch.Tensor:
    """numpy's cumulative sum along dim (one add at a time, in index order) / the size, in fp32 (fp64
    for fp64): the order docs/SPEC.md states, computed without torch. Returns the unrounded mean."""
    acc = np.float64 if k.dtype == torch.float64 else np.float32
    values = k.to(torch.float64 if acc is np.float64 else torch.float32).numpy()
    total = np.cumsum(values, axis=dim, dtype=acc).take(-1, axis=dim)
    return torch.from_numpy(total / acc(k.shape[dim]))


# ---------------------------------------------------------------------------------------------
# The reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H", [9, 16, 24])
def test_reference_head_mean_sums_heads_in_order(dtype, H):
    k = _keys((2, 97, H, 72), dtype, seed=H)
    metric = reference.head_mean(k)
    assert_equal_verbose(metric, _ordered_mean_oracle(k, dim=2).to(dtype), f"head_mean vs ordered oracle, H={H}")
    assert_metric_is_head_mean(metric, k, "head_mean vs k.mean")


def test_torch_mean_sums_in_another_order():
    """Why the reference spells the order out: at SigLIP-so400m's shape, fp32, torch.mean's bits differ
    from the ordered sum's (within a rounding), so a test against it could not be bit for bit."""
    k = _keys((1, 729, 16, 72), torch.float32, seed=0)
    ordered = reference.head_mean(k)
    assert bool((ordered != k.mean(dim=2)).any()), "torch.mean now sums heads in order: the note in SPEC is stale"
    assert_metric_is_head_mean(ordered, k)


def test_negative_zero_heads_give_positive_zero():
    """The sum starts from +0 as the kernels' accumulators do: heads that are all -0.0 give +0.0."""
    k = torch.full((1, 3, 10, 8), -0.0)
    q = torch.ones(1, 1, 10, 8)
    for metric, name in ((reference.head_mean(k), "reference"), (ops.scores_and_metric(q, k, 0.5, True)[1], "CPU")):
        assert not bool(torch.signbit(metric).any()), f"{name}: -0.0 in the metric"


# ---------------------------------------------------------------------------------------------
# The CPU kernels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,d", [(16, 72), (9, 64), (12, 80), (24, 40)])
def test_cpu_scores_and_metric_metric_is_the_reference(dtype, H, d):
    N = 729 if (H, d) == (16, 72) else 130
    k = _keys((2, N, H, d), dtype, seed=H + d)
    q_cls = _keys((2, 1, H, d), dtype, seed=1)
    _, metric = ops.scores_and_metric(q_cls, k, d**-0.5, True)
    assert_equal_verbose(metric, reference.head_mean(k), f"CPU metric vs reference, H={H}, d={d}")
    # Without CLS the same metric comes from the attention-received path (small N: it is O(N^2)).
    k_small, q_small = k[:, :40], _keys((2, 40, H, d), dtype, seed=2)
    _, metric = ops.scores_and_metric(q_small, k_small, d**-0.5, False)
    assert_equal_verbose(metric, reference.head_mean(k_small), "CPU metric (keep_cls=False) vs reference")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H", [9, 16])
@pytest.mark.parametrize("unit", [1, 4])
def test_cpu_varlen_metric_is_the_reference(dtype, H, unit):
    T, d = 64, 80
    q, k = _keys((T, H, d), dtype, seed=3), _keys((T, H, d), dtype, seed=4)
    cu = torch.tensor([0, 24, 24, 64])
    _, metric = ops.varlen_scores_and_metric(q, k, cu, d**-0.5, unit)
    _, expected = reference.varlen_scores_and_metric(q, k, cu, d**-0.5, unit)
    assert_equal_verbose(metric, expected, f"CPU varlen metric vs reference, H={H}, unit={unit}")
    # The reference's order (per head the unit's mean, then the heads' mean) against numpy's.
    per_head = _ordered_mean_oracle(k.reshape(T // unit, unit, H, d), dim=1)  # [T/unit, H, d]
    assert_equal_verbose(expected, _ordered_mean_oracle(per_head, dim=1).to(dtype), "reference vs ordered oracle")


# ---------------------------------------------------------------------------------------------
# The Triton kernels (on CPU tensors under TRITON_INTERPRET=1, on CUDA when present)

TRITON_DEVICES = (["cuda"] if torch.cuda.is_available() else []) + (["cpu"] if INTERPRETED else [])


def _expected_triton_metric(k: torch.Tensor, expected: torch.Tensor, unrounded: torch.Tensor) -> torch.Tensor:
    """What Triton must store: the reference's bits, except that the interpreter's fp32 -> bf16 store
    truncates where the GPU rounds to nearest, so there the reference's fp32 mean truncated to bf16."""
    if k.dtype != torch.bfloat16 or k.is_cuda:
        return expected
    bits = unrounded.float().contiguous().view(torch.int32) & ~0xFFFF
    return bits.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero


@pytest.mark.skipif(not TRITON_DEVICES, reason="Triton needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,d,keep_cls", [(16, 72, True), (9, 64, True), (12, 40, False)])
def test_triton_scores_and_metric_metric_is_the_reference(device, dtype, H, d, keep_cls):
    pytest.importorskip("triton")
    import triton_ops

    N = 40  # the interpreter costs milliseconds per program
    k = _keys((1, N, H, d), dtype, seed=H)
    q = _keys((1, 1 if keep_cls else N, H, d), dtype, seed=5)
    _, metric = triton_ops.scores_and_metric(q.to(device), k.to(device), d**-0.5, keep_cls=keep_cls)
    expected = _expected_triton_metric(k, reference.head_mean(k), reference.head_mean(k.float()))
    assert_equal_verbose(metric.cpu(), expected, f"Triton metric vs reference, H={H}, d={d}")


@pytest.mark.skipif(not TRITON_DEVICES, reason="Triton needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,unit", [(16, 4), (9, 1)])
def test_triton_varlen_metric_is_the_reference(device, dtype, H, unit):
    pytest.importorskip("triton")
    import triton_ops

    T, d = 32, 80
    q, k = _keys((T, H, d), dtype, seed=6), _keys((T, H, d), dtype, seed=7)
    cu = torch.tensor([0, 12, 32])
    _, metric = triton_ops.varlen_scores_and_metric(q.to(device), k.to(device), cu.to(device), d**-0.5, unit)
    _, expected = reference.varlen_scores_and_metric(q, k, cu, d**-0.5, unit)
    unrounded = reference.varlen_scores_and_metric(q.float(), k.float(), cu, d**-0.5, unit)[1]
    assert_equal_verbose(metric.cpu(), _expected_triton_metric(k, expected, unrounded),
                         f"Triton varlen metric vs reference, H={H}, unit={unit}")
