"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration``
and their ``...Model``): the LLM gets each image's VisionZip tokens, at their own 3-D rope positions.

The vision tower is NaViT-style: the images of a call are packed into one [T, C] sequence (T = sum of
t*h*w patches) with ``cu_seqlens``; a patch merger pools every 2x2 merge unit (4 consecutive tokens)
into one LLM token, so image i gives N_i = t*h*w/4 tokens. Qwen2.5-VL also reorders the units into
attention windows (``window_index``) and puts the LLM tokens back with ``argsort(window_index)``.

What :func:`visionzip_kernels.apply` does (:class:`QwenVLPatch`), as upstream VisionZip's Qwen2.5-VL
port computes it (docs/SPEC.md, "Qwen2-VL and Qwen2.5-VL"), but image-local:

- ``get_image_features`` of the inner model is replaced, on the instance only, by a bound method of
  the patch (:meth:`QwenVLPatch.get_image_features`), the mechanism of the other families: it runs
  the tower itself (:meth:`QwenVLPatch.run_tower`). The blocks' inputs come from transformers' own
  functions and the tower's modules (``get_vision_position_ids``, ``get_vision_attention_seqlens``,
  ``get_vision_window_index``, ``patch_embed``, ``rotary_pos_emb``, the window permutation); every
  block runs as one call of its module (its attention implementation included), then the merger on
  all tokens. Nothing of transformers' ``forward`` code is copied wholesale.
- Scoring layer: the last vision block (``layer=-1``; on Qwen2.5-VL it must be one of
  ``fullatt_block_indexes``). Just before it runs, its fused q/k/v is computed by its own ``norm1``
  and ``attn.qkv`` on its input, and q, k are rotated with the (cos, sin) the block receives by the
  model's own ``apply_rotary_pos_emb_vision``: q and k AFTER the rotary, as the attention sees them,
  bit for bit (the same modules on the same tensors). No hooks, no thread-local or shared state:
  everything of a call is in its local variables, so threads may run one patched model at once.
- ``varlen_scores_and_metric`` (attention within each image, per ``cu_seqlens``; pooled per merge
  unit of 4 tokens in window order) gives scores [T/4] and metric [T/4, d]; they are put in the
  original order with ``argsort(window_index)`` (Qwen2.5-VL; identity for Qwen2-VL).
- ``varlen_select_merge`` on the merger's outputs with per-image budgets keeps each image's tokens in
  original order, the contextual token at its target's position.

The patched ``get_image_features`` returns a :class:`QwenVisionZipOutput` whose ``pooler_output`` is
one [D_i+K_i, C_llm] tensor per image.

Budgets, per image, with N_i = the image's merged tokens: ``dominant`` a count (int) or a ratio
(float in (0, 1]: D_i = int(r * N_i), upstream's default 0.65), ``contextual`` a count or a ratio
(K_i = max(int(r * N_i), 1), default 0.05). D_i + K_i <= N_i is checked for every image.

The prompt: the stock processor writes N_i placeholders per image, and the 3-D rope positions of a
VisionZip prompt are the original ones at the kept tokens (the text after an image keeps its
positions). :func:`shrink_inputs` does both: it encodes the images once (the patched tower), computes
the 3-D positions for the ORIGINAL prompt with the model's own ``get_rope_index``, drops the removed
image tokens from ``input_ids``, ``attention_mask``, ``mm_token_type_ids``, ``labels`` and the
positions, re-pads the rows, and returns ``inputs_embeds`` with the VisionZip tokens in place (the
images are not encoded again)::

    vz.apply(model)                                   # dominant=0.65, contextual=0.05 per image
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    inputs = shrink_inputs(model, inputs)             # input_ids, attention_mask, position_ids, inputs_embeds, ...
    out = model.generate(**inputs, max_new_tokens=32) # out = the shrunk input_ids + new tokens

A forward pre-hook on the inner model (an input check, no state) rejects inputs whose placeholder
count does not match the patched model (the stock prompt, with ``pixel_values`` on ``forward`` or with
the features ``generate()`` encoded first), naming :func:`shrink_inputs`. ``remove()`` restores the
model bit for bit.

Videos (``pixel_values_videos``, ``video_grid_thw``; docs/SPEC.md "Qwen videos"): ``get_video_features``
is replaced the same way. The tower attends within each temporal slice (``cu_seqlens`` repeats h*w per
t), so scoring, selection and merging are per slice, each slice with the image budget of its h*w/4
merge units (so every moment of the video keeps tokens); a video's kept tokens are its slices' kept
tokens in time order. :func:`shrink_inputs` takes images, videos or both; the positions are the
original prompt's (``get_rope_index``, with ``second_per_grid_ts`` / the per-frame timestamps).

Qwen3.5 (``Qwen3_5ForConditionalGeneration``, :data:`QWEN3_5`; and Qwen3.5-MoE, :data:`QWEN3_5_MOE`) runs
the same tower as Qwen3-VL without DeepStack, and takes the Qwen2-VL prompt (``inputs_embeds``).

Qwen3-VL (``Qwen3VLForConditionalGeneration``, :data:`QWEN3_VL`; docs/SPEC.md "Qwen3-VL"): the same
patch, with no windows, the learned position table resampled and added as the stock tower does
(transformers' ``get_vision_interpolation_indices_and_weights``), any block as the scoring layer, and
the DeepStack features (the blocks ``deepstack_visual_indexes`` through their own mergers) selected and
merged with the main features' plan (:func:`visionzip_kernels.varlen_select_merge_many`), returned as
``deepstack_features``. Its :func:`shrink_inputs` returns ``mm_encoder_outputs`` instead of
``inputs_embeds``: the model's forward scatters the features and adds the DeepStack ones itself.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ... import ops
from ...api import varlen_select_merge_many
from ...budget import Budget, check_count_or_ratio, check_int
from .common import (
    MIN_TRANSFORMERS,
    CompositeFamily,
    VisionZipOutput,
    replace_instance_attribute,
    restore_instance_attribute,
)
from .prompt import IGNORE_INDEX, PADDING_SIDES, RowPacker, same_mapping
from .prompt import pad_token_id as default_pad_token_id


@dataclass
class QwenVisionZipOutput(VisionZipOutput):
    """Output of a patched Qwen ``get_image_features``.

    Attributes:
        pooler_output: tuple of [D_i+K_i, C_llm] per image: the kept merger outputs in original order.
        keep: [sum(D_i+K_i)] int64: the kept merge units, packed (index into all images' N_i units in
            input order), ascending within each image.
        cu_seqlens: [n+1] int64 on the CPU: cumulative D_i+K_i (image i's rows in ``keep``).
        last_hidden_state: the tower's last hidden state [T, C_vision] (window order on Qwen2.5-VL),
            as the stock ``get_image_features`` returns it.
        deepstack_features: Qwen3-VL only (else ``None``): per DeepStack layer, a tuple of
            [D_i+K_i, C_llm] per image, selected and merged with the same plan as ``pooler_output``
            (the same kept units, the same contextual assignment), as the stock model's LLM adds them.
    """

    cu_seqlens: torch.Tensor | None = None
    deepstack_features: list[tuple[torch.Tensor, ...]] | None = None


# ------------------------------------------------------------------------------------------------
# The tower records (no lambdas: plain functions, so the records copy and pickle)


@dataclass(frozen=True)
class FusedQueryKey:
    """Where the scoring block's q and k come from: one fused projection, taken after the rotary embedding.

    ``attention_input`` is the block's pre-attention norm (``norm1``): the attention projects its
    output. ``qkv_proj``'s output [T, 3 * num_heads * head_dim] is (q, k, v) x heads x head_dim, as
    the model splits it. ``rotary`` is the model's own function ``(q, k, cos, sin) -> (q, k)`` on
    [T, H, d]: q and k are taken AFTER it, as the attention sees them.
    """

    attention_input: torch.nn.Module
    qkv_proj: torch.nn.Module
    num_heads: int
    head_dim: int
    scale: float  # the softmax scale the model uses
    rotary: Callable


@dataclass(frozen=True)
class QwenTower:
    """A Qwen vision tower, NaViT-style packed (:class:`QwenVLPatch` runs it; it is no stand-alone encoder)."""

    name: str  # "Qwen2.5-VL vision"
    model_types: tuple[str, ...]  # its config.model_type (apply() given the bare tower names the whole model)
    model_class: Callable[[], type]  # the tower's class, imported lazily; the patch checks the model's tower is one
    windowed: bool  # Qwen2.5-VL: window attention in all blocks but fullatt_block_indexes, units in window order
    # Qwen3-VL / Qwen3.5: a learned position table (pos_embed) resampled to each image's grid is added to the patches
    interpolated_positions: bool = False
    # Qwen3-VL: the outputs of the blocks deepstack_visual_indexes, each through its deepstack_merger_list merger,
    # are added to the first LLM layers at the image tokens
    deepstack: bool = False


def _qwen2_vl_tower_class():
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    return Qwen2VisionTransformerPretrainedModel


def _qwen2_5_vl_tower_class():
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    return Qwen2_5_VisionTransformerPretrainedModel


def _missing(what: str, owner: torch.nn.Module) -> AttributeError:
    return AttributeError(f"visionzip.apply: {type(owner).__name__} has no {what}; this transformers version's "
                          f"Qwen vision tower is laid out differently from the supported {MIN_TRANSFORMERS}+")


def blocks(tower: torch.nn.Module) -> torch.nn.ModuleList:
    """The vision blocks of a Qwen tower."""
    found = getattr(tower, "blocks", None)
    if not isinstance(found, torch.nn.ModuleList):
        raise _missing("`blocks` (the vision blocks)", tower)
    return found


def fused_query_key(block: torch.nn.Module) -> FusedQueryKey:
    """The vision block's ``norm1`` and its ``attn`` with the fused ``qkv`` Linear; q/k after the
    model's own ``apply_rotary_pos_emb_vision`` (looked up in the attention class's module)."""
    attention = getattr(block, "attn", None)
    if attention is None:
        raise _missing("`attn` in its vision block", block)
    norm = getattr(block, "norm1", None)
    if not isinstance(norm, torch.nn.Module):
        raise _missing("`norm1` (the attention's input norm) in its vision block", block)
    qkv = getattr(attention, "qkv", None)
    if not isinstance(qkv, torch.nn.Linear):
        raise _missing("fused `attn.qkv` Linear", block)
    num_heads = int(getattr(attention, "num_heads", 0))
    if num_heads <= 0 or qkv.out_features % (3 * num_heads):
        raise _missing("`attn.num_heads` that divides its qkv output", block)
    head_dim = qkv.out_features // (3 * num_heads)
    rotary = getattr(sys.modules.get(type(attention).__module__), "apply_rotary_pos_emb_vision", None)
    if rotary is None:
        raise _missing(f"apply_rotary_pos_emb_vision beside {type(attention).__name__}", block)
    scale = getattr(attention, "scaling", None)
    scale = float(scale) if isinstance(scale, (int, float)) else head_dim**-0.5
    return FusedQueryKey(norm, qkv, num_heads, head_dim, scale, rotary)


def _qwen3_vl_tower_class():
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    return Qwen3VLVisionModel


def _qwen3_vl_moe_tower_class():
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeVisionModel

    return Qwen3VLMoeVisionModel


def _qwen3_5_tower_class():
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionModel

    return Qwen3_5VisionModel


def _qwen3_5_moe_tower_class():
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeVisionModel

    return Qwen3_5MoeVisionModel


QWEN2_VL_TOWER = QwenTower(name="Qwen2-VL vision", model_types=("qwen2_vl_vision",),
                           model_class=_qwen2_vl_tower_class, windowed=False)
QWEN2_5_VL_TOWER = QwenTower(name="Qwen2.5-VL vision", model_types=("qwen2_5_vl_vision",),
                             model_class=_qwen2_5_vl_tower_class, windowed=True)
QWEN3_VL_TOWER = QwenTower(name="Qwen3-VL vision", model_types=("qwen3_vl_vision",), model_class=_qwen3_vl_tower_class,
                           windowed=False, interpolated_positions=True, deepstack=True)
QWEN3_VL_MOE_TOWER = QwenTower(name="Qwen3-VL-MoE vision", model_types=("qwen3_vl_moe_vision",),
                               model_class=_qwen3_vl_moe_tower_class, windowed=False, interpolated_positions=True,
                               deepstack=True)
QWEN3_5_TOWER = QwenTower(name="Qwen3.5 vision", model_types=("qwen3_5_vision",), model_class=_qwen3_5_tower_class,
                          windowed=False, interpolated_positions=True)
QWEN3_5_MOE_TOWER = QwenTower(name="Qwen3.5-MoE vision", model_types=("qwen3_5_moe_vision",),
                              model_class=_qwen3_5_moe_tower_class, windowed=False, interpolated_positions=True)


def qwen_model(model: torch.nn.Module) -> torch.nn.Module:
    """The inner ``Qwen2VLModel`` / ``Qwen2_5_VLModel`` (``visual`` + ``get_rope_index``) of ``model``."""
    for candidate in (model, getattr(model, "model", None)):
        if candidate is not None and hasattr(candidate, "visual") and hasattr(candidate, "get_rope_index"):
            return candidate
    raise TypeError(f"visionzip.apply: {type(model).__name__} has a Qwen-VL model_type but no inner model with "
                    "`visual` and `get_rope_index` was found in it")


# ------------------------------------------------------------------------------------------------
# Budgets


def image_budgets(dominant: int | float, contextual: int | float, tokens: list[int],
                  grids: list[list[int]] | None = None, names: list[str] | None = None
                  ) -> tuple[list[int], list[int]]:
    """Per-segment (D_i, K_i) for segments (images, or a video's temporal slices) of ``tokens`` = [N_i]
    merged tokens: a ratio r gives D_i = int(r * N_i) and K_i = max(int(r * N_i), 1) (upstream's
    rounding), a count is used as is. Raises ``ValueError`` naming the segment (``names[i]``, default
    "image i") when D_i + K_i > N_i."""
    dominants, contextuals = [], []
    for i, n in enumerate(tokens):
        d = int(dominant * n) if isinstance(dominant, float) else dominant
        k = max(int(contextual * n), 1) if isinstance(contextual, float) else contextual
        if d + k > n:
            grid = f" (grid t, h, w = {grids[i]})" if grids is not None else ""
            name = names[i] if names is not None else f"image {i}"
            raise ValueError(f"visionzip: {name}{grid} has {n} merged tokens, fewer than dominant {d} + "
                             f"contextual {k}; lower the budget or pass it as a ratio")
        dominants.append(d)
        contextuals.append(k)
    return dominants, contextuals


@dataclass(frozen=True)
class SlicePlan:
    """The budgets of one call's images or videos, per temporal slice (the unit VisionZip scores and
    merges in: the tower attends within each slice). An image is one slice (t = 1); a video of t
    temporal patches is t slices of h*w/4 merge units, each with the image budget of its own units.

    ``tokens``, ``dominants``, ``contextuals``: per slice, in input order; ``slices``: per item (image or
    video), how many consecutive slices it has."""

    tokens: list[int]
    dominants: list[int]
    contextuals: list[int]
    slices: list[int]

    def per_item(self, values: list[int]) -> list[int]:
        """``values`` (one per slice) summed per item."""
        out, start = [], 0
        for n in self.slices:
            out.append(sum(values[start:start + n]))
            start += n
        return out

    @property
    def kept(self) -> list[int]:
        """D + K per item: the tokens the LLM sees for each image or video."""
        return self.per_item([d + k for d, k in zip(self.dominants, self.contextuals)])


@dataclass(frozen=True)
class Modality:
    """The names one modality goes by in a Qwen prompt and model."""

    name: str  # "image" / "video": also the key of mm_encoder_outputs
    pixels: str  # the processor's key of its pixel rows
    grid: str  # the processor's key of its [n, 3] (t, h, w) grid
    features: str  # the inner model's method that encodes it
    token_id: str  # the config's attribute with its placeholder token id
    token_type: int  # its value in mm_token_type_ids


IMAGE = Modality("image", "pixel_values", "image_grid_thw", "get_image_features", "image_token_id", 1)
VIDEO = Modality("video", "pixel_values_videos", "video_grid_thw", "get_video_features", "video_token_id", 2)
MODALITIES = (IMAGE, VIDEO)


# ------------------------------------------------------------------------------------------------
# The patch


class QwenVLPatch:
    """VisionZip on a Qwen2-VL / Qwen2.5-VL / Qwen3-VL(-MoE) / Qwen3.5 model instance (see the module docstring).

    ``settings`` = what was given to ``apply`` (``dominant``, ``contextual``: int counts or float
    ratios per image; ``layer``); ``layer_index`` = the scoring block, 0..depth-1; ``tower`` = the
    :class:`QwenTower` record."""

    def __init__(self, model: torch.nn.Module, tower: QwenTower, dominant, contextual, layer: int):
        self.model = model
        self.qwen = qwen_model(model)
        self.visual = self.qwen.visual
        self.tower = tower
        tower_class = tower.model_class()
        if not isinstance(self.visual, tower_class):
            raise TypeError(f"visionzip.apply: the vision tower of this {type(model).__name__} is a "
                            f"{type(self.visual).__name__}, not the {tower_class.__name__} the {tower.name} patch runs")
        self.dominant = check_count_or_ratio("dominant", dominant)
        self.contextual = check_count_or_ratio("contextual", contextual)
        layer = check_int("layer", layer)
        vision_blocks = blocks(self.visual)
        n = len(vision_blocks)
        if not -n <= layer < n:
            raise ValueError(f"visionzip.apply: layer must be in [-{n}, {n - 1}] for this {n}-block "
                             f"{tower.name} tower, got {layer}")
        self.layer = layer
        self.layer_index = layer % n
        self.num_layers = n
        # Qwen2.5-VL: windowed blocks attend within windows; VisionZip reads a full-attention block.
        self.windowed = tower.windowed
        if self.windowed:
            full = list(getattr(self.visual, "fullatt_block_indexes", None) or [])
            if self.layer_index not in full:
                raise ValueError(f"visionzip.apply: layer {layer} (block {self.layer_index}) of the {tower.name} "
                                 "tower is a windowed block; the scoring layer must be a full-attention block, "
                                 f"one of fullatt_block_indexes = {full}")
        merge = getattr(self.visual, "spatial_merge_size", None)
        if not isinstance(merge, int):
            raise _missing("`spatial_merge_size`", self.visual)
        self.spatial_merge_size = merge
        self.unit = merge * merge
        forward_parameters = inspect.signature(type(self.qwen).forward).parameters
        if tower.interpolated_positions and "mm_encoder_outputs" not in forward_parameters:
            # The Qwen3 generation's prompts need 5.23's forward: Qwen3-VL's shrink_inputs hands the features
            # (DeepStack included) over as mm_encoder_outputs; Qwen3.5's older forward refuses input_ids beside
            # inputs_embeds. Both come with mm_encoder_outputs, which marks that forward.
            import transformers

            raise NotImplementedError(f"visionzip.apply: VisionZip for {tower.name.split()[0]} needs a transformers "
                                      f"whose {type(self.qwen).__name__}.forward takes mm_encoder_outputs (5.23 does); "
                                      f"the installed {transformers.__version__} does not")
        self.query_key = fused_query_key(vision_blocks[self.layer_index])
        config = self.qwen.config
        self.image_token_id = config.image_token_id
        self.video_token_id = getattr(config, "video_token_id", None)
        # Bound methods: pickled as (patch, name); a deep copy gets its own patch. Both are replaced (the stock
        # get_video_features runs the stock tower, or calls get_image_features with video grids).
        self._saved_features = {m.features: replace_instance_attribute(self.qwen, m.features, getattr(self, m.features))
                                for m in MODALITIES}
        self._pre_hook = self.qwen.register_forward_pre_hook(self._check_inputs, with_kwargs=True)
        self.removed = False

    @property
    def settings(self) -> dict:
        return {"dominant": self.dominant, "contextual": self.contextual, "layer": self.layer}

    def __repr__(self) -> str:
        return (f"QwenVLPatch({self.tower.name}, dominant={self.dominant}, contextual={self.contextual}, "
                f"layer={self.layer} -> block {self.layer_index} of {self.num_layers})")

    # -- grids and budgets -----------------------------------------------------------------------
    def _grids(self, grid_thw, patches: int | None, modality: Modality = IMAGE) -> list[list[int]]:
        if grid_thw is None:
            raise ValueError(f"visionzip: {modality.grid} is required with {modality.pixels} (one [t, h, w] row per "
                             f"{modality.name})")
        if not isinstance(grid_thw, torch.Tensor) or grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
            raise ValueError(f"visionzip: {modality.grid} must be an [n_{modality.name}s, 3] tensor of (t, h, w), got "
                             f"{getattr(grid_thw, 'shape', type(grid_thw).__name__)}")
        grids = grid_thw.tolist()
        m = self.spatial_merge_size
        for i, (t, h, w) in enumerate(grids):
            if t <= 0 or h <= 0 or w <= 0 or h % m or w % m:
                raise ValueError(f"visionzip: {modality.grid} row {i} = {[t, h, w]}: t must be positive, h and w "
                                 f"positive multiples of spatial_merge_size = {m}")
        total = sum(t * h * w for t, h, w in grids)
        if patches is not None and patches != total:
            raise ValueError(f"visionzip: {modality.pixels} has {patches} patch rows but {modality.grid} describes "
                             f"{total} (sum of t*h*w over {len(grids)} {modality.name}(s)): mismatched grids")
        return grids

    def plan(self, grid_thw: torch.Tensor, patches: int | None = None, modality: Modality = IMAGE) -> SlicePlan:
        """The per-slice budgets of the images or videos of ``grid_thw`` (checked against ``patches`` pixel
        rows when given): each temporal slice of h*w/4 merge units keeps what an image of that size keeps."""
        grids = self._grids(grid_thw, patches, modality)
        slice_tokens, names, slice_grids = [], [], []
        for i, (t, h, w) in enumerate(grids):
            for j in range(t):
                slice_tokens.append(h * w // self.unit)
                names.append(f"{modality.name} {i}" + (f" (temporal slice {j})" if t > 1 else ""))
                slice_grids.append([t, h, w])
        dominants, contextuals = image_budgets(self.dominant, self.contextual, slice_tokens, slice_grids, names)
        return SlicePlan(slice_tokens, dominants, contextuals, [t for t, _, _ in grids])

    def budgets(self, grid_thw: torch.Tensor, patches: int | None = None, modality: Modality = IMAGE
                ) -> tuple[list[int], list[int], list[int]]:
        """(N_i, D_i, K_i) per image or video of ``grid_thw``, summed over its temporal slices."""
        plan = self.plan(grid_thw, patches, modality)
        return plan.per_item(plan.tokens), plan.per_item(plan.dominants), plan.per_item(plan.contextuals)

    # -- the tower, run by the patch ---------------------------------------------------------------
    def run_tower(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, **kwargs):
        """The tower's blocks and merger, run here with every intermediate in a local variable.

        The inputs of the blocks come from transformers' own functions and the tower's own modules
        (``patch_embed``, ``rotary_pos_emb``, the window permutation), then each block runs as one call
        of its module, as the stock tower calls it. Before the scoring block runs, its fused q/k/v is
        computed by the block's own ``norm1`` and ``attn.qkv`` on the block's input: the same modules on
        the same tensor the block uses, so bit for bit the qkv inside the block (in eager).

        Qwen3-VL / Qwen3.5: the learned position table, resampled by transformers'
        ``get_vision_interpolation_indices_and_weights``, is added to the patch embeddings as the stock
        tower adds it; Qwen3-VL: after each block of ``deepstack_visual_indexes`` its DeepStack merger
        runs on the block's output.

        Returns:
            (last_hidden_state [T, C_vision] (window order on Qwen2.5-VL), merged [T/4, C_llm] in
            original order, qkv [T, 3*H*d] of the scoring block (window order, no autograd), rotary
            (cos, sin) [T, d], cu_seqlens [n+1] of the images, window_index [T/4] or ``None``,
            deepstack: list of [T/4, C_llm] per DeepStack layer, empty but on Qwen3-VL).
        """
        # transformers' own geometry of the packed tower (imported here: apply() names an older transformers).
        from transformers.vision_utils import (
            get_max_seqlen,
            get_vision_attention_seqlens,
            get_vision_position_ids,
            get_vision_window_index,
        )

        visual = self.visual
        position_ids = get_vision_position_ids(image_grid_thw, visual.spatial_merge_size, kwargs=kwargs)
        cu_seqlens, max_seqlen = get_vision_attention_seqlens(image_grid_thw, visual.config, kwargs=kwargs)
        hidden = visual.patch_embed(pixel_values)
        if self.tower.interpolated_positions:
            from transformers.vision_utils import get_vision_interpolation_indices_and_weights

            indices, weights = get_vision_interpolation_indices_and_weights(
                image_grid_thw, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
                align_corners=visual.interpolation_align_corners, spatial_merge_size=visual.spatial_merge_size,
                kwargs=kwargs)
            # The table rows at each patch's neighbours, blended by their weights (the stock tower's sum).
            hidden = hidden + (visual.pos_embed(indices) * weights[:, :, None]).sum(1).to(hidden.dtype)
        deepstack_layers = list(getattr(visual, "deepstack_visual_indexes", None) or []) if self.tower.deepstack else []
        deepstack = []
        window_index = None
        if self.windowed:
            window_index, cu_window_seqlens = get_vision_window_index(
                image_grid_thw, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
                patch_size=visual.patch_size, kwargs=kwargs)
            max_window_seqlen = get_max_seqlen(cu_window_seqlens, visual.config, kwargs=kwargs,
                                               kwarg_name="max_window_seqlen")
            full_blocks = set(visual.fullatt_block_indexes)
            seq_len = hidden.shape[0]
            hidden = visual.permute_input_for_window_attn(hidden, window_index, seq_len=seq_len)
        rotary = visual.rotary_pos_emb(hidden, position_ids)
        if self.windowed:
            rotary = tuple(visual.permute_input_for_window_attn(f, window_index, seq_len=seq_len) for f in rotary)
        query_key = self.query_key
        qkv = None
        for index, block in enumerate(blocks(visual)):
            if self.windowed and index not in full_blocks:
                block_seqlens, block_max = cu_window_seqlens, max_window_seqlen
            else:
                block_seqlens, block_max = cu_seqlens, max_seqlen
            if index == self.layer_index:
                # The selection is discrete: no gradient flows to q or k (docs/SPEC.md "Gradients").
                with torch.no_grad():
                    qkv = query_key.qkv_proj(query_key.attention_input(hidden))
            hidden = block(hidden, cu_seqlens=block_seqlens, max_seqlen=block_max, position_embeddings=rotary, **kwargs)
            if index in deepstack_layers:
                deepstack.append(visual.deepstack_merger_list[deepstack_layers.index(index)](hidden))
        merged = visual.merger(hidden)
        if window_index is not None:
            merged = merged[torch.argsort(window_index)]
        return hidden, merged, qkv, rotary, cu_seqlens, window_index, deepstack

    # -- the replacements of <Qwen model>.get_image_features / get_video_features -------------------
    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.LongTensor | None = None,
                           **kwargs) -> QwenVisionZipOutput:
        """VisionZip image features: per image, the kept patch-merger outputs in original order.

        Args:
            pixel_values: [sum(t*h*w), C*temporal*patch*patch], as the stock processor gives.
            image_grid_thw: [n, 3] (t, h, w) in patches, t = 1.

        Returns:
            :class:`QwenVisionZipOutput` (``pooler_output``: tuple of [D_i+K_i, C_llm]; ``keep``;
            ``cu_seqlens``); ``return_dict=False`` gives its tuple.
        """
        return self.encode(pixel_values, image_grid_thw, IMAGE, **kwargs)

    def get_video_features(self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.LongTensor | None = None,
                           **kwargs) -> QwenVisionZipOutput:
        """VisionZip video features: per video, each temporal slice's kept merger outputs (original order
        within the slice, the slices in time order), each slice with the image budget of its h*w/4 units.

        Args:
            pixel_values_videos: [sum(t*h*w), C*temporal*patch*patch], as the stock processor gives.
            video_grid_thw: [n, 3] (t, h, w) in patches.

        Returns:
            :class:`QwenVisionZipOutput` (``pooler_output``: tuple of [sum over slices of D_s+K_s, C_llm] per
            video; ``keep``: the kept units, index into all videos' units packed; ``cu_seqlens`` per video).
        """
        return self.encode(pixel_values_videos, video_grid_thw, VIDEO, **kwargs)

    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | None, modality: Modality,
               **kwargs) -> QwenVisionZipOutput:
        """The tower on images or videos, one plan per temporal slice applied to the merger's output and the
        DeepStack features, the outputs grouped per image or video (a video's slices are consecutive)."""
        return_dict = kwargs.pop("return_dict", True)
        for key in ("output_hidden_states", "output_attentions"):
            kwargs.pop(key, None)
        plan = self.plan(grid_thw, pixel_values.shape[0] if pixel_values.dim() >= 1 else None, modality)
        pixel_values = pixel_values.type(self.visual.dtype)  # as the stock get_image_features
        last_hidden_state, merged, qkv, rotary, cu_seqlens, window_index, deepstack = self.run_tower(
            pixel_values, grid_thw, **kwargs)
        outputs, keep, _ = self.compress([merged, *deepstack], qkv, rotary, cu_seqlens, window_index, plan.tokens,
                                         plan.dominants, plan.contextuals)
        counts = plan.kept
        deepstack_features = [out.split(counts) for out in outputs[1:]] if self.tower.deepstack else None
        result = QwenVisionZipOutput(last_hidden_state=last_hidden_state, pooler_output=outputs[0].split(counts),
                                     keep=keep, cu_seqlens=torch.tensor([0, *counts], dtype=torch.int64).cumsum(0),
                                     deepstack_features=deepstack_features)
        return result if return_dict else result.to_tuple()

    def compress(self, merged: list[torch.Tensor], qkv: torch.Tensor, rotary: tuple, cu_seqlens: torch.Tensor,
                 window_index: torch.Tensor | None, tokens: list[int], dominants: list[int], contextuals: list[int]):
        """Scores and metric from the scoring block's fused qkv [T, 3*H*d] (window order) and its rotary
        (cos, sin), attention within each temporal slice (``cu_seqlens``), put in original order with
        ``argsort(window_index)``, then ONE plan applied to every tensor of ``merged`` (each [T/4, C_llm] in
        original order: the merger's output, then the DeepStack mergers'; ``tokens`` = N_s, the merge units
        of each slice, an image being one) by ``varlen_select_merge_many``.
        Returns (list of [sum(D_i+K_i), C_llm], keep, cu_seqlens_out)."""
        query_key = self.query_key
        qkv = qkv.detach()
        T = qkv.shape[0]
        q, k, _ = qkv.view(T, 3, query_key.num_heads, query_key.head_dim).unbind(1)
        cos, sin = rotary
        q, k = query_key.rotary(q, k, cos, sin)
        scores, metric = ops.varlen_scores_and_metric(q, k, cu_seqlens, scale=query_key.scale, unit=self.unit)
        if window_index is not None:
            original = torch.argsort(window_index).to(scores.device)
            scores, metric = scores[original], metric[original]
        # The slices' bounds from the host grid, so that the op need not read the tower's device cu_seqlens
        # back (its one sync); cu_seqlens_out is then on the CPU too.
        cu_units = torch.tensor([0, *tokens], dtype=torch.int64).cumsum(0)
        return varlen_select_merge_many(merged, scores, metric, cu_units, dominants, contextuals)

    # -- input check (a forward pre-hook on the inner model) ---------------------------------------
    # Reads counts out of tensors (a graph break under torch.compile): runs eagerly, outside the graph.
    @torch.compiler.disable
    def _check_inputs(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            return None
        checked = False
        for modality in MODALITIES:
            token_id = getattr(self, modality.token_id)
            pixels = kwargs.get(modality.pixels)
            if pixels is not None:
                plan = self.plan(kwargs.get(modality.grid), None, modality)
                rows, what = sum(plan.kept), f"{len(plan.slices)} {modality.name}(s)"
            else:
                # generate() encodes the images / videos first (through the patched get_*_features) and passes
                # the features instead of the pixels.
                encoded = (kwargs.get("mm_encoder_outputs") or {}).get(modality.name)
                if not isinstance(encoded, QwenVisionZipOutput) or not encoded.pooler_output:
                    continue
                rows = sum(f.shape[0] for f in encoded.pooler_output)
                what = f"{len(encoded.pooler_output)} pre-encoded {modality.name}(s)"
            found = int((input_ids == token_id).sum())
            if found != rows:
                raise ValueError(
                    f"visionzip: input_ids holds {found} {modality.name} placeholder tokens (id {token_id}) but the "
                    f"VisionZip-patched model produces {rows} {modality.name} tokens ({what}, dominant {self.dominant} "
                    f"+ contextual {self.contextual} per {'temporal slice' if modality is VIDEO else 'image'}). Pass "
                    "the processor's output through visionzip_kernels.integrations.transformers.shrink_inputs(model, "
                    "inputs) first.")
            checked = True
        if checked and kwargs.get("position_ids") is None:
            raise ValueError("visionzip: a VisionZip prompt needs its 3-D position_ids (the original positions of the "
                             "kept tokens); take them from shrink_inputs(model, inputs)")
        return None

    def remove(self) -> None:
        """Restores ``get_image_features`` and ``get_video_features`` and removes the pre-hook; idempotent."""
        if self.removed:
            return
        self._pre_hook.remove()
        for name, saved in self._saved_features.items():
            restore_instance_attribute(self.qwen, name, saved)
        self.removed = True


# ------------------------------------------------------------------------------------------------
# Prompt shrinking


def _padding_side(attention_mask: torch.Tensor | None) -> str:
    if attention_mask is not None and attention_mask.shape[1] and bool((attention_mask[:, -1] == 0).any()):
        return "right"
    return "left"


def shrink_inputs(model: torch.nn.Module, inputs: Mapping, *, padding_side: str | None = None,
                  pad_token_id: int | None = None):
    """The stock processor's output, made into a VisionZip prompt for a patched Qwen-VL ``model``.

    Encodes the images and videos once with the patched tower, computes the 3-D rope positions of the
    ORIGINAL prompt (the model's own ``get_rope_index``, so a video's temporal positions keep
    ``second_per_grid_ts`` / timestamps as the model computes them), keeps the text and the kept image
    and video tokens, and returns a mapping of the same kind with:

    - ``input_ids``, ``attention_mask``, ``mm_token_type_ids``, ``labels`` and any other [B, S]
      tensor: [B, S'] with the removed image / video tokens (and the old padding) gone, rows re-padded;
    - ``position_ids`` [3, B, S']: the original positions at the kept tokens (0 on padding);
    - ``inputs_embeds`` [B, S', C]: the token embeddings with the VisionZip image and video tokens in
      place; on Qwen3-VL instead ``mm_encoder_outputs = {"image": ..., "video": ...}`` (the patched
      ``get_image_features`` / ``get_video_features`` outputs): its forward scatters the features and
      adds the DeepStack features (``deepstack_features``, the same kept tokens) at the visual tokens
      itself, and it takes ``input_ids`` or ``inputs_embeds``, not both;
    - ``pixel_values`` / ``pixel_values_videos`` removed (already encoded); the grids and everything
      else passed on.

    Args:
        inputs: ``input_ids`` [B, S], ``pixel_values`` + ``image_grid_thw`` and/or ``pixel_values_videos``
            + ``video_grid_thw``, optionally ``attention_mask``, ``mm_token_type_ids``, ``labels``,
            ``second_per_grid_ts``, ...
        padding_side: where shorter rows are padded; default: the side the inputs were padded on
            (left when they were not padded).
        pad_token_id: default: the model's ``pad_token_id`` (config or text config), else 0.
    """
    from . import patch_for_prompt

    patch = patch_for_prompt(model, QwenVLPatch)
    if inputs.get("input_ids") is None:
        raise KeyError("shrink_inputs: inputs has no 'input_ids'")
    present = []
    for modality in MODALITIES:
        has_pixels, has_grid = inputs.get(modality.pixels) is not None, inputs.get(modality.grid) is not None
        if has_pixels != has_grid:
            raise KeyError(f"shrink_inputs: inputs has {modality.pixels if has_pixels else modality.grid!r} but no "
                           f"{modality.grid if has_pixels else modality.pixels!r}")
        if has_pixels:
            present.append(modality)
    if not present:
        raise KeyError("shrink_inputs: inputs has neither 'pixel_values' nor 'pixel_values_videos'")
    input_ids = inputs["input_ids"]
    if input_ids.dim() != 2:
        raise ValueError(f"shrink_inputs: input_ids must be [B, S], got shape {list(input_ids.shape)}")
    attention_mask = inputs.get("attention_mask")
    side = padding_side or _padding_side(attention_mask)
    if side not in PADDING_SIDES:
        raise ValueError(f"shrink_inputs: padding_side must be 'left' or 'right', got {side!r}")
    qwen = patch.qwen
    valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    placeholders = {}  # modality -> [B, S] bool: its placeholder tokens
    for modality in present:
        tokens, _, _ = patch.budgets(inputs[modality.grid], None, modality)
        is_placeholder = (input_ids == getattr(patch, modality.token_id)) & valid
        found = int(is_placeholder.sum())
        if found != sum(tokens):
            raise ValueError(f"shrink_inputs: input_ids holds {found} {modality.name} placeholders but "
                             f"{modality.grid} describes {sum(tokens)} merged tokens ({tokens} per {modality.name}): "
                             "mismatched grids")
        placeholders[modality.name] = is_placeholder
    mm_token_type_ids = inputs.get("mm_token_type_ids")
    if mm_token_type_ids is None:  # what the processor writes: 1 at image tokens, 2 at video tokens
        mm_token_type_ids = torch.zeros_like(input_ids, dtype=torch.int)
        for modality in MODALITIES:
            token_id = getattr(patch, modality.token_id)
            if token_id is not None:
                mm_token_type_ids[input_ids == token_id] = modality.token_type

    features = {m.name: getattr(patch, m.features)(inputs[m.pixels], inputs[m.grid]) for m in present}
    rope_kwargs = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
                   if inputs.get(k) is not None}
    position_ids, _ = qwen.get_rope_index(input_ids, mm_token_type_ids=mm_token_type_ids,
                                          attention_mask=attention_mask, **rope_kwargs)

    # The kept positions: text tokens and the kept visual tokens. Each modality's placeholders come in
    # row-major order, as the model scatters its features; its features.keep indexes them.
    kept = valid.clone()
    for name, is_placeholder in placeholders.items():
        kept &= ~is_placeholder
        chosen = is_placeholder.nonzero()[features[name].keep.to(input_ids.device)]
        kept[chosen[:, 0], chosen[:, 1]] = True

    if pad_token_id is None:
        pad_token_id = default_pad_token_id(qwen.config)
    pack = RowPacker(kept, side)
    new_mask = pack(torch.ones_like(input_ids) if attention_mask is None else attention_mask, 0)
    new_ids = pack(input_ids, pad_token_id)
    data = dict(inputs.items())
    for modality in present:
        data.pop(modality.pixels)
    data["input_ids"] = new_ids
    data["attention_mask"] = new_mask
    data["mm_token_type_ids"] = pack(mm_token_type_ids, 0)
    data["position_ids"] = pack(position_ids.permute(1, 2, 0), 0).permute(2, 0, 1).contiguous()
    if inputs.get("labels") is not None:
        data["labels"] = pack(inputs["labels"], IGNORE_INDEX)
    for key, value in inputs.items():
        if key not in data or key in ("input_ids", "attention_mask", "mm_token_type_ids", "labels"):
            continue
        if isinstance(value, torch.Tensor) and value.shape == input_ids.shape:
            data[key] = pack(value, 0)
    if patch.tower.deepstack:
        # The model scatters pooler_output and adds deepstack_features at the visual tokens (in the prompt's
        # row-major order, as features.keep was taken); generate() passes them to the prefill only.
        data["mm_encoder_outputs"] = features
        return same_mapping(inputs, data)
    embeds = qwen.get_input_embeddings()(new_ids)
    for modality in present:
        rows = torch.cat(list(features[modality.name].pooler_output), dim=0).to(embeds.device, embeds.dtype)
        mask = (new_ids == getattr(patch, modality.token_id)) & new_mask.bool()
        embeds = embeds.masked_scatter(mask.unsqueeze(-1), rows)
    data["inputs_embeds"] = embeds
    return same_mapping(inputs, data)


def make_qwen2_vl_patch(model: torch.nn.Module, budget: Budget, layer: int) -> QwenVLPatch:
    """:class:`QwenVLPatch` on a Qwen2-VL model."""
    return QwenVLPatch(model, QWEN2_VL_TOWER, budget.dominant, budget.contextual, layer)


def make_qwen2_5_vl_patch(model: torch.nn.Module, budget: Budget, layer: int) -> QwenVLPatch:
    """:class:`QwenVLPatch` on a Qwen2.5-VL model."""
    return QwenVLPatch(model, QWEN2_5_VL_TOWER, budget.dominant, budget.contextual, layer)


def make_qwen3_vl_patch(model: torch.nn.Module, budget: Budget, layer: int) -> QwenVLPatch:
    """:class:`QwenVLPatch` on a Qwen3-VL model."""
    return QwenVLPatch(model, QWEN3_VL_TOWER, budget.dominant, budget.contextual, layer)


def make_qwen3_vl_moe_patch(model: torch.nn.Module, budget: Budget, layer: int) -> QwenVLPatch:
    """:class:`QwenVLPatch` on a Qwen3-VL-MoE model (Qwen3-VL's vision side, an MoE LLM)."""
    return QwenVLPatch(model, QWEN3_VL_MOE_TOWER, budget.dominant, budget.contextual, layer)


def make_qwen3_5_patch(model: torch.nn.Module, budget: Budget, layer: int) -> QwenVLPatch:
    """:class:`QwenVLPatch` on a Qwen3.5 model."""
    return QwenVLPatch(model, QWEN3_5_TOWER, budget.dominant, budget.contextual, layer)


def make_qwen3_5_moe_patch(model: torch.nn.Module, budget: Budget, layer: int) -> QwenVLPatch:
    """:class:`QwenVLPatch` on a Qwen3.5-MoE model (Qwen3.5's vision side, an MoE LLM)."""
    return QwenVLPatch(model, QWEN3_5_MOE_TOWER, budget.dominant, budget.contextual, layer)


QWEN2_VL = CompositeFamily(
    name="Qwen2-VL", model_types=("qwen2_vl",), classes=("Qwen2VLForConditionalGeneration", "Qwen2VLModel"),
    summary="attention received in the last vision block (fused qkv, after rotary), per image, packed",
    make_patch=make_qwen2_vl_patch, per_image_budget=True, takes_videos=True,
    tower_model_types=QWEN2_VL_TOWER.model_types,
)
QWEN2_5_VL = CompositeFamily(
    name="Qwen2.5-VL", model_types=("qwen2_5_vl",), classes=("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel"),
    summary="the same, window order undone (see :mod:`.qwen_vl`)",
    make_patch=make_qwen2_5_vl_patch, per_image_budget=True, takes_videos=True,
    tower_model_types=QWEN2_5_VL_TOWER.model_types,
)
QWEN3_VL = CompositeFamily(
    name="Qwen3-VL", model_types=("qwen3_vl",), classes=("Qwen3VLForConditionalGeneration", "Qwen3VLModel"),
    summary="the same (no windows); the DeepStack features merged with the main features' plan",
    make_patch=make_qwen3_vl_patch, per_image_budget=True, takes_videos=True,
    tower_model_types=QWEN3_VL_TOWER.model_types,
)
QWEN3_VL_MOE = CompositeFamily(
    name="Qwen3-VL-MoE", model_types=("qwen3_vl_moe",),
    classes=("Qwen3VLMoeForConditionalGeneration", "Qwen3VLMoeModel"),
    summary="as Qwen3-VL (the same vision side, DeepStack included; an MoE LLM)",
    make_patch=make_qwen3_vl_moe_patch, per_image_budget=True, takes_videos=True,
    tower_model_types=QWEN3_VL_MOE_TOWER.model_types,
)
QWEN3_5 = CompositeFamily(
    name="Qwen3.5", model_types=("qwen3_5",), classes=("Qwen3_5ForConditionalGeneration", "Qwen3_5Model"),
    summary="as Qwen3-VL, without DeepStack (the LLM is hybrid linear / full attention)",
    make_patch=make_qwen3_5_patch, per_image_budget=True, takes_videos=True,
    tower_model_types=QWEN3_5_TOWER.model_types,
)
QWEN3_5_MOE = CompositeFamily(
    name="Qwen3.5-MoE", model_types=("qwen3_5_moe",),
    classes=("Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeModel"),
    summary="as Qwen3.5 (the same vision side; an MoE LLM)",
    make_patch=make_qwen3_5_moe_patch, per_image_budget=True, takes_videos=True,
    tower_model_types=QWEN3_5_MOE_TOWER.model_types,
)
