"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration`` / ``LlavaOnevisionModel``): images and videos.

LLaVA-OneVision has a SigLIP tower (no CLS: the scores are the attention each token receives,
``attention_received``), LLaVA-NeXT's anyres crops with the grid unpadded and capped at 9 crops' worth of
tokens ("anyres_max_9"), one ``image_newline`` after every row of the grid, and videos whose frames
are pooled 2x2 (bilinear, ``apply_pooling``) after the projector. What :func:`visionzip_kernels.apply`
does to it (:class:`LlavaOnevisionPatch`, a :class:`~.llava_next.LlavaNextPatch`):

- **Images.** As for LLaVA-NeXT: the tower runs on all crops of all images as one batch and every
  crop (the base image and each grid crop) keeps D+K tokens. One image's rows are the base crop's
  D+K tokens; then the grid crops' dominant tokens on the stitched grid, read in raster order, with
  one ``image_newline`` after each band of crop rows (``rows`` newlines); then the grid crops'
  contextual tokens, crop by crop. The grid is not unpadded and not downscaled (both act on the
  dense grid; on the kept tokens they would make the count depend on the selection). An image of
  one crop (an image of a multi-image prompt: ``batch_num_images[i] > 1``) gets its D+K tokens
  and one ``image_newline``, as stock. Counts: ``(1 + rows * cols) * (D + K) + rows``, or
  ``D + K + 1``: known before the tower runs (docs/SPEC.md "LLaVA-OneVision").
- **Videos.** Per frame, ``video_pooling`` (an ``apply`` option) says where VisionZip works:
  ``"before"`` the 2x2 pooling: the frame's tower tokens are selected and merged like a crop's,
  projected, and not pooled; ``"after"`` it: the tower runs to layer L, the projector and the
  model's own ``apply_pooling`` run on all tokens, and the pooled tokens are selected and merged
  with the scores and the metric pooled by the same ``apply_pooling``. Each frame keeps D+K tokens
  (dominant in ascending order, then contextual), frames in order, then the stock ``image_newline``
  once per video: ``frames * (D + K) + 1`` rows. The default and the measurements that chose it:
  docs/SPEC.md "LLaVA-OneVision".
- The layer read defaults to ``config.vision_feature_layer`` (-1 for the published checkpoints,
  whose 26-layer tower is SigLIP-so400m less its last layer), the layer whose output the LLM reads.
- Prompts: :func:`shrink_inputs` cuts each image's and each video's stock placeholders to the counts
  above (the stock ones come from the model's own ``pack_image_features`` and ``apply_pooling`` on
  shape-only tensors); a forward pre-hook names it when the counts do not match.

transformers: 5.23 appends a video's ``image_newline`` in ``get_video_features`` (the forward then
scatters pre-encoded features, ``mm_encoder_outputs``, as they are), 5.17's forward appends it
after calling ``get_video_features``; the patch follows the model's own forward (whether it takes
``mm_encoder_outputs``), so both work.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch

from ... import ops
from ...budget import Budget, split_budget, tokens_for_ratio
from .common import (
    CompositeFamily,
    EncoderFamily,
    VisionZipOutput,
    replace_instance_attribute,
    restore_instance_attribute,
)
from .llava import llava_model, shrink_image_tokens
from .llava_next import LlavaNextPatch
from .prompt import pad_token_id as default_pad_token_id
from .prompt import same_mapping

VIDEO_POOLING = ("before", "after")
DEFAULT_VIDEO_POOLING = "before"


def check_video_pooling(value) -> str:
    """``value`` if it is one of :data:`VIDEO_POOLING`, else a ``ValueError`` naming ``video_pooling``."""
    if value not in VIDEO_POOLING:
        raise ValueError(f"visionzip.apply: video_pooling must be 'before' or 'after' (VisionZip per frame before or "
                         f"after LLaVA-OneVision's 2x2 pooling), got {value!r}")
    return value


def _alone_in_prompt(batch_num_images, images: int) -> list[bool]:
    """Per image, whether it is the only image of its prompt (then it is cut into anyres crops): the
    model's own rule (``batch_num_images`` None: every image is alone)."""
    if batch_num_images is None:
        return [True] * images
    alone = [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
    if len(alone) != images:
        raise ValueError(f"visionzip: batch_num_images {[int(n) for n in batch_num_images]} counts {len(alone)} "
                         f"images, image_sizes has {images}")
    return alone


class LlavaOnevisionPatch(LlavaNextPatch):
    """VisionZip on a LLaVA-OneVision model instance (see the module docstring).

    ``tokens_per_image`` (inherited) is D+K per crop and per frame; ``video_pooling`` is "before" or
    "after"; ``pooled_tokens`` the tokens of a frame after the stock 2x2 pooling (196 for 27x27).
    """

    model_name = "LLaVA-OneVision"

    def __init__(self, model: torch.nn.Module, tower_family: EncoderFamily, dominant: int | None,
                 contextual: int | None, layer: int, ratio: float | None = None,
                 video_pooling: str = DEFAULT_VIDEO_POOLING):
        llava = llava_model(model)
        if tower_family.keep_cls:
            raise NotImplementedError(f"visionzip.apply: LLaVA-OneVision with a {tower_family.name} tower (a CLS "
                                      "token) is not supported; its tower is SigLIP (no CLS)")
        for attr in ("get_video_features", "apply_pooling", "image_newline"):
            if not hasattr(llava, attr):
                raise TypeError(f"visionzip.apply: {type(llava).__name__} has no {attr}; not a LLaVA-OneVision model")
        self.video_pooling = check_video_pooling(video_pooling)
        self.video_token_id = llava.config.video_token_id
        side = int(llava.config.vision_config.image_size) // int(llava.config.vision_config.patch_size)
        self.pooled_tokens = int(llava.apply_pooling(torch.empty(1, side * side, 1, device="meta")).shape[1])
        # 5.23's get_video_features returns the features with the newline; 5.17's forward appends it.
        self.video_newline_in_features = "mm_encoder_outputs" in inspect.signature(type(llava).forward).parameters
        # Checked before anything is patched, so that a refused budget leaves the model as it was.
        counts = (dominant, contextual)
        if ratio is not None and dominant is None and contextual is None:
            counts = split_budget(tokens_for_ratio(ratio, tower_family.num_tokens(llava.vision_tower)))
        if (self.video_pooling == "after" and all(isinstance(c, int) for c in counts)
                and sum(counts) > self.pooled_tokens):
            raise ValueError(
                f"visionzip.apply: with video_pooling='after' every frame keeps dominant + contextual of its "
                f"{self.pooled_tokens} pooled tokens, but dominant={counts[0]} + contextual={counts[1]} = "
                f"{sum(counts)}; use a smaller budget or video_pooling='before' (of the frame's {side * side} tokens)")
        super().__init__(model, tower_family, dominant, contextual, layer, ratio=ratio)
        self._saved_get_video_features = replace_instance_attribute(self.llava, "get_video_features",
                                                                    self.get_video_features)

    @property
    def settings(self) -> dict:
        """The budget, layer and ``video_pooling`` as :func:`visionzip_kernels.apply` takes them."""
        return {**super().settings, "video_pooling": self.video_pooling}

    def __repr__(self) -> str:
        return (f"LlavaOnevisionPatch(tower={self.tower_patch!r}, {self.crop_tokens} -> {self.tokens_per_image} "
                f"tokens per crop and per frame, video_pooling={self.video_pooling!r})")

    # -- image geometry --------------------------------------------------------------------------
    def grid_of(self, image_size) -> tuple[int, int]:
        """(rows, cols) of an image's crop grid, from transformers' own anyres helper."""
        rows, cols = self._grid_shape(image_size, self.llava.config.image_grid_pinpoints, self.crop_size)
        return int(rows), int(cols)

    def crops_per_image(self, image_sizes, batch_num_images=None) -> list[int]:
        """Crops the tower sees per image: the grid's plus the base one for an image alone in its
        prompt, the base one only for the images of a multi-image prompt (the model's own rule)."""
        alone = _alone_in_prompt(batch_num_images, len(image_sizes))
        return [self.crops_of(size) if single else 1 for size, single in zip(image_sizes, alone)]

    def tokens_for_crops(self, crops: int, image_size) -> int:
        """Feature rows of one image of ``crops`` crops: ``crops * (D + K)`` plus one ``image_newline``
        per band of crop rows (one for a single crop)."""
        newlines = 1 if crops == 1 else self.grid_of(image_size)[0]
        return crops * self.tokens_per_image + newlines

    def tokens_for_image(self, image_size) -> int:
        """Feature rows of an image alone in its prompt (anyres crops)."""
        return self.tokens_for_crops(self.crops_of(image_size), image_size)

    def image_rows(self, image_sizes, batch_num_images=None) -> list[int]:
        """Feature rows (= placeholders under the patch) per image."""
        crops = self.crops_per_image(image_sizes, batch_num_images)
        return [self.tokens_for_crops(n, size) for n, size in zip(crops, image_sizes)]

    def stock_image_rows(self, image_sizes, batch_num_images=None) -> list[int]:
        """Placeholders per image that the stock processor writes for the unpatched model: counted by
        the model's own ``pack_image_features`` (unpadding, anyres_max downscaling, newlines) on
        shape-only (meta) features."""
        per_crop = self.crop_side**2
        if self.llava.config.vision_feature_select_strategy == "default":
            per_crop -= 1
        crops = self.crops_per_image(image_sizes, batch_num_images)
        features = [torch.empty(n, per_crop, 1, device="meta") for n in crops]
        packed, _ = self.llava.pack_image_features(features, image_sizes, image_newline=torch.empty(1, device="meta"),
                                                   vision_aspect_ratio=self.llava.config.vision_aspect_ratio)
        return [int(f.shape[0]) for f in packed]

    def stock_placeholders(self, image_sizes) -> list[int]:
        """:meth:`stock_image_rows` for images alone in their prompts (LLaVA-NeXT's signature)."""
        return self.stock_image_rows(image_sizes)

    def image_token_counts(self, inputs: Mapping) -> tuple[list[int], list[int]]:
        """(patched, stock) placeholders per image of the processor's ``inputs`` (``image_sizes``,
        ``batch_num_images``); none without ``pixel_values``."""
        if inputs.get("pixel_values") is None:
            return [], []
        image_sizes = inputs.get("image_sizes")
        if image_sizes is None:
            raise KeyError("shrink_inputs: LLaVA-OneVision inputs with pixel_values need 'image_sizes' (the processor "
                           "returns them)")
        batch_num_images = inputs.get("batch_num_images")
        return self.image_rows(image_sizes, batch_num_images), self.stock_image_rows(image_sizes, batch_num_images)

    # -- video geometry --------------------------------------------------------------------------
    def tokens_for_video(self, frames: int) -> int:
        """Feature rows of one video: D+K per frame and one ``image_newline``."""
        return frames * self.tokens_per_image + 1

    def stock_tokens_for_video(self, frames: int) -> int:
        """The stock count: the pooled tokens of every frame and one ``image_newline``."""
        return frames * self.pooled_tokens + 1

    def video_token_counts(self, inputs: Mapping) -> tuple[list[int], list[int]]:
        """(patched, stock) placeholders per video of ``inputs`` (``pixel_values_videos`` [videos,
        frames, 3, S, S]); none without videos."""
        videos = inputs.get("pixel_values_videos")
        if videos is None:
            return [], []
        frames = int(videos.shape[1])
        return ([self.tokens_for_video(frames)] * videos.shape[0],
                [self.stock_tokens_for_video(frames)] * videos.shape[0])

    # -- the replacement of LlavaOnevisionModel.get_image_features --------------------------------
    def get_image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor, vision_feature_layer=None,
                           vision_feature_select_strategy=None, vision_aspect_ratio=None, batch_num_images=None,
                           **kwargs) -> VisionZipOutput:
        """VisionZip image features of LLaVA-OneVision inputs.

        Args:
            pixel_values: [images, max_crops, 3, S, S] as the processor pads them, or the crops
                already concatenated, [crops, 3, S, S].
            image_sizes: [images, 2] the original (H, W) of each image.
            batch_num_images: images per prompt (the processor's); an image that shares its prompt
                is one crop. ``None``: every image is alone.

        Returns:
            A :class:`VisionZipOutput`: ``pooler_output`` = one [rows, C_text] tensor per image (the
            layout of the module docstring), ``last_hidden_state`` = [crops, D+K, C_vision] and
            ``keep`` = [crops, D] for all crops before the layout. ``vision_feature_layer``,
            ``vision_feature_select_strategy`` and ``vision_aspect_ratio`` are ignored (the layer is
            ``apply``'s; no grid is downscaled).
        """
        if image_sizes is None:
            raise ValueError("visionzip: LLaVA-OneVision get_image_features needs image_sizes")
        return self.encode_images(pixel_values, image_sizes, self.crops_per_image(image_sizes, batch_num_images),
                                  **kwargs)

    def arrange(self, features: torch.Tensor, keep: torch.Tensor, image_size) -> torch.Tensor:
        """One image's LLM rows from its crops' tokens: LLaVA-NeXT's layout with an ``image_newline``
        after each band of crop rows.

        Args:
            features: [crops, D+K, C] projected tokens, base crop first, then the grid row by row.
            keep: [crops, D] ascending token indices of the dominant tokens.
            image_size: the image's original (H, W).

        Returns:
            [rows, C]: base crop; per band of crop rows, its dominant tokens in raster order of the
            stitched grid and ``image_newline``; the grid crops' contextual tokens.
        """
        laid_out = super().arrange(features, keep, image_size)
        if features.shape[0] == 1:
            return laid_out  # the crop's tokens and image_newline
        rows, cols = self.grid_of(image_size)
        per_crop, dominant, channels = features.shape[1], keep.shape[1], features.shape[2]
        # Raster order sorts by stitched row first, and each crop of a band keeps D tokens, so band b
        # holds exactly the dominant rows b * cols * D .. (b + 1) * cols * D - 1.
        band = cols * dominant
        base, grid, contextual = laid_out.split([per_crop, rows * band, laid_out.shape[0] - per_crop - rows * band])
        newline = self.llava.image_newline.to(features).expand(rows, 1, channels)
        banded = torch.cat([grid.view(rows, band, channels), newline], dim=1).flatten(0, 1)
        return torch.cat([base, banded, contextual])

    # -- the replacement of LlavaOnevisionModel.get_video_features --------------------------------
    def get_video_features(self, pixel_values_videos: torch.Tensor | None = None, vision_feature_layer=None,
                           vision_feature_select_strategy=None, **kwargs) -> VisionZipOutput:
        """VisionZip video features: every frame keeps D+K tokens (``video_pooling``: before or after
        the 2x2 pooling, see the module docstring).

        Args:
            pixel_values_videos: [videos, frames, 3, S, S] (transformers 5.17's outer model passes
                them as ``pixel_values``, which is taken too; the parameter keeps 5.23's name, the one
                ``generate()`` looks for in this signature).

        Returns:
            A :class:`VisionZipOutput`: ``pooler_output`` = [videos, frames * (D+K) (+ 1), C_text], the
            frames' tokens in order (and the video's ``image_newline`` on a transformers whose
            ``get_video_features`` appends it, 5.23); ``last_hidden_state`` = the frames' kept tokens
            [videos * frames, D+K, C] (before: the tower's, before the projector; after: the pooled
            projected ones); ``keep`` = [videos * frames, D], indices into the frame's tower tokens
            (before) or its pooled tokens (after).
        """
        if pixel_values_videos is None:
            pixel_values_videos = kwargs.pop("pixel_values", None)
        if pixel_values_videos is None:
            raise ValueError("visionzip: LLaVA-OneVision get_video_features needs pixel_values_videos")
        return_dict = kwargs.pop("return_dict", True)
        # vision_aspect_ratio: filled in from the config by the outer model's wrapper; images only
        for key in ("output_hidden_states", "output_attentions", "vision_aspect_ratio"):
            kwargs.pop(key, None)
        if pixel_values_videos.dim() != 5:
            raise ValueError("visionzip: LLaVA-OneVision pixel_values_videos must be [videos, frames, 3, H, W], got "
                             f"{list(pixel_values_videos.shape)}")
        videos, frames = pixel_values_videos.shape[:2]
        pixels = pixel_values_videos.flatten(0, 1)
        if self.video_pooling == "before":
            out = self.llava.vision_tower(pixels, return_dict=True, **kwargs)
            tokens = self.llava.multi_modal_projector(out.last_hidden_state)
        else:
            tower = self.tower_patch
            hidden, q, k, _ = tower.encode(pixels, **kwargs)
            scores, metric = ops.scores_and_metric(q.detach(), k.detach(), tower.scale, False)
            pool = self.llava.apply_pooling  # the model's own 2x2 pooling, on features, scores and metric alike
            pooled = pool(self.llava.multi_modal_projector(hidden))
            pooled_scores = pool(scores.unsqueeze(-1)).squeeze(-1)
            tokens, keep = ops.select_merge(pooled, pooled_scores, pool(metric), tower.dominant, tower.contextual,
                                            False)
            out = VisionZipOutput(last_hidden_state=tokens, keep=keep)
        features = tokens.reshape(videos, frames * tokens.shape[1], tokens.shape[2])
        if self.video_newline_in_features:
            newline = self.llava.image_newline.to(features).expand(videos, 1, features.shape[2])
            features = torch.cat([features, newline], dim=1)
        out.pooler_output = features
        return out if return_dict else out.to_tuple()

    # -- the placeholder check (a forward pre-hook on LlavaOnevisionModel) ---------------------------
    # Reads counts out of tensors (a graph break under torch.compile): runs eagerly, outside the graph.
    @torch.compiler.disable
    def _check_placeholders(self, module, args, kwargs):
        names = ("input_ids", "pixel_values", "image_sizes", "pixel_values_videos")
        given = {name: kwargs.get(name, args[i] if len(args) > i else None) for i, name in enumerate(names)}
        input_ids = given["input_ids"]
        if input_ids is None:
            return None
        encoded = kwargs.get("mm_encoder_outputs") or {}
        hints = []
        pixel_values = given["pixel_values"]
        if pixel_values is not None and pixel_values.shape[0] > 0:
            image_sizes = given["image_sizes"]
            if image_sizes is None:
                raise ValueError("visionzip: LLaVA-OneVision needs image_sizes with pixel_values")
            batch_num_images = kwargs.get("batch_num_images")
            rows = sum(self.image_rows(image_sizes, batch_num_images))
            stock = sum(self.stock_image_rows(image_sizes, batch_num_images))
            hints.append(self._mismatch("image", self.image_token_id, input_ids, rows, stock))
        elif isinstance(encoded.get("image"), VisionZipOutput) and encoded["image"].pooler_output:
            rows = sum(f.shape[0] for f in encoded["image"].pooler_output)
            hints.append(self._mismatch("image", self.image_token_id, input_ids, rows, None))
        videos = given["pixel_values_videos"]
        if videos is not None and videos.shape[0] > 0:
            frames = int(videos.shape[1])
            rows = videos.shape[0] * self.tokens_for_video(frames)
            stock = videos.shape[0] * self.stock_tokens_for_video(frames)
            hints.append(self._mismatch("video", self.video_token_id, input_ids, rows, stock))
        elif isinstance(encoded.get("video"), VisionZipOutput) and encoded["video"].pooler_output is not None:
            features = encoded["video"].pooler_output
            rows = features.shape[0] * (features.shape[1] + (0 if self.video_newline_in_features else 1))
            hints.append(self._mismatch("video", self.video_token_id, input_ids, rows, None))
        problems = [hint for hint in hints if hint]
        if problems:
            raise ValueError(" ".join(problems))
        return None

    def _mismatch(self, kind: str, token_id: int, input_ids: torch.Tensor, rows: int, stock: int | None) -> str:
        """'' when ``input_ids`` holds ``rows`` placeholders ``token_id``, else the error's sentence."""
        found = int((input_ids == token_id).sum())
        if found == rows:
            return ""
        hint = ""
        if stock is not None and found == stock:
            hint = (" These are the stock processor's placeholders: pass the inputs through "
                    "visionzip_kernels.integrations.transformers.shrink_inputs(model, inputs) first.")
        per = "per crop and per frame" if kind == "video" else "per crop"
        return (f"visionzip: input_ids holds {found} {kind} placeholder tokens (id {token_id}) but the VisionZip-"
                f"patched LLaVA-OneVision produces {rows} {kind} feature rows (dominant {self.dominant} + contextual "
                f"{self.contextual} {per}, and the newlines).{hint}")

    def remove(self) -> None:
        """Restores ``get_video_features``, then what :class:`~.llava.LlavaPatch` patched; idempotent."""
        if self.removed:
            return
        restore_instance_attribute(self.llava, "get_video_features", self._saved_get_video_features)
        super().remove()


def shrink_inputs(model: torch.nn.Module, inputs: Mapping, *, padding_side: str = "left",
                  pad_token_id: int | None = None):
    """The stock processor's output made consistent with a VisionZip-patched LLaVA-OneVision ``model``.

    Every image's and every video's stock placeholders (the counts the stock model fills, from
    ``image_sizes``, ``batch_num_images`` and ``pixel_values_videos``' frames) are cut to the
    patched counts (:class:`LlavaOnevisionPatch`) by :func:`~.llava.shrink_image_tokens`, from
    ``input_ids``, ``attention_mask``, ``labels`` and every other [B, S] tensor; the rest
    (``pixel_values``, ``image_sizes``, ``pixel_values_videos``, ...) is passed through. Returns the
    same kind of mapping (a ``BatchFeature`` stays one).

    Args:
        padding_side: where rows that became shorter are padded ("left", as generation wants).
        pad_token_id: default: the model's ``pad_token_id`` (config or text config), else 0.
    """
    from . import patch_for_prompt

    patch = patch_for_prompt(model, LlavaOnevisionPatch)
    if "input_ids" not in inputs:
        raise KeyError("shrink_inputs: inputs has no 'input_ids'")
    if pad_token_id is None:
        pad_token_id = default_pad_token_id(patch.llava.config)
    data = dict(inputs.items())
    for token_id, (tokens, stock) in ((patch.image_token_id, patch.image_token_counts(inputs)),
                                      (patch.video_token_id, patch.video_token_counts(inputs))):
        if not tokens:
            continue
        input_ids = data["input_ids"]
        extra = {k: v for k, v in data.items()
                 if k not in ("input_ids", "attention_mask", "labels") and isinstance(v, torch.Tensor)
                 and v.shape == input_ids.shape}
        data.update(shrink_image_tokens(
            input_ids, tokens, image_token_id=token_id, placeholders_per_image=stock,
            attention_mask=data.get("attention_mask"), labels=data.get("labels"), pad_token_id=pad_token_id,
            padding_side=padding_side, extra=extra,
        ))
    return same_mapping(inputs, data)


def make_patch(model: torch.nn.Module, budget: Budget, layer: int,
               video_pooling: str = DEFAULT_VIDEO_POOLING) -> LlavaOnevisionPatch:
    """:class:`LlavaOnevisionPatch` on ``model``, its tower's family from the registry."""
    from . import encoder_family
    from .llava import vision_tower

    return LlavaOnevisionPatch(model, encoder_family(vision_tower(model)), budget.dominant, budget.contextual, layer,
                               ratio=budget.ratio, video_pooling=video_pooling)


def default_layer(model: torch.nn.Module) -> int:
    """The layer whose output the stock model feeds its LLM: ``config.vision_feature_layer``."""
    value = llava_model(model).config.vision_feature_layer
    if not isinstance(value, int):
        raise NotImplementedError("visionzip.apply: LLaVA-OneVision with a list of vision_feature_layer (features of "
                                  f"several layers concatenated) is not supported, got {value!r}")
    return value


FAMILY = CompositeFamily(
    name="LLaVA-OneVision",
    model_types=("llava_onevision",),
    classes=("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel"),
    summary="every anyres crop and every video frame as above (see :mod:`.llava_onevision`)",
    make_patch=make_patch,
    options=("video_pooling",),
    takes_videos=True,
    default_layer=default_layer,
)

__all__ = ["FAMILY", "LlavaOnevisionPatch", "shrink_inputs"]
