"""VisionZip for Hugging Face transformers models (pinned: transformers==5.23.0).

One call makes a model compress its visual tokens with the package's ops; the encoder keeps its
attention implementation (SDPA by default) and stops after the layer VisionZip reads::

    import visionzip_kernels as vz

    vz.apply(model, dominant=54, contextual=10, layer=-2)   # patches in place, returns model
    out = model(pixel_values=x)
    out.last_hidden_state   # [B, 64, C]: 54 dominant (CLS first) + 10 contextual tokens of layer -2
    out.keep                # [B, 54] int64, ascending token indices of the dominant tokens
    vz.remove(model)        # back to the original model, bit for bit

    with vz.patched(model, dominant=108, contextual=20):   # the same, undone on exit
        ...

Supported (``config.model_type`` -> class):

========================  ==================================  ===========================================
model_type                class                               scores / CLS
========================  ==================================  ===========================================
``clip_vision_model``     ``CLIPVisionModel``                 ``cls_attention``, CLS always kept
``siglip_vision_model``   ``SiglipVisionModel``               ``attention_received``, no CLS
``dinov2``                ``Dinov2Model``                     ``cls_attention``, CLS always kept
``llava``                 ``LlavaForConditionalGeneration``,  its vision tower as above, projected
                          ``LlavaModel``                      (see :mod:`.llava`)
``qwen2_vl``              ``Qwen2VLForConditionalGeneration``, attention received in the last vision block
                          ``Qwen2VLModel``                    (fused qkv, after rotary), per image, packed
``qwen2_5_vl``            ``Qwen2_5_VLForConditionalGeneration``, the same, window order undone
                          ``Qwen2_5_VLModel``                 (see :mod:`.qwen_vl`)
========================  ==================================  ===========================================

Anything else raises ``TypeError`` naming the supported types.

Output contract of a patched encoder (``CLIPVisionModel`` / ``SiglipVisionModel`` / ``Dinov2Model``):
``model(...)`` returns a :class:`VisionZipOutput` with ``last_hidden_state`` [B, D+K, C] = the
compressed tokens read from layer ``layer``'s output (before any final layer norm; docs/SPEC.md order:
dominant tokens in ascending token order, then the K contextual tokens), ``keep`` [B, D] int64
ascending, ``pooler_output = hidden_states = attentions = None``; ``return_dict=False`` gives
``(last_hidden_state, keep)``. A patched LLaVA's ``get_image_features`` returns the projected
compressed tokens (``pooler_output``: one [D+K, C_text] tensor per image); its LLM sees D+K tokens
per image, and inputs from the stock processor go through :func:`shrink_inputs` first.

``layer`` indexes the encoder's layer list, Python-style (``-2``: the second-to-last layer, which
LLaVA-1.5 reads). Its output is what transformers calls ``hidden_states[layer]`` for negative
``layer`` (``hidden_states[layer + 1]`` for ``layer >= 0``: ``hidden_states[0]`` is the embedding
output) and its attention map is ``attentions[layer]``: the tensors upstream VisionZip reads with
``output_hidden_states=True, output_attentions=True``.

Budget: ``dominant`` (D) counts the CLS token for CLS encoders (upstream's ``dominant=54`` means the
same 54 tokens: CLS + 53). ``dominant >= 1``, ``contextual >= 0`` and ``D + K <= N`` (checked at
run time against the actual token count N, with the ops' error messages).

Mechanism (:mod:`.common`): forward hooks on layer L's ``q_proj`` / ``k_proj`` capture q (CLS row
only for CLS encoders) and k; a forward hook on layer L captures its output and raises a private
exception that a wrapper around the instance's ``forward`` catches, so layers L+1.. never run; the
wrapper then runs ``cls_attention`` / ``attention_received``, the head-mean metric and
``select_merge``. No transformers ``forward`` code is copied, and the patch lives on the instance
only (other instances of the class are untouched).

Applying to a model that is already patched replaces the previous settings. Gradients flow to the
hidden states (VisionZip‡ fine-tuning); the selection itself is discrete. Not thread-safe to patch
or unpatch while another thread runs the model; concurrent forwards are fine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from . import clip, dinov2, llava, qwen_vl, siglip
from .common import CompositeFamily, EncoderFamily, EncoderPatch, VisionZipOutput
from .llava import LlavaPatch, shrink_image_tokens
from .qwen_vl import QwenVLPatch, QwenVisionZipOutput

__all__ = [
    "COMPOSITE_FAMILIES",
    "CompositeFamily",
    "ENCODER_FAMILIES",
    "EncoderPatch",
    "LlavaPatch",
    "QwenVLPatch",
    "QwenVisionZipOutput",
    "SUPPORTED_MODEL_TYPES",
    "VisionZipOutput",
    "apply",
    "get_patch",
    "patched",
    "remove",
    "shrink_image_tokens",
    "shrink_inputs",
]

# The registry: every supported model type, and nothing about a model type outside it.
ENCODER_FAMILIES: tuple[EncoderFamily, ...] = (clip.FAMILY, siglip.FAMILY, dinov2.FAMILY)
COMPOSITE_FAMILIES: tuple[CompositeFamily, ...] = (llava.FAMILY, qwen_vl.QWEN2_VL, qwen_vl.QWEN2_5_VL)
_BY_MODEL_TYPE = {t: family for family in ENCODER_FAMILIES for t in family.model_types}
_COMPOSITE_BY_MODEL_TYPE = {t: family for family in COMPOSITE_FAMILIES for t in family.model_types}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = (*_BY_MODEL_TYPE, *_COMPOSITE_BY_MODEL_TYPE)

# The attribute a patched model carries (a plain attribute: not a submodule, not in the state dict).
_ATTR = "_visionzip_patch"

_ENCODER_DEFAULTS = (54, 10, -2)  # dominant, contextual, layer (LLaVA-1.5's budget and layer)

_HINTS = {
    "clip": "a CLIPModel: apply VisionZip to its vision tower, a CLIPVisionModel (model.vision_model)",
    "siglip": "a SiglipModel: apply VisionZip to its vision tower, a SiglipVisionModel (model.vision_model)",
    "dinov2_with_registers": "DINOv2 with registers is not supported (only Dinov2Model)",
    "qwen2_vl_vision": "a Qwen2-VL vision tower: apply VisionZip to the whole Qwen2VLForConditionalGeneration",
    "qwen2_5_vl_vision": "a Qwen2.5-VL vision tower: apply VisionZip to the whole Qwen2_5_VLForConditionalGeneration",
}


def _unsupported(model: torch.nn.Module, model_type) -> TypeError:
    hint = _HINTS.get(model_type)
    return TypeError(
        f"visionzip.apply: {type(model).__name__} (config.model_type={model_type!r}) is not supported"
        + (f": {hint}" if hint else "")
        + f". Supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}."
    )


def encoder_family(model: torch.nn.Module) -> EncoderFamily:
    """The :class:`EncoderFamily` of a vision encoder instance, or ``TypeError``."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    family = _BY_MODEL_TYPE.get(model_type)
    if family is None:
        raise _unsupported(model, model_type)
    cls = family.model_class()
    if not isinstance(model, cls):
        raise TypeError(f"visionzip.apply: model_type {model_type!r} is supported as {cls.__name__} only, "
                        f"got {type(model).__name__}")
    return family


def get_patch(model: torch.nn.Module) -> EncoderPatch | LlavaPatch | QwenVLPatch | None:
    """The active patch of ``model`` (with its ``settings``), or ``None`` when it is not patched."""
    return model.__dict__.get(_ATTR)


def apply(model: torch.nn.Module, dominant: int | float | None = None, contextual: int | float | None = None,
          layer: int | None = None) -> torch.nn.Module:
    """Makes ``model`` VisionZip-compressed, in place, and returns it.

    Args:
        model: a ``CLIPVisionModel``, ``SiglipVisionModel``, ``Dinov2Model``,
            ``LlavaForConditionalGeneration`` or ``LlavaModel`` (recognised by ``config.model_type``).
        dominant: D, dominant tokens kept per image (CLS included for CLS encoders). Default 54.
            Qwen2-VL / Qwen2.5-VL: a count per image (int) or a ratio of each image's merged tokens
            (float in (0, 1]); default 0.65 (see :mod:`.qwen_vl`).
        contextual: K, contextual tokens merged from the rest. Default 10 (54 + 10 = 64); Qwen: a
            count or a ratio, default 0.05 (at least one per image).
        layer: the encoder layer read, Python-style index into its layer list; default -2 (Qwen: -1,
            the last vision block, which must be a full-attention block).

    Returns:
        ``model``, patched (see the module docstring for the output contract).

    Raises:
        TypeError: unsupported model (the message names the supported model types) or a
            non-int budget; ValueError: ``layer`` out of range, ``dominant < 1`` or ``contextual < 0``.
    """
    previous = get_patch(model)
    if previous is not None:
        remove(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    composite = _COMPOSITE_BY_MODEL_TYPE.get(model_type)
    try:
        if composite is not None:
            dominant, contextual, layer = _with_defaults(composite.defaults, dominant, contextual, layer)
            tower = composite.tower(model)
            tower_family = composite.tower_family or encoder_family(tower)
            patch = composite.make_patch(model, tower_family, dominant, contextual, layer)
        else:
            dominant, contextual, layer = _with_defaults(_ENCODER_DEFAULTS, dominant, contextual, layer)
            patch = EncoderPatch(model, encoder_family(model), dominant, contextual, layer)
    except Exception:
        if previous is not None:  # leave the model as it was
            apply(model, **previous.settings)
        raise
    model.__dict__[_ATTR] = patch
    return model


def _with_defaults(defaults: tuple, dominant, contextual, layer) -> tuple:
    given = (dominant, contextual, layer)
    return tuple(default if value is None else value for value, default in zip(given, defaults))


def shrink_inputs(model: torch.nn.Module, inputs, **kwargs):
    """The stock processor's output made consistent with the VisionZip-patched ``model``: for LLaVA,
    :func:`.llava.shrink_inputs` (D+K placeholders per image); for Qwen2-VL / Qwen2.5-VL,
    :func:`.qwen_vl.shrink_inputs` (the images encoded once, the kept tokens at their original
    3-D positions, ``inputs_embeds`` ready). Keyword arguments go to that function."""
    if isinstance(get_patch(model), QwenVLPatch):
        return qwen_vl.shrink_inputs(model, inputs, **kwargs)
    return llava.shrink_inputs(model, inputs, **kwargs)


def remove(model: torch.nn.Module) -> torch.nn.Module:
    """Undoes :func:`apply` on ``model`` (hooks, ``forward``, ``get_image_features``); returns it.
    A model that is not patched is returned unchanged."""
    patch = model.__dict__.pop(_ATTR, None)
    if patch is not None:
        patch.remove()
    return model


@contextlib.contextmanager
def patched(model: torch.nn.Module, dominant: int | float | None = None, contextual: int | float | None = None,
            layer: int | None = None) -> Iterator[torch.nn.Module]:
    """Context manager form of :func:`apply`: yields the patched model; on exit the model is
    restored to what it was on entry (unpatched, or patched with its previous settings)."""
    previous = get_patch(model)
    previous_settings = previous.settings if previous is not None else None
    apply(model, dominant=dominant, contextual=contextual, layer=layer)
    try:
        yield model
    finally:
        remove(model)
        if previous_settings is not None:
            apply(model, **previous_settings)
