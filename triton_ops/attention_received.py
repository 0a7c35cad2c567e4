"""Flash-style attention received: mean over heads and queries of softmax(q k^T) per key token.

Pass 1 (grid: image*head, query block): each query row's softmax max and sum, online over the key
blocks. Pass 2 (grid: image*head, key block): the column sums of the normalised probabilities,
looping over the query blocks in order. No float atomics, never an N x N map; the last reduction
over heads is a fixed-order torch sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from visionzip_kernels import _validation as check

from ._launch import device_context, head_block, unit_last_stride

BLOCK_M = 64
BLOCK_N = 64


@triton.jit
def _load_rows(ptr, offs_rows, row_mask, stride_row, offs_d, d_mask):
    return tl.load(ptr + offs_rows[:, None] * stride_row + offs_d[None, :], mask=row_mask[:, None] & d_mask[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _row_stats_kernel(q_ptr, k_ptr, max_ptr, sum_ptr, n_tokens, n_heads, head_dim, scale,
                      stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // n_heads
    h = bh % n_heads
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < n_tokens
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    q = _load_rows(q_ptr + b * stride_qb + h * stride_qh, offs_m, m_mask, stride_qn, offs_d, d_mask)
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range(0, n_tokens, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_tokens
        k = _load_rows(k_ptr + b * stride_kb + h * stride_kh, offs_n, n_mask, stride_kn, offs_d, d_mask)
        logits = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        logits = tl.where(n_mask[None, :], logits, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        row_max = new_max
    tl.store(max_ptr + bh * n_tokens + offs_m, row_max, mask=m_mask)
    tl.store(sum_ptr + bh * n_tokens + offs_m, row_sum, mask=m_mask)


@triton.jit
def _column_sums_kernel(q_ptr, k_ptr, max_ptr, sum_ptr, out_ptr, n_tokens, n_heads, head_dim, scale,
                        stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // n_heads
    h = bh % n_heads
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_tokens
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    k = _load_rows(k_ptr + b * stride_kb + h * stride_kh, offs_n, n_mask, stride_kn, offs_d, d_mask)
    received = tl.zeros([BLOCK_N], tl.float32)
    for m0 in range(0, n_tokens, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < n_tokens
        q = _load_rows(q_ptr + b * stride_qb + h * stride_qh, offs_m, m_mask, stride_qn, offs_d, d_mask)
        row_max = tl.load(max_ptr + bh * n_tokens + offs_m, mask=m_mask, other=0.0)
        row_sum = tl.load(sum_ptr + bh * n_tokens + offs_m, mask=m_mask, other=1.0)
        logits = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        probs = tl.exp(logits - row_max[:, None]) / row_sum[:, None]
        probs = tl.where(m_mask[:, None] & n_mask[None, :], probs, 0.0)
        received += tl.sum(probs, axis=0)
    tl.store(out_ptr + bh * n_tokens + offs_n, received, mask=n_mask)


def attention_received(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """q, k [B,N,H,d] -> [B,N] fp32: mean over heads and queries of the attention each key receives."""
    check.attention_received_args(q, k)
    q, k = unit_last_stride(q), unit_last_stride(k)
    B, N, H, d = k.shape
    if B == 0:
        return torch.empty(0, N, dtype=torch.float32, device=k.device)
    row_max = torch.empty(B * H, N, dtype=torch.float32, device=k.device)
    row_sum = torch.empty_like(row_max)
    per_head = torch.empty_like(row_max)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    blocks = dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=head_block(d))
    with device_context(k):
        _row_stats_kernel[(B * H, triton.cdiv(N, BLOCK_M))](q, k, row_max, row_sum, N, H, d, float(scale), *strides,
                                                            **blocks)
        _column_sums_kernel[(B * H, triton.cdiv(N, BLOCK_N))](q, k, row_max, row_sum, per_head, N, H, d,
                                                              float(scale), *strides, **blocks)
    return per_head.view(B, H, N).sum(dim=1) / (H * N)
