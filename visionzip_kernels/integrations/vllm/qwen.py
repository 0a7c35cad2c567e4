"""VisionZip in vLLM's Qwen2-VL / Qwen2.5-VL (imported by vLLM through the plug-in's model registration).

The classes here subclass vLLM's own model and multimodal processor; with VisionZip not enabled in the
model's config every method defers to vLLM's. Enabled (:func:`..settings_from_config`), for images and
videos alike, a video being t temporal slices that each keep the budget of an image of their h*w/4 units
(docs/SPEC.md "Qwen videos"):

- **Placeholders** (:class:`VisionZipProcessorMixin`): the processor writes D_i + K_i image tokens per
  image instead of N_i = h*w/4, and t*(D_s + K_s) video tokens per video instead of t*h*w/4 (the budget
  depends only on the grid), so the scheduler, the encoder cache and the prefix cache all see the shrunk
  prompt before the encoder runs.
- **Encoder** (:meth:`VisionZipQwenMixin.embed_multimodal`): vLLM's own vision tower runs unchanged;
  a forward pre-hook on the scoring block's ``MMEncoderAttention`` takes the q and k that attention
  receives (after vLLM's rotary, window order on Qwen2.5-VL), registered for that one call.
  ``varlen_scores_and_metric`` (unit 4, within each image or video slice, as the tower attends), the window
  order undone with vLLM's own ``reverse_indices``, then ``varlen_select_merge`` on the tower's outputs,
  one segment per slice: each slice's kept tokens in original order, a video's slices in time order, as the
  transformers integration computes them (docs/SPEC.md "Qwen2-VL and Qwen2.5-VL", "Qwen videos").
- **Positions**: vLLM's ``SupportsMultiModalPruning`` mechanism, as EVS uses it. Each image's or video's
  rows carry :data:`POSITION_CHANNELS` extra channels, the kept unit's (row, column) in its slice's merged
  grid as two base-256 digits each (exact in bf16/fp16/fp32); :meth:`get_mrope_input_positions` gives the
  text its original positions (text after an image or video starts where the full grid's positions would
  have ended, whatever is kept), every image token the image's base and every video token its base in
  the spatial channels and its slice's temporal position in the first (a slice keeps D_s + K_s tokens, so
  the slice of each video token is known from the prompt: base + int(s * second_per_grid_ts *
  tokens_per_second), as vLLM and transformers scale it); :meth:`recompute_mrope_positions` strips the
  channels and writes base + row, base + column in the spatial channels at the media tokens of each
  prefill chunk, so an image or video split across chunks, or partly served from the prefix cache, gets
  the same positions as one that is not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ... import ops
from ..transformers.qwen_vl import image_budgets
from . import VisionZipSettings, settings_from_config

POSITION_CHANNELS = 4  # row // 256, row % 256, column // 256, column % 256 of each kept unit
DIGIT = 256  # integers below 256 are exact in bf16 (8 significant bits)


def encode_positions(rows: torch.Tensor, columns: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[n, 4] channels of ``dtype`` holding ``rows`` / ``columns`` [n] (int64, < 65536) as base-256 digits."""
    if rows.numel() and int(max(rows.max(), columns.max())) >= DIGIT * DIGIT:
        raise ValueError(f"visionzip: a merged grid side of {int(max(rows.max(), columns.max())) + 1} units exceeds "
                         f"the {DIGIT * DIGIT} the position channels hold")
    digits = torch.stack([rows // DIGIT, rows % DIGIT, columns // DIGIT, columns % DIGIT], dim=1)
    return digits.to(dtype)


def decode_positions(channels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) [n] int64 from :func:`encode_positions`' [n, 4] channels."""
    digits = channels.to(torch.float32).round().long().cpu()
    return digits[:, 0] * DIGIT + digits[:, 1], digits[:, 2] * DIGIT + digits[:, 3]


def media_runs(token_ids: torch.Tensor, media_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """(start, end, token id) of each maximal run of one media placeholder id in ``token_ids`` [S]."""
    is_media = torch.zeros_like(token_ids, dtype=torch.bool)
    for media_id in media_ids:
        is_media |= token_ids == media_id
    runs = []
    boundaries = torch.nonzero(torch.diff(is_media.int(), prepend=torch.zeros(1, dtype=torch.int),
                                          append=torch.zeros(1, dtype=torch.int))).flatten().tolist()
    for start, end in zip(boundaries[0::2], boundaries[1::2]):
        runs.append((start, end, int(token_ids[start])))
    return runs


def enable_pruning_in_model_runner() -> None:
    """Makes vLLM's model runner run its pruned-embedding path (``recompute_mrope_positions``) for a model
    with VisionZip enabled: its ``_gather_mm_embeddings`` sets ``is_multimodal_pruning_enabled`` first,
    which the runner otherwise sets only for EVS (and only on GPU). Other models' engines are untouched.
    Idempotent; called when such a model is built, in the worker process that runs it."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    gather = GPUModelRunner._gather_mm_embeddings
    if getattr(gather, "visionzip", False):
        return

    def gather_mm_embeddings(runner, *args, **kwargs):
        if getattr(runner.get_model(), "visionzip", None) is not None:
            runner.is_multimodal_pruning_enabled = True
        return gather(runner, *args, **kwargs)

    gather_mm_embeddings.visionzip = True
    GPUModelRunner._gather_mm_embeddings = gather_mm_embeddings


class VisionZipProcessorMixin:
    """Qwen multimodal processor: with VisionZip enabled, D_i + K_i image placeholders per image and
    t * (D_s + K_s) video placeholders per video of t temporal slices."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        settings = settings_from_config(self.info.get_hf_config())
        if settings is None:
            return updates
        return [shrunk_replacement(update, settings, out_mm_kwargs) if update.modality in ("image", "video")
                else update for update in updates]


def shrunk_replacement(update, settings: VisionZipSettings, out_mm_kwargs):
    """``update`` (vLLM's image or video PromptReplacement of t*h*w/4 placeholder ids for an item of grid
    (t, h, w)) giving the first t * (D_s + K_s) of them: each of the t slices keeps the budget of its units."""
    full, modality = update.replacement, update.modality

    def replacement(item_idx: int):
        tokens = full(item_idx) if callable(full) else full
        if not isinstance(tokens, list):
            raise TypeError(f"visionzip: vLLM's {modality} placeholder is a {type(tokens).__name__}, not the list "
                            "of token ids this plug-in was written for (vLLM 0.32)")
        grid = out_mm_kwargs[modality][item_idx][f"{modality}_grid_thw"].data.tolist()
        slices = int(grid[0])
        names = [f"{modality} {item_idx}" + (f" slice {s}" if modality == "video" else "") for s in range(slices)]
        dominants, contextuals = image_budgets(settings.dominant, settings.contextual,
                                               [len(tokens) // slices] * slices, [grid] * slices, names)
        return tokens[: sum(dominants) + sum(contextuals)]

    return replace(update, replacement=replacement)


class VisionZipQwenMixin:
    """Qwen2-VL / Qwen2.5-VL model: VisionZip image features and positions when the config enables it."""

    windowed = False  # Qwen2.5-VL: window attention, the units in window order inside the tower

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.visionzip = settings_from_config(vllm_config.model_config.hf_config)
        if self.visionzip is None:
            return
        vision_blocks = self.visual.blocks
        n = len(vision_blocks)
        layer = self.visionzip.layer
        if not -n <= layer < n:
            raise ValueError(f"visionzip: layer must be in [-{n}, {n - 1}] for this {n}-block vision tower, "
                             f"got {layer}")
        self.visionzip_block = layer % n
        if self.windowed and self.visionzip_block not in self.visual.fullatt_block_indexes:
            raise ValueError(f"visionzip: layer {layer} (block {self.visionzip_block}) is a windowed block; the "
                             "scoring layer must be one of fullatt_block_indexes = "
                             f"{list(self.visual.fullatt_block_indexes)}")
        if getattr(self, "use_data_parallel", False):
            raise NotImplementedError("visionzip: mm_encoder_tp_mode='data' shards images across ranks; the plug-in "
                                      "supports the default encoder mode")
        attention = vision_blocks[self.visionzip_block].attn
        if attention.tp_size != 1:
            raise NotImplementedError("visionzip: the vision tower is tensor-parallel here (each rank holds some "
                                      "heads); the plug-in needs all heads' q/k on one rank (tensor_parallel_size=1)")
        if vllm_config.compilation_config.compile_mm_encoder:
            raise NotImplementedError("visionzip: compile_mm_encoder compiles the vision blocks, where the plug-in "
                                      "reads q/k from the attention's inputs; leave it off")
        self.visionzip_attention = attention.attn  # vLLM's MMEncoderAttention of the scoring block
        self.spatial_merge_unit = self.visual.spatial_merge_size**2
        # vLLM asks the multimodal config whether pruning is on (it means EVS' video_pruning_rate): answered
        # for this engine's config object only; and the model runner, which reads its answer once when it
        # loads a model (the CPU runner never), is told per call (enable_pruning_in_model_runner).
        multimodal_config = vllm_config.model_config.multimodal_config
        object.__setattr__(multimodal_config, "is_multimodal_pruning_enabled", lambda: True)
        self.supports_multimodal_pruning = True
        enable_pruning_in_model_runner()

    # -- encoder -----------------------------------------------------------------------------------
    def embed_multimodal(self, **kwargs: object):
        if self.visionzip is None:
            return super().embed_multimodal(**kwargs)
        by_modality = self._parse_and_validate_multimodal_inputs(**kwargs)
        embeddings: tuple[torch.Tensor, ...] = ()
        for modality, mm_input in by_modality.items():
            if mm_input is None:
                continue
            if modality in ("image", "images"):  # Qwen2.5-VL's key, Qwen2-VL's
                embeddings += self.visionzip_media(mm_input, "image")
            elif modality in ("video", "videos"):
                embeddings += self.visionzip_media(mm_input, "video")
            else:
                raise ValueError(f"visionzip: unexpected modality {modality!r} in the multimodal inputs")
        return embeddings

    def run_tower(self, pixel_values: torch.Tensor, grid: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """vLLM's tower on images or videos: (merged [sum N_i, C] in original order, the window order's inverse
        or None)."""
        return self.visual(pixel_values, grid_thw=torch.tensor(grid)), None

    def visionzip_media(self, media_input, modality: str) -> tuple[torch.Tensor, ...]:
        """Per image or video (``modality``): the kept tokens [t*(D_s+K_s), C] with their
        :data:`POSITION_CHANNELS` position channels, a video's slices in time order (an image: t = 1)."""
        pixels = "pixel_values" if modality == "image" else "pixel_values_videos"
        if media_input["type"] != pixels:
            raise ValueError(f"visionzip: precomputed {modality} embeddings cannot be pruned (the scores need the "
                             f"vision tower's attention); send pixels, or disable VisionZip for this engine")
        grid = media_input[f"{modality}_grid_thw"].tolist()
        unit = self.spatial_merge_unit
        # One segment per temporal slice (the tower attends within each), each with an image's budget.
        slice_grids = [[1, h, w] for t, h, w in grid for _ in range(t)]
        names = [f"{modality} {i}" + (f" slice {s}" if modality == "video" else "")
                 for i, (t, _, _) in enumerate(grid) for s in range(t)]
        tokens = [h * w // unit for _, h, w in slice_grids]
        dominants, contextuals = image_budgets(self.visionzip.dominant, self.visionzip.contextual, tokens,
                                               slice_grids, names)
        captured = {}

        def take_query_key(module, args, kwargs):
            captured["q"], captured["k"] = kwargs["query"], kwargs["key"]

        hook = self.visionzip_attention.register_forward_pre_hook(take_query_key, with_kwargs=True)
        try:
            merged, original_order = self.run_tower(media_input[pixels], grid)
        finally:
            hook.remove()
        q, k = captured["q"], captured["k"]  # [1, T, H, d] (batch, tokens, heads, head_dim)
        cu_patches = torch.tensor([0, *(h * w for _, h, w in slice_grids)], dtype=torch.int64).cumsum(0)
        scores, metric = ops.varlen_scores_and_metric(q[0], k[0], cu_patches.to(q.device),
                                                      scale=self.visionzip_attention.scale, unit=unit)
        if original_order is not None:
            original_order = original_order.to(scores.device)
            scores, metric = scores[original_order], metric[original_order]
        cu_units = torch.tensor([0, *tokens], dtype=torch.int64).cumsum(0)
        kept, keep, _ = ops.varlen_select_merge(merged, scores, metric, cu_units, dominants, contextuals)
        counts = [d + c for d, c in zip(dominants, contextuals)]
        slices = []
        for rows, keep_s, start, (_, _, w) in zip(kept.split(counts), keep.cpu().split(counts), cu_units.tolist(),
                                                  slice_grids):
            local = keep_s - start
            width = w // self.visual.spatial_merge_size
            channels = encode_positions(local // width, local % width, rows.dtype).to(rows.device)
            slices.append(torch.cat([rows, channels], dim=1))
        outputs, first = [], 0
        for t, _, _ in grid:  # an item's slices are consecutive
            outputs.append(torch.cat(slices[first:first + t]))
            first += t
        return tuple(outputs)

    # -- positions -------------------------------------------------------------------------------
    def get_mrope_input_positions(self, input_tokens: list[int], mm_features):
        if self.visionzip is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        parts, start, next_position = [], 0, 0
        for feature, (offset, grid_t, grid_h, grid_w, t_factor) in zip(features, self.iter_mm_grid_thw(features)):
            text = offset - start
            parts.append(torch.arange(text).expand(3, text) + next_position)
            base = next_position + text
            # Every media token at the base in the spatial channels until recompute_mrope_positions knows which
            # units were kept; a video token's temporal channel is its slice's (each slice keeps as many tokens).
            # The text after it continues from the full grid's extent (the original positions).
            length = feature.mm_position.length
            if length % grid_t:
                raise RuntimeError(f"visionzip: a {feature.modality} of {grid_t} temporal slices has {length} "
                                   "placeholders, not a multiple of them")
            # float64 and truncation, as vLLM's numpy positions and transformers' get_rope_index scale time
            times = (torch.arange(grid_t, dtype=torch.float64) * t_factor).long()
            item = torch.full((3, length), base, dtype=torch.int64)
            item[0] += times.repeat_interleave(length // grid_t)
            parts.append(item)
            next_position = base + max(int(times[-1]), grid_h - 1, grid_w - 1) + 1
            start = offset + length
        tail = len(input_tokens) - start
        parts.append(torch.arange(tail).expand(3, tail) + next_position)
        positions = torch.cat(parts, dim=1).long()
        return positions, int(positions.max()) + 1 - len(input_tokens)

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        if self.visionzip is None:
            return super().recompute_mrope_positions(input_ids, multimodal_embeddings, mrope_positions,
                                                     num_computed_tokens)
        token_ids = torch.as_tensor(input_ids).cpu().long()
        positions = mrope_positions.clone()
        runs = media_runs(token_ids, [self.config.image_token_id, self.config.video_token_id])
        # The chunk's slices come in prompt order: the first continues the run holding num_computed_tokens
        # (or starts the next one), each next one starts the next run.
        cursor = num_computed_tokens
        stripped = []
        for embedding in multimodal_embeddings:
            stripped.append(embedding[:, :-POSITION_CHANNELS])
            start, end, _ = next((r for r in runs if r[1] > cursor), (None, None, None))
            begin = max(start, cursor) if start is not None else None
            if begin is None or begin + embedding.shape[0] > end:
                raise RuntimeError(f"visionzip: {embedding.shape[0]} multimodal rows at token {cursor} do not fit a "
                                   "placeholder run of the prompt")
            # The temporal channel is get_mrope_input_positions' (an image's base, a video slice's time);
            # the run's first token is at the base (time 0).
            rows, columns = decode_positions(embedding[:, -POSITION_CHANNELS:])
            base = positions[0, start]
            stop = begin + embedding.shape[0]
            positions[1, begin:stop] = base + rows.to(positions.device)
            positions[2, begin:stop] = base + columns.to(positions.device)
            cursor = begin + embedding.shape[0]
        return stripped, positions, int(positions.max()) + 1 - token_ids.numel()


class VisionZipQwen2VLProcessor(VisionZipProcessorMixin, Qwen2VLMultiModalProcessor):
    """Qwen2-VL's processor, D_i + K_i image placeholders with VisionZip on."""


class VisionZipQwen2_5_VLProcessor(VisionZipProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    """Qwen2.5-VL's processor, D_i + K_i image placeholders with VisionZip on."""


@MULTIMODAL_REGISTRY.register_processor(VisionZipQwen2VLProcessor, info=Qwen2VLProcessingInfo,
                                        dummy_inputs=Qwen2VLDummyInputsBuilder)
class VisionZipQwen2VL(VisionZipQwenMixin, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL with the VisionZip plug-in (stock unless the config enables VisionZip)."""


@MULTIMODAL_REGISTRY.register_processor(VisionZipQwen2_5_VLProcessor, info=Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class VisionZipQwen2_5_VL(VisionZipQwenMixin, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with the VisionZip plug-in (stock unless the config enables VisionZip)."""

    windowed = True

    def run_tower(self, pixel_values, grid):
        # vLLM's own metadata (rotary, windows) passed in, so that its reverse_indices (argsort of the
        # window order) also undo the order of the scores.
        metadata = self.visual.prepare_encoder_metadata(grid)
        merged = self.visual(pixel_values, grid_thw=grid, encoder_metadata=metadata)
        return merged, metadata["reverse_indices"]
