"""SigLIP vision encoders (``SiglipVisionModel``, e.g. SigLIP-so400m/14-384, 729 tokens).

SigLIP has no CLS token: the scores are the attention each token receives, averaged over heads and
queries (``attention_received``, computed flash-style without the N x N map), and the D dominant
tokens are the D highest of all N (``keep_cls=False``). Layout as CLIP's (``embeddings ->
encoder.layers[i] -> post_layernorm -> head``) except that the post layer norm applies to every
token and an attention-pooling head follows; neither runs once the encoder stops after layer L, and
the compressed tokens are layer L's raw output, i.e. ``hidden_states[i + 1]``. The patched forward
runs ``embeddings`` (``hidden_states[0]``), then ``layer(hidden, None)`` for layers 0..L; the
attention's input is ``layer_norm1`` of the layer's input (transformers 5.17: the same).
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
    return model.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)


def _num_tokens(model: torch.nn.Module) -> int:
    config = model.config
    return (config.image_size // config.patch_size) ** 2


FAMILY = EncoderFamily(
    name="SigLIP",
    model_types=("siglip_vision_model",),
    class_name="SiglipVisionModel",
    summary="``attention_received``, no CLS",
    keep_cls=False,
    layers=_layers,
    query_key=_query_key,
    embed=_embed,
    run_layer=run_layer_without_mask,
    attention_input=layer_norm1_input,
    num_tokens=_num_tokens,
)
