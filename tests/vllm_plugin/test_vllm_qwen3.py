"""The vLLM plug-in on Qwen3-VL (DeepStack) and Qwen3.5, end to end on vLLM's CPU engine (.ci/vllm_stage.sh;
skipped where vLLM is not installed).

The oracle is this package's transformers integration, which for the Qwen3 generation needs transformers 5.23's
forward (``mm_encoder_outputs``), while vLLM 0.32's CPU build pins transformers < 5.20: it runs in the project's
venv (``$VISIONZIP_REPO/.venv/bin/python``, made by ``make test``; ``VISIONZIP_PROJECT_PYTHON`` overrides it), in a
subprocess (tests/vllm_plugin/transformers_run.py) on the same saved checkpoint, images and budget.

- **Qwen3-VL** (fp32): the same prompt ids, greedy tokens and first-token log-probabilities within 1e-4 for one
  image, two images of different sizes, a batch of different sizes, a ``max_num_batched_tokens`` that splits
  images across prefill chunks, and prefix caching with the same image sent twice; not enabled, the plug-in's
  outputs equal stock vLLM's. Videos (tests/vllm_plugin/qwen3_video_run.py; the transformers side gets the
  pixels vLLM's processor made, its video processor needing torchvision): stock vLLM equals stock transformers,
  and with VisionZip each frame's run keeps its slice's D_s + K_s and a video, alone across prefill chunks or
  with an image in one chunk or across chunks, equals the transformers integration (prompt, tokens, 1e-4).
- **Qwen3.5**: vLLM 0.32's CPU kernel for its linear-attention (Gated DeltaNet) layers takes bf16 only
  ("CPU GDN attention requires BF16."), so both sides run in bf16, where two frameworks' kernels agree on the
  prompt, the greedy tokens here, but not to 1e-4: the log-probabilities are compared within
  :data:`BF16_LOGPROB_ATOL` (stock vLLM and stock transformers differ by up to 0.03 there: bf16 logits near -3
  are quantised to 1/64). The prefix-cache case is Qwen3-VL's only: with prefix caching on, vLLM 0.32's CPU
  engine runs the hybrid Qwen3.5 in Mamba cache mode 'align' and reported no cache hits for these prompts.
  Not enabled, the plug-in equals stock vLLM in bf16 too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from test_vllm_plugin import run_engines  # noqa: E402
from tiny_qwen import prompt  # noqa: E402
from tiny_qwen3 import build_tiny_qwen3  # noqa: E402

from visionzip_kernels.integrations.vllm.qwen import media_runs  # noqa: E402

LOGPROB_ATOL = 1e-4
BF16_LOGPROB_ATOL = 0.1
MAX_TOKENS = 6
BUDGET = {"dominant": 0.65, "contextual": 0.05}
# Image sizes in multiples of 32 px (the 2x2 merge of 16-px patches), so the processor does not resize.
ONE = {"text": prompt(1), "images": [[288, 224, 1]]}  # 9 x 7 units -> 40 + 2 kept
# ONE's image with other text after it: the prefix cache holds ONE's first block (inside the image) only.
ONE_ELSE = {"text": prompt(1, "What is in this image?"), "images": ONE["images"]}
TWO = {"text": prompt(2, "Compare the two images and name what differs."), "images": [[192, 128, 2], [128, 256, 3]]}
BATCH = [{"text": prompt(1, t), "images": [size]} for t, size in (
    ("What is in this image?", [256, 160, 4]), ("Describe the picture in one sentence.", [96, 288, 5]),
    ("There is a small boat on the lake.", [256, 256, 6]))]
REQUESTS = [ONE, TWO, *BATCH]
CHUNK = 20  # tokens per step: every image above (16-42 placeholders with VisionZip) straddles prefill chunks
CHUNKED = dict(max_num_batched_tokens=CHUNK, enable_chunked_prefill=True, enable_prefix_caching=False)
PLAIN = dict(max_num_batched_tokens=1024, enable_prefix_caching=False)
CACHED = dict(max_num_batched_tokens=1024, enable_prefix_caching=True, block_size=32)
BF16 = dict(dtype="bfloat16")


def project_python() -> tuple[Path, Path]:
    """(the repository whose venv has transformers 5.23 and this package built, its python)."""
    repo = Path(os.environ.get("VISIONZIP_REPO", HERE.parents[1]))
    python = Path(os.environ.get("VISIONZIP_PROJECT_PYTHON", repo / ".venv" / "bin" / "python"))
    if not python.exists():
        pytest.skip(f"no project venv at {python} (make test creates it; VISIONZIP_PROJECT_PYTHON names another): "
                    "the Qwen3 transformers integration needs transformers 5.23, which vLLM's venv cannot have")
    return repo, python


def transformers_reference(checkpoint: Path, requests: list[dict], budget: dict | None, tmp_path: Path,
                           dtype: str = "float32") -> list[dict]:
    """Per request: prompt ids and length, greedy tokens, first-token log-probabilities (transformers + VisionZip)."""
    repo, python = project_python()
    spec, out = tmp_path / "transformers_spec.json", tmp_path / "transformers_out.json"
    spec.write_text(json.dumps({"model": str(checkpoint), "dtype": dtype, "max_tokens": MAX_TOKENS, "budget": budget,
                                "requests": requests}))
    env = {**os.environ, "PYTHONPATH": str(repo)}  # the repository's package, built for the project venv's torch
    done = subprocess.run([str(python), str(repo / "tests" / "vllm_plugin" / "transformers_run.py"), str(spec),
                           str(out)], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-6000:]
    return json.loads(out.read_text())


def assert_matches(result: dict, reference: dict, what: str, atol: float = LOGPROB_ATOL) -> None:
    assert result["prompt"] == reference["prompt"], what
    assert result["tokens"] == reference["tokens"], what
    for token, logprob in result["first_logprobs"].items():
        assert abs(logprob - reference["logprobs"][int(token)]) <= atol, (what, token)


def run_qwen3_engines(checkpoint: Path, engines: list[dict], tmp_path: Path, plugins: bool = True) -> dict:
    return run_engines(checkpoint, engines, tmp_path, plugins, max_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def qwen3_vl(tmp_path_factory) -> Path:
    return build_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3-vl"), kind="qwen3_vl")


@pytest.fixture(scope="module")
def qwen3_vl_results(qwen3_vl, tmp_path_factory) -> dict:
    engines = [
        {"name": "not_enabled", "engine": PLAIN, "calls": [[ONE], [TWO], BATCH]},
        {"name": "plain", "hf_overrides": {"visionzip": BUDGET}, "engine": PLAIN, "calls": [[ONE], [TWO], BATCH]},
        {"name": "chunked", "hf_overrides": {"visionzip": BUDGET}, "engine": CHUNKED, "calls": [[ONE], [TWO], BATCH]},
        {"name": "cached", "hf_overrides": {"visionzip": BUDGET}, "engine": CACHED,
         "calls": [[ONE], [ONE], [ONE_ELSE], [TWO], [TWO]]},
    ]
    return run_qwen3_engines(qwen3_vl, engines, tmp_path_factory.mktemp("qwen3-vl"))


@pytest.fixture(scope="module")
def qwen3_vl_reference(qwen3_vl, tmp_path_factory) -> list[dict]:
    """transformers + VisionZip on REQUESTS, then ONE_ELSE."""
    return transformers_reference(qwen3_vl, [*REQUESTS, ONE_ELSE], BUDGET, tmp_path_factory.mktemp("qwen3-vl-tf"))


def assert_equal_runs(calls: list, stock_calls: list) -> None:
    """Two engines' results on the same calls: the same prompts, tokens and first log-probabilities (1e-6)."""
    assert len(calls) == len(stock_calls)
    for call, (mine, theirs) in enumerate(zip(calls, stock_calls)):
        assert len(mine) == len(theirs), call
        for request, (a, b) in enumerate(zip(mine, theirs)):
            assert a["prompt"] == b["prompt"] and a["tokens"] == b["tokens"], (call, request)
            assert a["first_logprobs"].keys() == b["first_logprobs"].keys(), (call, request)
            for token, logprob in a["first_logprobs"].items():
                assert abs(logprob - b["first_logprobs"][token]) <= 1e-6, (call, request, token)


def test_qwen3_vl_not_enabled_equals_stock_vllm(qwen3_vl, qwen3_vl_results, tmp_path):
    stock = run_qwen3_engines(qwen3_vl, [{"name": "stock", "engine": PLAIN, "calls": [[ONE], [TWO], BATCH]}],
                              tmp_path, plugins=False)["stock"]
    assert_equal_runs(qwen3_vl_results["not_enabled"], stock)


def test_qwen3_vl_stock_vllm_equals_transformers(qwen3_vl, qwen3_vl_results, tmp_path):
    # The harness: without VisionZip both frameworks (and both venvs) agree on this checkpoint.
    reference = transformers_reference(qwen3_vl, REQUESTS, None, tmp_path)
    results = [r for call in qwen3_vl_results["not_enabled"] for r in call]
    for request, result, expected in zip(REQUESTS, results, reference):
        assert_matches(result, expected, f"stock: {request}")


@pytest.mark.parametrize("engine", ["plain", "chunked"])
def test_qwen3_vl_plugin_equals_transformers_integration(qwen3_vl_results, qwen3_vl_reference, engine):
    results = [r for call in qwen3_vl_results[engine] for r in call]
    for request, result, expected in zip(REQUESTS, results, qwen3_vl_reference):
        assert_matches(result, expected, f"{engine}: {request}")
    stock = qwen3_vl_results["not_enabled"][0][0]
    assert results[0]["prompt_len"] < stock["prompt_len"]  # the placeholders were shrunk before the encoder ran


def image_runs(checkpoint: Path, result: dict) -> list[tuple[int, int, int]]:
    config = json.loads((checkpoint / "config.json").read_text())
    return media_runs(torch.tensor(result["prompt"]), [config["image_token_id"]])


def test_qwen3_vl_chunked_engine_split_images_across_chunks(qwen3_vl, qwen3_vl_results):
    for call in qwen3_vl_results["chunked"][:2]:
        runs = image_runs(qwen3_vl, call[0])
        assert any(start // CHUNK != (end - 1) // CHUNK for start, end, _ in runs), runs


def test_qwen3_vl_prefix_caching_with_the_same_image_twice(qwen3_vl, qwen3_vl_results, qwen3_vl_reference):
    one, one_again, one_else, two, two_again = (call[0] for call in qwen3_vl_results["cached"])
    for first, again in ((one, one_again), (two, two_again)):
        assert first["cached_tokens"] == 0 and 0 < again["cached_tokens"] < again["prompt_len"]
    start, end, _ = image_runs(qwen3_vl, one_else)[0]
    assert start < one_else["cached_tokens"] < end  # ONE's image partly from the cache, its last rows computed
    expected = dict(zip(("one", "two", "one_else"), (qwen3_vl_reference[0], qwen3_vl_reference[1],
                                                      qwen3_vl_reference[-1])))
    for result, name in ((one, "one"), (one_again, "one"), (one_else, "one_else"), (two, "two"), (two_again, "two")):
        assert_matches(result, expected[name], f"cached: {name}")


def test_qwen3_5(tmp_path_factory):
    checkpoint = build_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3.5"), kind="qwen3_5")
    engines = [{"name": name, "hf_overrides": {"visionzip": BUDGET}, "engine": {**engine, **BF16},
                "calls": [[ONE], [TWO], BATCH]} for name, engine in (("plain", PLAIN), ("chunked", CHUNKED))]
    engines.append({"name": "not_enabled", "engine": {**PLAIN, **BF16}, "calls": [[ONE], [TWO], BATCH]})
    results = run_qwen3_engines(checkpoint, engines, tmp_path_factory.mktemp("qwen3.5"))
    stock = run_qwen3_engines(checkpoint, [{**engines[-1], "name": "stock"}],
                              tmp_path_factory.mktemp("qwen3.5-stock"), plugins=False)["stock"]
    assert_equal_runs(results["not_enabled"], stock)
    reference = transformers_reference(checkpoint, REQUESTS, BUDGET, tmp_path_factory.mktemp("qwen3.5-tf"),
                                       dtype="bfloat16")
    for name in ("plain", "chunked"):
        for request, result, expected in zip(REQUESTS, [r for call in results[name] for r in call], reference):
            assert_matches(result, expected, f"qwen3_5 {name}: {request}", atol=BF16_LOGPROB_ATOL)


def run_video(checkpoint: Path, hf_overrides: dict, batched: int, with_image: bool, out: Path,
              pixels: Path | None = None) -> dict:
    done = subprocess.run([sys.executable, str(HERE / "qwen3_video_run.py"), str(checkpoint), json.dumps(hf_overrides),
                           str(batched), "1" if with_image else "0", str(out), *([str(pixels)] if pixels else [])],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-6000:]
    if pixels is not None:
        assert pixels.exists(), "the video run saved no pixels: was the engine not in the test's process?"
    return json.loads(out.read_text())


def test_qwen3_vl_videos_pruned_per_slice_equal_transformers_integration(qwen3_vl, tmp_path):
    on = {"visionzip": BUDGET}
    video_id = json.loads((qwen3_vl / "config.json").read_text())["video_token_id"]
    stock = {image: run_video(qwen3_vl, {}, 1024, image, tmp_path / f"stock{image}.json", tmp_path / f"video{image}.pt")
             for image in (False, True)}
    requests = [{"input_ids": stock[image]["prompt"], "images": [[288, 224, 1]] if image else [],
                 "video": str(tmp_path / f"video{image}.pt")} for image in (False, True)]
    # The reference runner's video input is right: stock vLLM equals stock transformers on it.
    (tmp_path / "tf_stock").mkdir()
    (tmp_path / "tf_pruned").mkdir()
    for image, expected in zip((False, True), transformers_reference(qwen3_vl, requests, None, tmp_path / "tf_stock")):
        assert_matches(stock[image], expected, f"stock video, image {image}")
    reference = transformers_reference(qwen3_vl, requests, BUDGET, tmp_path / "tf_pruned")
    pruned = {"video chunked": (run_video(qwen3_vl, on, CHUNK, False, tmp_path / "chunked0.json"), reference[0]),
              "video + image": (run_video(qwen3_vl, on, 1024, True, tmp_path / "whole1.json"), reference[1]),
              "video + image chunked": (run_video(qwen3_vl, on, CHUNK, True, tmp_path / "chunked1.json"), reference[1])}
    for what, (result, expected) in pruned.items():
        assert_matches(result, expected, what)
        # 2 temporal slices of 6 x 7 units (the processor resizes the 128x160 frames to 192x224): each frame's
        # run keeps 27 + 2 (0.65 and 0.05 of 42, rounded down) of 42
        frames = [end - start for start, end, _ in media_runs(torch.tensor(result["prompt"]), [video_id])]
        assert frames == [29, 29], (what, frames)
    # each frame's run shrank, nothing else (the timestamps and markers as stock)
    assert len(stock[False]["prompt"]) - len(pruned["video chunked"][0]["prompt"]) == 2 * (42 - 29)
