"""Which VisionZip budget can your prompts afford? ``python -m visionzip_kernels.calibrate``.

Given a local checkpoint of a model family :func:`visionzip_kernels.apply` supports that takes images
(LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, ...: the composite families of the
registry, ``visionzip_kernels.integrations.transformers.FAMILIES``), a JSONL file of prompts with
images, and a list of budgets, it runs the stock model once per prompt and the patched model
(``apply(model, tokens=b)``) at each budget, and reports per budget (docs/SPEC.md, "Calibration"):

- visual tokens: the image placeholders the LLM sees per prompt (mean), and that over the stock count;
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
With a processor that has a chat template, the prompt is the user's text and the images come first
in a user message; without one, the prompt is used as is, and gets one image token per image in front
(then a newline) when it holds none. Videos are not calibrated (no integration compresses them yet).

The budget is ``apply``'s ``tokens=``: visual tokens per image (per crop on LLaVA-NeXT, as ``apply``
counts it), split 54:10 into dominant and contextual. Bad arguments give one line on stderr and exit
status 2: before the model is loaded, or, for a budget larger than a prompt's images allow, after one
patched prefill per prompt at the largest budget (before the long runs).
"""

from __future__ import annotations

import argparse
import json
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
                        help='JSONL file, one {"image": PATH or [PATHS], "prompt": TEXT} a line; paths relative '
                             "to the file's folder or absolute")
    parser.add_argument("--budgets", required=True, type=parse_budgets,
                        help="comma-separated visual tokens per image (apply's tokens=; per crop on LLaVA-NeXT), "
                             "e.g. 64,128,192")
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


@dataclass
class Prompt:
    """One line of the prompt file: its images (resolved paths) and its text."""

    images: list[Path]
    text: str
    where: str  # "FILE:LINE", for messages


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
            raise UsageError(f"{where}: expected an object with image and prompt")
        if "video" in record or "videos" in record:
            raise UsageError(f"{where}: videos are not calibrated (no integration compresses them yet)")
        images = record.get("image", record.get("images"))
        images = [images] if isinstance(images, str) else images
        if not images or not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise UsageError(f"{where}: 'image' must be a path or a non-empty list of paths")
        text = record.get("prompt")
        if not isinstance(text, str):
            raise UsageError(f"{where}: 'prompt' must be a string")
        resolved = [(path.parent / image) for image in images]
        missing = [str(p) for p in resolved if not p.is_file()]
        if missing:
            raise UsageError(f"{where}: image {missing[0]} does not exist")
        prompts.append(Prompt(resolved, text, where))
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


def prompt_text(processor, prompt: Prompt) -> str:
    """The text the processor gets: the chat template's user turn, else the prompt with image tokens."""
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"} for _ in prompt.images] + [{"type": "text", "text": prompt.text}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
    image_token = getattr(processor, "image_token", None) or "<image>"
    if image_token in prompt.text:
        return prompt.text
    return image_token * len(prompt.images) + "\n" + prompt.text


def encode(processor, prompt: Prompt, device: str, dtype: torch.dtype) -> dict:
    """The stock processor's tensors for one prompt (a batch of one), on ``device``, the pixels in ``dtype``."""
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in prompt.images]
    inputs = processor(images=images, text=prompt_text(processor, prompt), return_tensors="pt")
    return inputs.to(device, dtype=dtype)  # casts the floating tensors only


# ------------------------------------------------------------------------------------------------
# Running


@dataclass
class Answer:
    """One run of one prompt: the greedy tokens, the first token's log-probabilities, the visual tokens."""

    tokens: list[int]
    first_log_probs: torch.Tensor  # [vocab] float64, on the CPU
    visual_tokens: int


def visual_tokens(model, inputs) -> int:
    """Image placeholders the LLM sees (``image_token_id`` positions of ``input_ids`` under the mask)."""
    image_token_id = model.config.image_token_id
    is_image = inputs["input_ids"] == image_token_id
    if inputs.get("attention_mask") is not None:
        is_image &= inputs["attention_mask"].bool()
    return int(is_image.sum())


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
    images (more tokens than an image, or a crop, has): one patched prefill per prompt, before the long runs."""
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
                raise UsageError(f"--budgets {budgets[-1]} does not fit the images of {prompt.where}: "
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
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    processor = load_processor(args.model)
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
