"""LLM prefill with VisionZip's token budgets on a small random-init LLaVA (CPU, fp32).

    python -m pytest benchmarks/bench_prefill.py -q -p no:cacheprovider --benchmark-columns=median,min,max

LLaVA-1.5 puts 576 visual tokens per image in front of the prompt; VisionZip puts D + K (64 / 128 /
192). The prefill (one forward of the language model over the whole prompt, KV cache written, the
next-token logits computed) is what the budget shortens. Here the language model of a small
random-init ``LlavaForConditionalGeneration`` (a Llama: hidden 1024, 8 layers, 16 heads, SwiGLU
2816, ~100 M parameters; weights do not change the time) prefills ``visual + T`` embeddings with
T = 64 text tokens, for visual = 576 (the stock model) and for each budget. Each group's baseline
is the 576-token prefill: its ratio column reads "fraction of the stock prefill time"; the table at
the end gives the speed-up (stock / VisionZip).

A second group times the whole LLaVA forward that produces the first token (vision tower, projector,
prefill) with ``pixel_values`` and ``input_ids``: the stock model (SDPA tower, 576 placeholders) vs the
model patched by ``visionzip_kernels.apply`` (placeholders shrunk to D + K by ``shrink_image_tokens``).
Its tower has CLIP-L/336 geometry but only 4 layers (to keep the run short), so stopping after layer
-2 skips a quarter of it here; with LLaVA-1.5's 24 layers it skips 1/24.

LLaVA-NeXT (``-k next``): one 672x672 image is a 2x2 grid of 336 px crops plus the base crop, 5 crops
of 577 tower tokens. The stock model feeds 2928 visual tokens (base 576 + the unpadded 48x48 grid +
48 ``image_newline`` rows; the paper's "2880" is 5 x 576 without the newlines). VisionZip's budget is
per crop: 54+10 per crop is 320 tokens per image, 27+5 (the paper's 54:10 split of 32) is 160. The
same two groups as above are timed for it: the LLM prefill (2928 / 320 / 160 visual + T text
tokens) and the forward to the first token (tower on all 5 crops, projector, prefill; placeholders
shrunk by ``shrink_inputs``). The geometry is real (336 px crops, 14 px patches, 577 tokens per crop,
LLM hidden 1024), the model is not: the tower is CLIP-L's geometry at width 256 (4 heads of 64, 4
layers) and the LLM has 2 layers (the LLaVA-1.5 case above: 8), to keep a CPU run to minutes on a
shared machine. The prefill ratios do not depend on depth; with width 1024 instead of 7B's 4096 the
attention share (quadratic in tokens) is larger than in the paper's model, so the speed-up here is
an upper-bound-leaning estimate of the LLM part, not the paper's measurement.

Environment: ``VZ_BENCH_ROUNDS`` (default 5; NeXT: ``VZ_NEXT_ROUNDS``, default 3) timed rounds per
case; ``VZ_PREFILL_TEXT`` (default 64).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

pytest.importorskip("transformers")

from visionzip_kernels.api import BUDGETS  # noqa: E402

ROUNDS = int(os.environ.get("VZ_BENCH_ROUNDS", "5"))
TEXT = int(os.environ.get("VZ_PREFILL_TEXT", "64"))
NEXT_ROUNDS = int(os.environ.get("VZ_NEXT_ROUNDS", "3"))
STOCK = 576
NEXT_IMAGE = (672, 672)  # (H, W): a 2x2 grid of 336 px crops + the base crop
NEXT_CROPS = 5
NEXT_BUDGETS: dict[int, tuple[int, int]] = {320: (54, 10), 160: (27, 5)}  # per image -> per crop D+K
_RESULTS: dict[int, float] = {}
_LLAVA_RESULTS: dict[str, float] = {}
_NEXT_PREFILL: dict[str, float] = {}
_NEXT_RESULTS: dict[str, float] = {}


def _configs(vision_width: int, text_layers: int):
    """CLIP-L/336 tower geometry (577 tokens, 4 layers) at ``vision_width``; a Llama of hidden 1024."""
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(hidden_size=vision_width, intermediate_size=4 * vision_width, num_hidden_layers=4,
                              num_attention_heads=vision_width // 64, image_size=336, patch_size=14,
                              hidden_act="quick_gelu")
    text = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=text_layers, num_attention_heads=16,
                       num_key_value_heads=16, vocab_size=32064, max_position_embeddings=4096)
    return vision, text


def _seeded(model_class, config):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return model_class(config).eval()


def small_llava():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vision, text = _configs(vision_width=1024, text_layers=8)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-2)
    return _seeded(LlavaForConditionalGeneration, config)


def small_llava_next():
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    vision, text = _configs(vision_width=256, text_layers=2)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-2)
    return _seeded(LlavaNextForConditionalGeneration, config)


def _write_speedups(request, title: str, results: dict[str, float], baseline: str) -> None:
    """Prints ``title`` and each case's median with its speed-up over ``baseline`` (same run)."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or baseline not in results:
        return
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        reporter.write_line(title)
        for name, median in results.items():
            reporter.write_line(f"    {name:<34} {median * 1e3:9.1f} ms   {results[baseline] / median:5.2f}x")


@pytest.fixture(scope="module")
def llava(request):
    model = small_llava()
    yield model
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or STOCK not in _RESULTS:
        return
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        reporter.write_line("")
        reporter.write_line(
            f"LLM prefill, {TEXT} text tokens, speed-up over the stock {STOCK} visual tokens (same run):"
        )
        for visual, median in sorted(_RESULTS.items(), reverse=True):
            reporter.write_line(f"    {visual:>4} + {TEXT} tokens  {median * 1e3:9.1f} ms   "
                                f"{_RESULTS[STOCK] / median:5.2f}x")
        if "stock" in _LLAVA_RESULTS:
            reporter.write_line("LLaVA forward to the first token (tower + projector + prefill), speed-up over stock:")
            for name, median in _LLAVA_RESULTS.items():
                reporter.write_line(f"    {name:<28} {median * 1e3:9.1f} ms   {_LLAVA_RESULTS['stock'] / median:5.2f}x")


def prefill(model, embeds: torch.Tensor) -> torch.Tensor:
    """One prefill: the language model over the whole prompt (KV cache built), then the next-token logits."""
    out = model.model.language_model(inputs_embeds=embeds, use_cache=True)
    return model.lm_head(out.last_hidden_state[:, -1:])


@pytest.mark.parametrize("visual", [STOCK, *sorted(BUDGETS)])  # the stock prefill first: the baseline
def test_prefill(side_by_side, benchmark, llava, visual: int) -> None:
    hidden = llava.config.text_config.hidden_size
    embeds = torch.randn(1, visual + TEXT, hidden, generator=torch.Generator().manual_seed(0))
    name = f"{visual} visual + {TEXT} text" + (" (stock LLaVA-1.5)" if visual == STOCK else
                                               f" (VisionZip {BUDGETS[visual][0]}+{BUDGETS[visual][1]})")
    with torch.no_grad():
        side_by_side(f"LLM prefill, small LLaVA, {TEXT} text tokens, fp32", name, lambda: prefill(llava, embeds),
                     rounds=ROUNDS)
    _RESULTS[visual] = benchmark.stats.stats.median


def _prompt(llava, placeholders: int) -> torch.Tensor:
    """[1, S] ids: one image's placeholders between a few text tokens, TEXT text tokens in all."""
    g = torch.Generator().manual_seed(1)
    text = torch.randint(1, 31000, (TEXT,), generator=g)
    image = torch.full((placeholders,), llava.config.image_token_id)
    return torch.cat([text[:4], image, text[4:]])[None]


@pytest.mark.parametrize("budget", ["stock", *sorted(BUDGETS)])  # stock first: the baseline
def test_llava_first_token(side_by_side, benchmark, llava, budget) -> None:
    import visionzip_kernels as vz

    if not hasattr(vz, "apply"):
        pytest.skip("visionzip_kernels.apply (the transformers integration) is not available")
    from visionzip_kernels.integrations.transformers import shrink_image_tokens

    size = llava.config.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    input_ids = _prompt(llava, STOCK)
    group = f"LLaVA forward to the first token, small LLaVA, {TEXT} text tokens, fp32"
    with torch.no_grad():
        if budget == "stock":
            name = f"stock ({STOCK} visual tokens)"
            side_by_side(group, name, lambda: llava(input_ids=input_ids, pixel_values=pixels, logits_to_keep=1),
                         rounds=ROUNDS)
        else:
            dominant, contextual = BUDGETS[budget]
            name = f"VisionZip {dominant}+{contextual}"
            ids = shrink_image_tokens(input_ids, budget, image_token_id=llava.config.image_token_id,
                                      placeholders_per_image=STOCK)["input_ids"]
            with vz.patched(llava, dominant=dominant, contextual=contextual):
                side_by_side(group, name, lambda: llava(input_ids=ids, pixel_values=pixels, logits_to_keep=1),
                             rounds=ROUNDS)
        _LLAVA_RESULTS[name if budget != "stock" else "stock"] = benchmark.stats.stats.median


# ------------------------------------------------------------------------------------------------
# LLaVA-NeXT: one 672x672 image, 5 crops


@pytest.fixture(scope="module")
def llava_next(request):
    import visionzip_kernels as vz
    from visionzip_kernels.integrations.transformers import get_patch

    model = small_llava_next()
    with vz.patched(model, dominant=54, contextual=10):  # the stock placeholder count, from the model's geometry
        stock = get_patch(model).stock_placeholders(torch.tensor([NEXT_IMAGE]))[0]
    yield model, stock
    _write_speedups(request, f"LLaVA-NeXT LLM prefill, {TEXT} text tokens, speed-up over stock (same run):",
                    _NEXT_PREFILL, "stock")
    _write_speedups(request, "LLaVA-NeXT forward to the first token (5-crop tower + projector + prefill):",
                    _NEXT_RESULTS, "stock")


def _next_name(budget) -> str:
    if budget == "stock":
        return "stock"
    dominant, contextual = NEXT_BUDGETS[budget]
    return f"VisionZip {budget} ({NEXT_CROPS} x {dominant}+{contextual})"


@pytest.mark.parametrize("budget", ["stock", *sorted(NEXT_BUDGETS, reverse=True)])  # stock first: the baseline
def test_next_prefill(side_by_side, benchmark, llava_next, budget) -> None:
    model, stock = llava_next
    visual = stock if budget == "stock" else budget
    embeds = torch.randn(1, visual + TEXT, model.config.text_config.hidden_size,
                         generator=torch.Generator().manual_seed(0))
    name = f"{visual} visual + {TEXT} text" + (" (stock)" if budget == "stock" else f" ({_next_name(budget)})")
    with torch.no_grad():
        side_by_side(f"LLM prefill, small LLaVA-NeXT (2 layers), one 672x672 image, {TEXT} text tokens, fp32", name,
                     lambda: prefill(model, embeds), rounds=NEXT_ROUNDS)
    _NEXT_PREFILL[_next_name(budget)] = benchmark.stats.stats.median


@pytest.mark.parametrize("budget", ["stock", *sorted(NEXT_BUDGETS, reverse=True)])  # stock first: the baseline
def test_next_first_token(side_by_side, benchmark, llava_next, budget) -> None:
    import visionzip_kernels as vz
    from visionzip_kernels.integrations.transformers import shrink_inputs

    model, stock = llava_next
    size = model.config.vision_config.image_size
    inputs = {
        "input_ids": _prompt(model, stock),
        "pixel_values": torch.randn(1, NEXT_CROPS, 3, size, size, generator=torch.Generator().manual_seed(2)),
        "image_sizes": torch.tensor([NEXT_IMAGE]),
    }
    group = f"LLaVA-NeXT forward to the first token, small LLaVA-NeXT, one 672x672 image, {TEXT} text tokens, fp32"
    name = _next_name(budget)
    with torch.no_grad():
        if budget == "stock":
            side_by_side(group, f"stock ({stock} visual tokens)", lambda: model(**inputs, logits_to_keep=1),
                         rounds=NEXT_ROUNDS)
        else:
            dominant, contextual = NEXT_BUDGETS[budget]
            with vz.patched(model, dominant=dominant, contextual=contextual):
                shrunk = shrink_inputs(model, inputs)
                assert int((shrunk["input_ids"] == model.config.image_token_id).sum()) == budget
                side_by_side(group, name, lambda: model(**shrunk, logits_to_keep=1), rounds=NEXT_ROUNDS)
    _NEXT_RESULTS[name] = benchmark.stats.stats.median
