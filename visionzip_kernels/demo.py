"""The main job: VisionZip on a realistic batch, ours vs the PyTorch reference vs the upstream path.

    python -m visionzip_kernels.demo [--batch 8] [--budget 64] [--dtype float32] ...

Builds one encoder layer's worth of inputs at LLaVA-1.5 geometry (CLIP ViT-L/14-336: N = 577
tokens, C = 1024, 16 heads of 64), with attention peaked like a trained CLIP's, then compresses it
three ways and prints time per image, peak extra memory and agreement with our ops.
"""

from __future__ import annotations

import argparse
import sys

import torch

from . import reference
from .api import BUDGETS, compress
from .profiling import format_bytes, measure
from .upstream import full_attention, upstream_select_merge

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m visionzip_kernels.demo",
        description="Compress a realistic batch of visual tokens with VisionZip three ways and compare.",
    )
    parser.add_argument("--batch", type=int, default=8, help="images in the batch, B (default 8)")
    parser.add_argument("--tokens", type=int, default=577, help="tokens per image incl. CLS, N (default 577)")
    parser.add_argument("--channels", type=int, default=1024, help="hidden size, C (default 1024)")
    parser.add_argument("--heads", type=int, default=16, help="attention heads, H (default 16)")
    parser.add_argument("--head-dim", type=int, default=64, help="head dim, d (default 64)")
    parser.add_argument(
        "--budget", type=int, default=64, choices=sorted(BUDGETS),
        help="tokens kept per image: 64 = 54+10, 128 = 108+20, 192 = 162+30 (default 64)",
    )
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="input dtype (default float32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per path; the median is shown (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return parser.parse_args(argv)


def make_layer_inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [B,N,C] and q, k [B,N,H,d] as views of [B,N,H*d] projections. q and k are drawn with a
    larger spread than unit Gaussians so that CLS attention concentrates on a few tokens."""
    g = torch.Generator().manual_seed(args.seed)
    B, N, H, d = args.batch, args.tokens, args.heads, args.head_dim
    dtype = DTYPES[args.dtype]
    hidden = torch.randn(B, N, args.channels, generator=g).to(dtype)
    q = (1.5 * torch.randn(B, N, H * d, generator=g)).to(dtype).view(B, N, H, d)
    k = (1.5 * torch.randn(B, N, H * d, generator=g)).to(dtype).view(B, N, H, d)
    return hidden, q, k


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dominant, contextual = BUDGETS[args.budget]
    hidden, q, k = make_layer_inputs(args)
    scale = args.head_dim**-0.5
    B = args.batch

    def ours():
        return compress(hidden, q=q, k=k, dominant=dominant, contextual=contextual)

    def pytorch_reference():
        scores = reference.cls_attention(q[:, 0], k, scale)
        return reference.select_merge(hidden, scores, k.mean(dim=2), dominant, contextual)

    def upstream():
        attn = full_attention(q, k, scale)
        return upstream_select_merge(attn, hidden, k.mean(dim=2), dominant, contextual)

    print(
        f"VisionZip demo: B={B} images, N={args.tokens} tokens, C={args.channels}, H={args.heads}, "
        f"d={args.head_dim}, {args.dtype}, budget {dominant}+{contextual} = {args.budget} tokens, "
        f"{torch.get_num_threads()} CPU threads",
        flush=True,
    )
    tokens_ours, keep_ours = ours()
    rows = []
    for name, fn in (("ours (visionzip ops)", ours), ("PyTorch reference", pytorch_reference),
                     ("upstream-style path", upstream)):
        print(f"  timing {name} ...", flush=True)
        m = measure(fn, name, repeats=args.repeats)
        tokens, keep = fn()
        same_keep = bool(torch.equal(keep.sort(dim=1).values, keep_ours))
        diff = (tokens.double() - tokens_ours.double()).abs().max().item()
        rows.append((m, same_keep, diff))
    base = rows[0][0].median_s
    header = f"{'path':<22} {'tokens in->out':>15} {'ms/image':>9} {'time vs ours':>13} {'peak extra mem':>15} {'same keep':>10} {'max |diff|':>11}"
    print()
    print(header)
    print("-" * len(header))
    for m, same_keep, diff in rows:
        print(
            f"{m.name:<22} {f'{args.tokens}->{dominant + contextual}':>15} {1e3 * m.median_s / B:>9.3f} "
            f"{m.median_s / base:>12.1f}x {format_bytes(m.peak_bytes):>15} {str(same_keep):>10} {diff:>11.2e}"
        )
    print(f"\noutput tokens: {tuple(tokens_ours.shape)} {tokens_ours.dtype}; keep: {tuple(keep_ours.shape)}")
    if not rows[2][1]:
        print(f"note: the upstream path computes attention in {args.dtype}; its rounded scores tie or swap "
              "near the top-k boundary, so it keeps some other tokens. Ours and the reference score in float32.")
    return 0 if rows[1][1] else 1


if __name__ == "__main__":
    sys.exit(main())
