"""VisionZip in vLLM's Qwen3-VL (DeepStack) and Qwen3.5 (imported by vLLM through the plug-in's model registration).

The mechanism is :mod:`.qwen`'s (placeholders D_i + K_i from the grid, q/k from a forward pre-hook on the
scoring block's ``MMEncoderAttention``, 4 position channels per kept row, ``SupportsMultiModalPruning``'s
``recompute_mrope_positions`` per prefill chunk); what differs on the Qwen3 generation:

- **Tower output and DeepStack.** vLLM's Qwen3 tower returns, per unit, the merger's features and then each
  DeepStack merger's, concatenated along channels ([N, C * (1 + L)]). ``varlen_select_merge`` on that
  concatenation is ``varlen_select_merge_many`` on the pieces (one plan, merged per channel: docs/SPEC.md
  "One plan, several tensors"), so every DeepStack row lands on its unit's image token as in the
  transformers integration; vLLM's ``embed_input_ids`` splits the kept rows back into main and DeepStack
  features once :meth:`recompute_mrope_positions` has stripped the position channels. Qwen3.5 has no
  DeepStack (C * 1).
- **Positions.** Qwen3's text after a visual run continues at the run's largest position + 1, which for an
  image is its base + max(h, w) (h, w in merged units), as for Qwen2; each video frame is its own
  ``<t seconds><vision_start>...<vision_end>`` run, positioned as an image of t = 1 after its timestamp text.
- **Videos.** Pruned per temporal slice as the transformers integration prunes them (docs/SPEC.md "Qwen
  videos"): each frame's run of h*w/4 placeholders keeps its slice's D_s + K_s (:func:`shrunk_frame_runs`),
  its kept rows at the run's base + (0, row, column); a video's rows span its frames' runs, and a prefill
  chunk may end inside any of them.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from vllm.model_executor.models.qwen3_5 import Qwen3_5ForConditionalGeneration, Qwen3_5ProcessingInfo
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptUpdateDetails

from ..transformers.qwen_vl import image_budgets
from . import VisionZipSettings, settings_from_config
from .qwen import (
    POSITION_CHANNELS,
    VisionZipProcessorMixin,
    VisionZipQwenMixin,
    decode_positions,
    media_runs,
    shrunk_replacement,
)


def shrunk_frame_runs(update, settings: VisionZipSettings, out_mm_kwargs, video_token_id: int, merge_unit: int):
    """``update`` (vLLM's Qwen3 video PromptReplacement: per frame ``<t seconds><vision_start>`` + h*w/4 video
    ids + ``<vision_end>``) giving each frame's run the first D_s + K_s of its ids (the timestamps and markers
    as stock), embeddings at the video ids only."""
    full = update.replacement

    def replacement(item_idx: int) -> PromptUpdateDetails:
        details = full(item_idx) if callable(full) else full
        tokens = list(details.full) if isinstance(details, PromptUpdateDetails) else list(details)
        slices, height, width = out_mm_kwargs["video"][item_idx]["video_grid_thw"].data.tolist()
        per_frame = height * width // merge_unit
        is_video = torch.tensor(tokens) == video_token_id
        # (start, end) of each run of video ids: one per frame
        edges = torch.diff(torch.cat([torch.zeros(1, dtype=torch.int8), is_video.to(torch.int8),
                                      torch.zeros(1, dtype=torch.int8)]))
        runs = list(zip((edges == 1).nonzero().flatten().tolist(), (edges == -1).nonzero().flatten().tolist()))
        if len(runs) != slices or any(end - start != per_frame for start, end in runs):
            raise RuntimeError(f"visionzip: vLLM's placeholder for video {item_idx} has runs of "
                               f"{[end - start for start, end in runs]} video ids, not {slices} of {per_frame} "
                               "(the per-frame layout this plug-in was written for, vLLM 0.32)")
        names = [f"video {item_idx} slice {s}" for s in range(slices)]
        dominants, contextuals = image_budgets(settings.dominant, settings.contextual, [per_frame] * slices,
                                               [[1, height, width]] * slices, names)
        shrunk, previous = [], 0
        for (start, end), dominant, contextual in zip(runs, dominants, contextuals):
            shrunk += tokens[previous:start + dominant + contextual]
            previous = end
        shrunk += tokens[previous:]
        return PromptUpdateDetails.select_token_id(shrunk, video_token_id)

    return replace(update, replacement=replacement)


class VisionZipQwen3Mixin(VisionZipQwenMixin):
    """Qwen3-VL / Qwen3.5 model: VisionZip image and video features (DeepStack included) and positions when
    enabled."""

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features):
        if self.visionzip is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        merge = self.config.vision_config.spatial_merge_size
        # (offset, length, merged h, merged w) per visual run (an image, a video frame), in prompt order
        runs = []
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            if feature.modality == "image":
                _, grid_h, grid_w = feature.data["image_grid_thw"].data.tolist()
                runs.append((feature.mm_position.offset, feature.mm_position.length, grid_h // merge,
                             grid_w // merge))
            else:  # each frame of a video, as vLLM's Qwen3-VL finds them
                for offset, height, width, count in self._iter_mm_grid_hw(
                        input_tokens, [feature], video_token_id=self.config.video_token_id,
                        vision_start_token_id=self.config.vision_start_token_id,
                        vision_end_token_id=self.config.vision_end_token_id, spatial_merge_size=merge):
                    runs.append((offset, count, height, width))
        parts, start, next_position = [], 0, 0
        for offset, length, height, width in runs:
            text = offset - start
            parts.append(torch.arange(text).expand(3, text) + next_position)
            base = next_position + text
            # Every kept token at the base until recompute_mrope_positions knows which units were kept.
            parts.append(torch.full((3, length), base, dtype=torch.int64))
            next_position = base + max(height, width)  # the full grid's largest position + 1
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
        image_id = self.config.image_token_id
        runs = media_runs(token_ids, [image_id, self.config.video_token_id])
        # The chunk's slices come in prompt order, the first continuing the run that holds num_computed_tokens.
        # An image's slice lies in one run; a video's may span several (one run per frame, each at its base).
        cursor = num_computed_tokens
        stripped = []
        for embedding in multimodal_embeddings:
            stripped.append(embedding[:, :-POSITION_CHANNELS])
            done = 0
            while done < embedding.shape[0]:
                start, end, token = next((r for r in runs if r[1] > cursor), (None, None, None))
                if start is None:
                    raise RuntimeError(f"visionzip: {embedding.shape[0] - done} multimodal rows at token {cursor} "
                                       "do not fit a placeholder run of the prompt")
                begin = max(start, cursor)
                take = min(embedding.shape[0] - done, end - begin)
                if token == image_id and take != embedding.shape[0]:
                    raise RuntimeError(f"visionzip: an image's {embedding.shape[0]} rows at token {begin} do not "
                                       f"fit its placeholder run [{start}, {end})")
                rows, columns = decode_positions(embedding[done:done + take, -POSITION_CHANNELS:])
                base = positions[0, start]  # an image's or frame's temporal channel stays at its base
                positions[0, begin:begin + take] = base
                positions[1, begin:begin + take] = base + rows.to(positions.device)
                positions[2, begin:begin + take] = base + columns.to(positions.device)
                done += take
                cursor = begin + take
        return stripped, positions, int(positions.max()) + 1 - token_ids.numel()


class VisionZipQwen3VLProcessor(VisionZipProcessorMixin, Qwen3VLMultiModalProcessor):
    """Qwen3-VL's / Qwen3.5's processor with VisionZip on: D_i + K_i image placeholders, D_s + K_s video
    placeholders in each frame's run."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = Qwen3VLMultiModalProcessor._get_prompt_updates(self, mm_items, hf_processor_mm_kwargs,
                                                                 out_mm_kwargs)
        config = self.info.get_hf_config()
        settings = settings_from_config(config)
        if settings is None:
            return updates
        merge_unit = self.info.get_image_processor(**hf_processor_mm_kwargs).merge_size**2
        return [shrunk_frame_runs(update, settings, out_mm_kwargs, config.video_token_id, merge_unit)
                if update.modality == "video" else shrunk_replacement(update, settings, out_mm_kwargs)
                for update in updates]


@MULTIMODAL_REGISTRY.register_processor(VisionZipQwen3VLProcessor, info=Qwen3VLProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class VisionZipQwen3VL(VisionZipQwen3Mixin, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL with the VisionZip plug-in (stock unless the config enables VisionZip)."""


@MULTIMODAL_REGISTRY.register_processor(VisionZipQwen3VLProcessor, info=Qwen3_5ProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class VisionZipQwen3_5(VisionZipQwen3Mixin, Qwen3_5ForConditionalGeneration):
    """vLLM's Qwen3.5 with the VisionZip plug-in (stock unless the config enables VisionZip)."""
