"""Which VisionZip budget can your prompts afford? ``python -m visionzip_kernels.calibrate``.

Given a local checkpoint of a model family :func:`visionzip_kernels.apply` supports that takes images
(LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, ...: the composite families of the
registry, ``visionzip_kernels.integrations.transformers.FAMILIES``), a JSONL file of prompts with
images or videos, and a list of budgets, it runs the stock model once per prompt and the patched model
(``apply(model, tokens=b)``) at each budget, and reports per budget (docs/SPEC.md, "Calibration"):

- visual tokens: the image and video placeholders the LLM sees per prompt (mean), and that over the
  stock count;
- time ratio: patched over stock prefill time (``shrink_inputs`` included), measured interleaved
  (stock, patched, stock, ... per prompt and round), the median of the per-pair ratios;
- agreement: the fraction of prompts whose greedy answer (the first ``--new-tokens`` tokens) equals
  the stock model's;
- KL: the mean over prompts of KL(stock || patched) of the first generated token's distribution.

The smallest budget whose agreement is at least ``--target`` is written to ``DIR/visionzip_budget.json``
as the keyword arguments of :func:`visionzip_kernels.apply` (``{"tokens": 128}``). When no budget
reaches the target, no such file is written (a stale one is removed), the run says so and exits 0.
All numbers go to ``DIR/calibration.json``, a plot to ``DIR/calibration.png``, a table to stdout.

The prompt file, one JSON object a line: ``{"image": "a.png", "prompt": "What does the sign say?"}``;
``image`` (or ``images``) is a path or a list of paths, relative to the file's folder or absolute.
A video is given by its frames, as the model is to see them (no frame is sampled or dropped):
``"video"`` is one video, a folder of frames (its image files in natural name order: ``f2.png``
before ``f10.png``) or a list of frame paths; ``"videos"`` is a list of such videos; ``"fps"``
(optional, a number > 0) is the frame rate of the given frames, passed to the processor as each video's
metadata (Qwen2.5-VL's seconds per temporal slice, Qwen3-VL's frame timestamps); without it the
processor's default applies (24 on transformers' Qwen processors). Video files are not decoded: extract
their frames first (e.g. ``ffmpeg -i clip.mp4 -vf fps=2 clip/%04d.png``). A line may hold images,
videos or both, at least one of them: ``{"video": "clip/", "fps": 2, "prompt": "What happens?"}``.
Videos need a family whose integration takes them (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, ...:
``CompositeFamily.takes_videos``; any other stops before the model is loaded) and a processor with a
video processor (transformers' need torchvision).

With a processor that has a chat template, the prompt is the user's text, and the images, then the
videos, come first in a user message; without one, the prompt is used as is, and gets one image token
per image and one video token per video in front (then a newline) when it holds none of them.

The budget is ``apply``'s ``tokens=``: visual tokens per image (per crop on LLaVA-NeXT, per temporal
slice of a video on Qwen: 2 frames, as ``apply`` counts it), split 54:10 into dominant and contextual.
Bad arguments give one line on stderr and exit status 2: before the model is loaded, or, for a budget
larger than a prompt's images or video slices allow, after one patched prefill per prompt at the
largest budget (before the long runs).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

PROG = "python -m visionzip_kernels.calibrate"
BUDGET_FILE = "visionzip_budget.json"
REPORT_FILE = "calibration.json"
PLOT_FILE = "calibration.png"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


# ------------------------------------------------------------------------------------------------
# Arguments and inputs


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit 2 (argparse's default prints the usage too)
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=(
        "Measure what VisionZip budgets cost on your own prompts: per budget the visual tokens, the prefill "
        "time against the stock model, the agreement of greedy answers with the stock model and the KL "
        f"divergence of the first token; writes the smallest budget meeting --target to OUT/{BUDGET_FILE} "
        "(the keyword arguments of visionzip_kernels.apply)."))
    parser.add_argument("--model", required=True, type=Path,
                        help="folder of a local transformers checkpoint (model and processor; no network is used)")
    parser.add_argument("--prompts", required=True, type=Path,
                        help='JSONL file, one {"image": PATH or [PATHS], "prompt": TEXT} a line, or with "video": '
                             "a folder of frames or [FRAME PATHS] (\"videos\": a list of them; \"fps\": their "
                             "frame rate), images and videos mixed as the model allows; paths relative to the file's "
                             "folder or absolute")
    parser.add_argument("--budgets", required=True, type=parse_budgets,
                        help="comma-separated visual tokens per image (apply's tokens=; per crop on LLaVA-NeXT, "
                             "per temporal slice of 2 frames of a Qwen video), e.g. 64,128,192")
    parser.add_argument("--target", type=float, default=0.95,
                        help="the agreement the chosen budget must reach, in [0, 1] (default 0.95)")
    parser.add_argument("--out", type=Path, default=Path("calibration"),
                        help=f"output folder for {BUDGET_FILE}, {REPORT_FILE} and {PLOT_FILE} "
                             "(default ./calibration, created if missing)")
    parser.add_argument("--new-tokens", type=int, default=16,
                        help="greedy tokens compared with the stock answer (default 16)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="timed stock/patched prefill pairs per prompt and budget (default 3)")
    parser.add_argument("--device", default=None,
                        help="torch device to run on (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    return parser


def parse_budgets(text: str) -> list[int]:
    """``"64,128,192"`` -> [64, 128, 192] (sorted, duplicates dropped); ``ArgumentTypeError`` otherwise."""
    try:
        budgets = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated ints such as 64,128,192, got {text!r}") from None
    if not budgets or min(budgets) < 1:
        raise argparse.ArgumentTypeError(f"every budget must be an int >= 1, got {text!r}")
    return sorted(set(budgets))


# Frame files of a video folder (what PIL reads; other files there, such as notes, are skipped).
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class Prompt:
    """One line of the prompt file: its images and videos (resolved paths), its text, its frame rate."""

    images: list[Path]
    text: str
    where: str  # "FILE:LINE", for messages
    videos: list[list[Path]] = field(default_factory=list)  # per video, its frames in order
    fps: float | None = None  # the videos' frame rate, when the line gives one

    def media(self) -> str:
        """What the prompt shows, for messages: "images", "videos" or "images and videos"."""
        return " and ".join(kind for kind, items in (("images", self.images), ("videos", self.videos)) if items)


def _natural_key(path: Path) -> list:
    """Sort key that orders the numbers in a name by value (f2.png before f10.png)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _video_frames(video, base: Path, where: str) -> list[Path]:
    """One video of a line: a folder of frames or a list of frame paths -> the frames' paths, in order."""
    if isinstance(video, str):
        folder = base / video
        if not folder.is_dir():
            raise UsageError(f"{where}: video {folder} is not a folder of frames (video files are not decoded: "
                             "extract their frames, or list the frame paths)")
        frames = sorted((f for f in folder.iterdir() if f.suffix.lower() in FRAME_SUFFIXES and f.is_file()),
                        key=_natural_key)
        if not frames:
            raise UsageError(f"{where}: video folder {folder} holds no frames ({', '.join(FRAME_SUFFIXES)})")
        return frames
    if not video or not isinstance(video, list) or not all(isinstance(f, str) for f in video):
        raise UsageError(f"{where}: a video must be a folder of frames or a non-empty list of frame paths")
    frames = [base / f for f in video]
    missing = [str(f) for f in frames if not f.is_file()]
    if missing:
        raise UsageError(f"{where}: frame {missing[0]} does not exist")
    return frames


def _parse_record(record: dict, base: Path, where: str) -> Prompt:
    """One JSON object of the prompt file -> :class:`Prompt`; ``UsageError`` naming the line."""
    images = record.get("image", record.get("images"))
    if images is not None:
        images = [images] if isinstance(images, str) else images
        if not images or not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise UsageError(f"{where}: 'image' must be a path or a non-empty list of paths")
    if "video" in record and "videos" in record:
        raise UsageError(f"{where}: give 'video' (one video) or 'videos' (a list of them), not both")
    if "video" in record:
        videos = [record["video"]]
    elif "videos" in record:
        videos = record["videos"]
        if not videos or not isinstance(videos, list):
            raise UsageError(f"{where}: 'videos' must be a non-empty list of videos (folders or lists of frames)")
    else:
        videos = []
    if images is None and not videos:
        raise UsageError(f"{where}: expected an object with image (or video) and prompt")
    text = record.get("prompt")
    if not isinstance(text, str):
        raise UsageError(f"{where}: 'prompt' must be a string")
    fps = record.get("fps")
    if fps is not None:
        if not videos:
            raise UsageError(f"{where}: 'fps' is the frame rate of videos, and the line has none")
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
            raise UsageError(f"{where}: 'fps' must be a number > 0, got {fps!r}")
        fps = float(fps)
    resolved = [(base / image) for image in images or []]
    missing = [str(p) for p in resolved if not p.is_file()]
    if missing:
        raise UsageError(f"{where}: image {missing[0]} does not exist")
    return Prompt(resolved, text, where, [_video_frames(v, base, where) for v in videos], fps)


def read_prompts(path: Path) -> list[Prompt]:
    """The prompts of a JSONL file (blank lines skipped); ``UsageError`` naming the file and line."""
    if not path.is_file():
        raise UsageError(f"--prompts file {path} does not exist")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise UsageError(f"{where}: expected an object with image (or video) and prompt")
        prompts.append(_parse_record(record, path.parent, where))
    if not prompts:
        raise UsageError(f"--prompts file {path} holds no prompts")
    return prompts


def check_arguments(args: argparse.Namespace) -> None:
    """The checks that need no model: ``UsageError`` naming the option."""
    if not args.model.is_dir():
        raise UsageError(f"--model path {args.model} does not exist (or is not a folder)")
    if not (args.model / "config.json").is_file():
        raise UsageError(f"--model path {args.model} has no config.json (not a transformers checkpoint)")
    if not 0.0 <= args.target <= 1.0:
        raise UsageError(f"--target must be in [0, 1], got {args.target}")
    if args.new_tokens < 1:
        raise UsageError(f"--new-tokens must be >= 1, got {args.new_tokens}")
    if args.rounds < 1:
        raise UsageError(f"--rounds must be >= 1, got {args.rounds}")


# ------------------------------------------------------------------------------------------------
# Loading


def supported_model_types() -> dict[str, str]:
    """model_type -> family name, for the registry's families that take images (the composite ones)."""
    from .integrations.transformers import FAMILIES, CompositeFamily

    return {t: family.name for family in FAMILIES if isinstance(family, CompositeFamily) for t in family.model_types}


def check_model_type(path: Path) -> str:
    """The checkpoint's ``model_type`` (its config only is read); ``UsageError`` when no family supports it."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"--model {path}: cannot read its config ({str(exc).splitlines()[0]})") from None
    supported = supported_model_types()
    if config.model_type not in supported:
        raise UsageError(f"--model {path}: model_type {config.model_type!r} is not supported; VisionZip calibrates "
                         f"{', '.join(supported)}")
    return config.model_type


def video_model_types() -> dict[str, str]:
    """model_type -> family name, for the registry's families whose integration takes videos too."""
    from .integrations.transformers import COMPOSITE_FAMILIES

    return {t: family.name for family in COMPOSITE_FAMILIES if family.takes_videos for t in family.model_types}


def check_videos_supported(model_type: str, prompts: list[Prompt]) -> None:
    """``UsageError`` naming the first line with a video when the family's integration takes images only."""
    with_video = next((p for p in prompts if p.videos), None)
    takes_videos = video_model_types()
    if with_video is not None and model_type not in takes_videos:
        family = supported_model_types()[model_type]
        raise UsageError(f"{with_video.where}: a video, but VisionZip's {family} integration compresses images only "
                         f"(videos: {', '.join(sorted(set(takes_videos.values())))})")


def load_model(path: Path, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The model of the local folder ``path``, in eval mode on ``device``."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=dtype)
    return model.to(device).eval()


def load_processor(path: Path):
    """The processor of the local folder ``path``; ``UsageError`` with transformers' first line when it
    cannot be built (e.g. Qwen's processors need torchvision for their video part)."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, ImportError) as exc:
        raise UsageError(f"--model {path}: cannot load its processor ({str(exc).strip().splitlines()[0]})") from None


def check_video_processor(processor, path: Path, prompts: list[Prompt]) -> None:
    """``UsageError`` when a prompt has a video and the processor has no video processor to read it."""
    with_video = next((p for p in prompts if p.videos), None)
    if with_video is not None and getattr(processor, "video_processor", None) is None:
        raise UsageError(f"{with_video.where}: a video, but the processor of --model {path} has no video processor "
                         "(transformers' video processors need torchvision)")


def prompt_text(processor, prompt: Prompt) -> str:
    """The text the processor gets: the chat template's user turn (images, videos, text), else the prompt
    with image and video tokens."""
    if getattr(processor, "chat_template", None):
        content = ([{"type": "image"} for _ in prompt.images] + [{"type": "video"} for _ in prompt.videos]
                   + [{"type": "text", "text": prompt.text}])
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
    image_token = getattr(processor, "image_token", None) or "<image>"
    video_token = getattr(processor, "video_token", None) or "<video>"
    if image_token in prompt.text or (prompt.videos and video_token in prompt.text):
        return prompt.text
    return image_token * len(prompt.images) + video_token * len(prompt.videos) + "\n" + prompt.text


def encode(processor, prompt: Prompt, device: str, dtype: torch.dtype) -> dict:
    """The stock processor's tensors for one prompt (a batch of one), on ``device``, the pixels in ``dtype``.

    Videos go in as lists of PIL frames, all of them (``do_sample_frames=False``), with their frame rate as
    metadata when the line gives one."""
    from PIL import Image

    kwargs = {}
    if prompt.images:
        kwargs["images"] = [Image.open(p).convert("RGB") for p in prompt.images]
    if prompt.videos:
        kwargs["videos"] = [[Image.open(f).convert("RGB") for f in frames] for frames in prompt.videos]
        kwargs["do_sample_frames"] = False
        if prompt.fps is not None:
            from transformers.video_utils import VideoMetadata

            kwargs["video_metadata"] = [VideoMetadata(total_num_frames=len(frames), fps=prompt.fps,
                                                      frames_indices=list(range(len(frames))))
                                        for frames in prompt.videos]
    inputs = processor(text=prompt_text(processor, prompt), return_tensors="pt", **kwargs)
    inputs = inputs.to(device)
    # The pixels only in the model's dtype (as a user's pipeline does): Qwen2.5-VL's float second_per_grid_ts
    # stays float32, so the rope positions it scales are the stock ones.
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs and inputs[key].is_floating_point():
            inputs[key] = inputs[key].to(dtype)
    return inputs


# ------------------------------------------------------------------------------------------------
# Running


@dataclass
class Answer:
    """One run of one prompt: the greedy tokens, the first token's log-probabilities, the visual tokens."""

    tokens: list[int]
    first_log_probs: torch.Tensor  # [vocab] float64, on the CPU
    visual_tokens: int


def visual_tokens(model, inputs) -> int:
    """Image and video placeholders the LLM sees (``image_token_id`` and ``video_token_id`` positions of
    ``input_ids`` under the mask)."""
    ids = [model.config.image_token_id, getattr(model.config, "video_token_id", None)]
    is_visual = torch.isin(inputs["input_ids"], torch.tensor([i for i in ids if i is not None],
                                                             device=inputs["input_ids"].device))
    if inputs.get("attention_mask") is not None:
        is_visual &= inputs["attention_mask"].bool()
    return int(is_visual.sum())


def prepared(model, inputs, patched: bool):
    """The inputs the model takes: ``shrink_inputs`` of the stock ones when it is patched."""
    from .integrations.transformers import shrink_inputs

    return shrink_inputs(model, inputs) if patched else inputs


@torch.no_grad()
def answer(model, inputs, new_tokens: int, patched: bool) -> Answer:
    """The greedy answer of ``model`` (first ``new_tokens`` tokens) and its first token's distribution."""
    ready = prepared(model, inputs, patched)
    # Greedy whatever the checkpoint's generation_config asks (sampling, beams, a repetition penalty).
    out = model.generate(**ready, max_new_tokens=new_tokens, do_sample=False, num_beams=1, repetition_penalty=1.0,
                         output_logits=True, return_dict_in_generate=True)
    prompt_length = ready["input_ids"].shape[1]
    first = torch.log_softmax(out.logits[0][0].double().cpu(), dim=-1)
    return Answer(out.sequences[0, prompt_length:].tolist(), first, visual_tokens(model, ready))


def kl_divergence(stock_log_probs: torch.Tensor, log_probs: torch.Tensor) -> float:
    """KL(stock || other) = sum p_stock * (log p_stock - log p_other), in float64."""
    return float(torch.sum(stock_log_probs.exp() * (stock_log_probs - log_probs)))


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill_seconds(model, inputs, patched: bool, device: str) -> float:
    """Seconds from the stock processor's tensors to the first token's logits (``shrink_inputs`` included)."""
    _synchronize(device)
    start = time.perf_counter()
    model(**prepared(model, inputs, patched), logits_to_keep=1)
    _synchronize(device)
    return time.perf_counter() - start


@dataclass
class BudgetResult:
    """What one budget costs on the prompts (docs/SPEC.md, "Calibration")."""

    budget: int
    apply_kwargs: dict
    visual_tokens_mean: float
    visual_tokens_vs_stock: float
    prefill_ms_median: float
    stock_prefill_ms_median: float
    time_ratio: float
    agreement: float
    kl_mean: float
    agrees: list[bool] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    visual_tokens: list[int] = field(default_factory=list)


def check_budgets(model, encoded: list[dict], prompts: list[Prompt], budgets: list[int], device: str) -> None:
    """``UsageError`` naming the budget and the prompt's line when the largest budget does not fit a prompt's
    images or videos (more tokens than an image, a crop or a video slice has): one patched prefill per prompt,
    before the long runs."""
    from .integrations.transformers import apply, remove

    try:
        apply(model, tokens=budgets[-1])
    except ValueError as exc:  # e.g. more than one LLaVA-NeXT crop's tokens
        raise UsageError(f"--budgets {budgets[-1]}: {str(exc).splitlines()[0]}") from None
    try:
        for inputs, prompt in zip(encoded, prompts):
            try:
                prefill_seconds(model, inputs, True, device)
            except ValueError as exc:  # shrink_inputs' placeholder count, or the tower's D + K <= N
                raise UsageError(f"--budgets {budgets[-1]} does not fit the {prompt.media()} of {prompt.where}: "
                                 f"{str(exc).splitlines()[0]}") from None
    finally:
        remove(model)


def measure_budget(model, encoded: list[dict], stock: list[Answer], budget: int, args, progress) -> BudgetResult:
    """Runs the patched model at ``budget`` on every prompt, and the interleaved prefill timing."""
    from .integrations.transformers import apply, remove

    kwargs = {"tokens": budget}
    apply(model, **kwargs)
    try:
        answers = []
        for inputs in encoded:
            answers.append(answer(model, inputs, args.new_tokens, patched=True))
            progress.update()
    finally:
        remove(model)
    stock_times, patched_times, ratios = [], [], []
    for _ in range(args.rounds):
        for inputs in encoded:  # stock then patched, back to back: drifts in clock or load hit both
            stock_times.append(prefill_seconds(model, inputs, False, args.device))
            with _patched(model, kwargs):
                patched_times.append(prefill_seconds(model, inputs, True, args.device))
            ratios.append(patched_times[-1] / stock_times[-1])
            progress.update()
    agrees = [a.tokens == s.tokens for a, s in zip(answers, stock)]
    kl = [kl_divergence(s.first_log_probs, a.first_log_probs) for a, s in zip(answers, stock)]
    tokens = [a.visual_tokens for a in answers]
    stock_tokens = sum(s.visual_tokens for s in stock)
    return BudgetResult(
        budget=budget, apply_kwargs=kwargs, visual_tokens_mean=statistics.fmean(tokens),
        visual_tokens_vs_stock=sum(tokens) / stock_tokens, prefill_ms_median=1e3 * statistics.median(patched_times),
        stock_prefill_ms_median=1e3 * statistics.median(stock_times), time_ratio=statistics.median(ratios),
        agreement=sum(agrees) / len(agrees), kl_mean=statistics.fmean(kl), agrees=agrees, kl=kl, visual_tokens=tokens)


class _patched:
    """``apply`` on enter, ``remove`` on exit (the package's ``patched`` restores earlier settings too,
    which the timing loop does not need)."""

    def __init__(self, model, kwargs: dict):
        self.model, self.kwargs = model, kwargs

    def __enter__(self):
        from .integrations.transformers import apply

        return apply(self.model, **self.kwargs)

    def __exit__(self, *exc):
        from .integrations.transformers import remove

        remove(self.model)


def choose(results: list[BudgetResult], target: float) -> BudgetResult | None:
    """The smallest budget whose agreement is at least ``target``, or ``None``."""
    meeting = [r for r in results if r.agreement >= target]
    return min(meeting, key=lambda r: r.budget) if meeting else None


# ------------------------------------------------------------------------------------------------
# Reporting


def table(stock_tokens_mean: float, results: list[BudgetResult]) -> str:
    """The printed table: one row for the stock model, one per budget."""
    header = ("budget", "visual tokens", "vs stock", "prefill time", "agreement", "KL(stock||patched)")
    rows = [("stock", f"{stock_tokens_mean:.1f}", "1.000", "1.000", "1.000", "0")]
    rows += [(str(r.budget), f"{r.visual_tokens_mean:.1f}", f"{r.visual_tokens_vs_stock:.3f}", f"{r.time_ratio:.3f}",
              f"{r.agreement:.3f}", f"{r.kl_mean:.4g}") for r in results]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in (header, *rows)]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def plot(path: Path, stock_tokens_mean: float, results: list[BudgetResult], target: float) -> None:
    """PNG: agreement (left axis) and prefill time ratio (right axis) against visual tokens per prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r.visual_tokens_mean for r in results]
    fig, left = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    left.plot(x, [r.agreement for r in results], "o-", color="tab:blue", label="agreement")
    left.axhline(target, color="tab:blue", linestyle=":", linewidth=1, label=f"target {target:g}")
    left.set_xlabel(f"visual tokens per prompt (stock: {stock_tokens_mean:.0f})")
    left.set_ylabel("agreement with stock (greedy answers)", color="tab:blue")
    left.set_ylim(-0.05, 1.05)
    right = left.twinx()
    right.plot(x, [r.time_ratio for r in results], "s--", color="tab:orange", label="prefill time / stock")
    right.set_ylabel("prefill time / stock", color="tab:orange")
    right.set_ylim(bottom=0)
    for r in results:
        left.annotate(str(r.budget), (r.visual_tokens_mean, r.agreement), textcoords="offset points", xytext=(4, 4),
                      fontsize=8)
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    left.legend(handles=handles, loc="lower right", fontsize=8)
    left.set_title("VisionZip budgets (labels: tokens per image)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(out: Path, report: dict, chosen: BudgetResult | None) -> None:
    """``calibration.json``, and ``visionzip_budget.json`` for the chosen budget (removed when none is)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    budget_file = out / BUDGET_FILE
    if chosen is None:
        budget_file.unlink(missing_ok=True)  # a stale choice from an earlier run must not be read as this one's
    else:
        budget_file.write_text(json.dumps(chosen.apply_kwargs) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------
# The command


def calibrate(args: argparse.Namespace) -> int:
    """Runs the calibration of parsed, checked ``args``; returns the exit status."""
    from tqdm import tqdm

    model_type = check_model_type(args.model)
    check_videos_supported(model_type, args.prompt_list)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    processor = load_processor(args.model)
    check_video_processor(processor, args.model, args.prompt_list)
    model = load_model(args.model, args.device, dtype)
    encoded = [encode(processor, p, args.device, dtype) for p in args.prompt_list]
    check_budgets(model, encoded, args.prompt_list, args.budgets, args.device)
    n = len(encoded)
    with tqdm(total=n * (1 + len(args.budgets) * (1 + args.rounds)), desc="calibrating", unit="run",
              file=sys.stderr) as progress:
        stock = []
        for inputs in encoded:
            stock.append(answer(model, inputs, args.new_tokens, patched=False))
            progress.update()
        results = [measure_budget(model, encoded, stock, b, args, progress) for b in args.budgets]
    stock_tokens_mean = statistics.fmean(s.visual_tokens for s in stock)
    chosen = choose(results, args.target)
    report = {
        "model": str(args.model), "model_type": model_type, "family": supported_model_types()[model_type],
        "device": args.device, "dtype": str(dtype).removeprefix("torch."), "prompts": n,
        "new_tokens": args.new_tokens, "rounds": args.rounds, "target": args.target,
        "stock": {"visual_tokens_mean": stock_tokens_mean, "visual_tokens": [s.visual_tokens for s in stock],
                  "answers": [s.tokens for s in stock]},
        "budgets": [asdict(r) for r in results],
        "chosen": None if chosen is None else chosen.apply_kwargs,
    }
    write_outputs(args.out, report, chosen)
    plot(args.out / PLOT_FILE, stock_tokens_mean, results, args.target)
    print(table(stock_tokens_mean, results))
    if chosen is None:
        best = max(results, key=lambda r: (r.agreement, -r.budget))
        print(f"no budget reaches agreement {args.target:g} (best: {best.budget} with {best.agreement:.3f}); "
              f"{BUDGET_FILE} not written; all numbers in {args.out / REPORT_FILE}")
    else:
        print(f"smallest budget with agreement >= {args.target:g}: {chosen.budget} -> {args.out / BUDGET_FILE} "
              f"{json.dumps(chosen.apply_kwargs)}; all numbers in {args.out / REPORT_FILE}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: returns 0, or 2 after one line on stderr for bad input."""
    try:
        args = build_parser().parse_args(argv)
        check_arguments(args)
        args.prompt_list = read_prompts(args.prompts)
        return calibrate(args)
    except UsageError as exc:
        print(f"calibrate: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
