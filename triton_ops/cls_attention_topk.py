"""Head-mean CLS attention from q/k, optionally fused with the top-k of the dominant tokens, and the
merge metric (k averaged over heads) from the same read of k.

Two launches, parallel over images and token blocks, deterministic (fixed reduction orders, no
atomics), never more than the CLS query row:

1. ``_cls_logits_kernel``, grid (image, token block): reads the block's keys once, head by head (the
   heads unrolled, so their loads are all in flight together). Per head it writes the logits
   ``scale * q_cls . k`` and the block's softmax statistics (max, sum of exp); it also sums the keys
   over heads, in head order, for the metric.
2. ``_cls_normalize_kernel``, grid (image, token block): combines each head's block statistics into
   the row's max and sum (a fixed-order reduction over the blocks), normalises its block's logits
   and averages over heads. With top-k fused it runs one program per image over the whole row and
   then selects keep from the finished scores in registers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import device_context, multiprocessor_count, unit_last_stride
from .tiles import accumulator_dtype, head_block
from .topk import check_topk_size, select_topk_row

# Token blocks of the logits pass, largest first: the largest that still gives every SM two programs
# and keeps one head's [block, head dim] key tile within 4 KiB (the unrolled heads' loads are in
# flight together; larger tiles push sm_90 to 230+ registers, and fp32 ones spill on sm_80).
TOKEN_BLOCKS = (32, 16, 8)
TILE_BYTES = 4096
NORMALIZE_BLOCK = 256


@triton.jit
def _cls_logits_kernel(q_ptr, k_ptr, logits_ptr, stats_ptr, metric_ptr, n_tokens, head_dim, scale,
                       stride_qb, stride_qh, stride_kb, stride_kn, stride_kh, stride_mb, stride_mn,
                       NUM_HEADS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       WITH_LOGITS: tl.constexpr, WITH_METRIC: tl.constexpr, ACC_DTYPE: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)  # image offsets exceed int32 for batches over 2**31 elements
    block = tl.program_id(1)
    n_blocks = tl.num_programs(1)
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_tokens
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    tile_mask = n_mask[:, None] & d_mask[None, :]
    k_rows = k_ptr + b * stride_kb + offs_n[:, None] * stride_kn + offs_d[None, :]
    key_sum = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)
    if WITH_LOGITS:
        for h in tl.static_range(NUM_HEADS):
            k = tl.load(k_rows + h * stride_kh, mask=tile_mask, other=0.0)
            if WITH_METRIC:
                key_sum += k.to(ACC_DTYPE)  # head order, as the C++ kernel sums
            q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d, mask=d_mask, other=0.0).to(tl.float32)
            logits = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scale
            logits = tl.where(n_mask, logits, float("-inf"))
            row = b * NUM_HEADS + h
            tl.store(logits_ptr + row * n_tokens + offs_n, logits, mask=n_mask)
            block_max = tl.max(logits, axis=0)
            stats = stats_ptr + (row * n_blocks + block) * 2
            tl.store(stats, block_max)
            tl.store(stats + 1, tl.sum(tl.exp(logits - block_max), axis=0))
    else:
        # The metric alone: a loop, not unrolled (sixteen hoisted tiles spill on sm_90).
        for h in range(NUM_HEADS):
            key_sum += tl.load(k_rows + h * stride_kh, mask=tile_mask, other=0.0).to(ACC_DTYPE)
    if WITH_METRIC:
        # IEEE division, so that the metric is the C++ kernel's bit for bit: fp32 `/` compiles to
        # div.approx.f32 (fp64 `/` is already IEEE, and div_rn takes fp32 only).
        if ACC_DTYPE == tl.float64:
            metric = key_sum / NUM_HEADS
        else:
            metric = tl.math.div_rn(key_sum, tl.full([BLOCK_N, BLOCK_D], NUM_HEADS, ACC_DTYPE))
        tl.store(metric_ptr + b * stride_mb + offs_n[:, None] * stride_mn + offs_d[None, :],
                 metric.to(metric_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _cls_normalize_kernel(logits_ptr, stats_ptr, out_ptr, keep_ptr, n_tokens, n_stat_blocks, dominant,
                          stride_keepb, NUM_HEADS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_STATS: tl.constexpr,
                          FUSE_TOPK: tl.constexpr, KEEP_CLS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_tokens
    offs_s = tl.arange(0, BLOCK_STATS)
    s_mask = offs_s < n_stat_blocks
    probs = tl.zeros([BLOCK], tl.float32)
    for h in range(NUM_HEADS):
        row = b * NUM_HEADS + h
        stats = stats_ptr + (row * n_stat_blocks + offs_s) * 2
        block_max = tl.load(stats, mask=s_mask, other=float("-inf"))
        block_sum = tl.load(stats + 1, mask=s_mask, other=0.0)
        row_max = tl.max(block_max, axis=0)
        row_sum = tl.sum(block_sum * tl.exp(block_max - row_max), axis=0)
        logits = tl.load(logits_ptr + row * n_tokens + offs, mask=mask, other=float("-inf"))
        probs += tl.exp(logits - row_max) / row_sum
    scores = probs / NUM_HEADS
    tl.store(out_ptr + b * n_tokens + offs, scores, mask=mask)
    if FUSE_TOPK:
        select_topk_row(tl.where(mask, scores, 0.0), offs, n_tokens, dominant, keep_ptr + b * stride_keepb, KEEP_CLS)


@functools.lru_cache(maxsize=256)
def token_block(batch: int, n_tokens: int, head_dim: int, element_size: int, processors: int) -> int:
    """BLOCK_N of the logits pass for a shape on a device with ``processors`` SMs."""
    fitting = [b for b in TOKEN_BLOCKS if b * head_block(head_dim) * element_size <= TILE_BYTES] or [TOKEN_BLOCKS[-1]]
    for block in fitting:
        if batch * -(-n_tokens // block) >= 2 * processors:
            return block
    return fitting[-1]


@dataclass(frozen=True)
class _Plan:
    """Grids and constexprs of one shape's launches, computed once per shape (the host path then
    only validates, allocates and launches)."""

    logits_grid: tuple[int, int]
    logits_meta: dict
    n_blocks: int
    normalize_grid: tuple[int, int]
    normalize_meta: dict


@functools.lru_cache(maxsize=256)
def _plan(B: int, N: int, H: int, d: int, element_size: int, accumulator, processors: int, *, fuse_topk: bool,
          keep_cls: bool, with_logits: bool, with_metric: bool) -> _Plan:
    block_n = token_block(B, N, d, element_size, processors)
    n_blocks = -(-N // block_n)
    padded = triton.next_power_of_2(N)
    block = padded if fuse_topk else min(NORMALIZE_BLOCK, padded)
    return _Plan(
        logits_grid=(B, n_blocks),
        logits_meta=dict(NUM_HEADS=H, BLOCK_N=block_n, BLOCK_D=head_block(d), WITH_LOGITS=with_logits,
                         WITH_METRIC=with_metric, ACC_DTYPE=accumulator, num_warps=4),
        n_blocks=n_blocks,
        normalize_grid=(B, -(-N // block)),
        normalize_meta=dict(NUM_HEADS=H, BLOCK=block, BLOCK_STATS=triton.next_power_of_2(n_blocks),
                            FUSE_TOPK=fuse_topk, KEEP_CLS=keep_cls, num_warps=8 if fuse_topk else 4),
    )


def _launch(q_cls: torch.Tensor | None, k: torch.Tensor, scale: float, *, metric: torch.Tensor | None = None,
            dominant: int = 0, keep_cls: bool = True,
            fuse_topk: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scores (when q_cls is given; else an empty [B, 0]), keep (when fused; else None) and the metric
    (when given, written in place). A pointer a launch does not use is passed as None, which Triton
    compiles as a constexpr the kernel never reads (its WITH_* / FUSE_TOPK switch is off)."""
    B, N, H, d = k.shape
    with_logits = q_cls is not None
    out = torch.empty(B, N if with_logits else 0, dtype=torch.float32, device=k.device)
    keep = torch.empty(B, dominant, dtype=torch.int64, device=k.device) if fuse_topk else None
    if B == 0:
        return out, keep
    plan = _plan(B, N, H, d, k.element_size(), accumulator_dtype(k.dtype), multiprocessor_count(k.device),
                 fuse_topk=fuse_topk, keep_cls=keep_cls, with_logits=with_logits, with_metric=metric is not None)
    logits = stats = None
    q_strides = (0, 0)
    if with_logits:
        # One allocation for the logits [B*H, N] and the block statistics [B*H, n_blocks, 2].
        workspace = torch.empty(B * H * (N + 2 * plan.n_blocks), dtype=torch.float32, device=k.device)
        logits, stats = workspace[: B * H * N], workspace[B * H * N :]
        q_strides = (q_cls.stride(0), q_cls.stride(1))
    metric_strides = (metric.stride(0), metric.stride(1)) if metric is not None else (0, 0)
    with device_context(k):
        _cls_logits_kernel[plan.logits_grid](
            q_cls, k, logits, stats, metric, N, d, float(scale),
            *q_strides, k.stride(0), k.stride(1), k.stride(2), *metric_strides, **plan.logits_meta,
        )
        if with_logits:
            _cls_normalize_kernel[plan.normalize_grid](
                logits, stats, out, keep, N, plan.n_blocks, dominant, keep.stride(0) if fuse_topk else 0,
                **plan.normalize_meta,
            )
    return out, keep


def cls_attention(q_cls: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """q_cls [B,H,d], k [B,N,H,d] (last dim unit-stride, any other strides) -> [B,N] fp32. Arguments
    are validated by the caller (visionzip_kernels)."""
    return _launch(unit_last_stride(q_cls), unit_last_stride(k), scale)[0]


def cls_attention_topk(q_cls: torch.Tensor, k: torch.Tensor, scale: float, dominant: int, *,
                       keep_cls: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and keep in two launches: -> (scores [B,N] fp32, keep [B,D] int64 ascending). Arguments
    are valid cls_attention arguments and a budget 1 <= D <= N (the caller's checks); N above the
    Triton top-k's limit raises."""
    check_topk_size("cls_attention_topk", k.shape[1])
    return _launch(unit_last_stride(q_cls), unit_last_stride(k), scale, dominant=dominant, keep_cls=keep_cls,
                   fuse_topk=True)


def cls_scores_and_metric(
    q_cls: torch.Tensor | None, k: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS scores [B,N] fp32 (empty [B,0] when q_cls is None) and metric [B,N,d] in k.dtype, from one
    read of k. Arguments are validated by the caller and have unit-stride last dims."""
    metric = torch.empty(k.shape[0], k.shape[1], k.shape[3], dtype=k.dtype, device=k.device)
    scores = _launch(q_cls, k, scale, metric=metric)[0]
    return scores, metric
