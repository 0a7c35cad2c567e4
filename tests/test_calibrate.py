"""``python -m visionzip_kernels.calibrate`` end to end on tiny random-init LLaVA-1.5 and Qwen2.5-VL checkpoints.

Each test saves a tiny model (the builders of test_integrations / test_qwen_vl) to a temporary folder
with a processor beside it (a word-level tokenizer whose ids match the model's special tokens, the
image processor's PIL backend at small sizes, a small chat template), writes 2 prompts with generated
PNG images, runs the command with 3 budgets and checks its files and table against the models run
here: greedy answers by ``generate``, the first token's distribution by a plain forward pass.

Qwen's processors hold a video processor, which needs torchvision (not installed here): the Qwen
processor is built without one and handed to the command through its ``load_processor``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from PIL import Image  # noqa: E402
from test_integrations import tiny_llava  # noqa: E402
from test_qwen_vl import IMAGE, PAD, VEND, VIDEO, VSTART, tiny_qwen  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

import visionzip_kernels as vz  # noqa: E402
from visionzip_kernels import calibrate  # noqa: E402
from visionzip_kernels.integrations import transformers as vzt  # noqa: E402

NEW_TOKENS = 3
WORDS = "what is in this image describe the picture colour of the square user assistant".split()
LLAVA_TEMPLATE = ("USER: {% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
                  "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT:")
QWEN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
                 "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
                 "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>{% else %}{{ c['text'] }}"
                 "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")


# ------------------------------------------------------------------------------------------------
# Tiny checkpoints


def word_tokenizer(vocab_size: int, special: dict[str, int]):
    """A whitespace word-level tokenizer of exactly ``vocab_size`` ids, the ``special`` tokens at the
    given ids (those the tiny models' configs use), the other ids words."""
    vocab = dict(special)
    free = iter(i for i in range(vocab_size) if i not in special.values())
    for word in WORDS + [f"w{i}" for i in range(vocab_size)]:
        if len(vocab) == vocab_size:
            break
        if word not in vocab:
            vocab[word] = next(free)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = [t for t in special if t not in ("<pad>", "<s>", "</s>", "<unk>")]
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                                bos_token="<s>", eos_token="</s>", additional_special_tokens=extra)


def llava_checkpoint(folder: Path) -> Path:
    """A tiny LLaVA-1.5 (CLIP 112 px / 14: 64 placeholders per image) and its processor, saved to ``folder``."""
    tokenizer = word_tokenizer(100, {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<image>": 99})
    image_processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 112},
                                                         crop_size={"height": 112, "width": 112})
    processor = transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                            vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                            chat_template=LLAVA_TEMPLATE)
    tiny_llava(image_token_id=99).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def qwen_processor(monkeypatch, kind: str = "qwen2_5_vl", video_processor=None):
    """A Qwen2.5-VL (or Qwen2-VL: ``kind``) processor at the tiny model's geometry (patch 4, merge 2), with
    ``video_processor`` (none by default: it needs torchvision)."""
    tokenizer = word_tokenizer(128, {"<pad>": PAD, "<s>": 1, "</s>": 2, "<unk>": 3, "<|image_pad|>": IMAGE,
                                     "<|video_pad|>": VIDEO, "<|vision_start|>": VSTART, "<|vision_end|>": VEND,
                                     "<|im_start|>": 104, "<|im_end|>": 105})
    image_processor = transformers.Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                                            size={"shortest_edge": 64, "longest_edge": 64 * 64})
    check = transformers.ProcessorMixin.check_argument_for_proper_class
    with monkeypatch.context() as patch:
        # Its class check looks up the video processor's base class, a torchvision placeholder here: skip it for
        # the absent video processor only.
        patch.setattr(transformers.ProcessorMixin, "check_argument_for_proper_class",
                      lambda self, name, arg: None if arg is None else check(self, name, arg))
        processor_class = {"qwen2_5_vl": transformers.Qwen2_5_VLProcessor, "qwen2_vl": transformers.Qwen2VLProcessor}
        return processor_class[kind](image_processor=image_processor, tokenizer=tokenizer,
                                     video_processor=video_processor, chat_template=QWEN_TEMPLATE)


def write_prompts(folder: Path, sizes: list[list[tuple[int, int]]]) -> Path:
    """prompts.jsonl with one prompt per entry of ``sizes`` (its images' (height, width)), random PNGs."""
    g = torch.Generator().manual_seed(0)
    lines = []
    for i, image_sizes in enumerate(sizes):
        names = []
        for j, (h, w) in enumerate(image_sizes):
            names.append(f"images/p{i}_{j}.png")
            pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
            (folder / "images").mkdir(exist_ok=True)
            Image.fromarray(pixels).save(folder / names[-1])
        image = names[0] if len(names) == 1 else names  # both forms of the "image" field
        lines.append(json.dumps({"image": image, "prompt": ["what is in this image", "describe the picture"][i % 2]}))
    path = folder / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_frames(folder: Path, names: list[str], size: tuple[int, int] = (32, 32), seed: int = 0) -> list[Path]:
    """Random PNG frames ``names`` in ``folder`` (created); returns their paths in the order given."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        pixels = torch.randint(0, 256, (*size, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / name)
    return [folder / name for name in names]



# ------------------------------------------------------------------------------------------------
# The direct computation


@torch.no_grad()
def greedy_and_first_token(model, inputs) -> tuple[list[int], torch.Tensor]:
    """The greedy answer (``generate``, NEW_TOKENS) and the first token's log-probabilities (a forward pass)."""
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    log_probs = torch.log_softmax(model(**inputs).logits[0, -1].double(), dim=-1)
    return out[0, inputs["input_ids"].shape[1]:].tolist(), log_probs


def image_record_inputs(processor, record: dict, folder: Path) -> dict:
    """The processor's tensors for one line of an image prompt file (its images, then its text)."""
    paths = [record["image"]] if isinstance(record["image"], str) else record["image"]
    images = [Image.open(folder / p).convert("RGB") for p in paths]
    messages = [{"role": "user", "content": [{"type": "image"}] * len(images)
                 + [{"type": "text", "text": record["prompt"]}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(images=images, text=text, return_tensors="pt")


def visual_token_count(model, input_ids: torch.Tensor) -> int:
    """Image and video placeholders in ``input_ids`` (the model's ``image_token_id`` / ``video_token_id``)."""
    ids = [i for i in (model.config.image_token_id, getattr(model.config, "video_token_id", None)) if i is not None]
    return sum(int((input_ids == i).sum()) for i in ids)


def direct_numbers(model, processor, prompts_file: Path, budgets, record_inputs=image_record_inputs
                   ) -> dict[int, dict]:
    """Per budget: agreement, per-prompt KL(stock || patched) and visual tokens, computed here from the
    inputs ``record_inputs(processor, record, folder)`` gives for each line of the prompt file."""
    inputs = [record_inputs(processor, json.loads(line), prompts_file.parent)
              for line in prompts_file.read_text().splitlines()]
    stock = [greedy_and_first_token(model, x) for x in inputs]
    numbers = {}
    for budget in budgets:
        with vz.patched(model, tokens=budget):
            shrunk = [vzt.shrink_inputs(model, x) for x in inputs]
            patched = [greedy_and_first_token(model, x) for x in shrunk]
        agrees = [p[0] == s[0] for p, s in zip(patched, stock)]
        # KL(P || Q) = sum P (log P - log Q), by torch's kl_div(input=log Q, target=log P)
        kl = [torch.nn.functional.kl_div(p[1], s[1], log_target=True, reduction="sum").item()
              for p, s in zip(patched, stock)]
        tokens = [visual_token_count(model, x["input_ids"]) for x in shrunk]
        numbers[budget] = {"agreement": sum(agrees) / len(agrees), "agrees": agrees, "kl": kl, "visual_tokens": tokens}
    return numbers


def run_and_check(model, processor, model_dir: Path, prompts: Path, budgets, target: float, out: Path, capsys,
                  expected_tokens: dict[int, list[int]], record_inputs=image_record_inputs) -> dict:
    """Runs the command, checks its outputs against :func:`direct_numbers`; returns calibration.json."""
    argv = ["--model", str(model_dir), "--prompts", str(prompts), "--budgets", ",".join(map(str, budgets)),
            "--target", str(target), "--out", str(out), "--new-tokens", str(NEW_TOKENS), "--rounds", "1"]
    assert calibrate.main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / calibrate.REPORT_FILE).read_text())
    direct = direct_numbers(model, processor, prompts, budgets, record_inputs)

    assert [r["budget"] for r in report["budgets"]] == sorted(budgets)
    for row in report["budgets"]:
        expected = direct[row["budget"]]
        assert row["visual_tokens"] == expected["visual_tokens"] == expected_tokens[row["budget"]]
        assert row["agrees"] == expected["agrees"]
        assert row["agreement"] == expected["agreement"]
        assert row["kl"] == pytest.approx(expected["kl"], rel=1e-4, abs=1e-7)
        assert row["kl_mean"] == pytest.approx(sum(expected["kl"]) / len(expected["kl"]), rel=1e-4, abs=1e-7)
        assert row["time_ratio"] > 0 and row["prefill_ms_median"] > 0
        # the table's row for this budget: its visual tokens, agreement and KL as computed here
        line = next(li for li in printed.splitlines() if li.split() and li.split()[0] == str(row["budget"]))
        cells = line.split()
        assert float(cells[1]) == pytest.approx(sum(expected["visual_tokens"]) / 2, abs=0.05)
        assert float(cells[4]) == pytest.approx(expected["agreement"], abs=5e-4)
        assert float(cells[5]) == pytest.approx(sum(expected["kl"]) / 2, rel=1e-3, abs=1e-9)
    assert printed.splitlines()[0].split()[:2] == ["budget", "visual"]

    meeting = [b for b in sorted(budgets) if direct[b]["agreement"] >= target]
    budget_file = out / calibrate.BUDGET_FILE
    if meeting:
        settings = json.loads(budget_file.read_text())
        assert settings == {"tokens": meeting[0]} == report["chosen"]
        vz.apply(model, **settings)  # what the file is for
        try:
            assert vzt.get_patch(model) is not None
        finally:
            vz.remove(model)
        assert f"smallest budget with agreement >= {target:g}: {meeting[0]}" in printed
    else:
        assert not budget_file.exists() and report["chosen"] is None
        assert "no budget reaches agreement" in printed
    with Image.open(out / calibrate.PLOT_FILE) as png:
        png.load()
        assert png.format == "PNG" and png.size[0] > 100 and png.size[1] > 100
    return report


# ------------------------------------------------------------------------------------------------
# End to end


def test_llava_end_to_end(tmp_path, capsys):
    model_dir = llava_checkpoint(tmp_path / "llava")
    prompts = write_prompts(tmp_path, [[(40, 50)], [(60, 30), (30, 30)]])
    model = transformers.AutoModelForImageTextToText.from_pretrained(model_dir, local_files_only=True).eval()
    processor = transformers.AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    budgets = (16, 8, 32)  # sorted by the command
    report = run_and_check(model, processor, model_dir, prompts, budgets, 0.5, tmp_path / "out", capsys,
                           {b: [b, 2 * b] for b in budgets})
    assert report["stock"]["visual_tokens"] == [64, 128]  # 8x8 patches per image, CLS dropped by "default"
    # A budget above an image's 64 placeholders: one line naming it and the prompt, before the long runs.
    argv = ["--model", str(model_dir), "--prompts", str(prompts), "--budgets", "8,100", "--out", str(tmp_path / "o2")]
    assert calibrate.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"calibrate: --budgets 100 does not fit the images of {prompts}:1: ")


def test_qwen2_5_vl_end_to_end(tmp_path, capsys, monkeypatch):
    model_dir = tmp_path / "qwen"
    tiny_qwen("qwen2_5_vl").save_pretrained(model_dir)
    processor = qwen_processor(monkeypatch)
    monkeypatch.setattr(calibrate, "load_processor", lambda path: processor)
    # 32 x 32 px -> 8 x 8 patches -> 16 merged tokens per image
    prompts = write_prompts(tmp_path, [[(32, 32)], [(32, 32), (32, 32)]])
    model = transformers.AutoModelForImageTextToText.from_pretrained(model_dir, local_files_only=True).eval()
    budgets = (4, 8, 16)
    report = run_and_check(model, processor, model_dir, prompts, budgets, 0.95, tmp_path / "out", capsys,
                           {b: [b, 2 * b] for b in budgets})
    assert report["stock"]["visual_tokens"] == [16, 32]
    # 16 of 16 tokens kept is the stock prompt: the same answers, the same first-token distribution
    full = report["budgets"][-1]
    assert full["agreement"] == 1.0 and full["kl_mean"] < 1e-9


# ------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2


def test_missing_model_path_names_it(tmp_path):
    prompts = write_prompts(tmp_path, [[(8, 8)]])
    missing = tmp_path / "no-such-model"
    result = subprocess.run([sys.executable, "-m", "visionzip_kernels.calibrate", "--model", str(missing),
                             "--prompts", str(prompts), "--budgets", "64"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"calibrate: --model path {missing} does not exist (or is not a "
                                                  "folder)"]


@pytest.mark.parametrize("case", ["unsupported model", "empty prompts", "bad budgets", "zero budget",
                                  "missing image", "target", "video for an images-only family", "video file",
                                  "missing frame", "fps without video", "bad fps"])
def test_bad_input_gives_one_line_and_exit_2(tmp_path, capsys, case):
    model_dir = tmp_path / "model"
    transformers.LlavaConfig().save_pretrained(model_dir)  # the config is all that is read before the checks pass
    prompts = write_prompts(tmp_path, [[(8, 8)]])
    argv = {"--model": str(model_dir), "--prompts": str(prompts), "--budgets": "64,128", "--out": str(tmp_path / "out")}
    expected = None
    if case == "unsupported model":
        transformers.CLIPVisionConfig().save_pretrained(model_dir)
        expected = "model_type 'clip_vision_model' is not supported"
    elif case == "empty prompts":
        prompts.write_text("\n")
        expected = "holds no prompts"
    elif case == "bad budgets":
        argv["--budgets"] = "64,x"
        expected = "argument --budgets"
    elif case == "zero budget":
        argv["--budgets"] = "0,64"
        expected = "every budget must be an int >= 1"
    elif case == "missing image":
        prompts.write_text(json.dumps({"image": "gone.png", "prompt": "what"}) + "\n")
        expected = "gone.png does not exist"
    elif case == "target":
        argv["--target"] = "1.5"
        expected = "--target must be in [0, 1]"
    elif case == "video for an images-only family":  # LLaVA's integration compresses images only
        write_frames(tmp_path / "clip", ["f1.png", "f2.png"])
        prompts.write_text(json.dumps({"image": "images/p0_0.png", "prompt": "what"}) + "\n"
                           + json.dumps({"video": "clip", "prompt": "what"}) + "\n")
        expected = (f"{prompts}:2: a video, but VisionZip's LLaVA integration compresses images only "
                    "(videos: LLaVA-OneVision, Qwen")
    elif case == "video file":
        (tmp_path / "clip.mp4").write_bytes(b"")
        prompts.write_text(json.dumps({"video": "clip.mp4", "prompt": "what"}) + "\n")
        expected = "is not a folder of frames (video files are not decoded"
    elif case == "missing frame":
        prompts.write_text(json.dumps({"video": ["images/p0_0.png", "f9.png"], "prompt": "what"}) + "\n")
        expected = "f9.png does not exist"
    elif case == "fps without video":
        prompts.write_text(json.dumps({"image": "images/p0_0.png", "fps": 2, "prompt": "what"}) + "\n")
        expected = "'fps' is the frame rate of videos, and the line has none"
    elif case == "bad fps":
        prompts.write_text(json.dumps({"video": ["images/p0_0.png"], "fps": 0, "prompt": "what"}) + "\n")
        expected = "'fps' must be a number > 0"
    assert calibrate.main([x for pair in argv.items() for x in pair]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("calibrate: ") and expected in lines[0], captured.err
    assert not (tmp_path / "out").exists()


def test_video_without_a_video_processor_gives_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    """Qwen takes videos, but a processor without a video processor (no torchvision) cannot read them: one line,
    exit 2, before the model is loaded."""
    model_dir = tmp_path / "qwen"
    tiny_qwen("qwen2_5_vl").config.save_pretrained(model_dir)  # no weights: the model must not be loaded
    processor = qwen_processor(monkeypatch)
    monkeypatch.setattr(calibrate, "load_processor", lambda path: processor)
    write_frames(tmp_path / "clip", ["a.png", "b.png"])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"video": "clip", "prompt": "what"}) + "\n")
    argv = ["--model", str(model_dir), "--prompts", str(prompts), "--budgets", "4", "--out", str(tmp_path / "out")]
    assert calibrate.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"calibrate: {prompts}:1: a video, but the processor of --model {model_dir} has no video "
                     "processor (transformers' video processors need torchvision)"]


def test_video_records_are_read_in_frame_order(tmp_path):
    """A folder gives its frames in natural name order (f9 before f10), other files skipped; a list keeps its
    order; "videos" holds several; "fps" is kept; images and videos mix in a line."""
    clip = write_frames(tmp_path / "clip", ["f9.png", "f10.png", "f11.JPG", "f100.png"])
    (tmp_path / "clip" / "notes.txt").write_text("not a frame")
    listed = write_frames(tmp_path / "other", ["b.png", "a.png"])
    image = write_frames(tmp_path, ["still.png"])[0]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join([
        json.dumps({"video": "clip", "prompt": "what"}),
        json.dumps({"image": "still.png", "video": ["other/b.png", "other/a.png"], "fps": 2, "prompt": "and"}),
        "",
        json.dumps({"videos": ["clip", ["other/a.png"]], "fps": 0.5, "prompt": "both"}),
    ]) + "\n")
    first, mixed, several = calibrate.read_prompts(prompts)
    assert first.images == [] and first.videos == [clip] and first.fps is None and first.media() == "videos"
    assert mixed.images == [image] and mixed.videos == [listed] and mixed.fps == 2.0
    assert mixed.media() == "images and videos" and mixed.where == f"{prompts}:2"
    assert several.videos == [clip, [tmp_path / "other" / "a.png"]] and several.fps == 0.5
    assert several.where == f"{prompts}:4"
    takes_videos = calibrate.video_model_types()  # the Qwen families; LLaVA and LLaVA-NeXT take images only
    assert {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"} <= set(takes_videos)
    assert not {"llava", "llava_next"} & set(takes_videos)
    assert set(takes_videos) <= set(calibrate.supported_model_types())


def test_prompt_text_puts_images_then_videos_before_the_text(monkeypatch):
    processor = qwen_processor(monkeypatch)
    prompt = calibrate.Prompt([Path("a.png")], "what is in this image", "x:1", [[Path("f.png")]] * 2)
    assert calibrate.prompt_text(processor, prompt) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        + "<|vision_start|><|video_pad|><|vision_end|>" * 2
        + "what is in this image<|im_end|>\n<|im_start|>assistant\n")
    processor.chat_template = None  # no template: one placeholder per image and per video in front
    assert calibrate.prompt_text(processor, prompt) == "<|image_pad|><|video_pad|><|video_pad|>\nwhat is in this image"


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        calibrate.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--model", "--prompts", "--budgets", "--target", "--out", "--new-tokens", "--rounds", "--device",
                   "--dtype"):
        assert option in text
    for words in ("JSONL", "comma-separated", "default 0.95", "greedy tokens", "prefill", "cuda"):
        assert words in text
