"""Tile helpers shared by the Triton kernels: head-dim tiling, the q . k^T logits on tensor cores,
the tile configuration of the attention passes, and the constants they use.

``qk_logits`` and ``row_tiles`` are used by the dense passes (attention_received.py) and the packed ones
(varlen_scores.py) alike; the kernels call them with the constexprs ``tile_config`` returns.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

# Read once, at import, as triton itself reads it (the @triton.jit decorators depend on it).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# The softmaxes run in base 2: logits scaled by scale * log2(e) once, exponentiated with exp2.
LOG2_E = 1.0 / math.log(2.0)


def head_block(head_dim: int) -> int:
    """Head dims such as 72 or 80 are padded to a power of two and masked; tl.dot needs >= 16."""
    return max(16, triton.next_power_of_2(head_dim))


def head_split(head_dim: int) -> tuple[int, int]:
    """A head dim as two power-of-two column tiles for tl.dot (each >= 16, the second 0 when one
    suffices): 64 -> (64, 0), 72 -> (64, 16), 80 -> (64, 16), 96 -> (64, 32), so a d = 72 head does
    80 columns of MMA work rather than the 128 of one padded tile."""
    if head_dim <= 16:
        return 16, 0
    low = triton.next_power_of_2(head_dim) // 2 if head_dim & (head_dim - 1) else head_dim
    rest = head_dim - low
    return low, (max(16, triton.next_power_of_2(rest)) if rest else 0)


def accumulator_dtype(dtype: torch.dtype):
    """Sums run in fp32 for every input dtype but fp64, which keeps its precision."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@functools.lru_cache(maxsize=64)
def tile_config(dtype: torch.dtype, head_dim: int, interpreted: bool) -> dict:
    """Constexprs and warps of the attention passes for one dtype and head dim.

    fp16/bf16 run on tensor cores as stored, on 64 x 64 tiles. fp32 (and fp64, computed in fp32) run
    IEEE fp32 dots on 32 x 32 tiles: larger ones spill registers on sm_90 (tests/test_triton_compile.py
    compiles every configuration and checks). The interpreter's dot is numpy's, which cannot
    multiply bf16: there bf16 operands are widened to fp32, exactly.
    """
    d_lo, d_hi = head_split(head_dim)
    if dtype == torch.float16 or (dtype == torch.bfloat16 and not interpreted):
        operand = tl.float16 if dtype == torch.float16 else tl.bfloat16
        return dict(BLOCK_M=64, BLOCK_N=64, D_LO=d_lo, D_HI=d_hi, OPERAND=operand, PRECISION="tf32", num_warps=4)
    return dict(BLOCK_M=32, BLOCK_N=32, D_LO=d_lo, D_HI=d_hi, OPERAND=tl.float32, PRECISION="ieee", num_warps=4)


@triton.jit
def load_tile(ptr, offs_rows, row_mask, stride_row, col0, head_dim, COLS: tl.constexpr, OPERAND: tl.constexpr):
    """Rows ``offs_rows``, columns ``col0 .. col0 + COLS`` (masked to the head dim), as OPERAND."""
    offs_c = col0 + tl.arange(0, COLS)
    tile = tl.load(ptr + offs_rows[:, None] * stride_row + offs_c[None, :],
                   mask=row_mask[:, None] & (offs_c < head_dim)[None, :], other=0.0)
    return tile.to(OPERAND)


@triton.jit
def qk_logits(q_lo, q_hi, k_ptr, offs_n, n_mask, stride_kn, head_dim, D_LO: tl.constexpr, D_HI: tl.constexpr,
           OPERAND: tl.constexpr, PRECISION: tl.constexpr):
    """[rows of q, BLOCK of k] fp32 = q . k^T over both column tiles, unscaled: the dot runs on the
    operands as stored (scaling q first would round it again) and the caller scales the fp32 logits."""
    k_lo = load_tile(k_ptr, offs_n, n_mask, stride_kn, 0, head_dim, D_LO, OPERAND)
    acc = tl.dot(q_lo, tl.trans(k_lo), input_precision=PRECISION, out_dtype=tl.float32)
    if D_HI > 0:
        k_hi = load_tile(k_ptr, offs_n, n_mask, stride_kn, D_LO, head_dim, D_HI, OPERAND)
        acc = tl.dot(q_hi, tl.trans(k_hi), acc, input_precision=PRECISION, out_dtype=tl.float32)
    return acc


@triton.jit
def row_tiles(ptr, offs_rows, row_mask, stride_row, head_dim, D_LO: tl.constexpr, D_HI: tl.constexpr,
              OPERAND: tl.constexpr):
    """A block of rows as its two column tiles; when D_HI == 0 there is one, returned twice (``qk_logits``
    never reads the second then)."""
    lo = load_tile(ptr, offs_rows, row_mask, stride_row, 0, head_dim, D_LO, OPERAND)
    hi = lo
    if D_HI > 0:
        hi = load_tile(ptr, offs_rows, row_mask, stride_row, D_LO, head_dim, D_HI, OPERAND)
    return lo, hi
