"""Pictures of what VisionZip kept: dominant patches and contextual groups on the image's patch grid.

    from examples.visualize import token_groups, Panel, save_png

:func:`token_groups` recomputes, from layer L's merge metric and ``keep``, which contextual group each
token was merged into (docs/SPEC.md "Merging"; the ops return only the merged tokens). :func:`save_png`
draws, for each image, the CLS attention heat map and the selection: dominant patches at full
brightness with a white outline, every other patch tinted with the colour of its contextual group
(the group's target marked with a dot). matplotlib makes the figure when it is installed; otherwise
PIL draws the same tiles with plain captions.
"""

from __future__ import annotations

import colorsys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Panel", "group_colors", "save_png", "token_groups"]


def token_groups(metric: torch.Tensor, keep: torch.Tensor, contextual: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which contextual group every token went to.

    Args:
        metric: [B, N, d] layer L's merge metric (head-mean of the keys).
        keep: [B, D] the dominant tokens (ascending).
        contextual: K.
    Returns:
        groups [B, N] int64: -1 for dominant tokens, else the contextual group 0..K-1 (a group's target
        belongs to its own group); targets [B, K] int64: the token index of each group's target.
    """
    B, N, _ = metric.shape
    D = keep.shape[1]
    groups = torch.full((B, N), -1, dtype=torch.int64)
    targets = torch.empty((B, contextual), dtype=torch.int64)
    if contextual == 0:
        return groups, targets
    kept = torch.zeros(B, N, dtype=torch.bool).scatter_(1, keep.cpu(), True)
    for b in range(B):
        rest = (~kept[b]).nonzero().squeeze(1)  # ascending
        unit = F.normalize(metric[b, rest].float().cpu(), dim=-1)
        step = max(1, (N - D) // contextual)
        target_pos = torch.arange(contextual) * step
        assign = (unit @ unit[target_pos].T).argmax(dim=1)  # first maximum wins
        assign[target_pos] = torch.arange(contextual)
        groups[b, rest] = assign
        targets[b] = rest[target_pos]
    return groups, targets


def group_colors(k: int) -> np.ndarray:
    """[k, 3] uint8 distinct colours (golden-ratio hues)."""
    colors = [colorsys.hsv_to_rgb((0.08 + i * 0.618034) % 1.0, 0.75, 0.95) for i in range(k)]
    return (np.array(colors).reshape(k, 3) * 255).astype(np.uint8)


@dataclass
class Panel:
    """One image's selection on its patch grid.

    image: the region the grid covers (PIL image or HxWx3 uint8), shown at its own aspect ratio.
    grid: (rows, cols) of patches. groups: [tokens] as from :func:`token_groups`; with ``cls_token``
    token 0 is the CLS token (not drawn) and patch p is token p + 1. targets: [K] token indices.
    scores: [tokens] the selection scores (CLS attention), drawn as a heat map when given.
    """

    image: object
    grid: tuple[int, int]
    groups: torch.Tensor
    targets: torch.Tensor
    title: str = ""
    scores: torch.Tensor | None = None
    cls_token: bool = True


def _pil(image):
    from PIL import Image

    return image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image)).convert("RGB")


def _cell_boxes(grid: tuple[int, int], size: tuple[int, int]):
    rows, cols = grid
    w, h = size
    ys = np.round(np.linspace(0, h, rows + 1)).astype(int)
    xs = np.round(np.linspace(0, w, cols + 1)).astype(int)
    return xs, ys


def _upsample(cells: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[rows, cols, ...] per-cell values -> [h, w, ...] by nearest neighbour over the cell boxes."""
    rows, cols = cells.shape[:2]
    w, h = size
    yi = np.minimum((np.arange(h) * rows) // h, rows - 1)
    xi = np.minimum((np.arange(w) * cols) // w, cols - 1)
    return cells[yi][:, xi]


def _heat_colors(values: np.ndarray) -> np.ndarray:
    """[...] in [0, 1] -> [..., 3] float, a black-red-yellow-white ramp."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    stops = np.array([[0.0, 0.0, 0.0], [0.75, 0.05, 0.05], [1.0, 0.8, 0.1], [1.0, 1.0, 1.0]])
    pos = v * (len(stops) - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, len(stops) - 2)
    frac = pos - lo
    return stops[lo[..., 0]] * (1 - frac) + stops[lo[..., 0] + 1] * frac


def render_tiles(panel: Panel, height: int = 336) -> tuple[Image.Image, Image.Image]:  # noqa: F821
    """(heat-map tile, selection tile) for one panel, ``height`` pixels high."""
    from PIL import Image, ImageDraw

    image = _pil(panel.image)
    width = max(1, round(image.width * height / image.height))
    base = np.asarray(image.resize((width, height), resample=Image.BICUBIC), dtype=np.float32) / 255.0
    rows, cols = panel.grid
    offset = 1 if panel.cls_token else 0
    groups = panel.groups.cpu().numpy()[offset:offset + rows * cols].reshape(rows, cols)

    # Heat map of the scores over the patches (CLS token excluded), normalised to its maximum.
    if panel.scores is not None:
        s = panel.scores.float().cpu().numpy()[offset:offset + rows * cols].reshape(rows, cols)
        heat = _heat_colors(_upsample(s / max(float(s.max()), 1e-12), (width, height)))
        heat_tile = 0.45 * base + 0.55 * heat
    else:
        heat_tile = base
    heat_img = Image.fromarray((heat_tile * 255).astype(np.uint8))

    # Selection: dominant patches as they are, the others dimmed and tinted by their group.
    k = int(groups.max()) + 1 if (groups >= 0).any() else 0
    colors = group_colors(max(k, 1)).astype(np.float32) / 255.0
    cell_rgb = np.zeros((rows, cols, 3), dtype=np.float32)
    dominant = groups < 0
    cell_rgb[~dominant] = colors[groups[~dominant]]
    up_rgb = _upsample(cell_rgb, (width, height))
    up_dom = _upsample(dominant, (width, height))[..., None]
    gray = base.mean(axis=2, keepdims=True)
    merged = 0.35 * (0.5 * base + 0.5 * gray) + 0.55 * up_rgb
    sel = np.where(up_dom, base, merged)
    sel_img = Image.fromarray((np.clip(sel, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(sel_img)
    xs, ys = _cell_boxes(panel.grid, (width, height))
    for r, c in zip(*np.nonzero(dominant)):
        draw.rectangle([xs[c], ys[r], xs[c + 1] - 1, ys[r + 1] - 1], outline=(255, 255, 255), width=1)
    for t in panel.targets.cpu().tolist():
        p = t - offset
        if 0 <= p < rows * cols:
            r, c = divmod(p, cols)
            cx, cy = (xs[c] + xs[c + 1]) / 2, (ys[r] + ys[r + 1]) / 2
            rad = max(2.0, min(xs[c + 1] - xs[c], ys[r + 1] - ys[r]) / 3)
            draw.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], fill=(0, 0, 0), outline=(255, 255, 255))
    return heat_img, sel_img


def _legend_text(panels: list[Panel]) -> str:
    return ("left: CLS attention of the scoring layer (brighter = more); right: dominant patches kept as they "
            "are (bright, outlined), every other patch tinted by the contextual token it was merged into "
            "(dot = that group's target)")


def save_png(
    path: str | Path, panels: list[Panel], suptitle: str = "", backend: str = "auto", height: int = 336
) -> str:
    """Write the figure; returns the backend used ("matplotlib" or "pil")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tiles = [render_tiles(p, height) for p in panels]
    if backend == "auto":
        try:
            import matplotlib  # noqa: F401

            backend = "matplotlib"
        except ImportError:
            backend = "pil"
    if backend == "matplotlib":
        _save_matplotlib(path, panels, tiles, suptitle)
    elif backend == "pil":
        _save_pil(path, panels, tiles, suptitle)
    else:
        raise ValueError(f"backend must be 'auto', 'matplotlib' or 'pil', got {backend!r}")
    return backend


def _save_matplotlib(path: Path, panels: list[Panel], tiles, suptitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    widths = [max(h.width for h, _ in tiles)] * 2
    n = len(panels)
    fig_w = 2 * widths[0] / 100 + 0.6
    fig, axes = plt.subplots(n, 2, figsize=(fig_w, n * 3.6 + 0.9), squeeze=False)
    for row, (panel, (heat, sel)) in enumerate(zip(panels, tiles)):
        for col, (tile, label) in enumerate(((heat, "CLS attention"), (sel, "dominant / contextual groups"))):
            ax = axes[row][col]
            ax.imshow(np.asarray(tile), interpolation="nearest")
            ax.set_title(f"{panel.title}: {label}" if panel.title else label, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.text(0.5, 0.005, _legend_text(panels), ha="center", va="bottom", fontsize=6.5, wrap=True)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97 if suptitle else 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _save_pil(path: Path, panels: list[Panel], tiles, suptitle: str) -> None:
    from PIL import Image, ImageDraw

    pad, caption = 8, 14
    tile_w = max(h.width for h, _ in tiles)
    tile_h = max(h.height for h, _ in tiles)
    tile_w = max(h.width for h, _ in tiles)
    lines = len(textwrap.wrap(_legend_text(panels), width=max(40, (2 * tile_w + 3 * pad) // 6)))
    header = caption * (lines + (1 if suptitle else 0)) + pad
    width = 2 * tile_w + 3 * pad
    height = header + len(tiles) * (tile_h + caption + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = pad // 2
    if suptitle:
        draw.text((pad, y), suptitle, fill=(0, 0, 0))
        y += caption
    for line in textwrap.wrap(_legend_text(panels), width=max(40, width // 6)):
        draw.text((pad, y), line, fill=(60, 60, 60))
        y += caption
    y = max(y, header)
    for panel, (heat, sel) in zip(panels, tiles):
        draw.text((pad, y), panel.title, fill=(0, 0, 0))
        y += caption
        canvas.paste(heat, (pad, y))
        canvas.paste(sel, (2 * pad + tile_w, y))
        y += tile_h + pad
    canvas.save(path)
