"""LLaVA-NeXT (``LlavaNextForConditionalGeneration`` / ``LlavaNextModel``): VisionZip on every anyres crop.

LLaVA-NeXT ("anyres") cuts each image into a grid of crops of the tower's size (rows x cols from
``config.image_grid_pinpoints``) plus one base crop (the whole image resized). What
:func:`visionzip_kernels.apply` does to it (:class:`LlavaNextPatch`, a :class:`~.llava.LlavaPatch`):

- The vision tower is patched as for LLaVA-1.5 and runs on all crops of all images as one batch;
  every crop keeps D+K tokens (D dominant, CLS included for CLIP, then K contextual).
- ``LlavaNextModel.get_image_features`` is replaced on the instance (same parameters, so
  ``generate()`` pre-encodes through it) by one that runs the patched tower and the model's own
  projector, then lays each image's tokens out the way upstream VisionZip's
  ``restore_image_features_sorted`` does (visionzip/llava_arch.py), with every size derived from the
  config instead of upstream's 576 / 24x24:

  1. the base crop's D+K tokens, as the tower returned them;
  2. the grid crops' dominant patch tokens, put back at their place on the stitched
     (rows * s) x (cols * s) patch grid (s = ``image_size // patch_size``) and read in raster order,
     so the LLM sees them in the image's own row-major order across crop borders;
  3. the grid crops' CLS tokens, crop by crop (CLS towers only);
  4. the grid crops' contextual tokens, crop by crop, K each.

  An image of one crop (no grid) gets its D+K tokens and ``image_newline``, as upstream and stock do.
- Upstream places the kept tokens on the grid but then neither unpads the grid nor inserts
  ``image_newline`` rows (it builds the newline tensor and never uses it). We do the same, on
  purpose: it is what the paper's numbers were measured with, and it makes the count a function of
  the grid alone, ``(1 + rows * cols) * (D + K)`` per image, known before the tower runs; unpadding
  the sparse kept tokens would make the count depend on which tokens were selected, which no
  processor can write placeholders for.
- ``D + K`` must fit in one crop (``s * s`` patches + CLS): a larger budget raises a ``ValueError``
  that names the crop size when ``apply`` is called (upstream crashes later, its issue #30).

Placeholders: the stock ``LlavaNextProcessor`` writes, per image, the stock model's feature count
(base crop + unpadded grid + one newline per grid row), which depends on the image size. Pass its
output (with ``image_sizes``) through :func:`~.llava.shrink_inputs`: it keeps the first
``(1 + rows * cols) * (D + K)`` placeholders of every image::

    model = visionzip_kernels.apply(llava_next, dominant=27, contextual=5)   # 32 per crop
    inputs = shrink_inputs(model, processor(images=image, text=prompt, return_tensors="pt"))
    out = model.generate(**inputs, max_new_tokens=32)

Budgets: the paper's LLaVA-NeXT budgets are per crop with 5 crops (a 2x2 grid + base): 27+5, 54+10
and 108+20 per crop give 160, 320 and 640 tokens per image (docs/SPEC.md).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch

from ...budget import Budget
from . import llava
from .common import CompositeFamily, EncoderFamily, VisionZipOutput
from .llava import LlavaPatch, llava_model

# Functions of transformers' LLaVA-NeXT modeling module that the patch calls (the model's own geometry).
_GRID_SHAPE = "get_anyres_image_grid_shape"
_NUM_CROPS = "image_size_to_num_patches"


def _modeling_function(llava: torch.nn.Module, name: str):
    """``name`` from the module that defines the model's class or one of its bases, so the model's
    own geometry is used whatever transformers' module layout (no fixed import path)."""
    for cls in type(llava).__mro__:
        function = getattr(inspect.getmodule(cls), name, None)
        if callable(function):
            return function
    raise TypeError(f"visionzip.apply: no {name}() next to {type(llava).__name__} or its base classes; this "
                    "transformers version's LLaVA-NeXT is not supported")


def _pair(size) -> list[int]:
    return [int(v) for v in size]


class LlavaNextPatch(LlavaPatch):
    """VisionZip on a LLaVA-NeXT model instance (see the module docstring).

    ``tokens_per_image`` (inherited) is D+K per crop; ``crop_side`` = s, ``crop_tokens`` = the
    tower's tokens per crop (s * s, plus CLS); :meth:`tokens_for_image` gives one image's count.
    """

    model_name = "LLaVA-NeXT"  # in error messages (a subclass patches another anyres family)

    def __init__(self, model: torch.nn.Module, tower_family: EncoderFamily, dominant: int | None,
                 contextual: int | None, layer: int, ratio: float | None = None):
        llava = llava_model(model)
        for attr in ("image_newline", "pack_image_features"):
            if not hasattr(llava, attr):
                raise TypeError(f"visionzip.apply: {type(llava).__name__} has no {attr}; not a LLaVA-NeXT model")
        config = llava.config
        vision = config.vision_config
        self.crop_size = int(vision.image_size)
        self.crop_side = self.crop_size // int(vision.patch_size)
        self.crop_tokens = self.crop_side**2 + (1 if tower_family.keep_cls else 0)
        self._grid_shape = _modeling_function(llava, _GRID_SHAPE)
        self._num_crops = _modeling_function(llava, _NUM_CROPS)
        if isinstance(dominant, int) and isinstance(contextual, int) and dominant + contextual > self.crop_tokens:
            raise ValueError(
                f"visionzip.apply: {self.model_name} keeps dominant + contextual tokens per crop, but "
                f"dominant={dominant} + contextual={contextual} = {dominant + contextual} exceeds the "
                f"{self.crop_tokens} tokens of one {self.crop_size}x{self.crop_size} crop "
                f"({self.crop_side}x{self.crop_side} patches"
                + (" + CLS)" if tower_family.keep_cls else ")") + ". The budget is per crop: e.g. 54+10 per crop "
                "is 320 tokens for a 5-crop image."
            )
        super().__init__(model, tower_family, dominant, contextual, layer, ratio=ratio)  # ratio: of one crop's tokens

    def __repr__(self) -> str:
        return (f"LlavaNextPatch(tower={self.tower_patch!r}, {self.crop_tokens} -> {self.tokens_per_image} tokens "
                "per crop)")

    # -- geometry --------------------------------------------------------------------------------
    def crops_of(self, image_size) -> int:
        """Crops the tower sees for one image of ``image_size`` (H, W): the grid's plus the base one."""
        return int(self._num_crops(image_size=image_size, grid_pinpoints=self.llava.config.image_grid_pinpoints,
                                   patch_size=self.crop_size))

    def tokens_for_image(self, image_size) -> int:
        """Feature rows (= placeholders) of one image under the patch: (1 + rows * cols) * (D + K)."""
        crops = self.crops_of(image_size)
        return crops * self.tokens_per_image + (1 if crops == 1 else 0)

    def stock_placeholders(self, image_sizes) -> list[int]:
        """Placeholders per image that the stock processor writes for the unpatched model: counted by
        the model's own ``pack_image_features`` on shape-only (meta) features."""
        per_crop = self.crop_side**2
        strategy = self.llava.config.vision_feature_select_strategy
        if self.family.keep_cls and strategy != "default":
            per_crop += 1
        features = [torch.empty(self.crops_of(size), per_crop, 1, device="meta") for size in image_sizes]
        packed, _ = self.llava.pack_image_features(features, image_sizes, vision_feature_select_strategy=strategy,
                                                   image_newline=torch.empty(1, device="meta"))
        return [int(f.shape[0]) for f in packed]

    def image_token_counts(self, inputs: Mapping) -> tuple[list[int], list[int]]:
        """(patched, stock) placeholders per image for the processor's ``inputs`` (needs ``image_sizes``)."""
        image_sizes = inputs.get("image_sizes")
        if image_sizes is None:
            raise KeyError("shrink_inputs: LLaVA-NeXT inputs need 'image_sizes' (the processor returns them)")
        return [self.tokens_for_image(size) for size in image_sizes], self.stock_placeholders(image_sizes)

    # -- the replacement of LlavaNextModel.get_image_features ------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor, vision_feature_layer=None,
                           vision_feature_select_strategy=None, **kwargs) -> VisionZipOutput:
        """VisionZip image features of LLaVA-NeXT inputs.

        Args:
            pixel_values: [images, max_crops, 3, S, S] as the processor pads them, or the crops
                already concatenated, [crops, 3, S, S].
            image_sizes: [images, 2] the original (H, W) of each image.

        Returns:
            A :class:`VisionZipOutput`: ``pooler_output`` = one [tokens_for_image, C_text] tensor per
            image (the layout of the module docstring), ``last_hidden_state`` = [crops, D+K, C_vision]
            and ``keep`` = [crops, D] for all crops before the layout. ``vision_feature_layer`` /
            ``vision_feature_select_strategy`` are ignored (the layer is ``apply``'s).
        """
        if image_sizes is None:
            raise ValueError("visionzip: LLaVA-NeXT get_image_features needs image_sizes")
        return self.encode_images(pixel_values, image_sizes, [self.crops_of(size) for size in image_sizes], **kwargs)

    def encode_images(self, pixel_values: torch.Tensor, image_sizes, crops: list[int], **kwargs) -> VisionZipOutput:
        """:meth:`get_image_features` once each image's crop count (``crops``) is known: the patched
        tower on all real crops as one batch, the projector, then :meth:`arrange` per image."""
        return_dict = kwargs.pop("return_dict", True)
        for key in ("output_hidden_states", "output_attentions"):
            kwargs.pop(key, None)
        if pixel_values.dim() == 5:  # padded per image: keep each image's real crops
            pixel_values = torch.cat([pixels[:n] for pixels, n in zip(pixel_values, crops)], dim=0)
        elif pixel_values.dim() != 4:
            raise ValueError(f"visionzip: {self.model_name} pixel_values must be 4-D or 5-D, got "
                             f"{list(pixel_values.shape)}")
        if tuple(pixel_values.shape[-2:]) != (self.crop_size, self.crop_size) or pixel_values.shape[0] != sum(crops):
            raise ValueError(f"visionzip: {self.model_name} pixel_values hold {pixel_values.shape[0]} crops of "
                             f"{list(pixel_values.shape[-2:])} px; image_sizes imply {sum(crops)} crops of "
                             f"{self.crop_size}x{self.crop_size}")
        out = self.llava.vision_tower(pixel_values, return_dict=True, **kwargs)
        features = self.llava.multi_modal_projector(out.last_hidden_state)
        out.pooler_output = [
            self.arrange(image_features, image_keep, size)
            for image_features, image_keep, size in zip(features.split(crops), out.keep.split(crops), image_sizes)
        ]
        return out if return_dict else out.to_tuple()

    def arrange(self, features: torch.Tensor, keep: torch.Tensor, image_size) -> torch.Tensor:
        """One image's LLM rows from its crops' tokens.

        Args:
            features: [crops, D+K, C] projected tokens, base crop first, then the grid row by row.
            keep: [crops, D] ascending token indices of the dominant tokens (CLS = 0 for CLS towers).
            image_size: the image's original (H, W).

        Returns:
            [tokens_for_image, C]: base crop, grid dominant tokens in raster order, grid CLS tokens,
            grid contextual tokens (the module docstring's layout).
        """
        if features.shape[0] == 1:
            newline = self.llava.image_newline[None].to(features)
            return torch.cat([features[0], newline])
        base, grid, grid_keep = features[0], features[1:], keep[1:]
        pinpoints = self.llava.config.image_grid_pinpoints
        rows, cols = (int(v) for v in self._grid_shape(image_size, pinpoints, self.crop_size))
        if rows * cols != grid.shape[0]:
            raise ValueError(f"visionzip: image of size {_pair(image_size)} has {grid.shape[0]} grid crops, "
                             f"its {rows}x{cols} grid needs {rows * cols}")
        side = self.crop_side
        first = 1 if self.family.keep_cls else 0  # CLS is keep[:, 0] and not on the patch grid
        dominant = keep.shape[1]
        patch = grid_keep[:, first:] - first  # [crops, D - first] index into each crop's s x s patches
        crop = torch.arange(grid.shape[0], device=patch.device)[:, None]
        y = (crop // cols) * side + patch // side  # row on the stitched (rows * s) x (cols * s) grid
        x = (crop % cols) * side + patch % side
        order = (y * (cols * side) + x).flatten().argsort()
        parts = [base, grid[:, first:dominant].flatten(0, 1)[order]]
        if first:
            parts.append(grid[:, 0])
        parts.append(grid[:, dominant:].flatten(0, 1))
        return torch.cat(parts)

    # -- the placeholder check (a forward pre-hook on LlavaNextModel) ------------------------------
    # Reads counts out of tensors (a graph break under torch.compile): runs eagerly, outside the graph.
    @torch.compiler.disable
    def _check_placeholders(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            return None
        pixel_values = kwargs.get("pixel_values", args[1] if len(args) > 1 else None)
        image_sizes = kwargs.get("image_sizes", args[2] if len(args) > 2 else None)
        has_pixels = pixel_values is not None and pixel_values.shape[0] > 0
        if has_pixels:
            if image_sizes is None:
                raise ValueError("visionzip: LLaVA-NeXT needs image_sizes with pixel_values")
            rows = sum(self.tokens_for_image(size) for size in image_sizes)
        else:
            encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
            if not isinstance(encoded, VisionZipOutput) or not encoded.pooler_output:
                return None
            rows = sum(f.shape[0] for f in encoded.pooler_output)
        found = int((input_ids == self.image_token_id).sum())
        if found == rows:
            return None
        hint = ""
        if has_pixels and found == sum(self.stock_placeholders(image_sizes)):
            hint = (" These are the stock processor's placeholders: pass the inputs through "
                    "visionzip_kernels.integrations.transformers.shrink_inputs(model, inputs) first.")
        raise ValueError(
            f"visionzip: input_ids holds {found} image placeholder tokens (id {self.image_token_id}) but the "
            f"VisionZip-patched LLaVA-NeXT produces {rows} image feature rows ((1 + grid crops) x (dominant "
            f"{self.dominant} + contextual {self.contextual}) per image).{hint}"
        )


def make_patch(model: torch.nn.Module, budget: Budget, layer: int) -> LlavaNextPatch:
    """:class:`LlavaNextPatch` on ``model`` (its tower is where LLaVA keeps it)."""
    return llava.make_patch(model, budget, layer, LlavaNextPatch)


FAMILY = CompositeFamily(
    name="LLaVA-NeXT",
    model_types=("llava_next",),
    classes=("LlavaNextForConditionalGeneration", "LlavaNextModel"),
    summary="every anyres crop as above, laid out on the crop grid (see :mod:`.llava_next`)",
    make_patch=make_patch,
)

__all__ = ["FAMILY", "LlavaNextPatch"]
