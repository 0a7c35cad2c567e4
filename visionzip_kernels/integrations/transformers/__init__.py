"""VisionZip for Hugging Face transformers models (pinned: transformers==5.23.0; oldest: 5.17.0).

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

    vz.apply(model, tokens=64)      # the total, split 54:10 -> dominant=54, contextual=10
    vz.apply(model, ratio=0.11)     # a share of the encoder's N tokens, split 54:10 (577 -> 63 = 53 + 10)

Supported (``config.model_type`` -> class; the table is built from the registry, ``FAMILIES``):

{supported}

Anything else raises ``TypeError`` naming the supported types.

Output contract of a patched encoder (``CLIPVisionModel`` / ``SiglipVisionModel`` / ``Dinov2Model``):
``model(...)`` returns a :class:`VisionZipOutput` with ``last_hidden_state`` [B, D+K, C] = the
compressed tokens read from layer ``layer``'s output (before any final layer norm; docs/SPEC.md order:
dominant tokens in ascending token order, then the K contextual tokens), ``keep`` [B, D] int64
ascending, ``pooler_output = attentions = None``, ``hidden_states = None`` unless asked for;
``return_dict=False`` gives ``(last_hidden_state, keep)``. ``output_hidden_states=True`` gives the
L+2 states that ran (the embedding output, then layers 0..L: equal to the unpatched model's
``hidden_states[:L + 2]``); ``output_attentions=True`` raises ``ValueError`` (no attention map is
computed). A patched LLaVA's ``get_image_features`` returns the projected
compressed tokens (``pooler_output``: one [D+K, C_text] tensor per image); its LLM sees D+K tokens
per image, and inputs from the stock processor go through :func:`shrink_inputs` first.

``layer`` indexes the encoder's layer list, Python-style (``-2``: the second-to-last layer, which
LLaVA-1.5 reads). Its output is what transformers calls ``hidden_states[layer]`` for negative
``layer`` (``hidden_states[layer + 1]`` for ``layer >= 0``: ``hidden_states[0]`` is the embedding
output) and its attention map is ``attentions[layer]``: the tensors upstream VisionZip reads with
``output_hidden_states=True, output_attentions=True``.

Budget: ``dominant`` (D) counts the CLS token for CLS encoders (upstream's ``dominant=54`` means the
same 54 tokens: CLS + 53). ``dominant >= 1``, ``contextual >= 0`` and ``D + K <= N`` (checked at
run time against the actual token count N, with the ops' error messages). Or one total:
``tokens=T`` or ``ratio=r`` (``T = floor(r * N + 1/2)``), split in the paper's 54:10 proportion by
:func:`visionzip_kernels.split_budget` with exact integer rounding: ``contextual = floor(T * 10 / 64
+ 1/2)``, ``dominant = T - contextual`` (64 -> 54 + 10, 128 -> 108 + 20, 192 -> 162 + 30, 32 -> 27
+ 5). ``tokens`` / ``ratio`` exclude ``dominant`` / ``contextual`` and each other (``ValueError``).
A ratio is resolved per call against that call's N for an encoder, once at ``apply`` for LLaVA (its
tower's N at the configured image size).

Mechanism (:mod:`.common`): the instance's ``forward`` is replaced by a bound method of the patch
that runs the model's embeddings and then only layers 0..L (a loop dynamo traces: no hooks, no
exception, no thread-local), computes layer L's q (CLS row only for CLS encoders) and k with that
layer's own ``q_proj`` / ``k_proj`` on its attention input, and runs ``cls_attention`` /
``attention_received``, the head-mean metric and ``select_merge``. No transformers ``forward`` code
is copied, and the patch lives on the instance only (other instances of the class are untouched).
A patched model works with ``torch.compile`` (``fullgraph=True`` for the encoders), ``copy.deepcopy``
(the copy has its own patch), ``pickle`` / ``torch.save`` of the whole model, ``state_dict`` round
trips and ``.to(device / dtype)``.

Applying to a model that is already patched replaces the previous settings. Gradients flow to the
hidden states (VisionZip‡ fine-tuning); the selection itself is discrete. Not thread-safe to patch
or unpatch while another thread runs the model; concurrent forwards are fine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ...budget import DEFAULTS, PER_IMAGE_DEFAULTS, resolve_budget
from . import clip, dinov2, llava, llava_next, llava_onevision, qwen_vl, siglip
from .common import MIN_TRANSFORMERS, CompositeFamily, EncoderFamily, EncoderPatch, VisionZipOutput
from .llava import LlavaPatch, shrink_image_tokens
from .llava_next import LlavaNextPatch
from .llava_onevision import LlavaOnevisionPatch
from .qwen_vl import QwenVisionZipOutput, QwenVLPatch

__all__ = [
    "COMPOSITE_FAMILIES",
    "CompositeFamily",
    "ENCODER_FAMILIES",
    "EncoderPatch",
    "FAMILIES",
    "LlavaNextPatch",
    "LlavaOnevisionPatch",
    "LlavaPatch",
    "MIN_TRANSFORMERS",
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

# The registry: every supported model type, and nothing about a model type outside it. apply(), the
# error messages and the table in this module's docstring all follow it.
ENCODER_FAMILIES: tuple[EncoderFamily, ...] = (clip.FAMILY, siglip.FAMILY, dinov2.FAMILY)
COMPOSITE_FAMILIES: tuple[CompositeFamily, ...] = (llava.FAMILY, llava_next.FAMILY, llava_onevision.FAMILY,
                                                  qwen_vl.QWEN2_VL, qwen_vl.QWEN2_5_VL, qwen_vl.QWEN3_VL,
                                                  qwen_vl.QWEN3_VL_MOE, qwen_vl.QWEN3_5, qwen_vl.QWEN3_5_MOE)
FAMILIES: tuple[EncoderFamily | CompositeFamily, ...] = (*ENCODER_FAMILIES, *COMPOSITE_FAMILIES)
_BY_MODEL_TYPE = {t: family for family in ENCODER_FAMILIES for t in family.model_types}
_COMPOSITE_BY_MODEL_TYPE = {t: family for family in COMPOSITE_FAMILIES for t in family.model_types}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = (*_BY_MODEL_TYPE, *_COMPOSITE_BY_MODEL_TYPE)

# The attribute a patched model carries (a plain attribute: not a submodule, not in the state dict).
_ATTR = "_visionzip_patch"

_HINTS = {
    "clip": "a CLIPModel: apply VisionZip to its vision tower, a CLIPVisionModel (model.vision_model)",
    "siglip": "a SiglipModel: apply VisionZip to its vision tower, a SiglipVisionModel (model.vision_model)",
    "dinov2_with_registers": "DINOv2 with registers is not supported (only Dinov2Model)",
    **{t: f"a {family.name} vision tower: apply VisionZip to the whole {family.classes[0]}"
       for family in COMPOSITE_FAMILIES for t in family.tower_model_types},
}


def _supported_table() -> str:
    """The registry as a reStructuredText table (model_type, classes, how it is scored)."""
    rows = [("model_type", "class", "scores / CLS")]
    rows += [(f"``{family.model_types[0]}``", f"``{family.class_name}``", family.summary)
             for family in ENCODER_FAMILIES]
    rows += [(f"``{family.model_types[0]}``", ", ".join(f"``{c}``" for c in family.classes), family.summary)
             for family in COMPOSITE_FAMILIES]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    rule = "  ".join("=" * w for w in widths)
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join([rule, lines[0], rule, *lines[1:], rule])


__doc__ = __doc__.replace("{supported}", _supported_table())


def _check_model(model, caller: str) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{caller}: model must be a transformers model (a torch.nn.Module), "
                        f"got {type(model).__name__}")


def check_transformers_version() -> None:
    """``RuntimeError`` naming the installed and the required version when transformers is older
    than :data:`MIN_TRANSFORMERS` (the oldest version CI tests)."""
    import transformers
    from packaging.version import Version

    installed = transformers.__version__
    if Version(installed) < Version(MIN_TRANSFORMERS):
        raise RuntimeError(f"visionzip.apply: transformers {installed} is installed, the VisionZip integration needs "
                           f"transformers >= {MIN_TRANSFORMERS} (pip install 'transformers>={MIN_TRANSFORMERS}')")


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


def family_of(model: torch.nn.Module) -> EncoderFamily | CompositeFamily:
    """The registry's record for ``model`` (by ``config.model_type``), or ``TypeError``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    composite = _COMPOSITE_BY_MODEL_TYPE.get(model_type)
    return composite if composite is not None else encoder_family(model)


def get_patch(model: torch.nn.Module) -> EncoderPatch | LlavaPatch | QwenVLPatch | None:
    """The active patch of ``model`` (with its ``settings``), or ``None`` when it is not patched."""
    _check_model(model, "visionzip.get_patch")
    return model.__dict__.get(_ATTR)


def apply(model: torch.nn.Module, dominant: int | float | None = None, contextual: int | float | None = None,
          layer: int | None = None, *, tokens: int | None = None, ratio: float | None = None,
          video_pooling: str | None = None) -> torch.nn.Module:
    """Makes ``model`` VisionZip-compressed, in place, and returns it.

    The budget is given one way: ``dominant`` / ``contextual`` explicitly (default 54 / 10), or
    ``tokens`` (the total D + K), or ``ratio`` (a share of the encoder's tokens). ``tokens`` and
    ``ratio`` are split dominant:contextual in the paper's 54:10 proportion by
    :func:`visionzip_kernels.split_budget`: ``contextual = floor(T * 10 / 64 + 1/2)``,
    ``dominant = T - contextual`` (64 -> 54 + 10, 128 -> 108 + 20, 192 -> 162 + 30, 32 -> 27 + 5).
    ``ratio`` gives ``T = floor(ratio * N + 1/2)`` of the encoder's N tokens (CLS included): for a
    stand-alone encoder N is each call's actual token count (DINOv2 at any input size); for LLaVA it
    is the tower's count at its configured image size, resolved here (the placeholder count must be
    fixed), e.g. ``ratio=0.11`` of 577 -> 63 = 53 + 10.

    Args:
        model: one of the supported models (the module docstring's table, :data:`SUPPORTED_MODEL_TYPES`:
            ``CLIPVisionModel``, ``SiglipVisionModel``, ``Dinov2Model``, LLaVA-1.5, LLaVA-NeXT,
            LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5; recognised by ``config.model_type``;
            for LLaVA-NeXT the budget is per crop, for LLaVA-OneVision per crop and per video frame, for
            Qwen per image).
        dominant: D, dominant tokens kept per image (CLS included for CLS encoders). Default 54.
            Qwen2-VL / Qwen2.5-VL: a count per image (int) or a ratio of each image's merged tokens
            (float in (0, 1]); default 0.65 (see :mod:`.qwen_vl`).
        contextual: K, contextual tokens merged from the rest. Default 10 (54 + 10 = 64); Qwen: a
            count or a ratio, default 0.05 (at least one per image).
        layer: the encoder layer read, Python-style index into its layer list; default -2 (Qwen: -1,
            the last vision block, which must be a full-attention block; LLaVA-OneVision: the config's
            ``vision_feature_layer``, -1 for the published checkpoints).
        tokens: the total D + K (int >= 1), split 54:10; excludes ``dominant`` / ``contextual``.
            Qwen: per image.
        ratio: a float in (0, 1]: the total as a share of N, split 54:10; excludes the others.
            Qwen: per image, as the ratios dominant = ratio * 54/64, contextual = ratio * 10/64.
        video_pooling: LLaVA-OneVision only: "before" (default) or "after": each video frame is
            compressed before or after the model's 2x2 pooling (:mod:`.llava_onevision`).

    Returns:
        ``model``, patched (see the module docstring for the output contract).

    Raises:
        TypeError: ``model`` is not a model, an unsupported model (the message names the supported
            model types), a non-int budget or ``video_pooling`` for another family; ValueError: ``layer``
            out of range, ``dominant < 1``, ``contextual < 0``, ``tokens < 1``, ``ratio`` outside (0, 1],
            the budget given two ways, or a ``video_pooling`` other than "before" / "after";
            RuntimeError: transformers older than :data:`MIN_TRANSFORMERS`. A budget larger than N
            raises at run time (``D + K <= N`` is checked against each call's tokens).
    """
    _check_model(model, "visionzip.apply")
    check_transformers_version()
    previous = get_patch(model)
    if previous is not None:
        remove(model)
    options = {name: value for name, value in (("video_pooling", video_pooling),) if value is not None}
    try:
        family = family_of(model)
        composite = isinstance(family, CompositeFamily)
        for name in options:
            if not composite or name not in family.options:
                raise TypeError(f"visionzip.apply: {name}= is an option of LLaVA-OneVision only, not of {family.name}")
        per_image = composite and family.per_image_budget
        budget = resolve_budget(dominant, contextual, tokens, ratio, per_image=per_image)
        if layer is None:
            if composite and family.default_layer is not None:
                layer = family.default_layer(model)
            else:
                layer = (PER_IMAGE_DEFAULTS if per_image else DEFAULTS).layer
        if composite:
            patch = family.make_patch(model, budget, layer, **options)
        else:
            patch = EncoderPatch(model, family, budget.dominant, budget.contextual, layer, ratio=budget.ratio)
    except Exception:
        if previous is not None:  # leave the model as it was
            apply(model, **previous.settings)
        raise
    model.__dict__[_ATTR] = patch
    return model


def patch_for_prompt(model: torch.nn.Module, patch_class: type | tuple[type, ...]):
    """The patch of ``model`` when it is a ``patch_class``, else a ``TypeError`` saying what to do."""
    _check_model(model, "shrink_inputs")
    patch = get_patch(model)
    if isinstance(patch, patch_class):
        return patch
    name = type(model).__name__
    if patch is None:
        supported = family_of_or_none(model)
        what = f"a {supported.name} model" if supported is not None else "model"
        raise TypeError(f"shrink_inputs: this {name} ({what}) is not patched by VisionZip; call "
                        "visionzip_kernels.apply(model) first, then shrink_inputs(model, inputs)")
    raise TypeError(f"shrink_inputs: this {name} is patched as {type(patch).__name__}, which has no prompt to "
                    "rewrite; shrink_inputs is for a patched LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, "
                    "Qwen2.5-VL, Qwen3-VL or Qwen3.5 model")


def family_of_or_none(model: torch.nn.Module) -> EncoderFamily | CompositeFamily | None:
    """:func:`family_of`, or ``None`` for an unsupported model."""
    try:
        return family_of(model)
    except TypeError:
        return None


def shrink_inputs(model: torch.nn.Module, inputs, **kwargs):
    """The stock processor's output made consistent with the VisionZip-patched ``model``: for LLaVA,
    :func:`.llava.shrink_inputs` (D+K placeholders per image); for LLaVA-OneVision,
    :func:`.llava_onevision.shrink_inputs` (images and videos); for Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3.5,
    :func:`.qwen_vl.shrink_inputs` (the images encoded once, the kept tokens at their original
    3-D positions, ``inputs_embeds`` ready; on Qwen3-VL ``mm_encoder_outputs`` with the DeepStack
    features instead). Keyword arguments go to that function. ``TypeError`` when ``model`` is not
    patched (call :func:`apply` first)."""
    patch = patch_for_prompt(model, (LlavaPatch, QwenVLPatch))
    if isinstance(patch, QwenVLPatch):
        return qwen_vl.shrink_inputs(model, inputs, **kwargs)
    if isinstance(patch, LlavaOnevisionPatch):
        return llava_onevision.shrink_inputs(model, inputs, **kwargs)
    return llava.shrink_inputs(model, inputs, **kwargs)


def remove(model: torch.nn.Module) -> torch.nn.Module:
    """Undoes :func:`apply` on ``model`` (``forward``, ``get_image_features``, hooks); returns it.
    A model that is not patched is returned unchanged."""
    _check_model(model, "visionzip.remove")
    patch = model.__dict__.pop(_ATTR, None)
    if patch is not None:
        patch.remove()
    return model


@contextlib.contextmanager
def patched(model: torch.nn.Module, dominant: int | float | None = None, contextual: int | float | None = None,
            layer: int | None = None, *, tokens: int | None = None, ratio: float | None = None,
            video_pooling: str | None = None) -> Iterator[torch.nn.Module]:
    """Context manager form of :func:`apply` (same arguments): yields the patched model; on exit the
    model is restored to what it was on entry (unpatched, or patched with its previous settings)."""
    previous = get_patch(model)
    previous_settings = previous.settings if previous is not None else None
    apply(model, dominant=dominant, contextual=contextual, layer=layer, tokens=tokens, ratio=ratio,
          video_pooling=video_pooling)
    try:
        yield model
    finally:
        remove(model)
        if previous_settings is not None:
            apply(model, **previous_settings)
