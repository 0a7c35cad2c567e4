"""CLIP vision encoders (``CLIPVisionModel``; also the vision tower of LLaVA-1.5).

CLIP has a CLS token at index 0: the scores are the CLS row of layer L's attention
(``cls_attention``) and the CLS token is always kept (``keep_cls=True``). In transformers 5.23
``CLIPVisionModel`` is flat: ``embeddings -> pre_layrnorm -> encoder.layers[i] -> post_layernorm``
(the last on the pooled CLS only). ``hidden_states[0]`` is the pre-layer-norm embedding output, so
``hidden_states[i + 1]`` (``hidden_states[-2]`` for ``layer=-2``) is ``encoder.layers[i]``'s output,
which is what the patch captures; ``attentions[i]`` is that same layer's attention map.
Each ``CLIPEncoderLayer`` has ``self_attn.q_proj`` / ``self_attn.k_proj`` (``nn.Linear``, bias) whose
outputs are q and k before scaling (the scale, d^-0.5, is passed to the attention function); the
attention's input is ``layer_norm1`` of the layer's input. The patched forward runs ``embeddings``
and ``pre_layrnorm`` (what ``hidden_states[0]`` holds), then ``layer(hidden, None)`` (no attention
mask) for layers 0..L; transformers 5.17 has the same layout.
"""

from __future__ import annotations

import torch

from .common import EncoderFamily, QueryKey, layer_norm1_input, run_layer_without_mask, separate_projections


def _layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.encoder.layers


def _query_key(layer: torch.nn.Module) -> QueryKey:
    return separate_projections(layer.self_attn)


def _embed(
    model: torch.nn.Module, pixel_values: torch.Tensor, interpolate_pos_encoding: bool | None = False
) -> torch.Tensor:
    return model.pre_layrnorm(model.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding))


def _num_tokens(model: torch.nn.Module) -> int:
    config = model.config
    return (config.image_size // config.patch_size) ** 2 + 1


FAMILY = EncoderFamily(
    name="CLIP",
    model_types=("clip_vision_model",),
    class_name="CLIPVisionModel",
    summary="``cls_attention``, CLS always kept",
    keep_cls=True,
    layers=_layers,
    query_key=_query_key,
    embed=_embed,
    run_layer=run_layer_without_mask,
    attention_input=layer_norm1_input,
    num_tokens=_num_tokens,
)
