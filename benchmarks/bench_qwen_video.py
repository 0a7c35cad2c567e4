"""Qwen2.5-VL video: the LLM prefill of a 16-frame 448 x 448 video prompt, stock vs VisionZip (``shrink_inputs``).

    python -m pytest benchmarks/bench_qwen_video.py -q -p no:cacheprovider --benchmark-columns=median,min,max
    python benchmarks/bench_qwen_video.py [--rounds 5] [--layers 1]   # script mode: the summary only

Why Qwen2.5-VL: its video prompt is one block of t*h*w/4 placeholders with 3-D positions from
``video_grid_thw`` and ``second_per_grid_ts`` (no per-frame timestamp text as in Qwen3-VL), so the
prompt length is the video's tokens plus the text, and the token ratio bounds the speed-up plainly.

The model: Qwen2.5-VL-3B's geometry, random init (weights do not change the time). LLM at its real
width (hidden 2048, 16 heads and 2 KV heads of 128, SwiGLU 11008, multimodal rope sections 16/24/24)
with ``VZ_VIDEO_LLM_LAYERS`` of its 36 layers (default 1 on CPU, where one prefill of the stock prompt
takes ~10 s on a 2-core machine; 8 on CUDA) and a 32000-token vocabulary; the vision tower (width 1280, 16 heads, patch
14, windows of 112 px, output 2048) at ``VZ_VIDEO_VISION_DEPTH`` blocks (default 1 on CPU, the real 32
on CUDA). The tower only encodes the video once, outside the timed calls: the prefill does not depend
on its depth, and VisionZip's kept counts do not either.

The video: 16 frames of 448 x 448 px, built without a processor: ``pixel_values_videos``
[8 * 32 * 32, 3 * 2 * 14 * 14] and ``video_grid_thw`` = [[8, 32, 32]] (temporal patch 2: 8 temporal
slices; 32 x 32 patches of 14 px), ``second_per_grid_ts`` = [1.0] (2 fps): 8 * 16 * 16 = 2048 video
tokens for the LLM, among ``VZ_PREFILL_TEXT`` (64) text tokens (vision start and end included): a
2112-token prompt. VisionZip keeps each temporal slice's image budget (0.65 / 0.05 of its 256 merge
units: 166 + 12 per slice, 1424 in all, a 1488-token prompt: token ratio 1.42); the 0.45 / 0.05 budget
of upstream's README (1016 video tokens, 1080 in all: 1.96) is timed beside it.

Timed: one prefill, the model's forward over the whole prompt given ``inputs_embeds`` and the 3-D
``position_ids`` (KV cache written, the last token's logits): the stock prompt (the stock tower's
features scattered at the placeholders, positions from the model's ``get_rope_index``) vs the prompt
``shrink_inputs`` returns for the patched model. The summary's speed-up is the median over interleaved
rounds (:func:`examples.profiling.interleaved_times`) of stock / VisionZip, beside the token ratio
(stock prompt / VisionZip prompt) that bounds it while the cost is linear in the tokens (projections,
MLP); the issue's target: speed-up >= 0.9 x that bound at the default budget.

``VZ_BENCH_ROUNDS`` (default 5 on CPU, 10 on CUDA) rounds; ``VZ_QWEN_DEVICE`` (default cuda when
available, else cpu); CPU runs fp32, CUDA bf16.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

if __name__ == "__main__":  # script mode: the repository root on the path, as pytest's rootdir puts it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import visionzip_kernels as vz  # noqa: E402
from examples.profiling import format_bytes, interleaved_times, load_average, peak_memory_bytes  # noqa: E402

if __name__ != "__main__":  # collected by pytest
    transformers = pytest.importorskip("transformers")

DEVICE = os.environ.get("VZ_QWEN_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
ON_CPU = torch.device(DEVICE).type == "cpu"
DTYPE = torch.float32 if ON_CPU else torch.bfloat16
ROUNDS = int(os.environ.get("VZ_BENCH_ROUNDS", "5" if ON_CPU else "10"))
LLM_LAYERS = int(os.environ.get("VZ_VIDEO_LLM_LAYERS", "1" if ON_CPU else "8"))
VISION_DEPTH = int(os.environ.get("VZ_VIDEO_VISION_DEPTH", "1" if ON_CPU else "32"))
TEXT = int(os.environ.get("VZ_PREFILL_TEXT", "64"))
PATCH, MERGE, TEMPORAL = 14, 2, 2
PIXEL_DIM = 3 * TEMPORAL * PATCH * PATCH
FRAMES, SIZE = 16, 448
VIDEO_GRID = (FRAMES // TEMPORAL, SIZE // PATCH, SIZE // PATCH)  # (t, h, w) = (8, 32, 32)
SECONDS_PER_GRID = 1.0  # 2 frames per temporal patch at 2 fps
IMAGE_ID, VIDEO_ID, VSTART_ID, VEND_ID, PAD_ID = 31000, 31001, 31002, 31003, 0
BUDGETS = {"0.65 / 0.05 (default)": (0.65, 0.05), "0.45 / 0.05": (0.45, 0.05)}


def qwen25_vl_3b(llm_layers: int = LLM_LAYERS, vision_depth: int = VISION_DEPTH):
    """A random-init Qwen2.5-VL with the 3B checkpoint's geometry at ``llm_layers`` LLM layers and
    ``vision_depth`` vision blocks (the last one a full-attention block), on DEVICE in DTYPE."""
    import transformers

    text = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=llm_layers, num_attention_heads=16,
                num_key_value_heads=2, vocab_size=32000, bos_token_id=1, eos_token_id=2, pad_token_id=PAD_ID,
                tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
    full_attention = [i for i in (7, 15, 23, 31) if i < vision_depth - 1] + [vision_depth - 1]
    vision = dict(depth=vision_depth, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=2048,
                  patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, window_size=112,
                  fullatt_block_indexes=sorted(set(full_attention)), tokens_per_second=2)
    config = transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID,
                                           video_token_id=VIDEO_ID, vision_start_token_id=VSTART_ID,
                                           vision_end_token_id=VEND_ID)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    return model.to(DEVICE, DTYPE)


def model_name(model) -> str:
    text, vision = model.config.text_config, model.config.vision_config
    return (f"Qwen2.5-VL-3B geometry (LLM {text.num_hidden_layers} of 36 layers at width {text.hidden_size}, "
            f"tower {vision.depth} of 32 blocks), {DEVICE}, {str(DTYPE).removeprefix('torch.')}")


def video_inputs() -> dict:
    """The processor's output for one 16-frame 448 x 448 video between TEXT text tokens, built directly:
    input_ids [1, S] (vision start, t*h*w/4 video placeholders, vision end), attention_mask, mm_token_type_ids
    (2 at the video tokens), pixel_values_videos, video_grid_thw, second_per_grid_ts."""
    t, h, w = VIDEO_GRID
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, 30000, (TEXT - 2,), generator=g)
    placeholders = t * h * w // (MERGE * MERGE)
    prefix = 8  # a few text tokens (the chat template's) before the video
    input_ids = torch.cat([text[:prefix], torch.tensor([VSTART_ID]), torch.full((placeholders,), VIDEO_ID),
                           torch.tensor([VEND_ID]), text[prefix:]])[None]
    return {
        "input_ids": input_ids.to(DEVICE),
        "attention_mask": torch.ones_like(input_ids).to(DEVICE),
        "mm_token_type_ids": (2 * (input_ids == VIDEO_ID).int()).to(DEVICE),
        "pixel_values_videos": torch.randn(t * h * w, PIXEL_DIM, generator=g).to(DEVICE, DTYPE),
        "video_grid_thw": torch.tensor([VIDEO_GRID]).to(DEVICE),
        "second_per_grid_ts": torch.tensor([SECONDS_PER_GRID]).to(DEVICE),
    }


def stock_prompt(model, inputs: dict) -> dict:
    """The stock model's prefill input: the token embeddings with the stock tower's video features at the
    placeholders, the 3-D positions of the model's ``get_rope_index``."""
    qwen = model.model
    with torch.no_grad():
        features = torch.cat(type(qwen).get_video_features(qwen, inputs["pixel_values_videos"],
                                                           inputs["video_grid_thw"]).pooler_output)
        embeds = qwen.get_input_embeddings()(inputs["input_ids"])
        mask = (inputs["input_ids"] == VIDEO_ID).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask, features.to(embeds.dtype))
        position_ids, _ = qwen.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                              video_grid_thw=inputs["video_grid_thw"],
                                              second_per_grid_ts=inputs["second_per_grid_ts"],
                                              attention_mask=inputs["attention_mask"])
    return {"inputs_embeds": embeds, "position_ids": position_ids, "attention_mask": inputs["attention_mask"]}


def visionzip_prompt(model, inputs: dict, dominant: float, contextual: float) -> dict:
    """The prefill input ``shrink_inputs`` gives for the model patched at (dominant, contextual): the kept
    tokens' embeddings and their original 3-D positions."""
    from visionzip_kernels.integrations.transformers import shrink_inputs

    with torch.no_grad(), vz.patched(model, dominant=dominant, contextual=contextual):
        shrunk = shrink_inputs(model, dict(inputs))
    return {"inputs_embeds": shrunk["inputs_embeds"], "position_ids": shrunk["position_ids"],
            "attention_mask": shrunk["attention_mask"], "video_tokens": int((shrunk["input_ids"] == VIDEO_ID).sum())}


def slice_budget(dominant: float, contextual: float) -> int:
    """The video tokens VisionZip keeps by default: each temporal slice its image budget of h*w/4 units."""
    t, h, w = VIDEO_GRID
    n = h * w // (MERGE * MERGE)
    return t * (int(dominant * n) + max(int(contextual * n), 1))


def prefill(model, prompt: dict) -> torch.Tensor:
    """One prefill: the forward over the whole prompt (KV cache written), the last token's logits."""
    return model(inputs_embeds=prompt["inputs_embeds"], position_ids=prompt["position_ids"],
                 attention_mask=prompt["attention_mask"], use_cache=True, logits_to_keep=1).logits


def prompts(model) -> dict[str, dict]:
    """name -> prefill input: ``stock`` first (the baseline), then each of BUDGETS."""
    inputs = video_inputs()
    stock = stock_prompt(model, inputs)
    stock["video_tokens"] = int((inputs["input_ids"] == VIDEO_ID).sum())
    return {"stock": stock, **{name: visionzip_prompt(model, inputs, *budget) for name, budget in BUDGETS.items()}}


@dataclass
class PrefillResult:
    name: str
    tokens: int  # the prompt's length
    video_tokens: int
    median_s: float
    speedup: float  # median over rounds of stock / this
    bound: float  # stock prompt length / this prompt's
    peak: int | None

    def line(self) -> str:
        check = "" if self.name == "stock" else f" = {self.speedup / self.bound:4.2f} x bound"
        return (f"    {self.name:<24} {self.tokens:5d} tokens ({self.video_tokens:4d} video) "
                f"{self.median_s * 1e3:9.1f} ms   speed-up {self.speedup:5.2f}x   token ratio (bound) "
                f"{self.bound:5.2f}{check}   peak {format_bytes(self.peak)}")


def measure_prefill(model, rounds: int = ROUNDS) -> list[PrefillResult]:
    """The prompts' prefills timed interleaved on ``model`` (unpatched: the prompts carry VisionZip's tokens)."""
    built = prompts(model)
    with torch.no_grad():
        paths = {name: (lambda prompt=prompt: prefill(model, prompt)) for name, prompt in built.items()}
        peaks = {name: peak_memory_bytes(fn, DEVICE) for name, fn in paths.items()}
        timing = interleaved_times(paths, rounds, device=DEVICE)
    stock_tokens = built["stock"]["inputs_embeds"].shape[1]
    return [PrefillResult(name, prompt["inputs_embeds"].shape[1], prompt["video_tokens"], timing.median(name),
                          timing.ratio("stock", name), stock_tokens / prompt["inputs_embeds"].shape[1], peaks[name])
            for name, prompt in built.items()]


def title(model) -> str:
    t, h, w = VIDEO_GRID
    return (f"LLM prefill, {FRAMES} frames {SIZE}x{SIZE} px (video_grid_thw {t}x{h}x{w}) + {TEXT} text tokens, "
            f"{model_name(model)}")


# ------------------------------------------------------------------------------------------------
# pytest: pytest-benchmark per prompt, then the interleaved summary

_RESULTS: list[PrefillResult] = []


class _Summary:
    def __init__(self, heading: str):
        self.heading = heading

    def pytest_terminal_summary(self, terminalreporter, config):
        if not _RESULTS:
            return
        write = terminalreporter.write_line
        write("")
        write(f"{self.heading}: speed-up over the stock prompt (interleaved rounds) beside the token ratio that "
              f"bounds it; {load_average()}:")
        for result in _RESULTS:
            write(result.line())


@pytest.fixture(scope="module")
def model(register_summary):
    built = qwen25_vl_3b()
    register_summary("qwen_video_prefill_summary", _Summary(title(built)))
    return built


@pytest.fixture(scope="module")
def video_prompts(model):
    return prompts(model)


@pytest.mark.parametrize("name", ["stock", *BUDGETS])  # stock first: the baseline
def test_prefill(side_by_side, model, video_prompts, name) -> None:
    prompt = video_prompts[name]
    with torch.no_grad():
        side_by_side(title(model), f"{name}: {prompt['video_tokens']} video tokens", lambda: prefill(model, prompt),
                     device=DEVICE, rounds=max(ROUNDS // 2, 1))


def test_prefill_interleaved(model, video_prompts) -> None:
    """The summary's speed-ups; also checks the kept video tokens: each temporal slice its image budget."""
    results = measure_prefill(model)
    for result in results[1:]:
        assert result.video_tokens == slice_budget(*BUDGETS[result.name]), result.name
    _RESULTS.extend(results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="interleaved rounds")
    parser.add_argument("--layers", type=int, default=LLM_LAYERS, help="LLM layers (of the real 36)")
    args = parser.parse_args(argv)
    model = qwen25_vl_3b(llm_layers=args.layers)
    print(f"{title(model)}, {torch.get_num_threads()} threads, {load_average()}:", flush=True)
    for result in measure_prefill(model, args.rounds):
        print(result.line())
    print(load_average())
    return 0


if __name__ == "__main__":
    sys.exit(main())
