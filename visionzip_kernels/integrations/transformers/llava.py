"""LLaVA-1.5 (``LlavaForConditionalGeneration`` / ``LlavaModel``): the LLM gets D+K tokens per image.

What :func:`visionzip_kernels.apply` does to a LLaVA model (:class:`LlavaPatch`):

- Its vision tower (a ``CLIPVisionModel`` for LLaVA-1.5; a SigLIP or DINOv2 tower works the same
  way) is patched like a stand-alone encoder (:class:`~.common.EncoderPatch`): SDPA kept, the tower
  run up to layer L only, layer L's q/k from its own projections, ``last_hidden_state`` = the compressed
  tokens [B, D+K, C_vision] and ``keep`` [B, D].
- ``LlavaModel.get_image_features`` is replaced on the instance (``LlavaForConditionalGeneration``'s
  own ``get_image_features`` delegates to it, and ``generate()`` pre-encodes images through it) by
  a function with the same signature that runs the patched tower and the model's own
  ``multi_modal_projector``. It returns a :class:`~.common.VisionZipOutput` whose ``pooler_output``
  is a list of [D+K, C_text] projected tokens, one per image (the container transformers' LLaVA
  uses), ``last_hidden_state`` the compressed vision tokens and ``keep`` [B, D]. ``LlavaModel.forward``
  then scatters these rows into the image placeholder positions of ``inputs_embeds`` as usual.
- As upstream VisionZip does for LLaVA-1.5, the CLS token is one of the D dominant tokens and is
  fed to the LLM: ``vision_feature_select_strategy`` ("default" drops CLS in stock LLaVA) and
  ``vision_feature_layer`` are ignored while patched; the layer is the ``layer`` given to ``apply``
  (``-2``, the default, is LLaVA-1.5's ``vision_feature_layer``). Multi-layer feature lists and
  ``image_sizes`` are not supported.
- Budget: ``tokens=`` splits 54:10 like for an encoder; ``ratio=`` is resolved once, at ``apply``,
  against the tower's token count at its configured image size (577 for LLaVA-1.5: ``ratio=0.11``
  -> 63 tokens, 53 + 10), since the number of image placeholders must be known before any image.
- A forward pre-hook on ``LlavaModel`` checks that ``input_ids`` holds exactly D+K image placeholder
  tokens per image and otherwise raises a ``ValueError`` that names :func:`shrink_inputs`.

Placeholders: the stock ``LlavaProcessor`` writes 576 ``<image>`` tokens per image (LLaVA-1.5 at
336 px). A patched model needs D+K. Pass the processor's output through :func:`shrink_inputs`
(or :func:`shrink_image_tokens` for bare tensors): it keeps the first D+K placeholders of every
image, drops the others from ``input_ids``, ``attention_mask``, ``labels`` and any other per-token
tensor, and re-pads rows whose lengths now differ. Then ``model(**inputs)`` and
``model.generate(**inputs)`` work unchanged::

    model = visionzip_kernels.apply(llava, dominant=54, contextual=10)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    inputs = shrink_inputs(model, inputs)            # 576 -> 64 placeholders per image
    out = model.generate(**inputs, max_new_tokens=32)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ...budget import Budget, split_budget, tokens_for_ratio
from .common import (
    CompositeFamily,
    EncoderFamily,
    EncoderPatch,
    VisionZipOutput,
    replace_instance_attribute,
    restore_instance_attribute,
)
from .prompt import IGNORE_INDEX, PADDING_SIDES, RowPacker, same_mapping
from .prompt import pad_token_id as default_pad_token_id


def llava_model(model: torch.nn.Module) -> torch.nn.Module:
    """The ``LlavaModel`` inside ``model`` (a ``LlavaForConditionalGeneration``) or ``model`` itself."""
    if hasattr(model, "multi_modal_projector") and hasattr(model, "vision_tower"):
        return model
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "multi_modal_projector") and hasattr(inner, "vision_tower"):
        return inner
    raise TypeError(f"visionzip.apply: {type(model).__name__} has model_type 'llava' but no LlavaModel "
                    "(vision_tower + multi_modal_projector) was found in it")


def stock_placeholders_per_image(llava: torch.nn.Module, has_cls: bool) -> int:
    """Image placeholders per image that the stock processor writes for the unpatched model: the
    tower's token count (patches, plus CLS), less one with the "default" feature strategy."""
    vc = llava.config.vision_config
    side = vc.image_size // vc.patch_size
    count = side * side + (1 if has_cls else 0)
    if llava.config.vision_feature_select_strategy == "default":
        count -= 1
    return count


class LlavaPatch:
    """VisionZip on a LLaVA model instance (see the module docstring). ``tower_patch`` is the
    :class:`EncoderPatch` of its vision tower; ``tokens_per_image`` = D+K;
    ``placeholders_per_image`` = what the stock processor writes (576 for LLaVA-1.5)."""

    def __init__(self, model: torch.nn.Module, tower_family: EncoderFamily, dominant: int | None,
                 contextual: int | None, layer: int, ratio: float | None = None):
        self.model = model
        self.llava = llava_model(model)
        config = self.llava.config
        if not isinstance(config.vision_feature_layer, int):
            raise NotImplementedError(
                "visionzip.apply: LLaVA with a list of vision_feature_layer (features of several layers "
                f"concatenated) is not supported, got {config.vision_feature_layer!r}"
            )
        self.family = tower_family
        self.image_token_id = config.image_token_id
        self.placeholders_per_image = stock_placeholders_per_image(self.llava, tower_family.keep_cls)
        self.ratio = ratio
        if ratio is not None:
            if dominant is not None or contextual is not None:
                raise ValueError("visionzip.apply: ratio= sets dominant and contextual; give one or the other")
            tokens = tokens_for_ratio(ratio, tower_family.num_tokens(self.llava.vision_tower))
            dominant, contextual = split_budget(tokens)
        self.tower_patch = EncoderPatch(self.llava.vision_tower, tower_family, dominant, contextual, layer)
        self._saved_get_image_features = replace_instance_attribute(self.llava, "get_image_features",
                                                                    self.get_image_features)
        self._pre_hook = self.llava.register_forward_pre_hook(self._check_placeholders, with_kwargs=True)
        self.removed = False

    @property
    def dominant(self) -> int:
        return self.tower_patch.dominant

    @property
    def contextual(self) -> int:
        return self.tower_patch.contextual

    @property
    def layer(self) -> int:
        return self.tower_patch.layer

    @property
    def tokens_per_image(self) -> int:
        return self.dominant + self.contextual

    @property
    def settings(self) -> dict:
        """The budget and layer as :func:`visionzip_kernels.apply` takes them (to re-apply)."""
        if self.ratio is not None:
            return {"ratio": self.ratio, "layer": self.layer}
        return self.tower_patch.settings

    def __repr__(self) -> str:
        counts = f"{self.placeholders_per_image} -> {self.tokens_per_image} tokens per image"
        return f"LlavaPatch(tower={self.tower_patch!r}, {counts})"

    # -- the replacement of LlavaModel.get_image_features (same parameters, for generate()'s inspection)
    def get_image_features(self, pixel_values: torch.Tensor, vision_feature_layer=None,
                           vision_feature_select_strategy=None, image_sizes=None, **kwargs) -> VisionZipOutput:
        """VisionZip image features: the patched tower's compressed tokens through the projector.

        Returns a :class:`VisionZipOutput`: ``pooler_output`` = list of [D+K, C_text] per image,
        ``last_hidden_state`` = [B, D+K, C_vision] before the projector, ``keep`` = [B, D]. The
        ``vision_feature_layer`` / ``vision_feature_select_strategy`` arguments are ignored (see the
        module docstring); ``return_dict=False`` gives the output's tuple.
        """
        if image_sizes is not None:
            raise NotImplementedError("visionzip: LLaVA image_sizes (several resolutions) is not supported")
        return_dict = kwargs.pop("return_dict", True)
        for key in ("output_hidden_states", "output_attentions"):
            kwargs.pop(key, None)
        out = self.llava.vision_tower(pixel_values, return_dict=True, **kwargs)
        features = self.llava.multi_modal_projector(out.last_hidden_state)
        out.pooler_output = list(features)
        return out if return_dict else out.to_tuple()

    def image_token_counts(self, inputs: Mapping) -> tuple[int, int]:
        """(patched, stock) placeholders per image for the processor's ``inputs``: D+K and 576 for
        LLaVA-1.5 (the same for every image; LLaVA-NeXT's differ per image)."""
        return self.tokens_per_image, self.placeholders_per_image

    # Reads counts out of tensors (a graph break under torch.compile): runs eagerly, outside the graph.
    @torch.compiler.disable
    def _check_placeholders(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            return None
        pixel_values = kwargs.get("pixel_values", args[1] if len(args) > 1 else None)
        if pixel_values is not None:
            images = pixel_values.shape[0]
            rows = images * self.tokens_per_image
        else:
            encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
            features = getattr(encoded, "pooler_output", None) if isinstance(encoded, VisionZipOutput) else None
            if not features:
                return None
            if isinstance(features, torch.Tensor):
                features = [features]
            images = None
            rows = sum(f.numel() for f in features) // features[0].shape[-1]
        found = int((input_ids == self.image_token_id).sum())
        if found == rows:
            return None
        hint = ""
        if images is not None and found == images * self.placeholders_per_image:
            hint = (f" These are the stock processor's {self.placeholders_per_image} per image: pass the inputs "
                    "through visionzip_kernels.integrations.transformers.shrink_inputs(model, inputs) first.")
        per = f"{images} image(s) x {self.tokens_per_image}" if images is not None else "the pre-encoded features"
        raise ValueError(
            f"visionzip: input_ids holds {found} image placeholder tokens (id {self.image_token_id}) but the "
            f"VisionZip-patched LLaVA produces {rows} image feature rows ({per} = dominant {self.dominant} + "
            f"contextual {self.contextual}).{hint}"
        )

    def remove(self) -> None:
        """Restores ``get_image_features``, removes the pre-hook and unpatches the tower; idempotent."""
        if self.removed:
            return
        self._pre_hook.remove()
        restore_instance_attribute(self.llava, "get_image_features", self._saved_get_image_features)
        self.tower_patch.remove()
        self.removed = True


# ------------------------------------------------------------------------------------------------
# Placeholder shrinking


def shrink_image_tokens(
    input_ids: torch.Tensor,
    tokens_per_image: int | Sequence[int],
    *,
    image_token_id: int,
    placeholders_per_image: int | Sequence[int] = 576,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    pad_token_id: int = 0,
    padding_side: str = "left",
    extra: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Shrinks every image's ``placeholders_per_image`` placeholder tokens to ``tokens_per_image``.

    Each row's placeholders (``input_ids == image_token_id``) are taken in order, in consecutive
    groups of ``placeholders_per_image`` (one group per image, so images may be adjacent); the
    first ``tokens_per_image`` of each group are kept and the others are removed from every tensor.
    Positions where ``attention_mask`` is 0 (the old padding) are dropped as well, and rows that
    end up shorter than the longest (fewer images) are padded on ``padding_side``:
    ``input_ids`` with ``pad_token_id``, ``attention_mask`` with 0, ``labels`` with -100, ``extra``
    tensors with 0. An ``attention_mask`` is created when padding is needed and none was given.

    Args:
        input_ids: [B, S] token ids, e.g. from the stock ``LlavaProcessor`` (576 placeholders per image).
        tokens_per_image: D+K of the patched model; or one count per image (LLaVA-NeXT), the
            images in the order they appear in ``input_ids`` (row by row).
        image_token_id: the placeholder id (``model.config.image_token_id``).
        placeholders_per_image: placeholders per image in ``input_ids`` (576 for LLaVA-1.5); or one
            count per image, as ``tokens_per_image``.
        attention_mask, labels: [B, S], shrunk the same way when given.
        extra: other [B, S] per-token tensors (e.g. ``token_type_ids``), shrunk the same way.

    Returns:
        A dict with ``input_ids`` and, when given or needed, ``attention_mask``, ``labels`` and the
        ``extra`` keys, all [B, S'] with S' = the longest shrunk row.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"shrink_image_tokens: input_ids must be [B, S], got shape {list(input_ids.shape)}")
    if not (isinstance(tokens_per_image, int) and isinstance(placeholders_per_image, int)):
        kept_placeholders = _first_placeholders_per_image(input_ids == image_token_id, tokens_per_image,
                                                         placeholders_per_image)
    elif not 0 < tokens_per_image <= placeholders_per_image:
        raise ValueError(f"shrink_image_tokens: tokens_per_image must be in 1..placeholders_per_image "
                         f"({placeholders_per_image}), got {tokens_per_image}")
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"shrink_image_tokens: padding_side must be 'left' or 'right', got {padding_side!r}")
    tensors = {"attention_mask": attention_mask, "labels": labels, **(extra or {})}
    tensors = {k: v for k, v in tensors.items() if v is not None}
    for name, t in tensors.items():
        if t.shape != input_ids.shape:
            raise ValueError(
                f"shrink_image_tokens: {name} has shape {list(t.shape)}, input_ids {list(input_ids.shape)}"
            )
    is_image = input_ids == image_token_id
    if isinstance(tokens_per_image, int) and isinstance(placeholders_per_image, int):
        counts = is_image.sum(dim=1)
        bad = (counts % placeholders_per_image) != 0
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"shrink_image_tokens: row {row} has {int(counts[row])} image placeholders, not a "
                             f"multiple of placeholders_per_image ({placeholders_per_image})")
        rank = is_image.long().cumsum(dim=1) - 1  # index of each placeholder among its row's placeholders
        kept_placeholders = rank % placeholders_per_image < tokens_per_image
    keep = ~is_image | kept_placeholders
    if attention_mask is not None:
        keep &= attention_mask.bool()  # old padding goes too; rows are re-padded to the new width
    pack = RowPacker(keep, padding_side)
    if pack.ragged and attention_mask is None:
        tensors["attention_mask"] = torch.ones_like(input_ids)
    fills = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    result = {"input_ids": pack(input_ids, pad_token_id)}
    for name, t in tensors.items():
        result[name] = pack(t, fills.get(name, 0))
    return result


def _first_placeholders_per_image(is_image: torch.Tensor, tokens, placeholders) -> torch.Tensor:
    """[B, S] bool: the first ``tokens[i]`` of image i's ``placeholders[i]`` consecutive placeholders,
    images numbered in reading order (row by row); an int for either count applies to every image."""
    tokens, placeholders = torch.broadcast_tensors(torch.as_tensor(tokens, dtype=torch.long).flatten(),
                                                   torch.as_tensor(placeholders, dtype=torch.long).flatten())
    bad = ((tokens < 1) | (tokens > placeholders)).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(f"shrink_image_tokens: image {i} keeps {int(tokens[i])} of its {int(placeholders[i])} "
                         "placeholders; it must keep 1..all")
    ends = placeholders.cumsum(0)
    row_ends = is_image.sum(dim=1).cumsum(0)
    found, needed = int(row_ends[-1]) if row_ends.numel() else 0, int(ends[-1]) if ends.numel() else 0
    if found != needed:
        raise ValueError(f"shrink_image_tokens: input_ids holds {found} image placeholders, the {tokens.numel()} "
                         f"images' counts add up to {needed}")
    if not bool(torch.isin(row_ends, torch.cat([ends.new_zeros(1), ends])).all()):
        raise ValueError("shrink_image_tokens: an image's placeholders run over the end of a row")
    if needed == 0:
        return is_image
    rank = (is_image.flatten().long().cumsum(0) - 1).view_as(is_image)  # index among all placeholders
    image = torch.searchsorted(ends, rank.clamp(min=0), right=True)
    within = rank - (ends - placeholders)[image]
    return is_image & (within < tokens[image])


def shrink_inputs(model: torch.nn.Module, inputs: Mapping, *, padding_side: str = "left",
                  pad_token_id: int | None = None, placeholders_per_image: int | None = None):
    """The stock processor's output, made consistent with a VisionZip-patched LLaVA ``model``.

    ``inputs`` is a mapping such as ``processor(images=..., text=..., return_tensors="pt")`` with
    ``input_ids`` (576 placeholders per image) and optionally ``attention_mask``, ``labels`` and
    other [B, S] per-token tensors; everything else (``pixel_values``) is passed through. Returns
    the same kind of mapping (a ``BatchFeature`` stays one) with the per-token tensors shrunk to
    D+K placeholders per image by :func:`shrink_image_tokens`.

    Args:
        padding_side: where rows that became shorter are padded ("left", as LLaVA generates).
        pad_token_id: default: the model's ``pad_token_id`` (config or text config), else 0.
        placeholders_per_image: default: the stock count for the model's tower (576 for LLaVA-1.5;
            for LLaVA-NeXT, per image from ``inputs["image_sizes"]``, see :mod:`.llava_next`).
    """
    from . import patch_for_prompt

    patch = patch_for_prompt(model, LlavaPatch)
    if "input_ids" not in inputs:
        raise KeyError("shrink_inputs: inputs has no 'input_ids'")
    input_ids = inputs["input_ids"]
    if pad_token_id is None:
        pad_token_id = default_pad_token_id(patch.llava.config)
    extra = {k: v for k, v in inputs.items()
             if k not in ("input_ids", "attention_mask", "labels") and isinstance(v, torch.Tensor)
             and v.shape == input_ids.shape}
    tokens, stock = patch.image_token_counts(inputs)
    shrunk = shrink_image_tokens(
        input_ids, tokens, image_token_id=patch.image_token_id,
        placeholders_per_image=placeholders_per_image or stock,
        attention_mask=inputs.get("attention_mask"), labels=inputs.get("labels"), pad_token_id=pad_token_id,
        padding_side=padding_side, extra=extra,
    )
    data = {k: v for k, v in inputs.items()}
    data.update(shrunk)
    return same_mapping(inputs, data)


def vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The vision tower of a LLaVA model (``LlavaForConditionalGeneration`` or ``LlavaModel``; the
    LLaVA-NeXT classes keep theirs at the same place)."""
    return llava_model(model).vision_tower


def make_patch(model: torch.nn.Module, budget: Budget, layer: int, patch_class: type | None = None) -> LlavaPatch:
    """``patch_class`` (default :class:`LlavaPatch`) on ``model``, its tower's family from the registry."""
    from . import encoder_family

    patch_class = LlavaPatch if patch_class is None else patch_class
    return patch_class(model, encoder_family(vision_tower(model)), budget.dominant, budget.contextual, layer,
                       ratio=budget.ratio)


FAMILY = CompositeFamily(
    name="LLaVA",
    model_types=("llava",),
    classes=("LlavaForConditionalGeneration", "LlavaModel"),
    summary="its vision tower as above, projected (see :mod:`.llava`)",
    make_patch=make_patch,
)
