"""The transformers integration (visionzip_kernels.integrations) against upstream's way of doing it.

Upstream's way: eager attention, ``output_attentions=True, output_hidden_states=True``, then
``attentions[L]``, ``hidden_states[L]`` (L = -2) and the head-mean keys of layer L (captured here by
the test's own hook on ``k_proj``) go through the oracle ``upstream_select_merge`` (tests/helpers.py,
upstream's op sequence on the full attention map). Our way: the same weights on SDPA, patched by
``visionzip_kernels.apply`` (layers 0..L only, q/k from layer L's projections, our ops). ``keep`` must be identical
and the tokens equal up to SDPA-vs-eager rounding.

Random-init attention is nearly uniform (near-ties everywhere), so every model here gets its
``q_proj`` / ``k_proj`` re-initialised with a larger std, making attention peaked like a trained
encoder's; each comparison first asserts that the oracle's top-k boundary and contextual assignment
have no near-tie, so an agreement is meaningful and a disagreement is a bug.
"""

from __future__ import annotations

import copy
import itertools
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import visionzip_kernels as vz  # noqa: E402
from visionzip_kernels.integrations import transformers as vzt  # noqa: E402

from helpers import topk_is_separated, upstream_select_merge  # noqa: E402

TOKEN_ATOL = 1e-4  # SDPA vs eager over a few layers differ by ~1e-6 on values of magnitude ~5
TOKEN_RTOL = 1e-4
# Near-tie thresholds. SDPA vs eager changes layer L's scores by ~1e-6 relative and the unit merge
# metric by ~2e-7 (measured at CLIP-L geometry, layer -2 of 3); ties closer than these could
# legitimately go either way, anything wider must be decided identically.
TOPK_REL_GAP = 1e-4
ASSIGN_MARGIN = 2e-6


# ------------------------------------------------------------------------------------------------
# Model builders (random init, peaked attention)


def _peak_qk_(model, hidden_size: int, seed: int = 0, logit_std: float = 2.5) -> None:
    """Re-initialise every layer's q/k projections (found through the integration's registry) with
    N(0, s), biases zero, where s makes the attention logits' std about ``logit_std``
    (s = sqrt(logit_std / C) for layer-normed inputs)."""
    family = vzt.encoder_family(model)
    std = (logit_std / hidden_size) ** 0.5
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in family.layers(model):
            query_key = family.query_key(layer)
            for proj in (query_key.q_proj, query_key.k_proj):
                proj.weight.copy_(torch.randn(proj.weight.shape, generator=g) * std)
                if proj.bias is not None:
                    proj.bias.zero_()


def _build(cls, config, seed: int = 0):
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return model.eval()


def clip_tower(num_layers=3, hidden=1024, heads=16, image=336, patch=14, intermediate=4096, seed=0):
    """CLIP ViT-L/14-336 geometry by default (N = 577, C = 1024, 16 heads), fewer layers."""
    config = transformers.CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=num_layers, num_attention_heads=heads,
        image_size=image, patch_size=patch, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )
    model = _build(transformers.CLIPVisionModel, config, seed)
    _peak_qk_(model, hidden, seed)
    return model


def siglip_tower(num_layers=3, seed=0):
    """SigLIP-so400m/14-384 geometry (N = 729, C = 1152, 16 heads), fewer layers."""
    config = transformers.SiglipVisionConfig(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=num_layers, num_attention_heads=16,
        image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
    )
    model = _build(transformers.SiglipVisionModel, config, seed)
    _peak_qk_(model, 1152, seed)
    return model


def dinov2_model(num_layers=3, seed=0):
    """DINOv2-S/14 geometry (C = 384, 6 heads, layer scale 1.0 -> here 0.5 so it matters)."""
    config = transformers.Dinov2Config(
        hidden_size=384, num_attention_heads=6, num_hidden_layers=num_layers, mlp_ratio=4, image_size=518,
        patch_size=14, layerscale_value=0.5,
    )
    model = _build(transformers.Dinov2Model, config, seed)
    _peak_qk_(model, 384, seed)
    return model


def tiny_llava(seed=0, image_token_id=99, vision_layers=3, text_layers=2):
    """LLaVA-1.5 layout at toy size: CLIP tower 112 px / 14 (65 tokens, C = 64), Llama LM (C = 48)."""
    vision = transformers.CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=vision_layers, num_attention_heads=4, image_size=112,
        patch_size=14, hidden_act="quick_gelu",
    )
    text = transformers.LlamaConfig(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    config.vision_config._attn_implementation = "sdpa"
    config.text_config._attn_implementation = "sdpa"
    model = _build(transformers.LlavaForConditionalGeneration, config, seed)
    _peak_qk_(model.model.vision_tower, 64, seed)
    return model


def eager_copy(model):
    other = copy.deepcopy(model)
    other.set_attn_implementation("eager")
    return other


def pixels(B, size, seed=0):
    return torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# The upstream way


def upstream_way(model, layers_of, attention, x, **forward_kwargs):
    """Upstream's way on an eager copy of ``model``: every attention map and hidden state, plus every
    layer's head-mean keys through the test's own hooks. Returns (output, metric per layer)."""
    eager_model = eager_copy(model)
    layers = layers_of(eager_model)
    metrics = {}
    handles = []
    for i, layer in enumerate(layers):
        attn = attention(layer)
        # The test's own look-up, independent of the integration's registry: transformers 5.17's
        # DINOv2 keeps the key projection one level down (attention.attention.key).
        k_proj = attn.k_proj if hasattr(attn, "k_proj") else attn.attention.key
        head_dim = attn.head_dim if hasattr(attn, "head_dim") else attn.attention.attention_head_size
        heads = k_proj.out_features // head_dim

        def hook(module, args, out, i=i, heads=heads):
            B, N, _ = out.shape
            metrics[i] = out.view(B, N, heads, -1).mean(dim=2)

        handles.append(k_proj.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = eager_model(x, output_attentions=True, output_hidden_states=True, **forward_kwargs)
    finally:
        for h in handles:
            h.remove()
    assert len(out.hidden_states) == len(layers) + 1 and len(out.attentions) == len(layers)
    return out, [metrics[i] for i in range(len(layers))]


def oracle(out, metrics, layer, dominant, contextual, keep_cls):
    """Upstream's selection and merge on attentions[layer] / hidden_states[layer] (negative layer,
    as upstream indexes) with the head-mean keys of that layer; asserts there is no near-tie."""
    assert layer < 0
    attn = out.attentions[layer]
    hidden = out.hidden_states[layer]
    metric = metrics[layer]
    scores = attn[:, :, 0].mean(dim=1) if keep_cls else attn.mean(dim=2).mean(dim=1)
    assert topk_is_separated(scores, dominant, keep_cls, rel_gap=TOPK_REL_GAP), (
        "precondition: near-tie at the top-k boundary"
    )
    tokens, keep = upstream_select_merge(attn, hidden, metric, dominant, contextual, keep_cls)
    margin = assignment_margin(metric, keep, contextual)
    assert margin > ASSIGN_MARGIN, f"precondition: near-tie in the contextual assignment ({margin:.2g})"
    return tokens, keep


def assignment_margin(metric: torch.Tensor, keep: torch.Tensor, contextual: int) -> float:
    """The smallest gap, over non-target tokens, between the best and second-best target cosine."""
    if contextual < 2:
        return float("inf")
    B, N, d = metric.shape
    kept = torch.zeros(B, N, dtype=torch.bool).scatter_(1, keep, True)
    rest = torch.argsort(kept.to(torch.int8), dim=1, stable=True)[:, : N - keep.shape[1]]
    unit = torch.nn.functional.normalize(metric.double().gather(1, rest[..., None].expand(-1, -1, d)), dim=-1)
    step = max(1, rest.shape[1] // contextual)
    targets = torch.arange(contextual) * step
    sims = unit @ unit[:, targets].transpose(1, 2)
    top2 = sims.topk(2, dim=-1).values
    gap = top2[..., 0] - top2[..., 1]
    members = torch.ones(rest.shape[1], dtype=torch.bool)
    members[targets] = False
    return gap[:, members].min().item()


def top_mass(out, layer, fraction=0.1):
    """Share of the CLS attention (head mean) taken by the top ``fraction`` of the patches."""
    cls = out.attentions[layer][:, :, 0, 1:].mean(dim=1)
    k = max(1, int(fraction * cls.shape[1]))
    return (cls.topk(k, dim=1).values.sum(dim=1) / cls.sum(dim=1)).min().item()


def assert_tokens_close(ours, expected, name):
    assert ours.shape == expected.shape, f"{name}: {tuple(ours.shape)} vs {tuple(expected.shape)}"
    torch.testing.assert_close(ours, expected, atol=TOKEN_ATOL, rtol=TOKEN_RTOL, msg=lambda m: f"{name}: {m}")


def ours(model, x, dominant, contextual, layer, **forward_kwargs):
    vz.apply(model, dominant=dominant, contextual=contextual, layer=layer)
    try:
        with torch.no_grad():
            out = model(x, **forward_kwargs)
    finally:
        vz.remove(model)
    assert isinstance(out, vzt.VisionZipOutput)
    return out.last_hidden_state, out.keep


# ------------------------------------------------------------------------------------------------
# Fixtures: one model per family, and the upstream way run once on it


@pytest.fixture(scope="module")
def clip_case():
    model = clip_tower(num_layers=3)
    x = pixels(2, 336)
    out, metrics = upstream_way(model, lambda m: m.encoder.layers, lambda layer: layer.self_attn, x)
    return model, x, out, metrics


@pytest.fixture(scope="module")
def tiny_clip():
    """A small CLIP tower (N = 17, C = 64, 4 layers) for the behaviour tests."""
    return clip_tower(num_layers=4, hidden=64, heads=4, image=56, patch=14, intermediate=128, seed=1)


# ------------------------------------------------------------------------------------------------
# CLIP


@pytest.mark.parametrize("dominant,contextual", [(54, 10), (108, 20), (162, 30), (64, 0)])
def test_clip_matches_upstream(clip_case, dominant, contextual):
    """CLIP-L/336 geometry: ours (SDPA, hooks, fused ops, stops after -2) == upstream's way."""
    model, x, out, metrics = clip_case
    assert top_mass(out, -2) > 0.3, "precondition: attention is not peaked like a trained CLIP's"
    expected_tokens, expected_keep = oracle(out, metrics, -2, dominant, contextual, keep_cls=True)
    tokens, keep = ours(model, x, dominant, contextual, layer=-2)
    assert tokens.shape == (2, dominant + contextual, 1024) and keep.shape == (2, dominant)
    assert keep.dtype == torch.int64 and bool((keep[:, 0] == 0).all())
    assert torch.equal(keep, expected_keep)
    assert_tokens_close(tokens, expected_tokens, f"CLIP {dominant}+{contextual}")


@pytest.mark.parametrize("layer", [-1, -3, 0, 1, 2])
def test_clip_layer_index_matches_hidden_states(clip_case, layer):
    """``layer`` indexes the layer list: its output is hidden_states[layer] for negative layer and
    hidden_states[layer + 1] for layer >= 0; its attention is attentions[layer]."""
    model, x, out, metrics = clip_case
    n = len(metrics)
    negative = layer - n if layer >= 0 else layer
    expected_tokens, expected_keep = oracle(out, metrics, negative, 54, 10, keep_cls=True)
    tokens, keep = ours(model, x, 54, 10, layer=layer)
    assert torch.equal(keep, expected_keep)
    assert_tokens_close(tokens, expected_tokens, f"CLIP layer {layer}")


def test_clip_encoder_stays_on_sdpa_and_stops_after_layer(clip_case, monkeypatch):
    """SDPA runs in layers 0..L only; layer L+1, the last layer and post_layernorm never run."""
    model, x, _, _ = clip_case
    calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(args[0].shape)
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    fired = []
    late = [model.encoder.layers[-1].register_forward_pre_hook(lambda *a: fired.append("last layer")),
            model.post_layernorm.register_forward_pre_hook(lambda *a: fired.append("post_layernorm"))]
    try:
        with vz.patched(model, dominant=54, contextual=10, layer=-2):
            assert model.config._attn_implementation == "sdpa"
            with torch.no_grad():
                out = model(x)
        assert out.last_hidden_state.shape == (2, 64, 1024)
        assert fired == []
        assert len(calls) == 2  # layers 0 and 1 of 3
    finally:
        for h in late:
            h.remove()


# ------------------------------------------------------------------------------------------------
# SigLIP and DINOv2


def test_siglip_matches_full_attention_oracle():
    """SigLIP-so400m geometry (no CLS): attention_received, keep_cls=False == the full-map oracle."""
    model = siglip_tower(num_layers=3)
    x = pixels(1, 384, seed=3)
    out, metrics = upstream_way(model, lambda m: m.encoder.layers, lambda layer: layer.self_attn, x)
    expected_tokens, expected_keep = oracle(out, metrics, -2, 54, 10, keep_cls=False)
    tokens, keep = ours(model, x, 54, 10, layer=-2)
    assert tokens.shape == (1, 64, 1152)
    assert torch.equal(keep, expected_keep)
    assert_tokens_close(tokens, expected_tokens, "SigLIP")
    # Layer L's raw output: the post layer norm (applied to every token by SiglipVisionModel) is not.
    assert_tokens_close(tokens[:, :54], out.hidden_states[-2].gather(1, keep[..., None].expand(-1, -1, 1152)),
                        "SigLIP dominant rows are layer L's raw states")


@pytest.mark.parametrize("size", [224, 280])
def test_dinov2_matches_upstream(size):
    """DINOv2-S geometry (CLS, layer scale): same as upstream; N follows the input size
    (interpolated position embeddings: 257 tokens at 224 px, 401 at 280 px)."""
    model = dinov2_model(num_layers=3)
    x = pixels(2, size, seed=4)
    out, metrics = upstream_way(model, lambda m: m.encoder.layer, lambda layer: layer.attention, x)
    assert out.hidden_states[-2].shape[1] == 1 + (size // 14) ** 2
    assert top_mass(out, -2) > 0.3, "precondition: attention is not peaked"
    expected_tokens, expected_keep = oracle(out, metrics, -2, 54, 10, keep_cls=True)
    tokens, keep = ours(model, x, 54, 10, layer=-2)
    assert torch.equal(keep, expected_keep)
    assert_tokens_close(tokens, expected_tokens, f"DINOv2 {size}px")


# ------------------------------------------------------------------------------------------------
# LLaVA


def stock_input_ids(rows, placeholders, image_token_id, pad_token_id=0):
    """input_ids as the stock processor writes them: ``rows`` is a list of token lists where the
    string "<image>" stands for one image; ``placeholders`` is its token count, one int for every
    image or a list with the count of each image in row order; left padded."""
    counts = iter(placeholders) if isinstance(placeholders, (list, tuple)) else itertools.repeat(placeholders)
    seqs = [[t for item in row for t in ([image_token_id] * next(counts) if item == "<image>" else [item])]
            for row in rows]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, width - len(s):] = torch.tensor(s)
        mask[b, width - len(s):] = 1
    return ids, mask


@pytest.fixture(scope="module")
def llava_case():
    model = tiny_llava()
    stock = vzt.llava.stock_placeholders_per_image(model.model, has_cls=True)
    assert stock == 64  # (112 / 14)^2 patches, CLS dropped by the "default" strategy
    # Row 0: one image; row 1: two adjacent images (3 images in the batch, in row order).
    ids, mask = stock_input_ids([[1, 5, "<image>", 7, 8], [1, "<image>", "<image>", 6]], stock, 99)
    x = pixels(3, 112, seed=5)
    return model, ids, mask, x


def test_llava_llm_sees_oracle_tokens(llava_case):
    """The LLM's inputs_embeds hold, at the placeholder positions, exactly the projector applied
    to the oracle's tokens (upstream way on the tower: eager, attentions[-2], hidden_states[-2])."""
    model, ids, mask, x = llava_case
    dominant, contextual = 8, 4
    tower = model.model.vision_tower
    out, metrics = upstream_way(tower, lambda m: m.encoder.layers, lambda layer: layer.self_attn, x)
    expected_tokens, expected_keep = oracle(out, metrics, -2, dominant, contextual, keep_cls=True)
    with torch.no_grad():
        expected_rows = model.model.multi_modal_projector(expected_tokens).reshape(-1, 48)

    seen = {}

    def grab(module, args, kwargs):
        seen["inputs_embeds"] = kwargs["inputs_embeds"]

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with vz.patched(model, dominant=dominant, contextual=contextual):
            inputs = vzt.shrink_inputs(model, {"input_ids": ids, "attention_mask": mask, "pixel_values": x})
            with torch.no_grad():
                features = model.get_image_features(pixel_values=x)
                model(**inputs)
    finally:
        handle.remove()
    assert torch.equal(features.keep, expected_keep)
    assert len(features.pooler_output) == 3 and features.pooler_output[0].shape == (12, 48)
    torch.testing.assert_close(torch.cat(features.pooler_output), expected_rows, atol=TOKEN_ATOL, rtol=TOKEN_RTOL)

    embeds = seen["inputs_embeds"]
    is_image = inputs["input_ids"] == 99
    assert is_image.sum(dim=1).tolist() == [12, 24]
    torch.testing.assert_close(embeds[is_image], expected_rows, atol=TOKEN_ATOL, rtol=TOKEN_RTOL)
    with torch.no_grad():
        text = model.get_input_embeddings()(inputs["input_ids"])
    assert torch.equal(embeds[~is_image], text[~is_image])


def test_llava_generate_end_to_end(llava_case):
    """Stock-processor inputs -> shrink_inputs -> generate(); the KV-cache path agrees with a full
    recompute every step (masks and positions consistent), and training labels give a finite loss."""
    model, ids, mask, x = llava_case
    with vz.patched(model, dominant=8, contextual=4):
        inputs = vzt.shrink_inputs(model, {"input_ids": ids, "attention_mask": mask, "pixel_values": x})
        width = inputs["input_ids"].shape[1]
        assert width == ids.shape[1] - 2 * (64 - 12)  # the longest row had two images
        # Row 0 (one image) keeps its padding; rows now differ by 12 image tokens, padded on the left.
        assert (
            inputs["attention_mask"][0, : width - 16].eq(0).all()
            and inputs["attention_mask"][0, width - 16 :].eq(1).all()
        )
        assert inputs["attention_mask"].sum(dim=1).tolist() == [4 + 12, 2 + 24]
        with torch.no_grad():
            cached = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
            full = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False)
            logits = model(**inputs).logits
        assert cached.shape == (2, width + 6)
        assert torch.equal(cached[:, :width], inputs["input_ids"])
        assert torch.equal(cached, full)
        assert torch.equal(cached[:, width], logits[:, -1].argmax(dim=-1))

        labels = (
            inputs["input_ids"]
            .masked_fill(inputs["input_ids"] == 99, -100)
            .masked_fill(inputs["attention_mask"] == 0, -100)
        )
        stock_labels = ids.masked_fill(ids == 99, -100).masked_fill(mask == 0, -100)
        shrunk = vzt.shrink_inputs(model, {"input_ids": ids, "attention_mask": mask, "labels": stock_labels})
        assert torch.equal(shrunk["labels"], labels)
        loss = model(**inputs, labels=shrunk["labels"]).loss
        assert torch.isfinite(loss)


def test_llava_stock_inputs_raise_a_clear_error(llava_case):
    model, ids, mask, x = llava_case
    with vz.patched(model, dominant=8, contextual=4):
        with pytest.raises(ValueError, match="shrink_inputs"):
            model(input_ids=ids, attention_mask=mask, pixel_values=x)


def test_llava_remove_restores_logits_exactly(llava_case):
    model, ids, mask, x = llava_case
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, pixel_values=x).logits
        before_features = model.get_image_features(pixel_values=x).pooler_output
        vz.apply(model, dominant=8, contextual=4)
        assert model.get_image_features(pixel_values=x).pooler_output[0].shape == (12, 48)
        vz.remove(model)
        after = model(input_ids=ids, attention_mask=mask, pixel_values=x).logits
        after_features = model.get_image_features(pixel_values=x).pooler_output
    assert torch.equal(before, after)
    assert all(torch.equal(a, b) for a, b in zip(before_features, after_features))
    assert "get_image_features" not in model.model.__dict__
    assert "forward" not in model.model.vision_tower.__dict__
    assert not model.model._forward_pre_hooks


# ------------------------------------------------------------------------------------------------
# Behaviour (small CLIP)


def _hook_counts(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


def test_remove_restores_outputs_bit_exactly(tiny_clip):
    model = tiny_clip
    x = pixels(2, 56, seed=6)
    hooks = _hook_counts(model)
    with torch.no_grad():
        before = model(x)
        vz.apply(model, dominant=5, contextual=3, layer=-2)
        patched = model(x)
        vz.remove(model)
        after = model(x)
    assert patched.last_hidden_state.shape == (2, 8, 64) and patched.pooler_output is None
    assert torch.equal(before.last_hidden_state, after.last_hidden_state)
    assert torch.equal(before.pooler_output, after.pooler_output)
    assert _hook_counts(model) == hooks
    assert "forward" not in model.__dict__ and vzt.get_patch(model) is None
    assert vz.remove(model) is model  # removing twice is harmless


def test_context_manager_and_reapply(tiny_clip):
    model = tiny_clip
    x = pixels(1, 56, seed=7)
    with torch.no_grad():
        with vz.patched(model, dominant=4, contextual=2) as m:
            assert m is model and model(x).last_hidden_state.shape == (1, 6, 64)
        assert model(x).last_hidden_state.shape == (1, 17, 64)
        assert vz.apply(model, dominant=6, contextual=1) is model
        vz.apply(model, dominant=3, contextual=3, layer=-1)  # re-applying replaces the settings
        assert vzt.get_patch(model).settings == {"dominant": 3, "contextual": 3, "layer": -1}
        with vz.patched(model, dominant=5, contextual=0):
            assert model(x).last_hidden_state.shape == (1, 5, 64)
        assert model(x).last_hidden_state.shape == (1, 6, 64)  # previous settings back
        vz.remove(model)
        assert model(x).last_hidden_state.shape == (1, 17, 64)
    assert _hook_counts(model) == [(0, 0)] * len(list(model.modules()))


def test_previous_instance_forward_is_set_aside_and_restored(tiny_clip):
    """Libraries such as accelerate set ``forward`` on the instance: the patched forward (which runs
    the submodules itself) takes its place while patched, and ``remove`` puts it back."""
    model = tiny_clip
    calls = []
    original = model.forward

    def wrapped(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    model.forward = wrapped
    try:
        with torch.no_grad():
            with vz.patched(model, dominant=4, contextual=2):
                assert model(pixels(1, 56)).keep.shape == (1, 4)
            assert calls == [] and model.__dict__["forward"] is wrapped
            assert model(pixels(1, 56)).last_hidden_state.shape == (1, 17, 64) and calls == [1]
    finally:
        del model.forward


def test_return_dict_false_and_gradients(tiny_clip):
    model = tiny_clip
    x = pixels(1, 56, seed=8).requires_grad_(True)
    with vz.patched(model, dominant=4, contextual=2):
        tokens, keep = model(x, return_dict=False)
        assert tokens.shape == (1, 6, 64) and keep.shape == (1, 4)
        tokens.sum().backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)


def test_bad_arguments_raise_clear_errors(tiny_clip):
    model = tiny_clip
    with pytest.raises(ValueError, match=r"layer must be in \[-4, 3\]"):
        vz.apply(model, layer=4)
    with pytest.raises(ValueError, match="dominant must be >= 1"):
        vz.apply(model, dominant=0)
    with pytest.raises(ValueError, match="contextual must be >= 0"):
        vz.apply(model, dominant=4, contextual=-1)
    with pytest.raises(TypeError, match="dominant must be an int"):
        vz.apply(model, dominant=4.0)
    assert vzt.get_patch(model) is None and "forward" not in model.__dict__
    with vz.patched(model, dominant=16, contextual=2), pytest.raises(ValueError, match="contextual must be <="):
        model(pixels(1, 56))  # 16 + 2 > N = 17: the op's own check, at run time


def test_unsupported_models_raise_a_clear_error():
    vit = transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=64, image_size=28, patch_size=14))
    with pytest.raises(TypeError, match=r"model_type='vit'.*not supported.*clip_vision_model.*llava"):
        vz.apply(vit)
    clip = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14)))
    with pytest.raises(TypeError, match="vision tower"):
        vz.apply(clip)
    assert vzt.get_patch(clip.vision_model) is None
    with pytest.raises(TypeError, match="not supported"):
        vz.apply(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("call", [vz.apply, vz.remove, vzt.get_patch, lambda m: vzt.shrink_inputs(m, {})])
def test_a_model_that_is_not_a_module_is_named(call):
    """Not ``AttributeError: 'NoneType' object has no attribute '__dict__'``."""
    with pytest.raises(TypeError, match="model must be a transformers model .*got NoneType"):
        call(None)


def test_an_older_transformers_is_named_at_apply(tiny_clip, monkeypatch):
    # The transformers module apply() imports now (the one in sys.modules), whose version it reads.
    installed = sys.modules["transformers"]
    monkeypatch.setattr(installed, "__version__", "5.16.2")
    with pytest.raises(RuntimeError, match=r"transformers 5\.16\.2 is installed.*transformers >= 5\.17\.0"):
        vz.apply(tiny_clip)
    assert vzt.get_patch(tiny_clip) is None and "forward" not in tiny_clip.__dict__
    monkeypatch.setattr(installed, "__version__", vzt.MIN_TRANSFORMERS)
    with vz.patched(tiny_clip):
        assert vzt.get_patch(tiny_clip) is not None


def test_docstrings_list_every_supported_model():
    """The registry is the one list: apply's types, the docstring tables and the package's listing follow it."""
    import visionzip_kernels.integrations as integrations

    assert len(vzt.SUPPORTED_MODEL_TYPES) == len(vzt.FAMILIES) == 12
    for family in vzt.FAMILIES:
        for model_type in family.model_types:
            assert f"``{model_type}``" in vzt.__doc__ and model_type in integrations.__doc__
        for name in getattr(family, "classes", ()) or (family.class_name,):
            assert f"``{name}``" in vzt.__doc__
    args = vzt.apply.__doc__.split("Args:")[1].split("Returns:")[0]
    for name in ("model", "dominant", "contextual", "layer", "tokens", "ratio"):
        assert args.count(f"\n        {name}: ") == 1, name


# ------------------------------------------------------------------------------------------------
# shrink_image_tokens, and the package import


def test_shrink_image_tokens_groups_pads_and_errors():
    I = 9  # noqa: E741  (the placeholder id)
    ids = torch.tensor([[0, 0, 0, 0, 1, I, I, I, 5],
                        [1, I, I, I, I, I, I, 6, 7]])
    mask = (ids != 0).long()
    labels = torch.tensor([[-100] * 8 + [5], [-100] * 7 + [6, 7]])
    out = vzt.shrink_image_tokens(ids, 2, image_token_id=I, placeholders_per_image=3, attention_mask=mask,
                                  labels=labels, pad_token_id=0, extra={"token_type_ids": (ids == I).long()})
    # The old padding of row 0 is dropped; both rows are re-padded (left) to the new width, 7.
    assert out["input_ids"].tolist() == [[0, 0, 0, 1, I, I, 5], [1, I, I, I, I, 6, 7]]
    assert out["attention_mask"].tolist() == [[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]]
    assert out["labels"].tolist() == [[-100] * 6 + [5], [-100] * 5 + [6, 7]]
    assert out["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 0], [0, 1, 1, 1, 1, 0, 0]]
    right = vzt.shrink_image_tokens(ids[1:], 1, image_token_id=I, placeholders_per_image=3, padding_side="right")
    assert right == {"input_ids": right["input_ids"]} and right["input_ids"].tolist() == [[1, I, I, 6, 7]]
    with pytest.raises(ValueError, match="not a multiple"):
        vzt.shrink_image_tokens(ids, 2, image_token_id=I, placeholders_per_image=4)
    with pytest.raises(ValueError, match="tokens_per_image"):
        vzt.shrink_image_tokens(ids, 4, image_token_id=I, placeholders_per_image=3)


def test_import_does_not_import_transformers():
    code = ("import sys, visionzip_kernels as vz; assert 'transformers' not in sys.modules; "
            "assert callable(vz.apply) and callable(vz.remove) and callable(vz.patched); "
            "assert 'transformers' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
