"""Prompt rewriting shared by the LLM families (LLaVA, LLaVA-NeXT, Qwen-VL): dropping the image
placeholders a patched model no longer fills and re-padding the rows.

Each family decides which positions of a [B, S] prompt stay (``kept``); :class:`RowPacker` then
moves every per-token tensor's kept positions to the front (right padding) or the back (left
padding) of rows of the new width, with one scatter per tensor (no loop over rows).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

IGNORE_INDEX = -100  # transformers' label value for positions without a loss

PADDING_SIDES = ("left", "right")


def pad_token_id(config) -> int:
    """The model's ``pad_token_id`` (its config, else its text config), else 0."""
    value = getattr(config, "pad_token_id", None)
    if value is None:
        value = getattr(getattr(config, "text_config", None), "pad_token_id", None)
    return 0 if value is None else value


class RowPacker:
    """Packs the ``kept`` positions of [B, S] per-token tensors into rows of the longest row's length.

    Args:
        kept: [B, S] bool, the positions that stay, in order.
        padding_side: "left" (the kept positions end each row) or "right" (they start it).

    ``width`` is the new length S'; ``lengths`` [B] the kept positions per row.
    """

    def __init__(self, kept: torch.Tensor, padding_side: str):
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.batch = kept.shape[0]
        self.lengths = kept.sum(dim=1)
        self.width = int(self.lengths.max()) if self.batch else 0
        # Destination column of every kept position, so each tensor is packed by one scatter.
        rank = kept.long().cumsum(dim=1) - 1
        if padding_side == "left":
            rank = rank + (self.width - self.lengths).unsqueeze(1)
        self.rows, self.cols = kept.nonzero(as_tuple=True)
        self.dest = rank[self.rows, self.cols]

    @property
    def ragged(self) -> bool:
        """Whether the packed rows differ in length (so that they need padding and a mask)."""
        return bool((self.lengths != self.width).any())

    def __call__(self, t: torch.Tensor, fill, seq_dim: int = 1) -> torch.Tensor:
        """``t`` [B, S, ...] (the sequence at ``seq_dim``) packed to [B, S', ...], padding = ``fill``."""
        t = t.movedim(seq_dim, 1)
        out = t.new_full((self.batch, self.width, *t.shape[2:]), fill)
        out[self.rows, self.dest] = t[self.rows, self.cols]
        return out.movedim(1, seq_dim)


def same_mapping(inputs: Mapping, data: dict):
    """``data`` as the kind of mapping ``inputs`` is (a ``BatchFeature`` stays one)."""
    if type(inputs) is dict:
        return data
    try:
        return type(inputs)(data)
    except Exception:  # a mapping type that cannot be rebuilt from a dict
        return data
