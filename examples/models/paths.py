"""Encoder + VisionZip, two ways, on a transformers vision model (CLIP, SigLIP, DINOv2).

- **ours**: the model patched by ``visionzip_kernels.apply`` (SDPA kept, layers 0..L only, q/k of
  layer L from its own projections, our fused ops). Returns ``last_hidden_state`` = the
  compressed tokens and ``keep``.
- **upstream**: what dvlab-research/VisionZip does: eager attention with ``output_attentions=True``
  and ``output_hidden_states=True`` over the full encoder, then its op sequence
  (:func:`visionzip_kernels.upstream.upstream_select_merge`) on ``attentions[L]`` and
  ``hidden_states[L]``, with the merge metric = head-mean of layer L's keys (upstream stores it from
  its patched attention forward; here a hook on ``k_proj`` does, which costs nothing).

:func:`compare_paths` measures both side by side for the demo (time of the encoder and of the VisionZip
step, timed interleaved; peak memory above the weights; the outputs for :func:`agreement`); the
benchmarks time the same two callables.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from dataclasses import dataclass, field

import torch

from visionzip_kernels.api import compress
from visionzip_kernels.upstream import upstream_select_merge

from ..profiling import interleaved_times, peak_memory_bytes
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


@dataclass
class PathResult:
    name: str
    total_s: float  # encoder + VisionZip step, median over the interleaved rounds
    step_s: float  # the VisionZip step alone (scores, selection, merge) on layer L's tensors, median
    peak_bytes: int | None  # peak memory of the whole path above the level at entry (weights excluded)
    tokens: torch.Tensor
    keep: torch.Tensor
    times: list[float] = field(default_factory=list)  # the whole path's time in each round

    @property
    def encoder_s(self) -> float:
        return max(0.0, self.total_s - self.step_s)


@dataclass
class Comparison:
    """Both paths of one model and input, and upstream / ours time ratios, each the median of the
    per-round ratios of the interleaved timing (``encoder``, ``step``, ``total``)."""

    upstream: PathResult
    ours: PathResult
    ratios: dict[str, float]
    rounds: int
    step_rounds: int


STEP_ROUNDS = 20  # the VisionZip step alone takes milliseconds: enough rounds for a stable median


def compare_paths(model, pixel_values: torch.Tensor, dominant: int, contextual: int, layer: int = -2,
                  rounds: int = 1, step_rounds: int = STEP_ROUNDS, progress=None) -> Comparison:
    """Upstream's path and ours on ``model`` (unpatched, on SDPA) and ``pixel_values`` [B, 3, S, S],
    timed interleaved (:func:`examples.profiling.interleaved_times`) so that load from other
    processes hits both alike:

    1. one warm-up call of each path, which also captures layer L's tensors: upstream's attention
       map, hidden states and metric, and our hidden states, q and k;
    2. the VisionZip step alone on those tensors (upstream's op sequence vs ``compress``),
       ``step_rounds`` rounds;
    3. the whole paths (ours: ``visionzip_kernels.patched`` for the call; upstream: eager attention
       for the call), ``rounds`` rounds; the encoder time of a round is its whole time minus the
       path's median step time;
    4. one more call of each path for its peak memory (after the timing, so that handing freed
       memory back to the system does not slow a timed call).
    """
    import visionzip_kernels as vz

    li = _layer_index(model, layer)
    cls = has_cls(model)
    say = progress or (lambda message: None)
    outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # Each call drops the previous call's output first, so that it is not held during the next.
    def upstream() -> None:
        outputs.pop("upstream", None)
        with attn_implementation(model, "eager"):
            outputs["upstream"] = upstream_forward(model, pixel_values, dominant, contextual, li)

    def ours() -> None:
        outputs.pop("ours", None)
        with vz.patched(model, dominant=dominant, contextual=contextual, layer=li):
            outputs["ours"] = ours_forward(model, pixel_values)

    with torch.no_grad():
        say("  warm-up: upstream (eager, all attention maps), capturing layer L ...")
        with attn_implementation(model, "eager"), capture_qk(model, li) as qk:
            out = model(pixel_values=pixel_values, output_attentions=True, output_hidden_states=True)
            upstream_inputs = (out.attentions[li], out.hidden_states[li + 1], qk["k"].mean(dim=2))
            del out
        say("  warm-up: ours (SDPA, stops after layer L), capturing layer L ...")
        with (vz.patched(model, dominant=dominant, contextual=contextual, layer=li),
              _capture_layer(model, li) as inputs):
            ours_forward(model, pixel_values)
            if "hidden" not in inputs:
                raise RuntimeError("layer L's output was not captured; did the patched encoder run it?")
            ours_inputs = dict(inputs)

        say(f"  timing the VisionZip step alone, interleaved: {step_rounds} rounds ...")
        # partial binds the captured tensors (not the names), so deleting the names and the paths frees them.
        step_paths = {
            "ours": functools.partial(compress, ours_inputs["hidden"], q=ours_inputs["q"], k=ours_inputs["k"],
                                      dominant=dominant, contextual=contextual, keep_cls=cls),
            "upstream": functools.partial(upstream_select_merge, *upstream_inputs, dominant, contextual, keep_cls=cls),
        }
        steps = interleaved_times(step_paths, step_rounds)
        del step_paths, upstream_inputs, ours_inputs

        say(f"  timing the whole paths, interleaved: {rounds} round(s) of ours then upstream ...")
        whole = interleaved_times({"ours": ours, "upstream": upstream}, rounds, warmup=0,
                                  progress=lambda line: say(f"    {line}"))
        say("  peak memory: one more call of each path ...")
        peaks = {"ours": peak_memory_bytes(ours), "upstream": peak_memory_bytes(upstream)}

    step_s = {name: steps.median(name) for name in ("ours", "upstream")}
    encoder = {name: [max(0.0, t - step_s[name]) for t in whole.times[name]] for name in ("ours", "upstream")}
    ratios = {
        "encoder": statistics.median(u / o if o > 0 else float("nan")
                                     for u, o in zip(encoder["upstream"], encoder["ours"])),
        "step": steps.ratio("upstream", "ours"),
        "total": whole.ratio("upstream", "ours"),
    }
    results = {
        name: PathResult(name, whole.median(name), step_s[name], peaks[name], *outputs[name], whole.times[name])
        for name in ("upstream", "ours")
    }
    return Comparison(results["upstream"], results["ours"], ratios, rounds, step_rounds)


def agreement(ours: PathResult, upstream: PathResult) -> tuple[bool, float, int]:
    """(same keep for every image, max |tokens_ours - tokens_upstream|, images whose keep differs)."""
    same = (ours.keep.cpu() == upstream.keep.cpu()).all(dim=1)
    if ours.tokens.shape != upstream.tokens.shape:
        return bool(same.all()), float("inf"), int((~same).sum())
    diff = (ours.tokens.double() - upstream.tokens.double()).abs().max().item()
    return bool(same.all()), diff, int((~same).sum())
