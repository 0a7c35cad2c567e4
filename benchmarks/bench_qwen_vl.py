"""Qwen2.5-VL: the vision tower with VisionZip (ours vs upstream's way vs the stock tower), and the
LLM prefill with the reduced tokens vs the stock prompt.

    python -m pytest benchmarks/bench_qwen_vl.py -q -p no:cacheprovider --benchmark-columns=median,min,max

Vision tower: Qwen2.5-VL's block geometry (width 1280, 16 heads, SwiGLU 3420, patch 14, window 112,
output 2048 as in the 3B model), random init, ``VZ_QWEN_DEPTH`` blocks (the real 32 on CUDA; 1 on
CPU, the full-attention block VisionZip reads, to keep the run within minutes on a small machine:
the tower's fixed cost is then 1/32 of the real one, so the relative cost of scoring is ~32x
overstated there). Three paths per image set, all ending with the LLM tokens of every image:

- ``stock``: ``get_image_features`` of the unpatched model (all tokens; the baseline);
- ``ours``: the model patched by ``visionzip_kernels.apply`` (0.65 / 0.05 per image): the same
  tower, plus ``varlen_scores_and_metric`` on the captured q/k of the last block and
  ``varlen_select_merge``;
- ``upstream``: the stock tower, then upstream's way (tests/qwen_oracle.py): the last block's q/k
  recomputed and the whole [H, T, T] softmax over all packed tokens in eager PyTorch, topk, masks,
  bmm, one-hot merge.

Image sets: 1 image of 32 x 32 patches (448 px, 1024 tokens in the tower), and 4 images of different
sizes, about 1024 tokens each (4096 in all). The issue's targets: ours no slower than stock + 5%;
scoring memory O(T H) (at 4 x 1024 tokens, peak >= 10x below upstream's way).

LLM prefill: a small random-init Qwen2.5-VL language model (width 1024, ``VZ_QWEN_LLM_LAYERS``
layers: 4 on CPU, 8 on CUDA; 16 heads, SwiGLU 2816) prefills one image at real geometry
(1288 x 728 px: 92 x 52 patches, 1196 LLM tokens)
plus ``VZ_PREFILL_TEXT`` (64) text tokens: the stock prompt vs the kept tokens at the default budget
(0.65 / 0.05: 70 % kept) and at the 0.45 / 0.05 budget of upstream's README. ``test_prefill`` times
each prompt on its own (pytest-benchmark's table, peak memory); ``test_prefill_interleaved`` times
them in turn within each round, and its medians give the summary's speed-ups. The summary prints the
token ratio beside them: prefill cost is at least linear in the tokens, so that ratio (1.40 at the
default budget, 1.91 at 0.45 / 0.05) bounds the speed-up until attention's quadratic part dominates,
which it does not at this length.

``VZ_BENCH_ROUNDS`` (default 2 on CPU, 10 on CUDA) timed rounds per path; ``VZ_QWEN_DEVICE``
(default cuda when available, else cpu); CPU runs fp32, CUDA bf16.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")

import visionzip_kernels as vz  # noqa: E402

from qwen_oracle import budget, upstream_way  # noqa: E402  (tests/, on the path through benchmarks/conftest.py)

DEVICE = os.environ.get("VZ_QWEN_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
ON_CPU = torch.device(DEVICE).type == "cpu"
ROUNDS = int(os.environ.get("VZ_BENCH_ROUNDS", "2" if ON_CPU else "10"))
DEPTH = int(os.environ.get("VZ_QWEN_DEPTH", "1" if ON_CPU else "32"))
LLM_LAYERS = int(os.environ.get("VZ_QWEN_LLM_LAYERS", "4" if ON_CPU else "8"))
TEXT = int(os.environ.get("VZ_PREFILL_TEXT", "64"))
DTYPE = torch.float32 if ON_CPU else torch.bfloat16
PATCH, MERGE = 14, 2
PIXEL_DIM = 3 * 2 * PATCH * PATCH
IMAGE_SETS = {
    "1 image 32x32 patches": [(32, 32)],
    "4 images 32x32, 24x44, 36x28, 28x36 patches": [(32, 32), (24, 44), (36, 28), (28, 36)],
}
PREFILL_GRID = (52, 92)  # 728 x 1288 px
_TOWER: dict[str, dict[str, tuple[float, int | None]]] = {}
_PREFILL: dict[str, tuple[int, float]] = {}


def qwen25_vl(depth: int = DEPTH):
    text = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=LLM_LAYERS, num_attention_heads=16,
                num_key_value_heads=16, vocab_size=32000, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]})
    full_attention = [i for i in (7, 15, 23, 31) if i < depth - 1] + [depth - 1]  # the real tower's, and the last
    vision = dict(depth=depth, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=2048,
                  patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=full_attention)
    config = transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=31000,
                                           video_token_id=31001, vision_start_token_id=31002,
                                           vision_end_token_id=31003)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    return model.to(DEVICE, DTYPE)


@pytest.fixture(scope="module")
def model(request, register_summary):
    register_summary("qwen_vl_summary", _Summary())
    return qwen25_vl()


class _Summary:
    def pytest_terminal_summary(self, terminalreporter, config):
        if not _TOWER and not _PREFILL:
            return
        write = terminalreporter.write_line
        write("")
        dtype = str(DTYPE).removeprefix("torch.")
        write(f"Qwen2.5-VL tower ({DEPTH} blocks, {DEVICE}, {dtype}) + VisionZip 0.65/0.05:")
        for group, paths in _TOWER.items():
            if {"stock", "ours", "upstream"} - set(paths):
                continue
            (t_s, m_s), (t_o, m_o), (t_u, m_u) = paths["stock"], paths["ours"], paths["upstream"]
            if None in (m_s, m_o, m_u):
                memory = "peak n/a"
            else:  # scoring's own memory: the peak above the stock tower's (at least 1 MiB, against noise)
                extra_o, extra_u = max(m_o - m_s, 2**20), max(m_u - m_s, 2**20)
                memory = (f"upstream/ours peak {m_u / m_o:5.1f}x, extra over stock: ours {extra_o / 2**20:7.1f} MiB, "
                          f"upstream {extra_u / 2**20:7.1f} MiB ({extra_u / extra_o:5.1f}x)")
            write(f"    {group:<46} ours/stock time {t_o / t_s:5.3f}   upstream/ours time {t_u / t_o:5.2f}x   {memory}")
        if "stock" in _PREFILL:
            tokens_stock, t_stock = _PREFILL["stock"]
            write(f"{_prefill_group()}: speed-up over the stock prompt (interleaved rounds), beside the token "
                  "ratio, which bounds it where the cost is linear in the tokens (projections, MLP):")
            for name, (tokens, median) in _PREFILL.items():
                write(f"    {name:<28} {tokens:5d} tokens {median * 1e3:9.1f} ms   {t_stock / median:5.2f}x   "
                      f"token ratio {tokens_stock / tokens:5.2f}")


def _images(grids, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor([[1, h, w] for h, w in grids])
    pixels = torch.randn(int(grid.prod(-1).sum()), PIXEL_DIM, generator=g)
    return pixels.to(DEVICE, DTYPE), grid.to(DEVICE)


@pytest.mark.parametrize("path", ["stock", "ours", "upstream"])  # stock first: the baseline
@pytest.mark.parametrize("image_set", list(IMAGE_SETS))
def test_tower(side_by_side, benchmark, model, image_set, path) -> None:
    pixels, grid = _images(IMAGE_SETS[image_set])
    group = f"Qwen2.5-VL tower + VisionZip, {image_set}"
    with torch.no_grad():
        if path == "ours":
            with vz.patched(model):  # 0.65 / 0.05 per image, the last block
                side_by_side(group, path, lambda: model.model.get_image_features(pixels, grid), device=DEVICE,
                             rounds=ROUNDS)
        elif path == "stock":
            side_by_side(group, path, lambda: model.model.get_image_features(pixels, grid), device=DEVICE,
                         rounds=ROUNDS)
        else:
            side_by_side(group, path, lambda: upstream_way(model, pixels, grid), device=DEVICE, rounds=ROUNDS)
    _TOWER.setdefault(image_set, {})[path] = (benchmark.stats.stats.median, benchmark.extra_info["peak_bytes"])


def _prefill(model, embeds: torch.Tensor) -> torch.Tensor:
    out = model.model.language_model(inputs_embeds=embeds, use_cache=True)
    return model.lm_head(out.last_hidden_state[:, -1:])


PREFILL_BUDGETS = ["stock", "0.65 / 0.05 (default)", "0.45 / 0.05"]  # stock first: the baseline


def _prefill_embeds(model, budget_name: str) -> torch.Tensor:
    """The LLM's input for one image at PREFILL_GRID under ``budget_name``, plus TEXT text tokens."""
    h, w = PREFILL_GRID
    n = h * w // (MERGE * MERGE)
    if budget_name == "stock":
        visual = n
    else:
        dominant, contextual = (float(x) for x in budget_name.split()[0:3:2])
        visual = sum(budget(n, dominant, contextual))
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, visual + TEXT, model.config.text_config.hidden_size, generator=g).to(DEVICE, DTYPE)


def _prefill_group() -> str:
    h, w = PREFILL_GRID
    return f"LLM prefill, small Qwen2.5-VL LLM, 1 image {w * PATCH}x{h * PATCH} px + {TEXT} text tokens"


@pytest.mark.parametrize("budget_name", PREFILL_BUDGETS)
def test_prefill(side_by_side, model, budget_name) -> None:
    embeds = _prefill_embeds(model, budget_name)
    with torch.no_grad():
        side_by_side(_prefill_group(), f"{budget_name}: {embeds.shape[1] - TEXT} visual",
                     lambda: _prefill(model, embeds), device=DEVICE, rounds=ROUNDS)


def test_prefill_interleaved(model) -> None:
    """The speed-ups of the summary: the prompts timed in turn within each round (the order rotating),
    so that a machine whose speed drifts over the run slows every prompt alike; the median per prompt."""
    prompts = {name: _prefill_embeds(model, name) for name in PREFILL_BUDGETS}
    sync = torch.cuda.synchronize if torch.device(DEVICE).type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in prompts}
    with torch.no_grad():
        for embeds in prompts.values():  # warm-up
            _prefill(model, embeds)
        for round_index in range(max(ROUNDS, 5)):
            names = PREFILL_BUDGETS[round_index % 3:] + PREFILL_BUDGETS[:round_index % 3]
            for name in names:
                sync()
                start = time.perf_counter()
                _prefill(model, prompts[name])
                sync()
                times[name].append(time.perf_counter() - start)
    for name, embeds in prompts.items():
        _PREFILL[name] = (embeds.shape[1], statistics.median(times[name]))

