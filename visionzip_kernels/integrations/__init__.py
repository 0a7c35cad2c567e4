"""Integrations of the VisionZip ops into model libraries.

- :mod:`visionzip_kernels.integrations.transformers`: Hugging Face transformers 5.x ({families}:
  ``config.model_type`` in {model_types}; the listing comes from its registry). Its :func:`apply`,
  :func:`remove` and :func:`patched` are re-exported here and as ``visionzip_kernels.apply`` /
  ``remove`` / ``patched``.

Importing this package imports transformers (``pip install -r requirements-integrations.txt``);
``import visionzip_kernels`` alone does not.
"""

from .transformers import (
    FAMILIES,
    SUPPORTED_MODEL_TYPES,
    VisionZipOutput,
    apply,
    get_patch,
    patched,
    remove,
    shrink_image_tokens,
    shrink_inputs,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "VisionZipOutput",
    "apply",
    "get_patch",
    "patched",
    "remove",
    "shrink_image_tokens",
    "shrink_inputs",
]

__doc__ = __doc__.replace("{families}", ", ".join(family.name for family in FAMILIES)).replace(
    "{model_types}", ", ".join(f"``{t}``" for t in SUPPORTED_MODEL_TYPES))
