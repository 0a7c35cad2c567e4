"""LLaVA-NeXT (anyres) through ``visionzip_kernels.apply`` against upstream VisionZip's way.

Upstream's way (visionzip/clip_encoder.py + llava_arch.py): every crop of every image through the
eager tower with ``output_attentions`` / ``output_hidden_states``, the selection and merge of
``upstream_select_merge`` on ``attentions[-2]`` / ``hidden_states[-2]``, the projector, then
``restore_image_features_sorted``: a zero [crops, s*s, C] buffer, a scattered keep mask, the kept
rows written through the mask, view/permute onto the stitched grid, the grid read through the
mask, then the crops' CLS rows and contextual rows. Here written with the sizes derived from the
config (upstream hard-codes 576 / 24x24), and without upstream's K = 0 slicing bug.

The model is a tiny random LLaVA-NeXT built from config (CLIP 56 px / 14: 4x4 patches + CLS per
crop, C = 64; Llama C = 48) with grid pinpoints giving a 1x2 and a 2x2 grid.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_integrations import TOKEN_ATOL, TOKEN_RTOL, _build, _peak_qk_, oracle, stock_input_ids, upstream_way  # noqa: E402

import visionzip_kernels as vz  # noqa: E402
from visionzip_kernels.integrations import transformers as vzt  # noqa: E402

IMAGE_TOKEN = 99
CROP_PX, PATCH = 56, 14
SIDE = CROP_PX // PATCH  # 4: a crop is 4x4 patches + CLS = 17 tokens
PINPOINTS = [[56, 112], [112, 56], [112, 112]]
IMAGE_SIZES = torch.tensor([[40, 110], [90, 110]])  # (H, W): a 1x2 grid (3 crops), a 2x2 grid (5 crops)
CROPS = [3, 5]
DOMINANT, CONTEXTUAL = 6, 3
TEXT_HIDDEN = 48


def tiny_llava_next(seed=1):
    vision = transformers.CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=CROP_PX,
        patch_size=PATCH, hidden_act="quick_gelu",
    )
    text = transformers.LlamaConfig(
        hidden_size=TEXT_HIDDEN, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )
    config = transformers.LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    config.vision_config._attn_implementation = "sdpa"
    config.text_config._attn_implementation = "sdpa"
    model = _build(transformers.LlavaNextForConditionalGeneration, config, seed)
    _peak_qk_(model.model.vision_tower, 64, seed)
    return model


def grid_shape(image_size, pinpoints=PINPOINTS, crop_px: int = CROP_PX):
    """(rows, cols) of an image's crop grid, from transformers' own anyres geometry (LLaVA-NeXT's, and
    LLaVA-OneVision's with its own ``pinpoints`` and ``crop_px``)."""
    from transformers.image_processing_utils import select_best_resolution

    height, width = select_best_resolution(image_size.tolist(), pinpoints)
    return height // crop_px, width // crop_px


def upstream_restore(features, keep, image_size, dominant):
    """restore_image_features_sorted's sequence for one image: [crops, D+K, C] projected tokens
    (base first) and keep [crops, D] -> the LLM rows."""
    rows, cols = grid_shape(image_size)
    base, crops, crop_keep = features[0], features[1:], keep[1:]
    n, _, C = crops.shape
    assert n == rows * cols
    patch_idx = crop_keep.sort(dim=1).values[:, 1:] - 1
    restored = torch.zeros(n, SIDE * SIDE, C, dtype=crops.dtype)
    mask = torch.zeros(n, SIDE * SIDE, dtype=torch.bool)
    mask.scatter_(1, patch_idx, True)
    restored[mask] = crops[:, 1:dominant].reshape(-1, C)
    grid = restored.view(rows, cols, SIDE, SIDE, C).permute(0, 2, 1, 3, 4).reshape(rows * SIDE, cols * SIDE, C)
    grid_mask = mask.view(rows, cols, SIDE, SIDE).permute(0, 2, 1, 3).reshape(rows * SIDE, cols * SIDE)
    contextual = crops[:, dominant:].reshape(-1, C)
    return torch.cat([base, grid[grid_mask], crops[:, 0], contextual])


@pytest.fixture(scope="module")
def next_case():
    model = tiny_llava_next()
    g = torch.Generator().manual_seed(3)
    pixel_values = torch.randn(2, max(CROPS), 3, CROP_PX, CROP_PX, generator=g)
    pixel_values[0, CROPS[0]:] = 0  # the processor's padding crops
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixel_values, image_sizes=IMAGE_SIZES)
    stock = [f.shape[0] for f in features.pooler_output]
    ids, mask = stock_input_ids([[1, 5, "<image>", 7, 8], [1, "<image>", 6]], stock, IMAGE_TOKEN)
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values, "image_sizes": IMAGE_SIZES}
    return model, inputs, stock


def expected_rows(model, pixel_values, dominant, contextual):
    """The oracle's LLM rows per image: upstream's selection on every real crop, the projector,
    upstream's restore. Also returns the oracle's keep [crops, D]."""
    crops = torch.cat([pixels[:n] for pixels, n in zip(pixel_values, CROPS)])
    tower = model.model.vision_tower
    out, metrics = upstream_way(tower, lambda m: m.encoder.layers, lambda layer: layer.self_attn, crops)
    tokens, keep = oracle(out, metrics, -2, dominant, contextual, keep_cls=True)
    with torch.no_grad():
        projected = model.model.multi_modal_projector(tokens)
    rows = [upstream_restore(f, k, size, dominant)
            for f, k, size in zip(projected.split(CROPS), keep.split(CROPS), IMAGE_SIZES)]
    return rows, keep


def test_apply_matches_upstream_layout_and_the_llm_sees_it(next_case):
    model, inputs, stock = next_case
    rows, keep = expected_rows(model, inputs["pixel_values"], DOMINANT, CONTEXTUAL)
    seen = {}

    def grab(module, args, kwargs):
        seen["inputs_embeds"] = kwargs["inputs_embeds"]

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with vz.patched(model, dominant=DOMINANT, contextual=CONTEXTUAL):
            with torch.no_grad():
                features = model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=IMAGE_SIZES)
                shrunk = vzt.shrink_inputs(model, inputs)
                model(**shrunk)
    finally:
        handle.remove()
    assert torch.equal(features.keep, keep)
    per_crop = DOMINANT + CONTEXTUAL
    assert [f.shape for f in features.pooler_output] == [(n * per_crop, TEXT_HIDDEN) for n in CROPS]
    for i, (ours, expected) in enumerate(zip(features.pooler_output, rows)):
        torch.testing.assert_close(ours, expected, atol=TOKEN_ATOL, rtol=TOKEN_RTOL,
                                   msg=lambda m, i=i: f"image {i}: {m}")

    is_image = shrunk["input_ids"] == IMAGE_TOKEN
    assert is_image.sum(dim=1).tolist() == [n * per_crop for n in CROPS]
    torch.testing.assert_close(seen["inputs_embeds"][is_image], torch.cat(rows), atol=TOKEN_ATOL, rtol=TOKEN_RTOL)


def test_layout_with_no_contextual_tokens(next_case):
    """K = 0: upstream's ``image_feature[:, -0:]`` would append every token again; ours appends none."""
    model, inputs, _ = next_case
    rows, keep = expected_rows(model, inputs["pixel_values"], 5, 0)
    with vz.patched(model, dominant=5, contextual=0), torch.no_grad():
        features = model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=IMAGE_SIZES)
    assert torch.equal(features.keep, keep)
    for ours, expected in zip(features.pooler_output, rows):
        torch.testing.assert_close(ours, expected, atol=TOKEN_ATOL, rtol=TOKEN_RTOL)


def test_generate_with_shrunk_placeholders(next_case):
    """Stock-processor-style inputs -> shrink_inputs -> generate(): each row shorter by exactly the
    removed placeholders; the KV-cache path equals a full recompute; the first token is the argmax."""
    model, inputs, stock = next_case
    with torch.no_grad():
        model(**inputs)  # the stock model accepts the stock counts (a check on the test's inputs)
    with vz.patched(model, dominant=DOMINANT, contextual=CONTEXTUAL):
        shrunk = vzt.shrink_inputs(model, inputs)
        ours = [n * (DOMINANT + CONTEXTUAL) for n in CROPS]
        removed = [s - o for s, o in zip(stock, ours)]
        assert (inputs["attention_mask"].sum(dim=1) - shrunk["attention_mask"].sum(dim=1)).tolist() == removed
        assert (shrunk["input_ids"] == IMAGE_TOKEN).sum(dim=1).tolist() == ours
        assert shrunk["input_ids"].shape[1] == int(shrunk["attention_mask"].sum(dim=1).max())  # re-padded
        assert_generate_equals_recompute(model, shrunk)


def assert_generate_equals_recompute(model, shrunk, new_tokens: int = 4) -> None:
    """generate() on a shrunk prompt: the prompt kept, the KV-cache path equal to a full recompute, the first
    token the argmax of the prompt's forward."""
    width = shrunk["input_ids"].shape[1]
    with torch.no_grad():
        cached = model.generate(**shrunk, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        full = model.generate(**shrunk, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, use_cache=False)
        logits = model(**shrunk).logits
    assert cached.shape == (shrunk["input_ids"].shape[0], width + new_tokens)
    assert torch.equal(cached[:, :width], shrunk["input_ids"])
    assert torch.equal(cached, full)
    assert torch.equal(cached[:, width], logits[:, -1].argmax(dim=-1))


def test_stock_inputs_raise_a_clear_error(next_case):
    model, inputs, _ = next_case
    with vz.patched(model, dominant=DOMINANT, contextual=CONTEXTUAL):
        with pytest.raises(ValueError, match="shrink_inputs"):
            model(**inputs)


def test_remove_restores_the_model_bit_for_bit(next_case):
    model, inputs, _ = next_case
    with torch.no_grad():
        before = model(**inputs).logits
        before_features = model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=IMAGE_SIZES)
        vz.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL)
        vz.remove(model)
        after = model(**inputs).logits
        after_features = model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=IMAGE_SIZES)
    assert torch.equal(before, after)
    assert all(torch.equal(a, b) for a, b in zip(before_features.pooler_output, after_features.pooler_output))
    assert "get_image_features" not in model.model.__dict__
    assert "forward" not in model.model.vision_tower.__dict__
    assert not model.model._forward_pre_hooks


def test_budget_larger_than_a_crop_names_the_crop(next_case):
    """Upstream's issue #30 (dominant=540, contextual=100 on 577-token crops) at toy size."""
    model, _, _ = next_case
    with pytest.raises(ValueError, match=r"exceeds the 17 tokens of one 56x56 crop \(4x4 patches \+ CLS\)"):
        vz.apply(model, dominant=15, contextual=3)
    assert vzt.get_patch(model) is None
    vz.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL)
    try:
        with pytest.raises(ValueError, match="56x56 crop"):
            vz.apply(model, dominant=17, contextual=1)
        assert vzt.get_patch(model).settings == {"dominant": DOMINANT, "contextual": CONTEXTUAL, "layer": -2}
    finally:
        vz.remove(model)
    vz.apply(model, dominant=16, contextual=1)  # exactly one crop's 17 tokens is allowed
    vz.remove(model)


def test_upstream_issue_30_budget_at_real_geometry():
    """dominant=540, contextual=100 on LLaVA-NeXT's 336 px CLIP crops (577 tokens): a clear error
    at apply() (a narrow random model: only the geometry matters)."""
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=336, patch_size=14)
    text = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                    vocab_size=64)
    # A user's subclass, defined outside transformers: the geometry helpers are found through its bases.
    user_class = type("UserLlavaNextModel", (transformers.LlavaNextModel,), {"__module__": __name__})
    model = user_class(transformers.LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=63))
    message = r"= 640 exceeds the 577 tokens of one 336x336 crop \(24x24 patches \+ CLS\)"
    with pytest.raises(ValueError, match=message):
        vz.apply(model, dominant=540, contextual=100)
    vz.apply(model, dominant=54, contextual=10)  # a LlavaNextModel (no LM head) is supported as well
    assert isinstance(vzt.get_patch(model), vzt.LlavaNextPatch)
    assert vzt.get_patch(model).tokens_for_image(torch.tensor([672, 672])) == 320
    assert vzt.get_patch(model).stock_placeholders(torch.tensor([[672, 672]])) == [2928]
    vz.remove(model)


def test_shrink_image_tokens_per_image_counts():
    ids = torch.tensor([[7, 99, 99, 99, 8, 99, 99], [99, 99, 99, 99, 5, 6, 0]])
    out = vzt.shrink_image_tokens(ids, [2, 1, 3], image_token_id=99, placeholders_per_image=[3, 2, 4],
                                  attention_mask=torch.tensor([[1] * 7, [1] * 6 + [0]]), padding_side="right")
    assert out["input_ids"].tolist() == [[7, 99, 99, 8, 99], [99, 99, 99, 5, 6]]
    with pytest.raises(ValueError, match="run over the end of a row"):
        vzt.shrink_image_tokens(ids, [1, 1], image_token_id=99, placeholders_per_image=[4, 5])
    with pytest.raises(ValueError, match="add up to 8"):
        vzt.shrink_image_tokens(ids, [1, 1], image_token_id=99, placeholders_per_image=[4, 4])
    with pytest.raises(ValueError, match="image 1 keeps 3 of its 2"):
        vzt.shrink_image_tokens(ids, [1, 3, 1], image_token_id=99, placeholders_per_image=[3, 2, 4])


def test_deepcopy_and_pickle_of_a_patched_model(next_case):
    """A copy (deepcopy, or a pickle round trip as torch.save does) carries its own patch: the same
    features as the original, and remove() on the copy leaves the original patched."""
    import copy
    import pickle

    _, inputs, _ = next_case
    # A fresh model: one that has run a forward holds transformers' own output-capturing hooks
    # (local functions, which pickle refuses whether or not the model is patched).
    model = vz.apply(tiny_llava_next(), dominant=DOMINANT, contextual=CONTEXTUAL)
    try:
        with torch.no_grad():
            expected = model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=IMAGE_SIZES)
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert isinstance(vzt.get_patch(clone), vzt.LlavaNextPatch)
            with torch.no_grad():
                got = clone.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=IMAGE_SIZES)
            assert all(torch.equal(a, b) for a, b in zip(expected.pooler_output, got.pooler_output))
            vz.remove(clone)
            assert "get_image_features" not in clone.model.__dict__
        assert isinstance(vzt.get_patch(model), vzt.LlavaNextPatch)
    finally:
        vz.remove(model)
