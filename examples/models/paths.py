"""Encoder + VisionZip, two ways, on a transformers vision model (CLIP, SigLIP, DINOv2).

- **ours**: the model patched by ``visionzip_kernels.apply`` (SDPA kept, layers 0..L only, q/k of
  layer L from its own projections, our fused ops). Returns ``last_hidden_state`` = the
  compressed tokens and ``keep``.
- **upstream**: what dvlab-research/VisionZip does: eager attention with ``output_attentions=True``
  and ``output_hidden_states=True`` over the full encoder, then its op sequence
  (:func:`visionzip_kernels.upstream.upstream_select_merge`) on ``attentions[L]`` and
  ``hidden_states[L]``, with the merge metric = head-mean of layer L's keys (upstream stores it from
  its patched attention forward; here a hook on ``k_proj`` does, which costs nothing).

:func:`compare` measures both side by side (time of the encoder and of the VisionZip step, peak
memory above the weights, agreement) for the demo; the benchmarks time the same two callables.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from visionzip_kernels.api import compress
from ..profiling import median_seconds, peak_memory_bytes
from visionzip_kernels.upstream import upstream_select_merge
from .towers import encoder_layers, has_cls, query_key


def _layer_index(model, layer: int) -> int:
    n = len(encoder_layers(model))
    if not -n <= layer < n:
        raise ValueError(f"layer {layer} out of range for a {n}-layer encoder")
    return layer % n


@contextlib.contextmanager
def capture_qk(model, layer: int = -2):
    """Hooks on layer ``layer``'s q_proj / k_proj; yields a dict that receives ``q`` and ``k``
    as [B, N, H, d] after each forward."""
    projections = query_key(model, encoder_layers(model)[_layer_index(model, layer)])
    store: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(module, inputs, output):
            store[name] = output.unflatten(-1, (-1, projections.head_dim))
        return fn

    handles = [projections.q_proj.register_forward_hook(hook("q")),
               projections.k_proj.register_forward_hook(hook("k"))]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def cls_scores(model, pixel_values: torch.Tensor, layer: int = -2) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS-encoder (CLIP, DINOv2) scores [B, N] (``cls_attention``, head mean) and merge metric
    [B, N, d] (head-mean keys) of layer ``layer``, from one forward of the unpatched model."""
    from visionzip_kernels.ops import scores_and_metric

    with torch.no_grad(), capture_qk(model, layer) as qk:
        model(pixel_values=pixel_values)
    q, k = qk["q"], qk["k"]
    return scores_and_metric(q, k, q.shape[-1] ** -0.5, True)


def top_decile_count(patches: int) -> int:
    """How many patches are "the top 10%" of ``patches`` (at least one)."""
    return max(1, round(0.1 * patches))


def top_decile_share(scores: torch.Tensor) -> torch.Tensor:
    """[B, N] CLS scores (CLS at 0) -> [B]: the share of the CLS attention to patches that the top 10%
    of patches take (uniform attention gives 0.1)."""
    patches = scores[:, 1:].float()
    return patches.topk(top_decile_count(patches.shape[1]), dim=1).values.sum(dim=1) / patches.sum(dim=1)


@contextlib.contextmanager
def attn_implementation(model, name: str):
    """Temporarily switch the model's attention implementation ("eager", "sdpa")."""
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


def upstream_forward(model, pixel_values: torch.Tensor, dominant: int, contextual: int, layer: int = -2,
                     store: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream's path. ``model`` must be unpatched and on eager attention (see :func:`attn_implementation`).
    Returns (tokens [B, D+K, C], keep [B, D] ascending). ``store`` (optional) receives the times of the
    encoder (``encoder_s``) and of the VisionZip step (``step_s``)."""
    li = _layer_index(model, layer)
    start = time.perf_counter()
    with capture_qk(model, li) as qk:
        out = model(pixel_values=pixel_values, output_attentions=True, output_hidden_states=True)
    mid = time.perf_counter()
    attn = out.attentions[li]
    hidden = out.hidden_states[li + 1]  # hidden_states[0] is the embedding output
    metric = qk["k"].mean(dim=2)
    tokens, keep = upstream_select_merge(attn, hidden, metric, dominant, contextual, keep_cls=has_cls(model))
    if store is not None:
        store.update(encoder_s=mid - start, step_s=time.perf_counter() - mid)
    return tokens, keep


def ours_forward(patched_model, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our path: the model patched by ``visionzip_kernels.apply``."""
    out = patched_model(pixel_values=pixel_values)
    return out.last_hidden_state, out.keep


@dataclass
class PathResult:
    name: str
    total_s: float  # encoder + VisionZip step, median
    step_s: float  # the VisionZip step alone (scores, selection, merge), median
    peak_bytes: int | None  # peak memory of the whole path above the level at entry (weights excluded)
    tokens: torch.Tensor
    keep: torch.Tensor
    times: list[float] = field(default_factory=list)

    @property
    def encoder_s(self) -> float:
        return max(0.0, self.total_s - self.step_s)


def _timed(fn: Callable[[], object], repeats: int, warmup: int, progress, label: str) -> tuple[list[float], int | None, object]:
    for i in range(warmup):
        if progress:
            progress(f"  {label}: warm-up {i + 1}/{warmup} ...")
        fn()
    times, peaks, result = [], [], None
    for i in range(repeats):
        if progress:
            progress(f"  {label}: run {i + 1}/{repeats} ...")
        box = {}

        def run():
            start = time.perf_counter()
            box["out"] = fn()
            box["t"] = time.perf_counter() - start
            return None

        peaks.append(peak_memory_bytes(run))
        times.append(box["t"])
        result = box["out"]
    known = [p for p in peaks if p is not None]
    return times, (max(known) if known else None), result


def measure_upstream(model, pixel_values, dominant, contextual, layer=-2, repeats=1, warmup=1,
                     progress=None) -> PathResult:
    """Time and peak memory of the upstream path (the model is switched to eager for the call)."""
    steps: list[float] = []
    with torch.no_grad(), attn_implementation(model, "eager"):
        def run():
            store: dict = {}
            result = upstream_forward(model, pixel_values, dominant, contextual, layer, store=store)
            steps.append(store["step_s"])
            return result

        times, peak, (tokens, keep) = _timed(run, repeats, warmup, progress, "upstream (eager, all attention maps)")
    return PathResult("upstream", statistics.median(times), statistics.median(steps[warmup:]), peak, tokens, keep, times)


@contextlib.contextmanager
def _capture_layer(model, layer: int):
    """q, k (hooks on q_proj / k_proj) and the output hidden states of layer ``layer``."""
    li = _layer_index(model, layer)
    with capture_qk(model, li) as store:
        def hook(module, inputs, output):
            store["hidden"] = output[0] if isinstance(output, tuple) else output

        handle = encoder_layers(model)[li].register_forward_hook(hook, prepend=True)
        try:
            yield store
        finally:
            handle.remove()


def measure_ours(model, pixel_values, dominant, contextual, layer=-2, repeats=1, warmup=1,
                 progress=None) -> PathResult:
    """Time and peak memory of our path (``visionzip_kernels.apply`` for the call, then removed). The
    VisionZip step is timed on its own, on layer L's tensors captured during the warm-up run."""
    import visionzip_kernels as vz

    cls = has_cls(model)
    with torch.no_grad():
        vz.apply(model, dominant=dominant, contextual=contextual, layer=layer)
        try:
            if progress:
                progress("  ours (SDPA, stops after layer L): warm-up, capturing layer L ...")
            with _capture_layer(model, layer) as inputs:
                ours_forward(model, pixel_values)
            if "hidden" not in inputs:
                raise RuntimeError("layer L's output was not captured; did the patched encoder run it?")
            step = _median_time(
                lambda: compress(inputs["hidden"], q=inputs["q"], k=inputs["k"], dominant=dominant,
                                 contextual=contextual, keep_cls=cls),
                3,
            )
            inputs.clear()
            times, peak, (tokens, keep) = _timed(lambda: ours_forward(model, pixel_values), repeats,
                                                 max(0, warmup - 1), progress, "ours (SDPA, stops after layer L)")
        finally:
            vz.remove(model)
    return PathResult("ours", statistics.median(times), step, peak, tokens, keep, times)


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    return median_seconds(fn, repeats)


def agreement(ours: PathResult, upstream: PathResult) -> tuple[bool, float, int]:
    """(same keep for every image, max |tokens_ours - tokens_upstream|, images whose keep differs)."""
    same = (ours.keep.cpu() == upstream.keep.cpu()).all(dim=1)
    diff = (ours.tokens.double() - upstream.tokens.double()).abs().max().item() if ours.tokens.shape == upstream.tokens.shape else float("inf")
    return bool(same.all()), diff, int((~same).sum())
