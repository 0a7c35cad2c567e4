"""The CUDA merge kernels (csrc/cuda/*.cuh, launched through merge_kernels.cuh) run on the CPU, on every machine.

The kernels are written against raw pointers with no ATen, so a host compiler builds them together
with a small thread-level emulation of CUDA (tests/cuda_emulation: one std::thread per CUDA thread,
block barriers, warp votes and shuffles), through the very launchers and launch geometry the CUDA
extension uses. The plan kernels (radix-select top-k, complement scan, targets and their unit metric;
the assignment over a grid of token chunks; the member lists, one warp per target), the forward
merge and the backward are checked here bit for bit against the C++ CPU kernels, which compute with
the same csrc/merge_math.h formulas, and so against the reference. What this cannot
show (timing, the device memory model, nvcc-only code paths such as __reduce_add_sync) is left to
tests/test_cuda.py on a GPU.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import include_paths

from visionzip_kernels import reference

from helpers import (
    FP32_ATOL,
    FP32_RTOL,
    assert_close_verbose,
    assert_equal_verbose,
    assert_tokens_match_reference,
    merge_inputs,
    packed_inputs,
)

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "tests/cuda_emulation/harness.cpp", ROOT / "tests/cuda_emulation/cuda_emulation.h",
           *sorted((ROOT / "csrc/cuda").glob("*.cuh")), ROOT / "csrc/merge_math.h"]
CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
I64 = ctypes.c_int64
ops = torch.ops.visionzip


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    out = tmp_path_factory.mktemp("cuda_emulation") / "vz_emulation.so"
    cmd = [compiler, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-ffp-contract=off",
           "-Wall", "-Wextra", "-Wshadow", "-Wno-unknown-pragmas", "-Wno-unused-parameter", "-Werror",
           *(f"-isystem{p}" for p in include_paths()[:1]), str(SOURCES[0]), "-o", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return ctypes.CDLL(str(out))


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def emu_merge(lib, hidden, metric, D, K, scores=None, keep=None, keep_cls=True):
    """select_merge (scores given) or contextual_merge (keep given) through the emulated kernels."""
    B, N, C = hidden.shape
    assert hidden.stride(-1) == 1 and metric.stride(-1) == 1
    if scores is not None:
        keep = torch.full((B, D), -7, dtype=torch.int64)
        scores = scores.float().contiguous()
    else:
        keep = keep.contiguous()
    tokens = torch.full((B, D + K, C), float("nan"), dtype=hidden.dtype)
    rc = lib.vz_emu_merge(CODES[hidden.dtype], _ptr(hidden), I64(hidden.stride(0)), I64(hidden.stride(1)),
                          CODES[metric.dtype], _ptr(metric), I64(metric.stride(0)), I64(metric.stride(1)),
                          _ptr(scores), _ptr(keep), _ptr(tokens), I64(B), I64(N), I64(C), I64(metric.shape[2]),
                          I64(D), I64(K), ctypes.c_int(int(keep_cls)))
    assert rc == 0, f"emulated launch failed ({rc})"
    return tokens, keep


def emu_backward(lib, grad, metric, keep, N):
    B, R, C = grad.shape
    D = keep.shape[1]
    keep = keep.contiguous()
    out = torch.full((B, N, C), float("nan"), dtype=grad.dtype)
    rc = lib.vz_emu_merge_backward(CODES[grad.dtype], _ptr(grad), I64(grad.stride(0)), I64(grad.stride(1)),
                                   CODES[metric.dtype], _ptr(metric), I64(metric.stride(0)), I64(metric.stride(1)),
                                   _ptr(keep), _ptr(out), I64(B), I64(N), I64(C), I64(metric.shape[2]), I64(D),
                                   I64(R - D))
    assert rc == 0, f"emulated launch failed ({rc})"
    return out


# (B, N, C, d, D, K): the foundation shape (CLIP-L/336, 54 + 10) at B = 1 and 2; SigLIP's 729 tokens
# with K = 0 (no assignment, no lists); N, C, d off the warp and pack multiples; K over one target
# tile (16); the unit targets at the shared-memory budget of the assignment (K_pad * d * 4 = 24 KB)
# and past it (read from global scratch); d over the 128 channels a target's norm stages per round;
# N over 256 tokens per thread chunk and over several
# 128-token assignment blocks, one of them partial; K over 256 (more list warps than a block has);
# D = 1 (no top-k beyond CLS); D + K = N (no members at all, or a target per remaining token); tiny N.
SHAPES = [
    (1, 577, 32, 64, 54, 10),
    (2, 577, 64, 64, 54, 10),
    (1, 729, 16, 64, 64, 0),
    (1, 17, 24, 8, 1, 0),
    (2, 300, 40, 40, 30, 33),
    (1, 300, 8, 64, 20, 96),
    (1, 200, 16, 72, 10, 100),
    (1, 90, 8, 200, 9, 20),
    (1, 2881, 8, 16, 54, 10),
    (1, 640, 8, 8, 20, 300),
    (3, 50, 24, 33, 1, 49),
    (5, 37, 8, 12, 20, 17),
    (4, 3, 8, 5, 1, 2),
    (1, 1, 4, 3, 1, 0),
]


@pytest.mark.parametrize("B,N,C,d,D,K", SHAPES)
def test_select_merge_matches_cpu_kernel_bitwise(emu, B, N, C, d, D, K):
    hidden, scores, metric, expected_keep = merge_inputs(B, N, C, D, K, d=d, seed=N + K)
    tokens, keep = emu_merge(emu, hidden, metric, D, K, scores=scores)
    assert_equal_verbose(keep, expected_keep, "keep")
    cpu_tokens, cpu_keep = ops.select_merge(hidden, scores, metric, D, K, True)
    assert_equal_verbose(keep, cpu_keep, "keep vs CPU kernel")
    assert_equal_verbose(tokens, cpu_tokens, "tokens vs CPU kernel")
    assert_tokens_match_reference(tokens, hidden, metric, keep, K, "emulated select_merge")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("strided", [False, True])
def test_dtypes_and_layouts(emu, dtype, strided):
    """16-byte packs (contiguous) and the one-element path (a padded view whose strides are not
    multiples of the pack); metric in the same dtype, read as fp32."""
    hidden, scores, metric, _ = merge_inputs(2, 97, 48, 9, 5, dtype=dtype, d=24, seed=5, strided=strided)
    tokens, keep = emu_merge(emu, hidden, metric, 9, 5, scores=scores)
    cpu_tokens, cpu_keep = ops.select_merge(hidden, scores, metric, 9, 5, True)
    assert_equal_verbose(keep, cpu_keep, "keep")
    assert_equal_verbose(tokens, cpu_tokens, "tokens vs CPU kernel")
    assert_tokens_match_reference(tokens, hidden, metric, keep, 5, "emulated select_merge")


def test_keep_cls_false_and_ties(emu):
    """Top-k without CLS; heavy ties (ties to the lower index) and -0.0 == +0.0."""
    B, N, C, D, K = 3, 130, 16, 40, 7
    hidden, _, metric, _ = merge_inputs(B, N, C, D, K, keep_cls=False, d=16, seed=2)
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (B, N), generator=g).float()
    scores[0, ::3] = -0.0
    scores[1] = 0.0
    tokens, keep = emu_merge(emu, hidden, metric, D, K, scores=scores, keep_cls=False)
    cpu_tokens, cpu_keep = ops.select_merge(hidden, scores, metric, D, K, False)
    assert_equal_verbose(keep, cpu_keep, "keep")
    assert_equal_verbose(keep, reference.dominant_topk(scores, D, False), "keep vs reference")
    assert_equal_verbose(tokens, cpu_tokens, "tokens")


def _topk_by_key(scores: torch.Tensor, D: int, keep_cls: bool) -> torch.Tensor:
    """Oracle of the GPU top-k for any float scores: rank by merge_math.h's order-preserving key of
    the bits (-0.0 as +0.0, NaN above +inf), higher first, ties to the lower index; ascending."""
    bits = (scores.float() + 0.0).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    keys = torch.where(bits >= 2**31, 0xFFFFFFFF - bits, bits + 2**31)
    first = 1 if keep_cls else 0
    rows = []
    for row in keys.tolist():
        ranked = sorted(range(first, len(row)), key=lambda n: (-row[n], n))[: D - first]
        rows.append(sorted(([0] if keep_cls else []) + ranked))
    return torch.tensor(rows, dtype=torch.int64)


def _radix_tie_scores(B: int, N: int, seed: int) -> torch.Tensor:
    """Scores whose keys collide digit by digit: values that differ only in the top byte, only in the
    lowest, equal values, +-0.0, negatives, the extremes of the finite range and subnormals."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor([1.0, 1.0000001, 1.0000002, 2.0, 0.5, -1.0, -1.0000001, 0.0, -0.0, 3.4e38, -3.4e38,
                         1e-45, -1e-45, 1.5, 1.5])
    return pool[torch.randint(0, len(pool), (B, N), generator=g)]


@pytest.mark.parametrize("keep_cls", [True, False])
@pytest.mark.parametrize("B,N,D", [(3, 130, 40), (1, 577, 54), (2, 9, 9), (2, 40, 1), (1, 300, 299)])
def test_topk_ties_at_every_radix_digit(emu, B, N, D, keep_cls):
    """The radix select on keys that tie in some digits and not others, and on whole ties: keep is
    the CPU kernel's (ties to the lower index), and the sort-based oracle's."""
    scores = _radix_tie_scores(B, N, seed=N + D)
    hidden, _, metric, _ = merge_inputs(B, N, 8, D, 0, keep_cls=keep_cls, d=8, seed=1)
    K = min(3, N - D)
    tokens, keep = emu_merge(emu, hidden, metric, D, K, scores=scores, keep_cls=keep_cls)
    cpu_tokens, cpu_keep = ops.select_merge(hidden, scores, metric, D, K, keep_cls)
    assert_equal_verbose(keep, reference.dominant_topk(scores, D, keep_cls), "keep vs sort oracle")
    assert_equal_verbose(keep, cpu_keep, "keep vs CPU kernel")
    assert_equal_verbose(tokens, cpu_tokens, "tokens vs CPU kernel")


@pytest.mark.parametrize("keep_cls", [True, False])
@pytest.mark.parametrize("value", [1.0, 1.0000001, 0.5, -1.0, 0.0])
def test_topk_boundary_at_the_end_of_a_tie_group(emu, value, keep_cls):
    """D chosen so that the kept set ends exactly with the last token of a tie group (every token
    scoring >= value): in every radix pass the picked key is the last one of its digit's bin."""
    N = 130
    scores = _radix_tie_scores(1, N, seed=5)
    first = 1 if keep_cls else 0
    D = first + int((scores[0, first:] >= value).sum())
    hidden, _, metric, _ = merge_inputs(1, N, 8, D, 0, keep_cls=keep_cls, d=8, seed=1)
    K = min(2, N - D)
    tokens, keep = emu_merge(emu, hidden, metric, D, K, scores=scores, keep_cls=keep_cls)
    expected = reference.dominant_topk(scores, D, keep_cls)
    assert_equal_verbose(keep, expected, "keep vs sort oracle")
    assert set(keep[0, first:].tolist()) == {n for n in range(first, N) if scores[0, n] >= value}
    cpu_tokens, _ = ops.select_merge(hidden, scores, metric, D, K, keep_cls)
    assert_equal_verbose(tokens, cpu_tokens, "tokens vs CPU kernel")


def test_topk_of_non_finite_scores_follows_the_key_order(emu):
    """The GPU policy for what the CPU rejects: +-inf and NaN rank by their keys (NaN above +inf),
    with the same ties to the lower index; nothing else changes."""
    B, N, D, K = 2, 70, 12, 0
    scores = _radix_tie_scores(B, N, seed=11)
    scores[0, [3, 20, 41]] = float("inf")
    scores[0, [5, 6]] = float("nan")
    scores[1, 1::4] = float("-inf")
    scores[1, 30] = float("inf")
    hidden, _, metric, _ = merge_inputs(B, N, 8, D, K, d=8, seed=2)
    for keep_cls in (True, False):
        _, keep = emu_merge(emu, hidden, metric, D, K, scores=scores, keep_cls=keep_cls)
        assert_equal_verbose(keep, _topk_by_key(scores, D, keep_cls), f"keep (keep_cls={keep_cls})")


def test_contextual_merge_keep_order_and_backward(emu):
    """contextual_merge with a shuffled keep (dominant rows in keep's order), and its backward."""
    B, N, C, d, D, K = 2, 577, 32, 64, 54, 10
    hidden, _, metric, keep = merge_inputs(B, N, C, D, K, d=d, seed=7)
    g = torch.Generator().manual_seed(1)
    keep = torch.stack([row[torch.randperm(D, generator=g)] for row in keep])
    tokens, _ = emu_merge(emu, hidden, metric, D, K, keep=keep)
    assert_equal_verbose(tokens, ops.contextual_merge(hidden, metric, keep, K), "tokens vs CPU kernel")
    grad = torch.randn(B, D + K, C, generator=g)
    grad_hidden = emu_backward(emu, grad, metric, keep, N)
    assert_equal_verbose(grad_hidden, ops.contextual_merge_backward(grad, metric, keep, N), "grad vs CPU kernel")
    torch.testing.assert_close(grad_hidden, reference.contextual_merge_backward(grad, metric, keep, N))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [0, 3, 40])
def test_backward_matches_cpu_kernel(emu, dtype, K):
    B, N, C, d, D = 2, 150, 24, 16, 12
    hidden, _, metric, keep = merge_inputs(B, N, C, D, K, d=d, dtype=dtype, seed=K)
    grad = torch.randn(B, D + K, C, generator=torch.Generator().manual_seed(K)).to(dtype)
    strided_grad = torch.zeros(B, D + K + 1, C + 4, dtype=dtype)[:, 1:, 2 : C + 2]
    strided_grad.copy_(grad)  # the one-element path
    expected = ops.contextual_merge_backward(grad, metric, keep, N)
    assert_equal_verbose(emu_backward(emu, grad, metric, keep, N), expected, "grad")
    assert_equal_verbose(emu_backward(emu, strided_grad, metric, keep, N), expected, "strided grad")


def test_gpu_policy_for_bad_keep(emu):
    """What the CPU kernels reject but the GPU cannot check without a sync: keep out of range gives
    a zero dominant row; a repeated index is one dominant token whose gradient comes from its last
    row. Nothing else changes, nothing is read or written out of bounds, results are repeatable."""
    B, N, C, d, D, K = 1, 40, 8, 8, 4, 3
    hidden, _, metric, _ = merge_inputs(B, N, C, D, K, d=d, seed=3)
    keep = torch.tensor([[5, 77, 9, -2]])
    tokens, _ = emu_merge(emu, hidden, metric, D, K, keep=keep)
    assert torch.equal(tokens[0, 0], hidden[0, 5]) and torch.equal(tokens[0, 2], hidden[0, 9])
    assert torch.equal(tokens[0, 1], torch.zeros(C)) and torch.equal(tokens[0, 3], torch.zeros(C))
    # The contextual rows are those of the valid tokens alone (here: keep = [5, 9] and K = 3).
    expected = ops.contextual_merge(hidden, metric, torch.tensor([[5, 9]]), K)
    assert torch.equal(tokens[0, D:], expected[0, 2:])
    repeated = torch.tensor([[5, 9, 5, 11]])
    first, _ = emu_merge(emu, hidden, metric, D, K, keep=repeated)
    again, _ = emu_merge(emu, hidden, metric, D, K, keep=repeated)
    assert torch.equal(first, again) and torch.equal(first[0, 2], hidden[0, 5])
    grad = torch.randn(B, D + K, C)
    grad_hidden = emu_backward(emu, grad, metric, repeated, N)
    assert torch.equal(grad_hidden[0, 5], grad[0, 2])


def test_launch_geometry_limits(emu):
    """Merge launches stay within CUDA's limits for any row count: blocks of 256 threads, lanes a
    multiple of 32, grid.x capped (the kernels stride over rows), grid.y = channel blocks."""
    out = (ctypes.c_int64 * 6)()
    for rows, C, vec in [(1, 1, 1), (64, 1024, 8), (256 * 64, 1024, 8), (2**33, 8, 8), (577, 4096, 4),
                         (3, 100_000, 1), (10, 24, 8)]:
        emu.vz_emu_row_launch(I64(rows), I64(C), ctypes.c_int(vec), out)
        gx, gy, gz, bx, by, bz = list(out)
        assert bx % 32 == 0 and bx * by * bz == 256, (rows, C, vec, list(out))
        assert 1 <= gx <= 2**20 and 1 <= gy <= 65535 and gz == 1
        lanes = -(-C // vec)
        assert gy * bx >= lanes and (gy - 1) * bx < lanes
        assert gx * by >= rows or gx == 2**20
    assert emu.vz_emu_channel_blocks(I64(65535 * 256), ctypes.c_int(1)) == 65535
    assert emu.vz_emu_channel_blocks(I64(65535 * 256 + 1), ctypes.c_int(1)) == 65536


def test_plan_launch_geometry_limits(emu):
    """The plan kernels stay within CUDA's limits for any size: grid.x capped at 2^20 (they stride
    over images, token chunks and targets), at least one block, and the unit targets in shared
    memory only within the 24 KB budget (+ ~17 KB static < 48 KB)."""
    out = (ctypes.c_int64 * 5)()
    for B, N, d, K in [(1, 577, 64, 10), (1, 1, 1, 0), (2**25, 3000, 64, 10), (4096, 2**20, 8, 2**19),
                       (1, 300, 64, 96), (1, 300, 64, 97), (7, 1000, 200, 0)]:
        emu.vz_emu_plan_launch(I64(B), I64(N), I64(d), I64(K), out)
        select, assign, lists, unit_bytes, in_shared = list(out)
        for blocks in (select, assign, lists):
            assert 1 <= blocks <= 2**20, (B, N, d, K, list(out))
        assert select == min(B, 2**20) and assign == min(B * -(-N // 128), 2**20)
        assert lists == max(1, min(-(-B * K // 8), 2**20))
        assert unit_bytes == -(-K // 16) * 16 * d * 4 and in_shared == (unit_bytes <= 24 * 1024)


def test_exact_similarity_ties_go_to_the_first_target(emu):
    """Members equally similar to several targets join the first of them (first maximum wins)."""
    B, N, C, d, D, K = 2, 90, 16, 8, 6, 5
    hidden, _, _, keep = merge_inputs(B, N, C, D, K, d=d, seed=4)
    metric = torch.ones(B, N, d)
    metric[1, ::2, 0] = -1.0  # image 1: two directions, each shared by several targets
    tokens, _ = emu_merge(emu, hidden, metric, D, K, keep=keep)
    assert_equal_verbose(tokens, ops.contextual_merge(hidden, metric, keep, K), "tokens vs CPU kernel")
    grad = torch.randn(B, D + K, C, generator=torch.Generator().manual_seed(0))
    assert_equal_verbose(emu_backward(emu, grad, metric, keep, N),
                         ops.contextual_merge_backward(grad, metric, keep, N), "grad vs CPU kernel")
    # Image 0: every member is in target 0's row, which is target + mean of all members.
    rest = [n for n in range(N) if n not in set(keep[0].tolist())]
    step = max(1, len(rest) // K)
    targets = rest[: K * step : step]
    members = [n for n in rest if n not in targets]
    expected = hidden[0, targets[0]] + hidden[0, members].sum(0) / len(members)
    torch.testing.assert_close(tokens[0, D], expected)
    assert torch.equal(tokens[0, D + 1 :], hidden[0, targets[1:]])


def test_assignment_decided_by_rounding_matches_cpu_bitwise(emu):
    """Targets that all point the same way with different lengths (and members near that direction):
    their unit metrics agree only up to rounding, so every member's argmax is decided by the last
    bits of the unit targets and of its similarities. The emulated plan must pick the CPU kernel's
    targets exactly, which holds only when both sum the same products in the same order."""
    B, N, C, d, D, K = 2, 160, 8, 40, 10, 7
    hidden, _, metric, keep = merge_inputs(B, N, C, D, K, d=d, seed=9)
    g = torch.Generator().manual_seed(9)
    for b in range(B):
        _, targets = _rest_and_targets(keep[b], N, K)
        base = torch.randn(d, generator=g)
        scales = 0.3 + torch.rand(K, generator=g) * 3
        metric[b] = base + 1e-6 * torch.randn(N, d, generator=g)
        metric[b, targets] = base * scales[:, None]
    tokens, _ = emu_merge(emu, hidden, metric, D, K, keep=keep)
    assert_equal_verbose(tokens, ops.contextual_merge(hidden, metric, keep, K), "tokens vs CPU kernel")
    grad = torch.randn(B, D + K, C, generator=g)
    assert_equal_verbose(emu_backward(emu, grad, metric, keep, N),
                         ops.contextual_merge_backward(grad, metric, keep, N), "grad vs CPU kernel")


# ---------------------------------------------------------------------------------------------
# Metrics the plain formulas get wrong: tiny rows (their similarities would underflow; every row is
# scaled by a power of two, merge_math.h's metric_scale) and non-finite rows (torch.argmax's order:
# the first NaN wins; a non-finite member goes to target 0). CPU kernel against the reference, and
# the emulated CUDA kernels against the CPU kernel bit for bit.


@pytest.mark.parametrize("magnitude", [1e-28, 1e-31, 1e-34])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiny_metrics_are_assigned_as_in_float64(emu, magnitude, seed):
    B, N, C, d, D, K = 2, 120, 16, 16, 10, 6
    hidden, scores, metric, _ = merge_inputs(B, N, C, D, K, d=d, seed=seed)
    metric = metric * magnitude
    tokens, keep = ops.select_merge(hidden, scores, metric, D, K, True)
    # In float64 the reference's normalised similarities do not underflow: it is the oracle here.
    expected = reference.contextual_merge(hidden.double(), metric.double(), keep, K)
    assert_close_verbose(tokens.double(), expected, atol=1e-6, rtol=1e-5, name=f"CPU, |metric| ~ {magnitude}")
    emu_tokens, emu_keep = emu_merge(emu, hidden, metric, D, K, scores=scores)
    assert_equal_verbose(emu_keep, keep, "keep")
    assert_equal_verbose(emu_tokens, tokens, "emulated tokens vs CPU kernel")


@pytest.mark.parametrize("factor", [2.0**-100, 1e-15, 1e-36, 1e20, 2.0**120])
def test_metric_scale_does_not_change_the_emulated_plan(emu, factor):
    """docs/SPEC.md "Merging" step 1: every row (targets included) is brought to max |m| in [1, 2) by a
    power of two first, so a scaled metric is merged as the unscaled one, on the emulated CUDA kernels
    as on the CPU kernel (bit for bit for a power of two; the same assignment on a separated metric)."""
    B, N, C, d, D, K = 2, 120, 16, 16, 10, 6
    hidden, scores, metric, _ = merge_inputs(B, N, C, D, K, d=d, seed=5)
    tokens, keep = ops.select_merge(hidden, scores, metric, D, K, True)
    scaled = metric * factor
    emu_tokens, emu_keep = emu_merge(emu, hidden, scaled, D, K, scores=scores)
    assert_equal_verbose(emu_keep, keep, "keep")
    assert_equal_verbose(emu_tokens, tokens, f"emulated tokens, metric * {factor}, vs CPU kernel unscaled")
    assert_equal_verbose(ops.select_merge(hidden, scores, scaled, D, K, True)[0], tokens, "CPU kernel, scaled")


def test_subnormal_and_zero_metric_rows_match_the_cpu_kernel(emu):
    """Rows whose max |m| is subnormal (their scale is capped at 2^126) and all-zero rows (a zero unit
    vector), as targets and as members: the emulated plan is the CPU kernel's, bit for bit."""
    B, N, C, d, D, K = 2, 96, 8, 12, 8, 7
    hidden, scores, metric, keep = merge_inputs(B, N, C, D, K, d=d, seed=11)
    rest, targets = _rest_and_targets(keep[0], N, K)
    members = [n for n in rest if n not in targets]
    metric[0, targets[1]] = 0.0
    metric[0, members[:5]] = 0.0
    metric[1] *= 2.0**-140  # every row of image 1 subnormal (many elements flush to zero)
    assert bool((metric[1].abs().amax(dim=-1) < torch.finfo(torch.float32).tiny).all())
    tokens, got_keep = ops.select_merge(hidden, scores, metric, D, K, True)
    assert_equal_verbose(got_keep, keep, "keep")
    assert_tokens_match_reference(tokens, hidden, metric, keep, K, "CPU, zero and subnormal rows")
    emu_tokens, _ = emu_merge(emu, hidden, metric, D, K, scores=scores)
    assert_equal_verbose(emu_tokens, tokens, "emulated tokens vs CPU kernel")


def _rest_and_targets(keep_row: torch.Tensor, N: int, K: int) -> tuple[list[int], list[int]]:
    kept = set(keep_row.tolist())
    rest = [n for n in range(N) if n not in kept]
    step = max(1, len(rest) // K)
    return rest, rest[: K * step : step]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_metric_rows_follow_the_reference(emu, bad):
    B, N, C, d, D, K = 2, 80, 16, 8, 8, 5
    hidden, scores, metric, keep = merge_inputs(B, N, C, D, K, d=d, seed=3)
    rest, targets = _rest_and_targets(keep[0], N, K)
    members = [n for n in rest if n not in targets]
    metric[0, targets[2], 3] = bad  # a non-finite target: every member of image 0 joins it (NaN first)
    metric[1, members[4], 0] = bad  # a non-finite member of image 1: target 0, as its NaN row says
    tokens, got_keep = ops.select_merge(hidden, scores, metric, D, K, True)
    assert_equal_verbose(got_keep, keep, "keep")
    assert_tokens_match_reference(tokens, hidden, metric, keep, K, f"CPU, a {bad} metric")
    emu_tokens, _ = emu_merge(emu, hidden, metric, D, K, scores=scores)
    assert_equal_verbose(emu_tokens, tokens, "emulated tokens vs CPU kernel")


# ---------------------------------------------------------------------------------------------
# Packed images (varlen_select_merge): one set of launches for every image of a batch.


def emu_varlen(lib, data, scores, metric, cu, dominant, contextual, backward=False):
    """varlen_select_merge (data = hidden [T, C]: (tokens, keep)) or its backward (data = grad_tokens
    [rows, C]: grad_hidden [T, C]) through the emulated packed launches."""
    assert data.stride(-1) == 1 and metric.stride(-1) == 1
    T, rows, C = metric.shape[0], sum(dominant) + sum(contextual), data.shape[1]
    out = torch.full((T if backward else rows, C), float("nan"), dtype=data.dtype)
    keep = torch.full((rows,), -7, dtype=torch.int64)
    cu64 = cu.to(torch.int64).contiguous()
    budgets = [torch.tensor(b, dtype=torch.int64) for b in (dominant, contextual)]
    rc = lib.vz_emu_varlen(CODES[data.dtype], _ptr(data), I64(data.stride(0)), CODES[metric.dtype], _ptr(metric),
                           I64(metric.stride(0)), _ptr(scores.float().contiguous()), _ptr(cu64), I64(len(dominant)),
                           _ptr(budgets[0]), _ptr(budgets[1]), I64(C), I64(metric.shape[1]), ctypes.c_int(backward),
                           _ptr(out), _ptr(keep))
    assert rc == 0, f"emulated launch failed ({rc})"
    return out if backward else (out, keep)


def _budgets(sizes, dominant_ratio, contextual_ratio):
    dominant = [int(dominant_ratio * n) for n in sizes]
    return dominant, [min(max(int(contextual_ratio * n), 1), n - D) for n, D in zip(sizes, dominant)]


# (sizes, dominant, contextual, C, d): Qwen2.5-VL's 4 images at 0.65 / 0.05 (merge units, d = 80);
# empty images and images with no budget between others; D = 0 with K > 0 (no CLS here); K = 0;
# D + K = N; unit targets past the shared-memory budget beside ones within it; 40 small images (the
# binary searches over a longer table); an image over several 128-token assignment chunks.
PACKED = {
    "qwen 4 images": ([256, 264, 252, 216], *_budgets([256, 264, 252, 216], 0.65, 0.05), 32, 80),
    "empty and zero budgets": ([0, 37, 5, 0, 90, 3], [0, 10, 0, 0, 20, 0], [0, 3, 2, 0, 40, 0], 24, 16),
    "all kept and no contextual": ([9, 30, 12], [9, 20, 4], [0, 10, 0], 16, 8),
    "unit targets past shared memory": ([300, 60], [20, 10], [40, 7], 8, 200),
    "40 small images": ([3 + (7 * i) % 19 for i in range(40)], [1 + i % 3 for i in range(40)],
                        [min((5 * i) % 3, 3 + (7 * i) % 19 - 1 - i % 3) for i in range(40)], 8, 12),
    "one long image": ([700], [54], [10], 16, 24),
}


@pytest.mark.parametrize("case", list(PACKED), ids=list(PACKED))
def test_varlen_select_merge_matches_cpu_kernel_bitwise(emu, case):
    sizes, dominant, contextual, C, d = PACKED[case]
    hidden, scores, metric, cu = packed_inputs(sizes, dominant, contextual, C=C, d=d, seed=len(sizes))
    tokens, keep = emu_varlen(emu, hidden, scores, metric, cu, dominant, contextual)
    cpu_tokens, cpu_keep, _ = ops.varlen_select_merge(hidden, scores, metric, cu, dominant, contextual)
    assert_equal_verbose(keep, cpu_keep, "keep vs CPU kernel")
    assert_equal_verbose(tokens, cpu_tokens, "tokens vs CPU kernel")
    ref_tokens, ref_keep, _ = reference.varlen_select_merge(hidden, scores, metric, cu, dominant, contextual)
    assert_equal_verbose(keep, ref_keep, "keep vs reference")
    assert_close_verbose(tokens, ref_tokens, atol=FP32_ATOL, rtol=FP32_RTOL, name="tokens vs reference")
    grad = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(1))
    expected = ops.varlen_select_merge_backward(grad, scores, metric, cu, dominant, contextual)
    assert_equal_verbose(emu_varlen(emu, grad, scores, metric, cu, dominant, contextual, backward=True), expected,
                         "grad_hidden vs CPU kernel")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("strided", [False, True])
def test_varlen_dtypes_and_layouts(emu, dtype, strided):
    """16-byte packs (contiguous rows) and one element per lane (a padded view); fp64 accumulates in
    fp64, fp16 / bf16 in fp32; metric in the same dtype, read as fp32."""
    sizes, dominant, contextual = [40, 17, 29], [5, 17, 0], [6, 0, 5]
    hidden, scores, metric, cu = packed_inputs(sizes, dominant, contextual, C=24, d=12, dtype=dtype, strided=strided)
    tokens, keep = emu_varlen(emu, hidden, scores, metric, cu, dominant, contextual)
    cpu_tokens, cpu_keep, _ = ops.varlen_select_merge(hidden, scores, metric, cu, dominant, contextual)
    assert_equal_verbose(keep, cpu_keep, "keep")
    assert_equal_verbose(tokens, cpu_tokens, "tokens vs CPU kernel")
    grad = torch.randn(tokens.shape).to(dtype)
    expected = ops.varlen_select_merge_backward(grad, scores, metric, cu, dominant, contextual)
    assert_equal_verbose(emu_varlen(emu, grad, scores, metric, cu, dominant, contextual, backward=True), expected,
                         "grad_hidden")


def test_varlen_ties_and_one_image_equals_dense(emu):
    """Heavy score ties (ties to the lower index, per image), and one image equals the dense
    select_merge(keep_cls=False) with its rows in token order."""
    sizes, dominant, contextual = [130, 77], [40, 9], [7, 30]
    hidden, _, metric, cu = packed_inputs(sizes, dominant, contextual, C=16, d=16, seed=2)
    scores = _radix_tie_scores(1, sum(sizes), seed=4)[0]
    tokens, keep = emu_varlen(emu, hidden, scores, metric, cu, dominant, contextual)
    cpu_tokens, cpu_keep, _ = ops.varlen_select_merge(hidden, scores, metric, cu, dominant, contextual)
    assert_equal_verbose(keep, cpu_keep, "keep")
    assert_equal_verbose(tokens, cpu_tokens, "tokens")
    dense_tokens, dense_keep = emu_merge(emu, hidden[None, :130], metric[None, :130], 40, 7, scores=scores[None, :130],
                                         keep_cls=False)
    rest, targets = _rest_and_targets(dense_keep[0], 130, 7)
    order = torch.tensor(dense_keep[0].tolist() + targets).argsort()
    assert_equal_verbose(tokens[:47], dense_tokens[0, order], "image 0 vs the dense kernel, in token order")
