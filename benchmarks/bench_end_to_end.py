"""End to end on CPU: vision encoder + VisionZip, ours vs the upstream path, at real VLM geometry.

    python -m pytest benchmarks/bench_end_to_end.py -q -p no:cacheprovider \
        --benchmark-columns=median,min,max --benchmark-sort=name

- **ours**: ``visionzip_kernels.apply(model, ...)`` — SDPA kept in every layer, q/k of layer L
  captured by hooks, our fused ops, the encoder stopped after layer L (L = -2).
- **upstream**: eager attention with ``output_attentions=True`` (and ``output_hidden_states=True``)
  in every layer, the full encoder, then upstream's op sequence on ``attentions[-2]`` /
  ``hidden_states[-2]`` (:func:`visionzip_kernels.models.paths.upstream_forward`).

Geometries, random init from the configs (q/k drawn with a larger std so attention is peaked; timing
and memory do not depend on the weights), fp32, B in {1, 8}:

- CLIP ViT-L/14-336 (LLaVA-1.5): 577 tokens, 1024 wide, 24 layers; budget 54 + 10 (CLS kept).
- SigLIP-so400m/14-384: 729 tokens, 1152 wide, 27 layers; budget 64 + 0 by ``attention_received``.

Peak memory is the resident-set high-water mark above the level at entry
(:func:`visionzip_kernels.profiling.peak_memory_bytes`), so the weights, built before, are excluded.
Each group's baseline is ``ours``: the summary's ratio column reads "times slower than ours"; a
per-group table at the end gives the time and peak-memory ratios upstream / ours and the targets.

``VZ_BENCH_ROUNDS`` (default 2) sets the timed rounds per path (after one warm-up round);
``VZ_BENCH_BATCHES`` (default "1,8") and ``VZ_BENCH_MODELS`` (default "clip-l-336,siglip-so400m")
narrow the grid. A full run takes about 15 minutes on 2 cores and needs about 12 GB of memory
(SigLIP B=8's upstream path holds 27 x 8 x 16 x 729^2 fp32 attention maps: 7.3 GB).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

pytest.importorskip("transformers")

import visionzip_kernels as vz  # noqa: E402

if not hasattr(vz, "apply"):
    pytest.skip("visionzip_kernels.apply (the transformers integration) is not available", allow_module_level=True)
from visionzip_kernels.models import towers  # noqa: E402
from visionzip_kernels.models.paths import attn_implementation, upstream_forward  # noqa: E402
from visionzip_kernels.profiling import format_bytes  # noqa: E402

ROUNDS = int(os.environ.get("VZ_BENCH_ROUNDS", "2"))
BATCHES = [int(b) for b in os.environ.get("VZ_BENCH_BATCHES", "1,8").split(",")]
MODELS = os.environ.get("VZ_BENCH_MODELS", "clip-l-336,siglip-so400m").split(",")
BUDGET = {"clip-l-336": (54, 10), "siglip-so400m": (64, 0)}
# The targets for B = 8: (min time ratio, min peak-memory ratio), upstream / ours.
TARGETS = {"clip-l-336": (1.1, 4.0), "siglip-so400m": (1.5, None)}

_RESULTS: dict[tuple[str, int], dict[str, tuple[float, int | None]]] = {}


@pytest.fixture(scope="module")
def tower(request):
    cache: dict[str, torch.nn.Module] = {}

    def get(name: str):
        if name not in cache:
            cache.clear()  # one tower in memory at a time
            cache[name] = towers.random_tower(name, attn_implementation="sdpa")
        return cache[name]

    yield get
    cache.clear()
    _print_summary(request.config)


def _print_summary(config) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or not _RESULTS:
        return
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        _write_summary(reporter)


def _write_summary(reporter) -> None:
    reporter.write_line("")
    reporter.write_line("end to end, upstream / ours (same run):")
    reporter.write_line(f"    {'model':<16} {'B':>3} {'ours':>11} {'upstream':>11} {'time':>7} "
                        f"{'ours peak':>11} {'upstream peak':>14} {'memory':>8}   target (B=8)")
    for (name, B), paths in sorted(_RESULTS.items()):
        if {"ours", "upstream"} - set(paths):
            continue
        (t_o, m_o), (t_u, m_u) = paths["ours"], paths["upstream"]
        mem = f"{m_u / m_o:.1f}x" if m_o and m_u else "n/a"
        t_target, m_target = TARGETS.get(name, (None, None))
        target = ""
        if B == 8 and t_target:
            target = f"time >= {t_target}x: {'met' if t_u / t_o >= t_target else 'NOT met'}"
            if m_target:
                met = bool(m_o and m_u and m_u / m_o >= m_target)
                target += f"; memory >= {m_target}x: {'met' if met else 'NOT met'}"
        reporter.write_line(f"    {name:<16} {B:>3} {t_o * 1e3:>8.0f} ms {t_u * 1e3:>8.0f} ms {t_u / t_o:>6.2f}x "
                            f"{format_bytes(m_o):>11} {format_bytes(m_u):>14} {mem:>8}   {target}")


@pytest.mark.parametrize("path", ["ours", "upstream"])  # ours first in each group: its baseline
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("model_name", MODELS)  # slowest-varying: one tower built per model
def test_end_to_end(side_by_side, benchmark, tower, path: str, model_name: str, B: int) -> None:
    model = tower(model_name)
    dominant, contextual = BUDGET[model_name]
    size = model.config.image_size
    x = torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(B))
    group = f"end-to-end {model_name} B={B} fp32"
    with torch.no_grad():
        if path == "ours":
            vz.apply(model, dominant=dominant, contextual=contextual, layer=-2)
            try:
                side_by_side(group, "ours (SDPA, stops after L)", lambda: model(pixel_values=x), rounds=ROUNDS)
                out = model(pixel_values=x)
                assert out.last_hidden_state.shape == (B, dominant + contextual, model.config.hidden_size)
            finally:
                vz.remove(model)
        else:
            with attn_implementation(model, "eager"):
                run = lambda: upstream_forward(model, x, dominant, contextual, layer=-2)  # noqa: E731
                side_by_side(group, "upstream (eager, attentions)", run, rounds=ROUNDS)
    _RESULTS.setdefault((model_name, B), {})[path] = (benchmark.stats.stats.median, benchmark.extra_info["peak_bytes"])
