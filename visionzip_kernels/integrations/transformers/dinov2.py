"""DINOv2 (``Dinov2Model``; e.g. the DINOv2-S/14 converted by :mod:`visionzip_kernels.models.dinov2_onnx`).

A CLS encoder like CLIP (``cls_attention``, ``keep_cls=True``). Layout in transformers 5.23:
``embeddings -> encoder.layer[i] -> layernorm`` (the final layer norm applies to every token). Each
``Dinov2Layer`` computes ``h = h + layer_scale1(attention(norm1(h)))`` then
``h = h + layer_scale2(mlp(norm2(h)))`` and returns ``h``: the layer's output already includes both
layer scales and residuals, and no norm is pending, so the captured output is exactly
``hidden_states[i + 1]``. The attention module is ``layer.attention`` with ``q_proj`` / ``k_proj``
(``nn.Linear``) and ``scaling`` = d^-0.5. Position embeddings are interpolated, so N follows the
input size (1 + (size / 14)^2); the budget is checked against the actual N at run time.
``Dinov2WithRegisters`` (model_type ``dinov2_with_registers``) is not supported.
"""

from __future__ import annotations

from .common import EncoderFamily


def _model_class():
    from transformers import Dinov2Model

    return Dinov2Model


FAMILY = EncoderFamily(
    name="DINOv2",
    model_types=("dinov2",),
    model_class=_model_class,
    keep_cls=True,
    layers=lambda model: model.encoder.layer,
    attention=lambda layer: layer.attention,
)
