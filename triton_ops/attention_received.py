"""Flash-style attention received on tensor cores: mean over heads and queries of softmax(q k^T) per
key token, never an N x N map, deterministic (fixed reduction orders, no atomics).

- Pass 1, ``_row_stats_kernel`` (grid: image*head, query block): each query row's softmax max and
  sum, online over the key blocks.
- Pass 2, ``_column_sums_kernel`` (grid: image*head, key block): the column sums of the normalised
  probabilities, looping over the query blocks in order.
- ``_head_mean_kernel`` (grid: image, token block): the sum over heads, in head order, / (H * N).

The logits are ``tl.dot``s of the fp16/bf16 inputs with fp32 accumulation (products of fp16/bf16
values are exact in fp32, so this loses nothing against upcasting first); fp32 inputs use IEEE fp32
dots, fp64 inputs are computed in fp32. A head dim that is not a power of two is split into two
power-of-two column tiles (72 -> 64 + 16) rather than padded to the next power (128). The softmax
runs in base 2: logits are scaled by ``scale * log2(e)`` once and exponentiated with exp2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import device_context, unit_last_stride
from .tiles import INTERPRETED, LOG2_E, qk_logits, row_tiles, tile_config

HEAD_MEAN_BLOCK = 256


@triton.jit
def _row_stats_kernel(q_ptr, k_ptr, max_ptr, sum_ptr, n_tokens, n_heads, head_dim, qk_scale,
                      stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr,
                      OPERAND: tl.constexpr, PRECISION: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)  # offsets exceed int32 for batches over 2**31 elements
    b = bh // n_heads
    h = bh % n_heads
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < n_tokens
    q_lo, q_hi = row_tiles(q_ptr + b * stride_qb + h * stride_qh, offs_m, m_mask, stride_qn, head_dim, D_LO, D_HI,
                            OPERAND)
    k_head = k_ptr + b * stride_kb + h * stride_kh
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range(0, n_tokens, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_tokens
        logits = qk_logits(q_lo, q_hi, k_head, offs_n, n_mask, stride_kn, head_dim, D_LO, D_HI, OPERAND,
                         PRECISION) * qk_scale
        logits = tl.where(n_mask[None, :], logits, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        row_sum = row_sum * tl.exp2(row_max - new_max) + tl.sum(tl.exp2(logits - new_max[:, None]), axis=1)
        row_max = new_max
    tl.store(max_ptr + bh * n_tokens + offs_m, row_max, mask=m_mask)
    tl.store(sum_ptr + bh * n_tokens + offs_m, 1.0 / row_sum, mask=m_mask)


@triton.jit
def _column_sums_kernel(q_ptr, k_ptr, max_ptr, inv_sum_ptr, out_ptr, n_tokens, n_heads, head_dim, qk_scale,
                        stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr,
                        OPERAND: tl.constexpr, PRECISION: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)  # offsets exceed int32 for batches over 2**31 elements
    b = bh // n_heads
    h = bh % n_heads
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_tokens
    k_head = k_ptr + b * stride_kb + h * stride_kh
    q_head = q_ptr + b * stride_qb + h * stride_qh
    # k^T is the fixed operand here: logits^T [BLOCK_N, BLOCK_M] = k . q^T, so the column sums are
    # row sums of the tile.
    k_lo, k_hi = row_tiles(k_head, offs_n, n_mask, stride_kn, head_dim, D_LO, D_HI, OPERAND)
    received = tl.zeros([BLOCK_N], tl.float32)
    for m0 in range(0, n_tokens, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < n_tokens
        row_max = tl.load(max_ptr + bh * n_tokens + offs_m, mask=m_mask, other=0.0)
        inv_sum = tl.load(inv_sum_ptr + bh * n_tokens + offs_m, mask=m_mask, other=0.0)
        logits_t = qk_logits(k_lo, k_hi, q_head, offs_m, m_mask, stride_qn, head_dim, D_LO, D_HI, OPERAND,
                           PRECISION) * qk_scale
        probs_t = tl.exp2(logits_t - row_max[None, :]) * inv_sum[None, :]
        received += tl.sum(tl.where(m_mask[None, :], probs_t, 0.0), axis=1)
    tl.store(out_ptr + bh * n_tokens + offs_n, received, mask=n_mask)


@triton.jit
def _head_mean_kernel(per_head_ptr, out_ptr, n_tokens, divisor, NUM_HEADS: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_tokens
    total = tl.zeros([BLOCK], tl.float32)
    for h in range(NUM_HEADS):
        total += tl.load(per_head_ptr + (b * NUM_HEADS + h) * n_tokens + offs, mask=mask, other=0.0)
    tl.store(out_ptr + b * n_tokens + offs, total / divisor, mask=mask)


def attention_received(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """q, k [B,N,H,d] -> [B,N] fp32: mean over heads and queries of the attention each key receives.
    Arguments are validated by the caller (visionzip_kernels)."""
    return received_scores(unit_last_stride(q), unit_last_stride(k), scale)


def received_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """The launches of :func:`attention_received`, for validated q/k with unit-stride last dims."""
    B, N, H, d = k.shape
    out = torch.empty(B, N, dtype=torch.float32, device=k.device)
    if B == 0:
        return out
    # One allocation for the row maxima, the inverse row sums and the per-head column sums.
    workspace = torch.empty(3, B * H, N, dtype=torch.float32, device=k.device)
    row_max, inv_sum, per_head = workspace[0], workspace[1], workspace[2]
    tiles = tile_config(k.dtype, d, INTERPRETED)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    qk_scale = float(scale) * LOG2_E
    block = min(HEAD_MEAN_BLOCK, triton.next_power_of_2(N))
    with device_context(k):
        _row_stats_kernel[(B * H, -(-N // tiles["BLOCK_M"]))](q, k, row_max, inv_sum, N, H, d, qk_scale, *strides,
                                                              **tiles)
        # Pass 2 swaps the roles: its fixed tile is a key block, its loop runs over query blocks.
        _column_sums_kernel[(B * H, -(-N // tiles["BLOCK_N"]))](q, k, row_max, inv_sum, per_head, N, H, d, qk_scale,
                                                                *strides, **tiles)
        _head_mean_kernel[(B, -(-N // block))](per_head, out, N, float(H * N), NUM_HEADS=H, BLOCK=block)
    return out
