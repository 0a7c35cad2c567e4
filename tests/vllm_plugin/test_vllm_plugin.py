"""The vLLM plug-in end to end on vLLM's CPU engine (.ci/vllm_stage.sh runs this in its own venv; skipped
where vLLM is not installed).

One tiny random Qwen2.5-VL checkpoint (tests/vllm_plugin/tiny_qwen.py). The oracle is this package's transformers
integration: ``apply()`` + ``shrink_inputs`` + greedy ``generate`` on the same checkpoint, images and budget.
Every vLLM engine must give the same prompt length, the same greedy tokens and first-token log-probabilities
within 1e-4 (fp32): one image; two images of different sizes in one prompt; a batch of requests with
different sizes; a small ``max_num_batched_tokens`` so that images straddle prefill chunks; prefix caching
with the same image sent twice; the same for videos (one video, an image and a video in one prompt, a video
straddling prefill chunks, the same video twice with prefix caching; docs/SPEC.md "Qwen videos").
With the plug-in installed but not enabled, outputs equal stock vLLM
(run with ``VLLM_PLUGINS=""``, no plug-in loaded), and stock vLLM equals transformers without VisionZip
(the harness itself agrees).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
transformers = pytest.importorskip("transformers")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tiny_qwen import build_tiny_qwen2_5_vl, image, prompt, video  # noqa: E402

import visionzip_kernels as vz  # noqa: E402
from visionzip_kernels.integrations.transformers import shrink_inputs  # noqa: E402
from visionzip_kernels.integrations.vllm.qwen import media_runs  # noqa: E402

LOGPROB_ATOL = 1e-4
MAX_TOKENS = 8
BUDGET = {"dominant": 0.65, "contextual": 0.05}
ONE = {"text": prompt(1), "images": [[224, 168, 1]]}
# ONE's image with other text after it: the prefix cache holds ONE's first block (inside the image) only.
ONE_ELSE = {"text": prompt(1, "What is in this image?"), "images": ONE["images"]}
TWO = {"text": prompt(2, "Compare the two images and name what differs."), "images": [[168, 112, 2], [112, 224, 3]]}
BATCH = [{"text": prompt(1, t), "images": [size]} for t, size in (
    ("What is in this image?", [196, 140, 4]), ("Describe the picture in one sentence.", [84, 252, 5]),
    ("There is a small boat on the lake.", [224, 224, 6]))]
# Videos [[width, height, frames, seed]] (frames in 2-frame temporal slices) at a frame rate: Qwen2.5-VL's
# temporal positions are int(slice * (2 / fps) * tokens_per_second (4)): 4 per slice at 2 fps, 2 at 4 fps.
# ONE_VIDEO: 2 slices of 6x5 units (20 kept each); IMAGE_VIDEO: 3 slices of 5x4 units (14 kept each). The
# last slice's time stays within the spatial extent: where it does not, stock vLLM 0.32 and transformers 5.19
# disagree on the text after the video (max position + 1 vs base + max(h, w)), and the plug-in keeps vLLM's.
ONE_VIDEO = {"text": prompt(0, videos=1), "images": [], "videos": [[168, 140, 4, 7]], "fps": 2.0}
ONE_VIDEO_ELSE = {**ONE_VIDEO, "text": prompt(0, "What is in this image?", videos=1)}
IMAGE_VIDEO = {"text": prompt(1, "Compare the two images and name what differs.", videos=1), "images": [[112, 224, 3]],
               "videos": [[140, 112, 6, 8]], "fps": 4.0}
VIDEO_CALLS = [[ONE_VIDEO], [IMAGE_VIDEO]]
REQUESTS = [ONE, TWO, *BATCH, ONE_VIDEO, IMAGE_VIDEO]  # the requests of IMAGE_CALLS + VIDEO_CALLS, in order
IMAGE_CALLS = [[ONE], [TWO], BATCH]
# 20 tokens per step: every image above (16-42 placeholders with VisionZip) straddles prefill chunks.
CHUNK = 20
CHUNKED = dict(max_num_batched_tokens=CHUNK, enable_chunked_prefill=True, enable_prefix_caching=False)
PLAIN = dict(max_num_batched_tokens=1024, enable_prefix_caching=False)
CACHED = dict(max_num_batched_tokens=1024, enable_prefix_caching=True, block_size=32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny-qwen2.5-vl"))


def run_engines(checkpoint: Path, engines: list[dict], tmp_path: Path, plugins: bool = True,
                fails_with: str | None = None, max_tokens: int = MAX_TOKENS) -> dict:
    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    spec.write_text(json.dumps({"model": str(checkpoint), "engines": engines, "max_tokens": max_tokens}))
    env = dict(os.environ)
    if not plugins:
        env["VLLM_PLUGINS"] = ""  # load no plug-in: stock vLLM
    done = subprocess.run([sys.executable, str(HERE / "engine_run.py"), str(spec), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    if fails_with is not None:
        assert done.returncode != 0 and fails_with in done.stderr, done.stderr[-6000:]
        return {}
    assert done.returncode == 0, done.stderr[-6000:]
    return json.loads(out.read_text())


def transformers_reference(checkpoint: Path, request: dict, budget: dict | None) -> dict:
    """Prompt length, greedy tokens and first-token log-probabilities from transformers (+ VisionZip)."""
    processor = transformers.AutoProcessor.from_pretrained(checkpoint)
    model = transformers.AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    media = {"images": [image(*i) for i in request["images"]] or None}
    if request.get("videos"):  # exactly the given frames at the request's rate, as engine_run.py sends them
        from transformers.video_utils import VideoMetadata

        fps = request.get("fps", 1.0)
        media["videos"] = [video(*v) for v in request["videos"]]
        media["video_metadata"] = [VideoMetadata(total_num_frames=len(v), fps=fps, duration=len(v) / fps,
                                                 frames_indices=list(range(len(v))), video_backend="opencv")
                                   for v in media["videos"]]
        media["do_sample_frames"] = False
    inputs = processor(text=[request["text"]], **media, return_tensors="pt")
    if budget is not None:
        vz.apply(model, **budget)
        inputs = shrink_inputs(model, inputs)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=processor.tokenizer.pad_token_id)
    prompt_len = inputs["input_ids"].shape[1]
    return {"prompt_len": prompt_len, "tokens": out.sequences[0, prompt_len:].tolist(),
            "logprobs": torch.log_softmax(out.scores[0][0].double(), dim=-1)}


def assert_matches(result: dict, reference: dict, what: str) -> None:
    assert result["prompt_len"] == reference["prompt_len"], what
    assert result["tokens"] == reference["tokens"], what
    for token, logprob in result["first_logprobs"].items():
        assert abs(logprob - float(reference["logprobs"][int(token)])) <= LOGPROB_ATOL, (what, token)


@pytest.fixture(scope="module")
def plugin_results(checkpoint, tmp_path_factory) -> dict:
    engines = [
        {"name": "not_enabled", "engine": PLAIN, "calls": IMAGE_CALLS + VIDEO_CALLS},
        {"name": "plain", "hf_overrides": {"visionzip": BUDGET}, "engine": PLAIN, "calls": IMAGE_CALLS + VIDEO_CALLS},
        {"name": "chunked", "hf_overrides": {"visionzip": BUDGET}, "engine": CHUNKED,
         "calls": IMAGE_CALLS + VIDEO_CALLS},
        {"name": "cached", "hf_overrides": {"visionzip": BUDGET}, "engine": CACHED,
         "calls": [[ONE], [ONE], [ONE_ELSE], [TWO], [TWO], [ONE_VIDEO], [ONE_VIDEO], [ONE_VIDEO_ELSE]]},
    ]
    return run_engines(checkpoint, engines, tmp_path_factory.mktemp("plugin"))


@pytest.fixture(scope="module")
def stock_results(checkpoint, tmp_path_factory) -> dict:
    engines = [{"name": "stock", "engine": PLAIN, "calls": IMAGE_CALLS + VIDEO_CALLS}]
    return run_engines(checkpoint, engines, tmp_path_factory.mktemp("stock"), plugins=False)


def test_not_enabled_equals_stock_vllm(plugin_results, stock_results):
    for call, (mine, stock) in enumerate(zip(plugin_results["not_enabled"], stock_results["stock"])):
        for request, (a, b) in enumerate(zip(mine, stock)):
            assert a["prompt_len"] == b["prompt_len"] and a["tokens"] == b["tokens"], (call, request)
            assert a["first_logprobs"].keys() == b["first_logprobs"].keys(), (call, request)
            for token, logprob in a["first_logprobs"].items():
                assert abs(logprob - b["first_logprobs"][token]) <= 1e-6, (call, request, token)


def test_stock_vllm_equals_transformers(checkpoint, stock_results):
    # The harness: without VisionZip both frameworks agree on this checkpoint.
    results = [r for call in stock_results["stock"] for r in call]
    assert len(results) == len(REQUESTS)
    for request, result in zip(REQUESTS, results):
        assert_matches(result, transformers_reference(checkpoint, request, None), request["text"])


@pytest.mark.parametrize("engine", ["plain", "chunked"])
def test_plugin_equals_transformers_integration(checkpoint, plugin_results, engine):
    results = [r for call in plugin_results[engine] for r in call]
    assert len(results) == len(REQUESTS)
    for request, result in zip(REQUESTS, results):
        reference = transformers_reference(checkpoint, request, BUDGET)
        assert_matches(result, reference, f"{engine}: {request}")
    stock_len = transformers_reference(checkpoint, ONE, None)["prompt_len"]
    assert results[0]["prompt_len"] < stock_len  # the image placeholders were shrunk before the encoder ran
    stock_video_len = transformers_reference(checkpoint, ONE_VIDEO, None)["prompt_len"]
    assert results[REQUESTS.index(ONE_VIDEO)]["prompt_len"] < stock_video_len  # and the video placeholders


def image_runs(checkpoint: Path, result: dict, modality: str = "image") -> list[tuple[int, int, int]]:
    config = transformers.AutoConfig.from_pretrained(checkpoint)
    return media_runs(torch.tensor(result["prompt"]), [getattr(config, f"{modality}_token_id")])


def test_the_chunked_engine_split_images_across_chunks(checkpoint, plugin_results):
    # The single-request calls: chunks start at multiples of CHUNK; some image's (video's) tokens cross one.
    for call, modality in zip([*plugin_results["chunked"][:2], *plugin_results["chunked"][-2:]],
                              ["image", "image", "video", "video"]):
        runs = image_runs(checkpoint, call[0], modality)
        assert any(start // CHUNK != (end - 1) // CHUNK for start, end, _ in runs), runs


def test_prefix_caching_with_the_same_image_twice(checkpoint, plugin_results):
    one, one_again, one_else, two, two_again, clip, clip_again, clip_else = (
        call[0] for call in plugin_results["cached"])
    # The repeats were served partly from the prefix cache: ONE and TWO again past their images, ONE's
    # image with other text up to a block boundary inside the image (its last rows computed again).
    for first, again in ((one, one_again), (two, two_again), (clip, clip_again)):
        assert first["cached_tokens"] == 0 and 0 < again["cached_tokens"] < again["prompt_len"]
    start, end, _ = image_runs(checkpoint, one_else)[0]
    assert start < one_else["cached_tokens"] < end
    start, end, _ = image_runs(checkpoint, clip_else, "video")[0]  # the same with ONE_VIDEO's video
    assert start < clip_else["cached_tokens"] < end
    for result, request in ((one, ONE), (one_again, ONE), (one_else, ONE_ELSE), (two, TWO), (two_again, TWO),
                            (clip, ONE_VIDEO), (clip_again, ONE_VIDEO), (clip_else, ONE_VIDEO_ELSE)):
        assert_matches(result, transformers_reference(checkpoint, request, BUDGET), f"cached: {request}")


def test_qwen2_vl(tmp_path_factory):
    checkpoint = build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny-qwen2-vl"), kind="qwen2_vl")
    engines = [{"name": "qwen2_vl", "hf_overrides": {"visionzip": BUDGET}, "engine": CHUNKED,
                "calls": [[ONE], [TWO], [IMAGE_VIDEO]]}]
    results = run_engines(checkpoint, engines, tmp_path_factory.mktemp("qwen2-vl"))["qwen2_vl"]
    assert len(results) == 3
    for request, result in zip([ONE, TWO, IMAGE_VIDEO], [call[0] for call in results]):
        assert_matches(result, transformers_reference(checkpoint, request, BUDGET), f"qwen2_vl: {request}")


def test_an_unsupported_model_with_the_setting_fails_at_engine_start(checkpoint, tmp_path):
    # vLLM's Transformers backend runs this checkpoint as another architecture: the plug-in cannot serve it.
    engines = [{"name": "unsupported", "hf_overrides": {"visionzip": BUDGET},
                "engine": {**PLAIN, "model_impl": "transformers"}, "calls": []}]
    run_engines(checkpoint, engines, tmp_path, fails_with="is not supported by the vLLM plug-in")
