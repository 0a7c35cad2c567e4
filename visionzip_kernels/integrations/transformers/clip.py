"""CLIP vision encoders (``CLIPVisionModel``; also the vision tower of LLaVA-1.5).

CLIP has a CLS token at index 0: the scores are the CLS row of layer L's attention
(``cls_attention``) and the CLS token is always kept (``keep_cls=True``). In transformers 5.23
``CLIPVisionModel`` is flat: ``embeddings -> pre_layrnorm -> encoder.layers[i] -> post_layernorm``
(the last on the pooled CLS only). ``hidden_states[0]`` is the pre-layer-norm embedding output, so
``hidden_states[i + 1]`` (``hidden_states[-2]`` for ``layer=-2``) is ``encoder.layers[i]``'s output,
which is what the patch captures; ``attentions[i]`` is that same layer's attention map.
Each ``CLIPEncoderLayer`` has ``self_attn.q_proj`` / ``self_attn.k_proj`` (``nn.Linear``, bias) whose
outputs are q and k before scaling (the scale, d^-0.5, is passed to the attention function).
"""

from __future__ import annotations

from .common import EncoderFamily, separate_projections


def _model_class():
    from transformers import CLIPVisionModel

    return CLIPVisionModel


FAMILY = EncoderFamily(
    name="CLIP",
    model_types=("clip_vision_model",),
    model_class=_model_class,
    keep_cls=True,
    layers=lambda model: model.encoder.layers,
    query_key=lambda layer: separate_projections(layer.self_attn),
)
