"""Upstream's way for Qwen2-VL / Qwen2.5-VL, written the way upstream's port computes it: the stock
tower runs, the last block's input and rotary (cos, sin) are taken by a hook, q/k are recomputed
from ``norm1`` and ``qkv`` with the rotate-half formula, the whole [H, T, T] softmax is materialised,
mean over heads, sum over rows, mean per merge unit of 4, ``argsort(window_index)``, then topk,
masks, bmm similarity and a one-hot bmm merge, the kept tokens put back in original order.

Used as the tests' oracle (one image at a time, so attention is the image's own) and as the
benchmark's "upstream" path (``packed=True``: all images in one softmax, as upstream does).
"""

from __future__ import annotations

import torch

UNIT = 4  # tokens per 2x2 merge unit


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def stock_image_features_with_last_block(model, pixels: torch.Tensor, grid: torch.Tensor, video: bool = False):
    """The unpatched model's ``get_image_features`` (``video``: ``get_video_features``) output, the last
    block's input [T, C] and its rotary (cos, sin), read by a pre-hook on that block during the stock call."""
    block = model.model.visual.blocks[-1]
    seen = {}

    def take_block_inputs(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]
        seen["cos_sin"] = kwargs["position_embeddings"]

    handle = block.register_forward_pre_hook(take_block_inputs, with_kwargs=True)
    try:
        out = (model.model.get_video_features if video else model.model.get_image_features)(pixels, grid)
    finally:
        handle.remove()
    return out, seen["x"], seen["cos_sin"]


def stock_tower_with_last_block(model, pixels: torch.Tensor, grid: torch.Tensor):
    """The unpatched model's image features: (merged tokens [T/4, C_llm] in original order,
    the last block's input [T, C], its rotary (cos, sin))."""
    out, x, cos_sin = stock_image_features_with_last_block(model, pixels, grid)
    return torch.cat(list(out.pooler_output)), x, cos_sin


def upstream_scores_and_metric(model, x: torch.Tensor, cos_sin, grid: torch.Tensor, segments: list[int] | None = None):
    """Eager full softmax over all T tokens of ``x`` (images attend to each other when several are
    packed, as upstream does), or over each of ``segments`` (token counts: a video's temporal slices,
    consecutive in window order too) on its own: (scores [T/4], metric [T/4, d]) in original order."""
    visual = model.model.visual
    block = visual.blocks[-1]
    x = block.norm1(x)
    T = x.shape[0]
    heads = block.attn.num_heads
    q, k, _ = block.attn.qkv(x).reshape(T, 3, heads, -1).permute(1, 0, 2, 3)
    cos, sin = (t.unsqueeze(-2).float() for t in cos_sin)
    q = (q.float() * cos + _rotate_half(q.float()) * sin).to(x.dtype)
    k = (k.float() * cos + _rotate_half(k.float()) * sin).to(x.dtype)
    d = q.shape[-1]
    received = []
    for q_part, k_part in zip(q.split(segments or [T]), k.split(segments or [T])):
        attn = torch.softmax(torch.matmul(q_part.transpose(0, 1), k_part.transpose(0, 1).transpose(1, 2)) * d**-0.5,
                             dim=-1)
        received.append(attn.mean(dim=0).sum(dim=0))  # mean over heads, sum over query rows
    received = torch.cat(received)  # [T]
    scores = received.view(-1, UNIT).mean(dim=1)  # per merge unit, window order
    metric = k.view(-1, UNIT, heads, d).mean(dim=1)
    if hasattr(visual, "window_size"):  # Qwen2.5-VL: back to the original order
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size,
                                                  visual.patch_size)
        reverse = torch.argsort(window_index)
        scores, metric = scores[reverse], metric[reverse]
    return scores, metric.mean(dim=1)


def upstream_select_merge(tokens: torch.Tensor, scores: torch.Tensor, metric: torch.Tensor, dominant: int,
                          contextual: int):
    """One image: topk, masks, bmm, one-hot merge; (kept positions [D+K] ascending, kept tokens)."""
    N, C = tokens.shape
    dominant_idx = scores.topk(dominant).indices
    mask = torch.ones(N, dtype=torch.bool, device=tokens.device)
    mask[dominant_idx] = False
    rest = mask.nonzero().squeeze(1)
    metric_rest = metric[mask]
    hidden_rest = tokens.masked_select(mask.unsqueeze(-1)).view(-1, C)
    normed = metric_rest / metric_rest.norm(dim=-1, keepdim=True)
    step = max(1, normed.shape[0] // contextual)
    targets = torch.arange(0, normed.shape[0], step, device=tokens.device)[:contextual]
    not_target = ~torch.isin(torch.arange(normed.shape[0], device=tokens.device), targets)
    similarity = torch.bmm(normed[not_target][None], normed[targets].T[None])[0]
    one_hot = torch.zeros(int(not_target.sum()), contextual, dtype=tokens.dtype, device=tokens.device)
    one_hot.scatter_(1, similarity.argmax(dim=1, keepdim=True), 1)
    counts = one_hot.sum(dim=0).clamp(min=1).unsqueeze(-1)
    merged = torch.bmm(one_hot.T[None], hidden_rest[not_target][None])[0] / counts
    contextual_tokens = hidden_rest[targets] + merged
    positions = torch.cat([dominant_idx, rest[targets]])
    order = positions.argsort()
    return positions[order], torch.cat([tokens[dominant_idx], contextual_tokens])[order]


def budget(n: int, dominant: float = 0.65, contextual: float = 0.05) -> tuple[int, int]:
    """Upstream's per-image budget: int(0.65 N) dominant, max(int(0.05 N), 1) contextual."""
    return int(dominant * n), max(int(contextual * n), 1)


def upstream_way(model, pixels: torch.Tensor, grid: torch.Tensor, dominant: float = 0.65, contextual: float = 0.05):
    """The whole upstream path for the images of ``grid`` (one softmax over all of them):
    (per-image kept positions, per-image kept tokens, scores [T/4])."""
    tokens, x, cos_sin = stock_tower_with_last_block(model, pixels, grid)
    scores, metric = upstream_scores_and_metric(model, x, cos_sin, grid)
    merge = model.model.visual.spatial_merge_size ** 2
    positions, kept, start = [], [], 0
    for t, h, w in grid.tolist():
        n = t * h * w // merge
        d, k = budget(n, dominant, contextual)
        p, tok = upstream_select_merge(tokens[start:start + n], scores[start:start + n], metric[start:start + n], d, k)
        positions.append(p)
        kept.append(tok)
        start += n
    return positions, kept, scores


def stock_features_with_last_block(model, pixels: torch.Tensor, grid: torch.Tensor):
    """The unpatched Qwen3-VL's image features: (merged tokens [T/4, C_llm], the DeepStack features
    [[T/4, C_llm] per DeepStack layer], the last block's input [T, C], its rotary (cos, sin))."""
    out, x, cos_sin = stock_image_features_with_last_block(model, pixels, grid)
    deepstack = [torch.cat(list(per_image)) for per_image in out.deepstack_features]
    return torch.cat(list(out.pooler_output)), deepstack, x, cos_sin


def upstream_way_deepstack(model, pixels: torch.Tensor, grid: torch.Tensor, dominant: float = 0.65,
                           contextual: float = 0.05):
    """Upstream's way extended to Qwen3-VL's DeepStack: the one selection of the main features (scores,
    topk, masks, one-hot assignment) applied to every DeepStack tensor with the same masks and the same
    one-hot matrix. Returns (per-image kept positions, per-image kept main tokens, per-image list of kept
    DeepStack tokens per layer, scores [T/4])."""
    tokens, deepstack, x, cos_sin = stock_features_with_last_block(model, pixels, grid)
    scores, metric = upstream_scores_and_metric(model, x, cos_sin, grid)
    merge = model.model.visual.spatial_merge_size ** 2
    positions, kept, kept_deepstack, start = [], [], [], 0
    for t, h, w in grid.tolist():
        n = t * h * w // merge
        d, k = budget(n, dominant, contextual)
        image = slice(start, start + n)
        p, tok = upstream_select_merge(tokens[image], scores[image], metric[image], d, k)
        layers = []
        for feature in deepstack:
            p_layer, tok_layer = upstream_select_merge(feature[image], scores[image], metric[image], d, k)
            assert torch.equal(p_layer, p)  # the plan depends on scores and metric only
            layers.append(tok_layer)
        positions.append(p)
        kept.append(tok)
        kept_deepstack.append(layers)
        start += n
    return positions, kept, kept_deepstack, scores


def upstream_way_per_slice(model, pixels: torch.Tensor, grid: torch.Tensor, video: bool, dominant: float = 0.65,
                           contextual: float = 0.05):
    """Upstream's way for ONE image or video (``grid`` [1, 3] = t, h, w), per temporal slice: the stock
    tower (``get_video_features`` for a video), the eager [H, h*w, h*w] softmax of each slice, and per
    slice topk, masks and the one-hot merge with the image budget of its h*w/4 units, applied with the
    same plan to every DeepStack tensor (Qwen3-VL). Returns (kept positions [sum(D_s+K_s)] into the
    item's units, ascending; kept main tokens; list of kept DeepStack tokens per layer; scores [t*h*w/4])."""
    out, x, cos_sin = stock_image_features_with_last_block(model, pixels, grid, video)
    tokens = torch.cat(list(out.pooler_output))
    deepstack = [torch.cat(list(per_item)) for per_item in (getattr(out, "deepstack_features", None) or [])]
    (t, h, w), = grid.tolist()
    scores, metric = upstream_scores_and_metric(model, x, cos_sin, grid, segments=[h * w] * t)
    n = h * w // model.model.visual.spatial_merge_size ** 2
    d, k = budget(n, dominant, contextual)
    positions, kept, kept_deepstack = [], [], [[] for _ in deepstack]
    for start in range(0, t * n, n):
        part = slice(start, start + n)
        p, tok = upstream_select_merge(tokens[part], scores[part], metric[part], d, k)
        positions.append(p + start)
        kept.append(tok)
        for layer, feature in enumerate(deepstack):
            p_layer, tok_layer = upstream_select_merge(feature[part], scores[part], metric[part], d, k)
            assert torch.equal(p_layer, p)  # the plan depends on scores and metric only
            kept_deepstack[layer].append(tok_layer)
    return torch.cat(positions), torch.cat(kept), [torch.cat(layer) for layer in kept_deepstack], scores
