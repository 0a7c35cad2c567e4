"""Head-mean CLS attention from q/k, optionally fused with the top-k of the dominant tokens.

One program per image loops over the heads in order (deterministic, no atomics). Per head: a pass
over the key blocks for the softmax's max and sum (online), then a pass that adds the normalised
probabilities into the image's output row. Only the CLS query row is ever formed: O(H*N*d) work and
no N x N map. With top-k fused, the same program then selects keep from the finished row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from visionzip_kernels import _validation as check

from ._launch import device_context, head_block, unit_last_stride
from .topk import check_topk_size, select_topk_row

BLOCK_N = 64


@triton.jit
def _cls_logits(q, k_ptr, offs_n, n_mask, offs_d, d_mask, stride_kn, scale):
    k = tl.load(k_ptr + offs_n[:, None] * stride_kn + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :],
                other=0.0).to(tl.float32)
    logits = tl.sum(k * q[None, :], axis=1) * scale
    return tl.where(n_mask, logits, float("-inf"))


@triton.jit
def _cls_attention_kernel(q_ptr, k_ptr, out_ptr, keep_ptr, n_tokens, n_heads, head_dim, scale, dominant,
                          stride_qb, stride_qh, stride_kb, stride_kn, stride_kh, stride_ob, stride_keepb,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_ALL: tl.constexpr,
                          FUSE_TOPK: tl.constexpr, KEEP_CLS: tl.constexpr):
    b = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    offs = tl.arange(0, BLOCK_N)
    out_row = out_ptr + b * stride_ob
    for n0 in range(0, n_tokens, BLOCK_N):
        tl.store(out_row + n0 + offs, tl.zeros([BLOCK_N], tl.float32), mask=n0 + offs < n_tokens)
    for h in range(0, n_heads):
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        k_head = k_ptr + b * stride_kb + h * stride_kh
        row_max = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), axis=0)
        row_sum = tl.sum(tl.zeros([BLOCK_N], tl.float32), axis=0)
        for n0 in range(0, n_tokens, BLOCK_N):
            offs_n = n0 + offs
            logits = _cls_logits(q, k_head, offs_n, offs_n < n_tokens, offs_d, d_mask, stride_kn, scale)
            new_max = tl.maximum(row_max, tl.max(logits, axis=0))
            row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(logits - new_max), axis=0)
            row_max = new_max
        for n0 in range(0, n_tokens, BLOCK_N):
            offs_n = n0 + offs
            n_mask = offs_n < n_tokens
            logits = _cls_logits(q, k_head, offs_n, n_mask, offs_d, d_mask, stride_kn, scale)
            acc = tl.load(out_row + offs_n, mask=n_mask, other=0.0)
            tl.store(out_row + offs_n, acc + tl.exp(logits - row_max) / row_sum, mask=n_mask)
    for n0 in range(0, n_tokens, BLOCK_N):
        offs_n = n0 + offs
        n_mask = offs_n < n_tokens
        tl.store(out_row + offs_n, tl.load(out_row + offs_n, mask=n_mask, other=0.0) / n_heads, mask=n_mask)
    if FUSE_TOPK:
        tl.debug_barrier()  # the row was written by every thread of the program
        offs_all = tl.arange(0, BLOCK_ALL)
        scores = tl.load(out_row + offs_all, mask=offs_all < n_tokens, other=0.0)
        select_topk_row(scores, offs_all, n_tokens, dominant, keep_ptr + b * stride_keepb, KEEP_CLS)


def _launch(q_cls: torch.Tensor, k: torch.Tensor, scale: float, dominant: int, keep_cls: bool, fuse_topk: bool):
    q_cls, k = unit_last_stride(q_cls), unit_last_stride(k)
    B, N, H, d = k.shape
    out = torch.empty(B, N, dtype=torch.float32, device=k.device)
    keep = torch.empty(B, dominant if fuse_topk else 0, dtype=torch.int64, device=k.device)
    if B == 0:
        return out, keep
    with device_context(k):
        _cls_attention_kernel[(B,)](
            q_cls, k, out, keep, N, H, d, float(scale), dominant,
            q_cls.stride(0), q_cls.stride(1), k.stride(0), k.stride(1), k.stride(2), out.stride(0),
            max(keep.stride(0), 1),
            BLOCK_N=BLOCK_N, BLOCK_D=head_block(d), BLOCK_ALL=triton.next_power_of_2(N) if fuse_topk else 16,
            FUSE_TOPK=fuse_topk, KEEP_CLS=keep_cls, num_warps=4,
        )
    return out, keep


def cls_attention(q_cls: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """q_cls [B,H,d], k [B,N,H,d] (last dim unit-stride, any other strides) -> [B,N] fp32."""
    check.cls_attention_args(q_cls, k)
    return _launch(q_cls, k, scale, 0, True, fuse_topk=False)[0]


def cls_attention_topk(q_cls: torch.Tensor, k: torch.Tensor, scale: float, dominant: int,
                       keep_cls: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and keep in one launch: -> (scores [B,N] fp32, keep [B,D] int64 ascending)."""
    check.cls_attention_args(q_cls, k)
    check.check_budget("cls_attention_topk", k.shape[1], dominant, 0, keep_cls)
    check_topk_size("cls_attention_topk", k.shape[1])
    return _launch(q_cls, k, scale, dominant, keep_cls, fuse_topk=True)
