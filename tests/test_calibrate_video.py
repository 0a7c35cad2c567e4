"""``python -m visionzip_kernels.calibrate`` with video prompts, end to end on tiny random-init Qwen2.5-VL and
Qwen2-VL checkpoints: a video-only prompt (a folder of frames) and a mixed image + video prompt (a list of
frames, with ``fps``), 3 budgets; per-prompt agreement, KL and visual tokens checked against the models run
here on the processor's own output (tests/test_calibrate.py's ``run_and_check`` / ``direct_numbers``).

transformers' video processors need torchvision, which the project venv lacks: these tests skip there (with
the reason). They run in the vLLM stage's venv (torch + torchvision from PyPI) once the package's extension is
built against that torch and matplotlib is importable (the command writes its plot), e.g. from a checkout
built there::

    PYTHONPATH=. ~/.cache/visionzip-vllm-venv/bin/python -m pytest tests/test_calibrate_video.py -q -p no:cacheprovider
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from test_calibrate import (  # noqa: E402
    qwen_processor,
    run_and_check,
    write_frames,
    write_prompts,
)
from test_qwen_vl import tiny_qwen  # noqa: E402

from visionzip_kernels import calibrate  # noqa: E402

FRAMES = 4  # per video: 2 temporal slices of 2 frames
FPS = 2.0  # the mixed prompt's frame rate: Qwen2.5-VL's second_per_grid_ts = 2 / FPS = 1 s per slice


def qwen_video_processor():
    """A Qwen2-VL video processor at the tiny model's geometry (patch 4, merge 2, 2 frames a slice), or a skip
    naming why there is none (torchvision missing or unusable against this torch)."""
    try:
        import torchvision  # noqa: F401  (transformers' video processors are torchvision-backed)

        video_processor = transformers.Qwen2VLVideoProcessor(
            patch_size=4, merge_size=2, temporal_patch_size=2,
            size={"shortest_edge": 64, "longest_edge": 64 * 64 * FRAMES})
        # one call, so that a processor that builds but cannot run is a skip too
        video_processor(videos=[[torch.zeros(3, 8, 8, dtype=torch.uint8)] * 2], do_sample_frames=False,
                        return_tensors="pt")
    except Exception as exc:  # ImportError, or torchvision's own load errors against a mismatched torch
        pytest.skip(f"no working Qwen video processor here (transformers' video processors need torchvision): "
                    f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
    return video_processor


def write_video_prompts(folder: Path) -> tuple[Path, dict[str, list[Path]]]:
    """prompts.jsonl: line 1 a video given as a folder of frames (names whose natural order is not their
    string order), line 2 an image and a video given as a list of frames, with ``fps``. Returns the file
    and, per video field value, its frames in time order (what the direct computation reads)."""
    write_prompts(folder, [[(32, 32)]])  # images/p0_0.png, 32 x 32 px -> 16 merged tokens
    folder_frames = write_frames(folder / "clip", [f"f{i}.png" for i in (9, 10, 11, 100)], seed=1)
    listed_frames = write_frames(folder / "frames", [f"{c}.png" for c in "dcba"], seed=2)  # listed in this order
    listed = [str(p.relative_to(folder)) for p in listed_frames]
    lines = [{"video": "clip", "prompt": "what is in this image"},
             {"image": "images/p0_0.png", "video": listed, "fps": FPS, "prompt": "describe the picture"}]
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path, {"clip": folder_frames, json.dumps(listed): listed_frames}


def video_record_inputs(frames_of: dict[str, list[Path]]):
    """``record_inputs`` for ``direct_numbers``: the processor called as a user calls it on one line (the
    image, then the video's frames in time order, all of them; the frame rate as the video's metadata)."""
    from PIL import Image
    from transformers.video_utils import VideoMetadata

    def record_inputs(processor, record: dict, folder: Path) -> dict:
        video = record["video"]
        frames = [Image.open(p).convert("RGB") for p in frames_of[video if isinstance(video, str) else
                                                                   json.dumps(video)]]
        content = ([{"type": "image"}] if "image" in record else []) + [{"type": "video"}]
        messages = [{"role": "user", "content": content + [{"type": "text", "text": record["prompt"]}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        kwargs = {"images": [Image.open(folder / record["image"]).convert("RGB")]} if "image" in record else {}
        if "fps" in record:
            kwargs["video_metadata"] = [VideoMetadata(total_num_frames=len(frames), fps=record["fps"],
                                                      frames_indices=list(range(len(frames))))]
        return processor(text=text, videos=[frames], do_sample_frames=False, return_tensors="pt", **kwargs)

    return record_inputs


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen2_vl"])
def test_video_and_mixed_prompts_end_to_end(tmp_path, capsys, monkeypatch, kind):
    video_processor = qwen_video_processor()
    model_dir = tmp_path / kind
    tiny_qwen(kind).save_pretrained(model_dir)
    processor = qwen_processor(monkeypatch, kind, video_processor)
    monkeypatch.setattr(calibrate, "load_processor", lambda path: processor)
    prompts, frames_of = write_video_prompts(tmp_path)
    model = transformers.AutoModelForImageTextToText.from_pretrained(model_dir, local_files_only=True).eval()
    record_inputs = video_record_inputs(frames_of)
    stock_inputs = [record_inputs(processor, json.loads(line), tmp_path) for line in prompts.read_text().splitlines()]
    assert [x["video_grid_thw"].tolist() for x in stock_inputs] == [[[2, 8, 8]], [[2, 8, 8]]]
    if kind == "qwen2_5_vl":  # the line's fps reaches the processor: 2 frames a slice at FPS frames a second
        assert stock_inputs[1]["second_per_grid_ts"].tolist() == [2 / FPS]

    encoded = []  # what the command gives the model, to compare with the processor called here
    command_encode = calibrate.encode
    monkeypatch.setattr(calibrate, "encode", lambda *args: encoded.append(command_encode(*args)) or encoded[-1])

    budgets = (4, 8, 16)  # per image and per temporal slice of the video (16 merged tokens each)
    report = run_and_check(model, processor, model_dir, prompts, budgets, 0.95, tmp_path / "out", capsys,
                           {b: [2 * b, 3 * b] for b in budgets}, record_inputs)
    assert report["stock"]["visual_tokens"] == [32, 48]  # 2 slices x 16; 16 + 2 x 16
    # The same tensors as the processor called here: every frame in time order, the line's fps as metadata.
    assert len(encoded) == 2
    for command, direct in zip(encoded, stock_inputs):
        assert set(command) == set(direct)
        for key in direct:
            assert torch.equal(command[key], direct[key]), key
    full = report["budgets"][-1]  # 16 of 16 tokens kept everywhere is the stock prompt
    assert full["agreement"] == 1.0 and full["kl_mean"] < 1e-9

    # A budget above a slice's 16 tokens: one line naming it and the video's line, before the long runs.
    argv = ["--model", str(model_dir), "--prompts", str(prompts), "--budgets", "8,20", "--out", str(tmp_path / "o2")]
    assert calibrate.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"calibrate: --budgets 20 does not fit the videos of {prompts}:1: ")
