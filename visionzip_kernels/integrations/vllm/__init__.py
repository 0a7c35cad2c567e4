"""VisionZip inside vLLM: an out-of-tree plug-in (the ``vllm.general_plugins`` entry point ``visionzip``).

Installed (``pip install visionzip-kernels[vllm]``) but not enabled, vLLM runs as stock: the plug-in's
model classes defer every call to vLLM's own. Enabled per engine with one setting, the same for
``LLM(...)`` and ``vllm serve``::

    LLM(model, hf_overrides={"visionzip": {"dominant": 0.65, "contextual": 0.05}})
    vllm serve MODEL --hf-overrides '{"visionzip": {"dominant": 0.65, "contextual": 0.05}}'

The mapping takes what :func:`visionzip_kernels.apply` takes for Qwen: ``dominant`` / ``contextual``
(per image, a count or a ratio of the image's merged tokens; defaults 0.65 / 0.05), or ``tokens`` (the
total per image, split 54:10), or ``ratio``; and ``layer`` (the scoring vision block, default -1).
``{"visionzip": {}}`` enables the defaults.

Supported: Qwen2-VL and Qwen2.5-VL, images and videos (each temporal slice of a video keeps an image's
budget); Qwen3-VL (DeepStack) and Qwen3.5, images and videos (per temporal slice, each frame's placeholder run
keeping its slice's budget). Any other model with
the setting fails at engine start with a ``ValueError`` naming the supported architectures. The algorithm
(:mod:`.qwen`, :mod:`.qwen3`) is the transformers integration's (docs/SPEC.md "Qwen2-VL and Qwen2.5-VL",
"Qwen3-VL", "Qwen3.5", "Qwen videos", "vLLM plug-in").

This module imports no vLLM at import time: :func:`settings_from_config` is usable (and tested) without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from ...budget import check_int, resolve_budget

SETTING = "visionzip"  # the hf_overrides key
KEYS = ("dominant", "contextual", "tokens", "ratio", "layer")
# vLLM architecture name -> the plug-in's class ("module:Class"), registered over vLLM's own.
ARCHITECTURES = {
    "Qwen2VLForConditionalGeneration": "visionzip_kernels.integrations.vllm.qwen:VisionZipQwen2VL",
    "Qwen2_5_VLForConditionalGeneration": "visionzip_kernels.integrations.vllm.qwen:VisionZipQwen2_5_VL",
    "Qwen3VLForConditionalGeneration": "visionzip_kernels.integrations.vllm.qwen3:VisionZipQwen3VL",
    "Qwen3_5ForConditionalGeneration": "visionzip_kernels.integrations.vllm.qwen3:VisionZipQwen3_5",
}


class VisionZipSettings(NamedTuple):
    """An engine's resolved VisionZip setting: per-image counts (int) or ratios (float), the scoring block."""

    dominant: int | float
    contextual: int | float
    layer: int


def settings_from_config(hf_config) -> VisionZipSettings | None:
    """The VisionZip setting of a model's (overridden) Hugging Face config, or ``None`` when not enabled.

    Args:
        hf_config: the config vLLM loaded, after ``hf_overrides``; its attribute ``visionzip`` is a
            mapping of :data:`KEYS` (``{}`` = the defaults), ``None`` or ``False`` (not enabled).

    Raises:
        TypeError / ValueError: a malformed setting, naming the key.
    """
    raw = getattr(hf_config, SETTING, None)
    if raw is None or raw is False:
        return None
    if raw is True:
        raw = {}
    if not isinstance(raw, Mapping):
        raise TypeError(f"visionzip: hf_overrides['visionzip'] must be a mapping of {', '.join(KEYS)}, "
                        f"got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise ValueError(f"visionzip: unknown key(s) {unknown} in hf_overrides['visionzip']; "
                         f"expected some of {list(KEYS)}")
    budget = resolve_budget(raw.get("dominant"), raw.get("contextual"), raw.get("tokens"), raw.get("ratio"),
                            per_image=True)
    layer = check_int("layer", raw.get("layer", -1), caller="visionzip")
    return VisionZipSettings(budget.dominant, budget.contextual, layer)


def register() -> None:
    """The ``vllm.general_plugins`` entry point, run by vLLM in every process before it builds an engine.

    Registers the plug-in's Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3.5 classes under vLLM's architecture names (they run
    vLLM's own code unless the model's config enables VisionZip), and makes ``ModelConfig`` refuse the
    setting on any other architecture (at engine start, not a silent no-op)."""
    from vllm import ModelRegistry

    for architecture, target in ARCHITECTURES.items():
        ModelRegistry.register_model(architecture, target)
    _refuse_unsupported_models(ModelRegistry)


def _refuse_unsupported_models(registry) -> None:
    inspect = registry.inspect_model_cls
    if getattr(inspect, "visionzip_checked", False):  # register() runs once per plug-in load; wrap once
        return

    def inspect_model_cls(architectures, model_config, *args, **kwargs):
        info, architecture = inspect(architectures, model_config, *args, **kwargs)
        if settings_from_config(getattr(model_config, "hf_config", None)) is not None:
            impl = getattr(model_config, "model_impl", "auto")
            if architecture not in ARCHITECTURES or impl not in ("auto", "vllm"):
                raise ValueError(f"visionzip: hf_overrides enables VisionZip, but this model ({architecture}, "
                                 f"model_impl={impl!r}) is not supported by the vLLM plug-in; supported: "
                                 f"{', '.join(ARCHITECTURES)} with vLLM's own implementation")
        return info, architecture

    inspect_model_cls.visionzip_checked = True
    registry.inspect_model_cls = inspect_model_cls
