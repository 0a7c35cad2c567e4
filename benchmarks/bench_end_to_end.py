"""End to end: vision encoder + VisionZip at real VLM geometry, ours vs stock vs upstream, on CUDA
(fp16) when a GPU is present, else on CPU (fp32).

    python -m pytest benchmarks/bench_end_to_end.py -q -p no:cacheprovider \
        --benchmark-columns=median,min,max --benchmark-sort=name

Three paths per group (model, B), side by side in the same run:

- **ours**: ``visionzip_kernels.apply(model, ...)`` — SDPA kept in every layer, layers 0..L
  only (L = -2), q/k of layer L from its own projections, our fused ops.
- **stock**: the unpatched model's plain forward, ``model(pixel_values=x)`` on SDPA: the full encoder
  (and its post-norm / pooling head), no VisionZip. What a GPU user runs today; the baseline ours
  should be no slower than.
- **upstream**: eager attention with ``output_attentions=True`` (and ``output_hidden_states=True``)
  in every layer, the full encoder, then upstream's op sequence on ``attentions[-2]`` /
  ``hidden_states[-2]`` (:func:`examples.models.paths.upstream_forward`).

Geometries, random init from the configs (q/k drawn with a larger std so attention is peaked; timing
and memory do not depend on the weights):

- CLIP ViT-L/14-336 (LLaVA-1.5): 577 tokens, 1024 wide, 24 layers; budget 54 + 10 (CLS kept).
- SigLIP-so400m/14-384: 729 tokens, 1152 wide, 27 layers; budget 64 + 0 by ``attention_received``.

Devices:

- **CUDA** (used when ``torch.cuda.is_available()``): the towers are moved to the GPU in fp16,
  B in {1, 8, 32}, 10 timed rounds per path after warm-up; every timed call ends with
  ``torch.cuda.synchronize()``. Peak memory is the caching allocator's peak allocation above the
  level at entry (``torch.cuda.max_memory_allocated``). Target: ours no slower than stock
  (stock / ours >= 1.0) for both models at every B.
- **CPU**: fp32, B in {1, 8}, 2 timed rounds per path after one warm-up. Peak memory is the
  resident-set high-water mark above the level at entry. Targets (B = 8): upstream / ours time and
  peak-memory ratios, as before.

In both, peak memory comes from :func:`examples.profiling.peak_memory_bytes`, so the
weights and the input, allocated before, are excluded. Each group's baseline is ``ours``: the
pytest summary's ratio column reads "times slower than ours"; a per-group table at the end gives the
stock and upstream times, the ratios stock / ours and upstream / ours, the peak memories and the
targets. Nothing is asserted about time.

``VZ_BENCH_DEVICE`` ("cuda" or "cpu") overrides the device; ``VZ_BENCH_ROUNDS`` sets the timed
rounds per path; ``VZ_BENCH_BATCHES`` (e.g. "1,8") and ``VZ_BENCH_MODELS`` (default
"clip-l-336,siglip-so400m") narrow the grid. A full CPU run takes about 20 minutes on 2 cores and
needs about 12 GB of memory (SigLIP B=8's upstream path holds 27 x 8 x 16 x 729^2 fp32 attention
maps: 7.3 GB); on CUDA SigLIP B=32's upstream path holds 27 x 32 x 16 x 729^2 fp16 maps (14.7 GB).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import pytest
import torch

pytest.importorskip("transformers")

import visionzip_kernels as vz  # noqa: E402

if not hasattr(vz, "apply"):
    pytest.skip("visionzip_kernels.apply (the transformers integration) is not available", allow_module_level=True)
from examples.models import towers  # noqa: E402
from examples.models.paths import attn_implementation, upstream_forward  # noqa: E402
from examples.profiling import format_bytes  # noqa: E402

DEVICE = os.environ.get("VZ_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = torch.device(DEVICE).type == "cuda"
if ON_CUDA and not torch.cuda.is_available():
    pytest.skip(f"VZ_BENCH_DEVICE={DEVICE} but CUDA is not available", allow_module_level=True)
# fp16 is what VLMs run their towers in on a GPU; fp16 matmuls on CPU are slow and not what anyone runs.
DTYPE = torch.float16 if ON_CUDA else torch.float32
DTYPE_NAME = {torch.float16: "fp16", torch.float32: "fp32"}[DTYPE]
# A GPU forward takes milliseconds, a CPU one seconds: more rounds where they are cheap.
ROUNDS = int(os.environ.get("VZ_BENCH_ROUNDS", "10" if ON_CUDA else "2"))
# Untimed calls before the fixture's own warm-up round on CUDA, so kernel compilation and autotuning
# at a new shape stay out of the timed rounds; on CPU the fixture's warm-up round is enough.
EXTRA_WARMUP_CALLS = 2 if ON_CUDA else 0
BATCHES = [int(b) for b in os.environ.get("VZ_BENCH_BATCHES", "1,8,32" if ON_CUDA else "1,8").split(",")]
MODELS = os.environ.get("VZ_BENCH_MODELS", "clip-l-336,siglip-so400m").split(",")
BUDGET = {"clip-l-336": (54, 10), "siglip-so400m": (64, 0)}
# The CPU targets for B = 8: (min time ratio, min peak-memory ratio), upstream / ours.
CPU_TARGETS = {"clip-l-336": (1.1, 4.0), "siglip-so400m": (1.5, None)}
# The GPU target, every model and B: min time ratio stock / ours (ours no slower than stock).
CUDA_STOCK_TARGET = 1.0
PATH_LABELS = {
    "ours": "ours (SDPA, stops after L)",
    "stock": "stock (SDPA, full encoder)",
    "upstream": "upstream (eager, attentions)",
}

# (model, B) -> path -> (median seconds, peak bytes or None)
_RESULTS: dict[tuple[str, int], dict[str, tuple[float, int | None]]] = {}


@pytest.fixture(scope="module")
def tower(request):
    cache: dict[str, torch.nn.Module] = {}

    def get(name: str) -> torch.nn.Module:
        if name not in cache:
            cache.clear()  # one tower in memory at a time
            if ON_CUDA:
                torch.cuda.empty_cache()  # hand the previous tower's blocks back before the next is built
            # Built in fp32 on the CPU (the seeded init is the same on every device), then moved.
            cache[name] = towers.random_tower(name, attn_implementation="sdpa").to(DEVICE, DTYPE)
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


def _format_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.0f} ms" if ms >= 100 else f"{ms:.1f} ms" if ms >= 10 else f"{ms:.2f} ms"


def _ratio(numerator: float | None, denominator: float | None) -> str:
    return f"{numerator / denominator:.2f}x" if numerator and denominator else "-"


def _targets(name: str, B: int, ours: tuple[float, int | None], paths: dict[str, tuple[float, int | None]]) -> str:
    """The issue's targets for this row, each "met" or "NOT met"; empty where none applies."""
    t_o, m_o = ours
    if ON_CUDA:
        if "stock" not in paths:
            return ""
        met = paths["stock"][0] / t_o >= CUDA_STOCK_TARGET
        return f"stock/ours >= {CUDA_STOCK_TARGET}x: {'met' if met else 'NOT met'}"
    t_target, m_target = CPU_TARGETS.get(name, (None, None))
    if B != 8 or not t_target or "upstream" not in paths:
        return ""
    t_u, m_u = paths["upstream"]
    text = f"time >= {t_target}x: {'met' if t_u / t_o >= t_target else 'NOT met'}"
    if m_target:
        met = bool(m_o and m_u and m_u / m_o >= m_target)
        text += f"; memory >= {m_target}x: {'met' if met else 'NOT met'}"
    return text


def _write_summary(reporter) -> None:
    target_scope = f"stock/ours >= {CUDA_STOCK_TARGET}x, every B" if ON_CUDA else "upstream/ours, B=8"
    reporter.write_line("")
    reporter.write_line(f"end to end on {DEVICE} {DTYPE_NAME}, stock / ours and upstream / ours (same run):")
    reporter.write_line(f"    {'model':<14} {'B':>3} {'ours':>10} {'stock':>10} {'upstream':>10} {'stock/ours':>10} "
                        f"{'upstr/ours':>10} {'ours peak':>10} {'stock peak':>10} {'upstr peak':>10} "
                        f"{'upstr/ours mem':>14}   targets ({target_scope})")
    for (name, B), paths in sorted(_RESULTS.items()):
        if "ours" not in paths:
            continue  # every ratio is to ours
        t_o, m_o = paths["ours"]
        t_s, m_s = paths.get("stock", (None, None))
        t_u, m_u = paths.get("upstream", (None, None))
        reporter.write_line(
            f"    {name:<14} {B:>3} {_format_time(t_o):>10} {_format_time(t_s):>10} {_format_time(t_u):>10} "
            f"{_ratio(t_s, t_o):>10} {_ratio(t_u, t_o):>10} {format_bytes(m_o):>10} "
            f"{format_bytes(m_s) if 'stock' in paths else '-':>10} "
            f"{format_bytes(m_u) if 'upstream' in paths else '-':>10} {_ratio(m_u, m_o):>14}   "
            f"{_targets(name, B, paths['ours'], paths)}".rstrip()
        )


def _warm_up(fn: Callable[[], object]) -> None:
    for _ in range(EXTRA_WARMUP_CALLS):
        fn()
    if ON_CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("path", ["ours", "stock", "upstream"])  # ours first in each group: its baseline
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("model_name", MODELS)  # slowest-varying: one tower built per model
def test_end_to_end(side_by_side, benchmark, tower, path: str, model_name: str, B: int) -> None:
    model = tower(model_name)
    dominant, contextual = BUDGET[model_name]
    size = model.config.image_size
    # Drawn on the CPU so every device sees the same pixels, then moved once, outside the timing.
    x = torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(B)).to(DEVICE, DTYPE)
    group = f"end-to-end {model_name} B={B} {DEVICE} {DTYPE_NAME}"

    def measure(fn: Callable[[], object]) -> None:
        _warm_up(fn)
        side_by_side(group, PATH_LABELS[path], fn, device=DEVICE, rounds=ROUNDS)

    with torch.no_grad():
        if path == "ours":
            vz.apply(model, dominant=dominant, contextual=contextual, layer=-2)
            try:
                measure(lambda: model(pixel_values=x))
                out = model(pixel_values=x)
                assert out.last_hidden_state.shape == (B, dominant + contextual, model.config.hidden_size)
            finally:
                vz.remove(model)
        elif path == "stock":
            measure(lambda: model(pixel_values=x))
            # The unpatched model returns every token: proof that no VisionZip patch was left on it.
            rows, cols = towers.num_patches(model)
            tokens = rows * cols + int(towers.has_cls(model))
            out = model(pixel_values=x)
            assert out.last_hidden_state.shape == (B, tokens, model.config.hidden_size)
        else:
            with attn_implementation(model, "eager"):
                measure(lambda: upstream_forward(model, x, dominant, contextual, layer=-2))
    _RESULTS.setdefault((model_name, B), {})[path] = (benchmark.stats.stats.median, benchmark.extra_info["peak_bytes"])
