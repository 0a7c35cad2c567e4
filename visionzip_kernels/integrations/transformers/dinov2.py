"""DINOv2 (``Dinov2Model``; e.g. the DINOv2-S/14 converted by :mod:`examples.models.dinov2_onnx`).

A CLS encoder like CLIP (``cls_attention``, ``keep_cls=True``). Layout in transformers 5.23:
``embeddings -> encoder.layer[i] -> layernorm`` (the final layer norm applies to every token). Each
``Dinov2Layer`` computes ``h = h + layer_scale1(attention(norm1(h)))`` then
``h = h + layer_scale2(mlp(norm2(h)))`` and returns ``h``: the layer's output already includes both
layer scales and residuals, and no norm is pending, so the captured output is exactly
``hidden_states[i + 1]``. The projections are ``layer.attention.q_proj`` / ``k_proj`` (``nn.Linear``)
with ``scaling`` = d^-0.5 on transformers 5.2x; 5.17 has them one level down, as
``layer.attention.attention.query`` / ``key`` with ``attention_head_size``: both are recognised.
Position embeddings are interpolated, so N follows the input size (1 + (size / 14)^2); the budget
is checked against the actual N at run time.
``Dinov2WithRegisters`` (model_type ``dinov2_with_registers``) is not supported. The patched
forward runs ``embeddings`` (``hidden_states[0]``; ``bool_masked_pos`` is passed on), then
``layer(hidden)`` for layers 0..L (no attention mask: the 5.2x ``attention_mask`` input of
``Dinov2Model`` is not supported while patched); the attention's input is ``norm1`` of the layer's
input in both versions.
"""

from __future__ import annotations

import torch

from .common import EncoderFamily, QueryKey, layer_output, separate_projections


def _layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.encoder.layer


def _query_key(layer: torch.nn.Module) -> QueryKey:
    attention = layer.attention
    if hasattr(attention, "q_proj"):
        return separate_projections(attention)
    inner = attention.attention  # transformers 5.17: Dinov2SelfAttention with query / key / value
    head_dim = int(inner.attention_head_size)
    return QueryKey(inner.query, inner.key, head_dim, float(getattr(inner, "scaling", head_dim**-0.5)))


def _embed(
    model: torch.nn.Module, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None
) -> torch.Tensor:
    return model.embeddings(pixel_values, bool_masked_pos=bool_masked_pos)


def _run_layer(layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return layer_output(layer(hidden))


def _attention_input(layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return layer.norm1(hidden)


def _num_tokens(model: torch.nn.Module) -> int:
    config = model.config
    return (config.image_size // config.patch_size) ** 2 + 1


FAMILY = EncoderFamily(
    name="DINOv2",
    model_types=("dinov2",),
    class_name="Dinov2Model",
    summary="``cls_attention``, CLS always kept",
    keep_cls=True,
    layers=_layers,
    query_key=_query_key,
    embed=_embed,
    run_layer=_run_layer,
    attention_input=_attention_input,
    num_tokens=_num_tokens,
)
