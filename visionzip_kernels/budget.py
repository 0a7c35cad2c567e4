"""Budgets: how many tokens VisionZip keeps, written once.

The paper keeps ``dominant + contextual`` tokens per image in the proportion 54 : 10 (of every 64).
Everything that turns a budget argument into counts lives here: the defaults of
:func:`visionzip_kernels.apply`, the one validator of its int arguments (:func:`check_int`), the
ratio check, and the one 54:10 split (:func:`split_budget`, public as ``visionzip_kernels.split_budget``).
No transformers import: ``visionzip_kernels`` imports this module.
"""

from __future__ import annotations

import math
from typing import NamedTuple

# The paper's dominant : contextual proportion (54 : 10 of every 64 tokens).
DOMINANT_SHARE, CONTEXTUAL_SHARE = 54, 10


class Defaults(NamedTuple):
    """What :func:`visionzip_kernels.apply` uses for an argument that is not given."""

    dominant: int | float
    contextual: int | float
    layer: int


# CLIP / SigLIP / DINOv2 and LLaVA / LLaVA-NeXT: the paper's 64-token budget at LLaVA-1.5's layer.
DEFAULTS = Defaults(DOMINANT_SHARE, CONTEXTUAL_SHARE, -2)
# Qwen2-VL / Qwen2.5-VL: upstream's per-image ratios, read at the last vision block.
PER_IMAGE_DEFAULTS = Defaults(0.65, 0.05, -1)


def check_int(name: str, value, minimum: int | None = None, caller: str = "visionzip.apply") -> int:
    """``value`` as an int (``bool`` is not one) that is ``>= minimum``, or ``TypeError`` /
    ``ValueError`` naming the argument ``name``, prefixed with ``caller``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{caller}: {name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{caller}: {name} must be >= {minimum}, got {value}")
    return value


def check_ratio(ratio, name: str = "ratio", caller: str = "visionzip") -> float:
    """``ratio`` as a float in (0, 1], or ``TypeError`` / ``ValueError`` naming it."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"{caller}: {name} must be a float in (0, 1], got {type(ratio).__name__}")
    ratio = float(ratio)
    if not (math.isfinite(ratio) and 0.0 < ratio <= 1.0):
        raise ValueError(f"{caller}: {name} must be in (0, 1], got {ratio}")
    return ratio


def check_count_or_ratio(name: str, value) -> int | float:
    """A per-image budget (Qwen): an int count >= 0, or a float ratio of each image's tokens in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"visionzip.apply: {name} must be an int (a count per image) or a float (a ratio of each "
                        f"image's tokens), got {type(value).__name__}")
    if isinstance(value, int):
        return check_int(name, value, 0)
    return check_ratio(value, f"{name} as a ratio", "visionzip.apply")


def split_budget(tokens: int) -> tuple[int, int]:
    """Splits a total of ``tokens`` kept tokens into (dominant, contextual) in the paper's 54:10 ratio.

    Rounding (exact, integer arithmetic): ``contextual = floor(tokens * 10 / 64 + 1/2)`` (10/64 of the
    total, halves rounded up) and ``dominant = tokens - contextual``, so the two always add up to
    ``tokens`` and ``dominant >= 1``. The paper's budgets come out as published: 64 -> 54 + 10,
    128 -> 108 + 20, 192 -> 162 + 30, and LLaVA-NeXT's 32 per crop -> 27 + 5.

    Args:
        tokens: the total D + K, an int >= 1.

    Returns:
        (dominant, contextual).
    """
    return split_checked_budget(check_int("tokens", tokens, 1, caller="visionzip"))


def split_checked_budget(tokens):
    """:func:`split_budget` without the argument checks, for a count already known to be an int
    >= 1 (also a SymInt: a token count under torch.compile with dynamic shapes)."""
    total = DOMINANT_SHARE + CONTEXTUAL_SHARE
    contextual = (tokens * CONTEXTUAL_SHARE * 2 + total) // (2 * total)
    return tokens - contextual, contextual


# The paper's budgets (dominant + contextual) for 576-patch LLaVA-1.5 images.
BUDGETS: dict[int, tuple[int, int]] = {total: split_checked_budget(total) for total in (64, 128, 192)}


def tokens_for_ratio(ratio: float, num_tokens: int) -> int:
    """The total budget for ``ratio`` of an encoder's ``num_tokens`` tokens (N, CLS included):
    ``floor(ratio * num_tokens + 1/2)`` (nearest, halves up; in float64). ``ValueError`` when that is 0.

    E.g. ``ratio=0.11`` of CLIP-L/336's 577 tokens: 63.47 -> 63 tokens (53 + 10 by :func:`split_budget`).
    """
    return checked_ratio_tokens(check_ratio(ratio), num_tokens)


def checked_ratio_tokens(ratio: float, num_tokens):
    """:func:`tokens_for_ratio` for a ratio already checked by :func:`check_ratio` (``num_tokens``
    may be a SymInt under torch.compile with dynamic shapes)."""
    tokens = math.floor(ratio * num_tokens + 0.5)
    if tokens < 1:
        raise ValueError(f"visionzip: ratio={ratio} of {num_tokens} tokens rounds to 0 tokens; use a larger ratio")
    return tokens


class Budget(NamedTuple):
    """A resolved budget: counts (``ratio`` None), or a ratio to resolve against N (counts None)."""

    dominant: int | float | None
    contextual: int | float | None
    ratio: float | None


def resolve_budget(dominant, contextual, tokens, ratio, *, per_image: bool = False) -> Budget:
    """The budget arguments of :func:`visionzip_kernels.apply`, checked and with the defaults filled in.

    Exactly one way of giving the budget: ``dominant`` / ``contextual``, or ``tokens`` (split 54:10
    by :func:`split_budget`), or ``ratio``.

    - An encoder or LLaVA (``per_image=False``): ``dominant`` an int >= 1, ``contextual`` an int >= 0
      (defaults 54 / 10); ``ratio`` is returned as is, with dominant = contextual = None (the count
      depends on the encoder's N).
    - A packed tower (Qwen, ``per_image=True``): ``dominant`` / ``contextual`` per image, each a count
      or a ratio of the image's tokens (defaults 0.65 / 0.05); ``ratio=r`` becomes the ratios
      ``r * 54/64`` and ``r * 10/64`` (rounded per image as upstream rounds its ratios).
    """
    if tokens is not None and ratio is not None:
        raise ValueError("visionzip.apply: give tokens= or ratio=, not both")
    if (tokens is not None or ratio is not None) and (dominant is not None or contextual is not None):
        given = "tokens" if tokens is not None else "ratio"
        raise ValueError(f"visionzip.apply: {given}= sets dominant and contextual (split 54:10); give either "
                         f"{given}= or dominant= / contextual=, not both")
    if ratio is not None:
        ratio = check_ratio(ratio)
        if per_image:
            total = DOMINANT_SHARE + CONTEXTUAL_SHARE
            return Budget(ratio * DOMINANT_SHARE / total, ratio * CONTEXTUAL_SHARE / total, None)
        return Budget(None, None, ratio)
    if tokens is not None:
        return Budget(*split_budget(tokens), None)
    defaults = PER_IMAGE_DEFAULTS if per_image else DEFAULTS
    dominant = defaults.dominant if dominant is None else dominant
    contextual = defaults.contextual if contextual is None else contextual
    if per_image:
        return Budget(check_count_or_ratio("dominant", dominant), check_count_or_ratio("contextual", contextual), None)
    return Budget(check_int("dominant", dominant, 1), check_int("contextual", contextual, 0), None)
