"""SigLIP vision encoders (``SiglipVisionModel``, e.g. SigLIP-so400m/14-384, 729 tokens).

SigLIP has no CLS token: the scores are the attention each token receives, averaged over heads and
queries (``attention_received``, computed flash-style without the N x N map), and the D dominant
tokens are the D highest of all N (``keep_cls=False``). Layout as CLIP's (``embeddings ->
encoder.layers[i] -> post_layernorm -> head``) except that the post layer norm applies to every
token and an attention-pooling head follows; neither runs once the encoder stops after layer L, and
the compressed tokens are layer L's raw output, i.e. ``hidden_states[i + 1]``.
"""

from __future__ import annotations

from .common import EncoderFamily, separate_projections


def _model_class():
    from transformers import SiglipVisionModel

    return SiglipVisionModel


FAMILY = EncoderFamily(
    name="SigLIP",
    model_types=("siglip_vision_model",),
    model_class=_model_class,
    keep_cls=False,
    layers=lambda model: model.encoder.layers,
    query_key=lambda layer: separate_projections(layer.self_attn),
)
