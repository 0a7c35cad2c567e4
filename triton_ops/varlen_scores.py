"""Packed (varlen) scores and metric on the Triton kernels: attention_received.py generalised to
images concatenated along the token axis with ``cu_seqlens`` (Qwen2-VL's NaViT layout), never an
L x L map, deterministic (fixed reduction orders, no atomics), no host sync.

Blocks are mapped to images on the device: the host computes, with device ops on cu_seqlens,
``block_starts[i]`` = the number of token blocks of the images before image i, and launches
``cdiv(T, BLOCK) + n`` programs per head (a bound on the sum of every image's block count that the
shapes alone give). Each program finds its image by counting the block_starts at or below its id;
programs past the last block exit.

- Pass 1, ``_varlen_row_stats_kernel`` (grid: query block, head): each query row's softmax max and
  1 / sum over its own image's keys, online over key blocks.
- Pass 2, ``_varlen_column_sums_kernel`` (grid: key block, head): the column sums of the normalised
  probabilities over the image's query blocks, in order.
- ``_varlen_pool_kernel`` (grid: merge-unit block): the mean over heads, then over the merge unit's
  tokens, of the column sums -> scores; k averaged over the unit, then heads -> metric.

Offsets are clamped to [0, T] in the kernels: a malformed cu_seqlens on CUDA (which is not checked
there, as that would need a host sync) gives wrong numbers but never an out-of-bounds access.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import device_context, unit_last_stride
from .tiles import INTERPRETED, LOG2_E, accumulator_dtype, head_block, qk_logits, row_tiles, tile_config

IMAGE_CHUNK = 64  # block_starts read this many at a time when a program looks up its image
POOL_BLOCK = 16  # merge units per program of the pooling kernel ([16, 128] fp32 tiles: no spills)


@triton.jit
def _image_bounds(cu_ptr, block_starts_ptr, n_images, n_tokens, block, CHUNK: tl.constexpr):
    """(image, first block of the image, its first token, its end) for the program's token block;
    image == n_images for a program past the last block."""
    image = 0
    for c0 in range(0, n_images, CHUNK):
        offs = c0 + 1 + tl.arange(0, CHUNK)
        ends = tl.load(block_starts_ptr + offs, mask=offs <= n_images, other=2147483647)
        image += tl.sum((ends <= block).to(tl.int32), axis=0)
    safe = tl.minimum(image, n_images - 1)
    first_block = tl.load(block_starts_ptr + safe)
    start = tl.minimum(tl.maximum(tl.load(cu_ptr + safe).to(tl.int64), 0), n_tokens)
    end = tl.minimum(tl.maximum(tl.load(cu_ptr + safe + 1).to(tl.int64), start), n_tokens)
    return image, first_block, start, end


@triton.jit
def _varlen_row_stats_kernel(q_ptr, k_ptr, cu_ptr, block_starts_ptr, max_ptr, inv_sum_ptr, n_images, n_tokens,
                             head_dim, qk_scale, stride_qt, stride_qh, stride_kt, stride_kh,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr,
                             OPERAND: tl.constexpr, PRECISION: tl.constexpr, CHUNK: tl.constexpr):
    block = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    image, first_block, start, end = _image_bounds(cu_ptr, block_starts_ptr, n_images, n_tokens, block, CHUNK)
    if image < n_images:
        # The image's first token goes into the (64-bit) base pointers; offsets within the image stay
        # 32-bit, as in the dense kernels (64-bit row offsets cost registers, and spill on sm_90).
        length = (end - start).to(tl.int32)
        offs_m = (block - first_block) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < length
        q_lo, q_hi = row_tiles(q_ptr + start * stride_qt + h * stride_qh, offs_m, m_mask, stride_qt, head_dim, D_LO,
                                D_HI, OPERAND)
        k_head = k_ptr + start * stride_kt + h * stride_kh
        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_M], tl.float32)
        for n0 in range(0, length, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < length
            logits = qk_logits(q_lo, q_hi, k_head, offs_n, n_mask, stride_kt, head_dim, D_LO, D_HI, OPERAND,
                             PRECISION) * qk_scale
            logits = tl.where(n_mask[None, :], logits, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(logits, axis=1))
            row_sum = row_sum * tl.exp2(row_max - new_max) + tl.sum(tl.exp2(logits - new_max[:, None]), axis=1)
            row_max = new_max
        stats = h * n_tokens + start
        tl.store(max_ptr + stats + offs_m, row_max, mask=m_mask)
        tl.store(inv_sum_ptr + stats + offs_m, 1.0 / row_sum, mask=m_mask)


@triton.jit
def _varlen_column_sums_kernel(q_ptr, k_ptr, cu_ptr, block_starts_ptr, max_ptr, inv_sum_ptr, out_ptr, n_images,
                               n_tokens, head_dim, qk_scale, stride_qt, stride_qh, stride_kt, stride_kh,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr,
                               OPERAND: tl.constexpr, PRECISION: tl.constexpr, CHUNK: tl.constexpr):
    block = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    image, first_block, start, end = _image_bounds(cu_ptr, block_starts_ptr, n_images, n_tokens, block, CHUNK)
    if image < n_images:
        length = (end - start).to(tl.int32)
        offs_n = (block - first_block) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < length
        q_head = q_ptr + start * stride_qt + h * stride_qh
        stats = h * n_tokens + start
        # k^T is the fixed operand: logits^T [BLOCK_N, BLOCK_M] = k . q^T, so the column sums are
        # row sums of the tile.
        k_lo, k_hi = row_tiles(k_ptr + start * stride_kt + h * stride_kh, offs_n, n_mask, stride_kt, head_dim, D_LO,
                                D_HI, OPERAND)
        received = tl.zeros([BLOCK_N], tl.float32)
        for m0 in range(0, length, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_mask = offs_m < length
            row_max = tl.load(max_ptr + stats + offs_m, mask=m_mask, other=0.0)
            inv_sum = tl.load(inv_sum_ptr + stats + offs_m, mask=m_mask, other=0.0)
            logits_t = qk_logits(k_lo, k_hi, q_head, offs_m, m_mask, stride_qt, head_dim, D_LO, D_HI, OPERAND,
                               PRECISION) * qk_scale
            probs_t = tl.exp2(logits_t - row_max[None, :]) * inv_sum[None, :]
            received += tl.sum(tl.where(m_mask[None, :], probs_t, 0.0), axis=1)
        tl.store(out_ptr + stats + offs_n, received, mask=n_mask)


@triton.jit
def _varlen_pool_kernel(per_head_ptr, k_ptr, scores_ptr, metric_ptr, n_units, n_tokens, head_dim, stride_kt,
                        stride_kh, NUM_HEADS: tl.constexpr, UNIT: tl.constexpr, BLOCK: tl.constexpr,
                        BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr):
    first_unit = tl.program_id(0).to(tl.int64) * BLOCK  # 64-bit base pointers, 32-bit offsets
    offs_j = tl.arange(0, BLOCK)
    j_mask = offs_j < n_units - first_unit
    offs_d = tl.arange(0, BLOCK_D)
    tile_mask = j_mask[:, None] & (offs_d < head_dim)[None, :]
    per_head_block = per_head_ptr + first_unit * UNIT
    k_block = k_ptr + first_unit * UNIT * stride_kt
    # Scores: per token the sum over heads in head order / H, then the unit's mean (as the C++ kernel).
    # IEEE divisions: fp32 `/` compiles to div.approx.f32; x / 4 and x * 0.25 are the same number.
    received = tl.zeros([BLOCK], tl.float32)
    for u in range(UNIT):
        over_heads = tl.zeros([BLOCK], tl.float32)
        for h in range(NUM_HEADS):
            over_heads += tl.load(per_head_block + h * n_tokens + offs_j * UNIT + u, mask=j_mask, other=0.0)
        received += tl.math.div_rn(over_heads, tl.full([BLOCK], NUM_HEADS, tl.float32))
    tl.store(scores_ptr + first_unit + offs_j, received * (1.0 / UNIT), mask=j_mask)
    # Metric: k summed over the unit's tokens, / unit, summed over heads in head order, / H.
    head_sum = tl.zeros([BLOCK, BLOCK_D], ACC_DTYPE)
    for h in range(NUM_HEADS):
        unit_sum = tl.zeros([BLOCK, BLOCK_D], ACC_DTYPE)
        for u in range(UNIT):
            rows = (offs_j * UNIT + u) * stride_kt + h * stride_kh
            unit_sum += tl.load(k_block + rows[:, None] + offs_d[None, :], mask=tile_mask, other=0.0).to(ACC_DTYPE)
        head_sum += unit_sum * (1.0 / UNIT)
    if ACC_DTYPE == tl.float64:
        metric = head_sum / NUM_HEADS
    else:
        metric = tl.math.div_rn(head_sum, tl.full([BLOCK, BLOCK_D], NUM_HEADS, ACC_DTYPE))
    tl.store(metric_ptr + first_unit * head_dim + offs_j[:, None] * head_dim + offs_d[None, :],
             metric.to(metric_ptr.dtype.element_ty), mask=tile_mask)


def _block_starts(lengths: torch.Tensor, block: int) -> torch.Tensor:
    """[n + 1] int32: block_starts[i] = token blocks of the images before image i (device ops, no sync)."""
    blocks = (lengths.clamp(min=0) + block - 1) // block
    return torch.cat([blocks.new_zeros(1), blocks.cumsum(0)]).to(torch.int32)


def varlen_scores_and_metric(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, scale: float,
                             unit: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [T,H,d], cu_seqlens [n+1] -> (scores [T/unit] fp32, metric [T/unit, d] in k.dtype); see
    visionzip_kernels.varlen_scores_and_metric. Arguments are validated by the caller
    (visionzip_kernels), cu_seqlens' values too where reading them needs no host sync."""
    T, H, d = k.shape
    q, k = unit_last_stride(q), unit_last_stride(k)
    cu = cu_seqlens.to(k.device)
    units = T // unit
    scores = torch.empty(units, dtype=torch.float32, device=k.device)
    metric = torch.empty(units, d, dtype=k.dtype, device=k.device)
    n_images = cu.shape[0] - 1
    if T == 0 or n_images == 0:
        return scores, metric
    tiles = tile_config(k.dtype, d, INTERPRETED)
    lengths = cu[1:] - cu[:-1]
    # One allocation for the row maxima, the inverse row sums and the per-head column sums: O(T * H).
    workspace = torch.empty(3, H, T, dtype=torch.float32, device=k.device)
    row_max, inv_sum, per_head = workspace[0], workspace[1], workspace[2]
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1))
    qk_scale = float(scale) * LOG2_E
    with device_context(k):
        starts_m = _block_starts(lengths, tiles["BLOCK_M"])
        grid_m = (triton.cdiv(T, tiles["BLOCK_M"]) + n_images, H)
        _varlen_row_stats_kernel[grid_m](q, k, cu, starts_m, row_max, inv_sum, n_images, T, d, qk_scale, *strides,
                                         CHUNK=IMAGE_CHUNK, **tiles)
        starts_n = starts_m if tiles["BLOCK_N"] == tiles["BLOCK_M"] else _block_starts(lengths, tiles["BLOCK_N"])
        grid_n = (triton.cdiv(T, tiles["BLOCK_N"]) + n_images, H)
        _varlen_column_sums_kernel[grid_n](q, k, cu, starts_n, row_max, inv_sum, per_head, n_images, T, d, qk_scale,
                                           *strides, CHUNK=IMAGE_CHUNK, **tiles)
        _varlen_pool_kernel[(triton.cdiv(units, POOL_BLOCK),)](
            per_head, k, scores, metric, units, T, d, k.stride(0), k.stride(1), NUM_HEADS=H, UNIT=unit,
            BLOCK=POOL_BLOCK, BLOCK_D=head_block(d), ACC_DTYPE=accumulator_dtype(k.dtype), num_warps=4)
    return scores, metric
