"""LLaVA-OneVision (anyres images, videos) through ``visionzip_kernels.apply`` against an upstream-style oracle.

The oracle: every crop or frame through an eager copy of the tower with ``output_attentions`` /
``output_hidden_states``; the attention each token receives from ``attentions[L]`` (L = the
config's ``vision_feature_layer``, -1), upstream's ``upstream_select_merge`` (topk, masked
indexing, one-hot bmm) on ``hidden_states[L]`` and the head-mean keys; the projector; then the
layout written here with masks: an image's grid crops' kept tokens scattered into a zero
[crops, s*s, C] buffer, stitched, read band by band of crop rows through the mask with an
``image_newline`` after each band, then the contextual tokens. Videos: per frame the same selection
(before the 2x2 pooling), or the stock bilinear pooling of the projected tokens, of the scores and
of the keys, then the same selection on the pooled grid (after it).

The model is a tiny random LLaVA-OneVision built from config: SigLIP 98 px / 14 (7x7 = 49 tokens per
crop, no CLS, C = 64; a frame pools to 4x4 = 16), Qwen2 LM (C = 48), grid pinpoints giving a 1x2
and a 2x2 grid.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from test_integrations import _build, _peak_qk_, assignment_margin, oracle, upstream_way  # noqa: E402
from test_llava_next import assert_generate_equals_recompute  # noqa: E402
from test_llava_next import grid_shape as anyres_grid_shape  # noqa: E402

import visionzip_kernels as vz  # noqa: E402
from visionzip_kernels.integrations import transformers as vzt  # noqa: E402
from visionzip_kernels.upstream import upstream_select_merge  # noqa: E402

from helpers import topk_is_separated  # noqa: E402

IMAGE_TOKEN, VIDEO_TOKEN = 97, 98
CROP_PX, PATCH = 98, 14
SIDE = CROP_PX // PATCH  # 7: a crop is 7x7 = 49 tokens
POOLED = math.ceil(SIDE / 2)  # 4: a frame pools to 4x4
PINPOINTS = [[98, 98], [98, 196], [196, 98], [196, 196]]
IMAGE_SIZES = torch.tensor([[60, 150], [150, 150]])  # (H, W): a 1x2 grid (3 crops), a 2x2 grid (5 crops)
CROPS = [3, 5]
DOMINANT, CONTEXTUAL = 6, 3
TEXT_HIDDEN = 48
ATOL = RTOL = 1e-5  # fp32: SDPA (ours) vs eager (the oracle) through a 3-layer tower of width 64


def tiny_onevision(seed=1, vision_feature_layer=-1):
    vision = transformers.SiglipVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=CROP_PX,
        patch_size=PATCH, hidden_act="gelu_pytorch_tanh", vision_use_head=False,
    )
    text = transformers.Qwen2Config(
        hidden_size=TEXT_HIDDEN, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=2048, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )
    config = transformers.LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, video_token_index=VIDEO_TOKEN,
        image_grid_pinpoints=PINPOINTS, vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="full",
    )
    config.vision_config._attn_implementation = "sdpa"
    config.text_config._attn_implementation = "sdpa"
    model = _build(transformers.LlavaOnevisionForConditionalGeneration, config, seed)
    _peak_qk_(model.model.vision_tower, 64, seed)
    return model


def grid_shape(image_size):
    """(rows, cols) of an image's crop grid, from transformers' own anyres geometry."""
    return anyres_grid_shape(image_size, PINPOINTS, CROP_PX)


def prompt_ids(rows, counts):
    """Left-padded input_ids and attention_mask: ``rows`` are token lists in which "<image>" and
    "<video>" stand for one image / video; ``counts[kind]`` lists their placeholder counts in order."""
    token = {"<image>": IMAGE_TOKEN, "<video>": VIDEO_TOKEN}
    left = {kind: iter(values) for kind, values in counts.items()}
    seqs = [[t for item in row for t in ([token[item]] * next(left[item]) if item in token else [item])]
            for row in rows]
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, width - len(s):] = torch.tensor(s)
        mask[b, width - len(s):] = 1
    return ids, mask


# ------------------------------------------------------------------------------------------------
# The oracle


def oracle_select(model, pixels, dominant, contextual):
    """Upstream's way per crop / frame: ([n, D+K, C_text] projected tokens, keep [n, D])."""
    tower = model.model.vision_tower
    out, metrics = upstream_way(tower, lambda m: m.encoder.layers, lambda layer: layer.self_attn, pixels)
    tokens, keep = oracle(out, metrics, -1, dominant, contextual, keep_cls=False)
    with torch.no_grad():
        return model.model.multi_modal_projector(tokens), keep


def oracle_image_rows(features, keep, image_size, newline):
    """One image's LLM rows from its crops' projected tokens (base first) and keep, written with
    masks: base; per band of crop rows its kept grid tokens in raster order and ``newline``; the
    grid crops' contextual tokens."""
    dominant = keep.shape[1]
    if features.shape[0] == 1:
        return torch.cat([features[0], newline[None]])
    rows, cols = grid_shape(image_size)
    base, crops, crop_keep = features[0], features[1:], keep[1:]
    n, _, C = crops.shape
    assert n == rows * cols
    restored = torch.zeros(n, SIDE * SIDE, C)
    mask = torch.zeros(n, SIDE * SIDE, dtype=torch.bool)
    mask.scatter_(1, crop_keep, True)
    restored[mask] = crops[:, :dominant].reshape(-1, C)
    grid = restored.view(rows, cols, SIDE, SIDE, C).permute(0, 2, 1, 3, 4).reshape(rows * SIDE, cols * SIDE, C)
    grid_mask = mask.view(rows, cols, SIDE, SIDE).permute(0, 2, 1, 3).reshape(rows * SIDE, cols * SIDE)
    parts = [base]
    for band in range(rows):
        lines = slice(band * SIDE, (band + 1) * SIDE)
        parts += [grid[lines][grid_mask[lines]], newline[None]]
    parts.append(crops[:, dominant:].reshape(-1, C))
    return torch.cat(parts)


def expected_image_rows(model, pixel_values, crops, image_sizes, dominant=DOMINANT, contextual=CONTEXTUAL):
    """The oracle's LLM rows per image (every real crop selected, projected, laid out) and its keep."""
    real = torch.cat([pixels[:n] for pixels, n in zip(pixel_values, crops)])
    projected, keep = oracle_select(model, real, dominant, contextual)
    newline = model.model.image_newline.detach()
    rows = [oracle_image_rows(f, k, size, newline)
            for f, k, size in zip(projected.split(crops), keep.split(crops), image_sizes)]
    return rows, keep


def bilinear_pool(x):
    """The stock 2x2 pooling of a frame's [n, SIDE*SIDE, C] tokens: bilinear to ceil(SIDE / 2) a side."""
    n, _, C = x.shape
    grid = x.reshape(n, SIDE, SIDE, C).permute(0, 3, 1, 2)
    pooled = F.interpolate(grid, size=(POOLED, POOLED), mode="bilinear", align_corners=False)
    return pooled.permute(0, 2, 3, 1).reshape(n, POOLED * POOLED, C)


def expected_video_rows(model, videos, pooling, dominant=DOMINANT, contextual=CONTEXTUAL):
    """The oracle's rows per video [videos, frames * (D+K) + 1, C_text] and keep [frames, D]."""
    frames = videos.flatten(0, 1)
    if pooling == "before":
        tokens, keep = oracle_select(model, frames, dominant, contextual)
    else:
        tower = model.model.vision_tower
        out, metrics = upstream_way(tower, lambda m: m.encoder.layers, lambda layer: layer.self_attn,
                                    frames)
        with torch.no_grad():
            pooled = bilinear_pool(model.model.multi_modal_projector(out.hidden_states[-1]))
        received = out.attentions[-1].mean(dim=2).mean(dim=1)  # [n, N]: attention each token receives
        scores = bilinear_pool(received[..., None])[..., 0]
        metric = bilinear_pool(metrics[-1])
        assert topk_is_separated(scores, dominant, keep_cls=False), "precondition: near-tie at the top-k boundary"
        # The pooled scores as a one-head, one-query map: upstream's ranking of them is their own order.
        tokens, keep = upstream_select_merge(scores[:, None, None, :], pooled, metric, dominant, contextual,
                                             keep_cls=False)
        assert assignment_margin(metric, keep, contextual) > 2e-6, "precondition: near-tie in the assignment"
    per_video = tokens.reshape(videos.shape[0], -1, tokens.shape[-1])
    newline = model.model.image_newline.detach().expand(videos.shape[0], 1, -1)
    return torch.cat([per_video, newline], dim=1), keep


# transformers 5.23's get_video_features appends the video's newline (its forward takes pre-encoded
# features, mm_encoder_outputs); 5.17's forward appends it after the call.
NEWLINE_IN_VIDEO_FEATURES = "mm_encoder_outputs" in inspect.signature(
    transformers.LlavaOnevisionModel.forward).parameters


def video_rows_of(model, features):
    """[videos, rows, C] of a patched get_video_features, with the newline that 5.17's forward appends."""
    out = features.pooler_output
    if not NEWLINE_IN_VIDEO_FEATURES:
        out = torch.cat([out, model.model.image_newline.detach().expand(out.shape[0], 1, -1)], dim=1)
    return out


def close(actual, expected, name=""):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def model():
    return tiny_onevision()


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(3)
    pixel_values = torch.randn(2, max(CROPS), 3, CROP_PX, CROP_PX, generator=g)
    pixel_values[0, CROPS[0]:] = 0  # the processor's padding crops
    return pixel_values


@pytest.fixture(scope="module")
def video():
    return torch.randn(1, 3, 3, CROP_PX, CROP_PX, generator=torch.Generator().manual_seed(4))


def stock_image_counts(model, pixel_values, image_sizes, batch_num_images=None):
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes,
                                            batch_num_images=batch_num_images)
    return [f.shape[0] for f in features.pooler_output]


def capture_inputs_embeds(model, call):
    """``call()``'s inputs_embeds as the language model receives them."""
    seen = {}

    def grab(module, args, kwargs):
        seen["inputs_embeds"] = kwargs["inputs_embeds"]

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            call()
    finally:
        handle.remove()
    return seen["inputs_embeds"]


# ------------------------------------------------------------------------------------------------
# Images


def test_one_image_matches_the_oracle_and_the_llm_sees_it(model, images):
    """One anyres image (2x2 grid, 5 crops): features and the LLM's rows equal the oracle's."""
    pixel_values, sizes = images[1:], IMAGE_SIZES[1:]
    rows, keep = expected_image_rows(model, pixel_values, CROPS[1:], sizes)
    stock = stock_image_counts(model, pixel_values, sizes)
    ids, mask = prompt_ids([[1, 5, "<image>", 7]], {"<image>": stock})
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values, "image_sizes": sizes}
    with vz.patched(model, dominant=DOMINANT, contextual=CONTEXTUAL):
        with torch.no_grad():
            features = model.get_image_features(pixel_values=pixel_values, image_sizes=sizes)
        shrunk = vzt.shrink_inputs(model, inputs)
        embeds = capture_inputs_embeds(model, lambda: model(**shrunk))
    assert torch.equal(features.keep, keep)
    per_image = 5 * (DOMINANT + CONTEXTUAL) + 2  # 5 crops, a newline after each of the 2 bands
    assert [f.shape for f in features.pooler_output] == [(per_image, TEXT_HIDDEN)]
    close(features.pooler_output[0], rows[0], "image")
    is_image = shrunk["input_ids"] == IMAGE_TOKEN
    assert is_image.sum().item() == per_image
    close(embeds[is_image], rows[0], "LLM rows")


def test_a_batch_equals_its_items(model, images):
    """Two prompts of one image each (a 1x2 and a 2x2 grid): the oracle's rows, and each prompt's
    LLM rows equal the prompt run alone."""
    rows, keep = expected_image_rows(model, images, CROPS, IMAGE_SIZES)
    stock = stock_image_counts(model, images, IMAGE_SIZES)
    prompts = [[1, 5, "<image>", 7, 8], [1, "<image>", 6]]
    with vz.patched(model, dominant=DOMINANT, contextual=CONTEXTUAL):
        with torch.no_grad():
            features = model.get_image_features(pixel_values=images, image_sizes=IMAGE_SIZES)
        assert torch.equal(features.keep, keep)
        for i, expected in enumerate(rows):
            close(features.pooler_output[i], expected, f"image {i}")
        ids, mask = prompt_ids(prompts, {"<image>": stock})
        batch = vzt.shrink_inputs(model, {"input_ids": ids, "attention_mask": mask, "pixel_values": images,
                                          "image_sizes": IMAGE_SIZES})
        batched = capture_inputs_embeds(model, lambda: model(**batch))
        for i in range(2):
            ids, mask = prompt_ids(prompts[i:i + 1], {"<image>": stock[i:i + 1]})
            alone = vzt.shrink_inputs(model, {"input_ids": ids, "attention_mask": mask,
                                              "pixel_values": images[i:i + 1, :CROPS[i]],
                                              "image_sizes": IMAGE_SIZES[i:i + 1]})
            single = capture_inputs_embeds(model, lambda alone=alone: model(**alone))
            width = alone["input_ids"].shape[1]
            assert torch.equal(batch["input_ids"][i, -width:], alone["input_ids"][0])
            close(batched[i, -width:], single[0], f"prompt {i} in the batch vs alone")


def test_two_images_in_a_prompt_are_one_crop_each(model, images):
    """batch_num_images = [2]: each image is its base crop only (the model's rule), D+K tokens and
    image_newline, each equal to the oracle on that image alone; the LLM sees them in order."""
    pixel_values = images[:, :1]
    batch_num_images = torch.tensor([2])
    stock = stock_image_counts(model, images, IMAGE_SIZES, batch_num_images)
    assert stock == [SIDE * SIDE + 1] * 2
    expected = [expected_image_rows(model, pixel_values[i:i + 1], [1], IMAGE_SIZES[i:i + 1])[0][0] for i in range(2)]
    ids, mask = prompt_ids([[1, "<image>", 5, "<image>", 6]], {"<image>": stock})
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": images, "image_sizes": IMAGE_SIZES,
              "batch_num_images": batch_num_images}
    with vz.patched(model, dominant=DOMINANT, contextual=CONTEXTUAL):
        with torch.no_grad():
            features = model.get_image_features(pixel_values=images, image_sizes=IMAGE_SIZES,
                                                batch_num_images=batch_num_images)
        shrunk = vzt.shrink_inputs(model, inputs)
        embeds = capture_inputs_embeds(model, lambda: model(**shrunk))
    assert [f.shape[0] for f in features.pooler_output] == [DOMINANT + CONTEXTUAL + 1] * 2
    for i in range(2):
        close(features.pooler_output[i], expected[i], f"image {i}")
    close(embeds[shrunk["input_ids"] == IMAGE_TOKEN], torch.cat(expected), "LLM rows")


# ------------------------------------------------------------------------------------------------
# Videos


@pytest.mark.parametrize("pooling", ["before", "after"])
def test_one_video_matches_the_oracle_and_the_llm_sees_it(model, video, pooling):
    expected, keep = expected_video_rows(model, video, pooling)
    frames = video.shape[1]
    stock = frames * POOLED * POOLED + 1
    ids, mask = prompt_ids([[1, 5, "<video>", 7]], {"<video>": [stock]})
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values_videos": video}
    with vz.patched(model, dominant=DOMINANT, contextual=CONTEXTUAL, video_pooling=pooling):
        with torch.no_grad():
            features = model.get_video_features(video)
        shrunk = vzt.shrink_inputs(model, inputs)
        embeds = capture_inputs_embeds(model, lambda: model(**shrunk))
    assert torch.equal(features.keep, keep)
    rows = video_rows_of(model, features)
    assert rows.shape == (1, frames * (DOMINANT + CONTEXTUAL) + 1, TEXT_HIDDEN)
    close(rows, expected, f"video, VisionZip {pooling} pooling")
    is_video = shrunk["input_ids"] == VIDEO_TOKEN
    assert is_video.sum().item() == rows.shape[1]
    close(embeds[is_video], expected[0], "LLM rows")


def test_two_videos_equal_each_video_alone(model, video):
    videos = torch.cat([video, torch.randn(video.shape, generator=torch.Generator().manual_seed(8))])
    for pooling in ("before", "after"):
        with vz.patched(model, dominant=DOMINANT, contextual=CONTEXTUAL, video_pooling=pooling), torch.no_grad():
            both = video_rows_of(model, model.get_video_features(videos))
            for i in range(2):
                alone = video_rows_of(model, model.get_video_features(videos[i:i + 1]))
                close(both[i], alone[0], f"video {i}, {pooling}")


# ------------------------------------------------------------------------------------------------
# generate(), the stock inputs, remove()


@pytest.fixture(scope="module")
def mixed_inputs(model, images, video):
    """A batch of an image prompt and a video prompt, as the stock processor writes them."""
    stock_images = stock_image_counts(model, images[1:], IMAGE_SIZES[1:])
    stock_video = video.shape[1] * POOLED * POOLED + 1
    ids, mask = prompt_ids([[1, 5, "<image>", 7, 8], [1, "<video>", 6]],
                           {"<image>": stock_images, "<video>": [stock_video]})
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": images[1:], "image_sizes": IMAGE_SIZES[1:],
            "pixel_values_videos": video}


@pytest.mark.parametrize("pooling", ["before", "after"])
def test_generate_with_an_image_and_a_video(model, mixed_inputs, pooling):
    """Stock-processor inputs -> shrink_inputs -> generate(): the KV-cache path equals a full
    recompute and the first token is the argmax of the shrunk prompt's forward."""
    with torch.no_grad():
        model(**mixed_inputs)  # the stock model accepts the stock counts (a check on the test's inputs)
    with vz.patched(model, dominant=DOMINANT, contextual=CONTEXTUAL, video_pooling=pooling):
        shrunk = vzt.shrink_inputs(model, mixed_inputs)
        assert (shrunk["input_ids"] == IMAGE_TOKEN).sum(dim=1).tolist() == [5 * (DOMINANT + CONTEXTUAL) + 2, 0]
        assert (shrunk["input_ids"] == VIDEO_TOKEN).sum(dim=1).tolist() == [0, 3 * (DOMINANT + CONTEXTUAL) + 1]
        assert_generate_equals_recompute(model, shrunk)


def test_stock_inputs_raise_a_clear_error(model, mixed_inputs):
    with vz.patched(model, dominant=DOMINANT, contextual=CONTEXTUAL):
        with pytest.raises(ValueError, match="image placeholder tokens.*shrink_inputs.*video placeholder tokens"):
            model(**mixed_inputs)
        video_only = {k: v[1:] for k, v in mixed_inputs.items() if k in ("input_ids", "attention_mask")}
        with pytest.raises(ValueError, match="video placeholder tokens.*shrink_inputs"):
            model(**video_only, pixel_values_videos=mixed_inputs["pixel_values_videos"])


def test_remove_restores_the_model_bit_for_bit(model, mixed_inputs, images, video):
    with torch.no_grad():
        before = model(**mixed_inputs).logits
        image_before = model.get_image_features(pixel_values=images, image_sizes=IMAGE_SIZES).pooler_output
        video_before = model.get_video_features(video).pooler_output
        for pooling in ("before", "after"):
            vz.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL, video_pooling=pooling)
            model(**vzt.shrink_inputs(model, mixed_inputs))
            vz.remove(model)
        after = model(**mixed_inputs).logits
        image_after = model.get_image_features(pixel_values=images, image_sizes=IMAGE_SIZES).pooler_output
        video_after = model.get_video_features(video).pooler_output
    assert torch.equal(before, after)
    assert all(torch.equal(a, b) for a, b in zip(image_before, image_after))
    assert torch.equal(video_before, video_after)
    for name in ("get_image_features", "get_video_features"):
        assert name not in model.model.__dict__
    assert "forward" not in model.model.vision_tower.__dict__
    assert not model.model._forward_pre_hooks


# ------------------------------------------------------------------------------------------------
# Settings and bad input


def test_settings_default_layer_and_video_pooling(model):
    with vz.patched(model, dominant=DOMINANT, contextual=CONTEXTUAL):
        patch = vzt.get_patch(model)
        assert isinstance(patch, vzt.LlavaOnevisionPatch)
        # The layer defaults to config.vision_feature_layer (-1 here), video_pooling to "before".
        assert patch.settings == {"dominant": DOMINANT, "contextual": CONTEXTUAL, "layer": -1,
                                  "video_pooling": "before"}
    other = tiny_onevision(vision_feature_layer=-2)
    vz.apply(other, tokens=8, video_pooling="after")
    assert vzt.get_patch(other).settings == {"dominant": 7, "contextual": 1, "layer": -2, "video_pooling": "after"}
    with vz.patched(other, tokens=16, video_pooling="before"):
        assert vzt.get_patch(other).video_pooling == "before"
    assert vzt.get_patch(other).settings["video_pooling"] == "after"  # restored on exit
    vz.remove(other)


def test_budget_errors_name_the_crop_or_the_pooled_frame(model):
    with pytest.raises(ValueError, match=r"exceeds the 49 tokens of one 98x98 crop \(7x7 patches\)"):
        vz.apply(model, dominant=45, contextual=5)
    with pytest.raises(ValueError, match=r"video_pooling='after'.*16 pooled tokens.*= 17"):
        vz.apply(model, dominant=14, contextual=3, video_pooling="after")
    with pytest.raises(ValueError, match=r"video_pooling must be 'before' or 'after'"):
        vz.apply(model, video_pooling="during")
    assert vzt.get_patch(model) is None
    assert "get_image_features" not in model.model.__dict__ and "get_video_features" not in model.model.__dict__
    vz.apply(model, dominant=14, contextual=3)  # 17 of a frame's 49 tokens: fine before the pooling
    vz.remove(model)


def test_video_pooling_is_refused_on_other_families():
    from test_llava_next import tiny_llava_next

    other = tiny_llava_next()
    with pytest.raises(TypeError, match=r"video_pooling= is an option of LLaVA-OneVision only, not of LLaVA-NeXT"):
        vz.apply(other, video_pooling="after")
    assert vzt.get_patch(other) is None


def test_counts_at_real_geometry_match_the_processor():
    """SigLIP-so400m/14-384 crops (27 x 27) with the default pinpoints (up to a 6x6 grid): the stock
    counts the patch derives from the model's own pack_image_features equal the stock processor's
    formula (unpadding, anyres_max_9 shrinking, newlines), and the patched counts are the documented
    (1 + rows * cols) * (D + K) + rows (a narrow random model: only the geometry matters)."""
    import functools
    import types

    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=384, patch_size=14,
                                             vision_use_head=False)
    text = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=1, vocab_size=64)
    model = transformers.LlavaOnevisionModel(transformers.LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=62, video_token_index=63))
    vz.apply(model, dominant=54, contextual=10)  # a LlavaOnevisionModel (no LM head) is supported as well
    patch = vzt.get_patch(model)
    # The processor's own counting methods, on a stand-in for the processor (no tokenizer needed).
    processor = types.SimpleNamespace(num_image_tokens=729, vision_aspect_ratio="anyres_max_9",
                                      image_processor=types.SimpleNamespace(
                                          image_grid_pinpoints=model.config.image_grid_pinpoints))
    processor._get_unpadded_features = functools.partial(LlavaOnevisionProcessor._get_unpadded_features, processor)
    sizes = torch.tensor([[2304, 2304], [480, 640], [300, 1900], [1000, 200], [384, 384]])
    stock = [LlavaOnevisionProcessor._get_number_of_features(processor, h, w, 384, 384) for h, w in sizes.tolist()]
    assert patch.stock_image_rows(sizes) == stock
    assert stock[0] == 729 + 81 * 81 + 81  # the 6x6 grid shrunk to 81 x 81 by anyres_max_9
    grids = [patch.grid_of(size) for size in sizes]
    assert patch.image_rows(sizes) == [(1 + r * c) * 64 + r for r, c in grids]
    assert patch.image_rows(sizes)[0] == 2374
    assert patch.image_rows(sizes, torch.tensor([2, 3])) == [64 + 1] * 5  # images of multi-image prompts
    assert patch.pooled_tokens == 196 and patch.tokens_for_video(8) == 8 * 64 + 1
    assert patch.stock_tokens_for_video(8) == 8 * 196 + 1
    vz.remove(model)


def test_deepcopy_and_pickle_of_a_patched_model(images, video):
    """A copy (deepcopy, or a pickle round trip as torch.save does) carries its own patch."""
    import copy
    import pickle

    # A fresh model: one that has run a forward holds transformers' own output-capturing hooks.
    model = vz.apply(tiny_onevision(), dominant=DOMINANT, contextual=CONTEXTUAL, video_pooling="after")
    try:
        with torch.no_grad():
            expected = model.get_image_features(pixel_values=images, image_sizes=IMAGE_SIZES).pooler_output
            expected_video = model.get_video_features(video).pooler_output
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert vzt.get_patch(clone).settings == vzt.get_patch(model).settings
            with torch.no_grad():
                got = clone.get_image_features(pixel_values=images, image_sizes=IMAGE_SIZES).pooler_output
                got_video = clone.get_video_features(video).pooler_output
            assert all(torch.equal(a, b) for a, b in zip(expected, got)) and torch.equal(expected_video, got_video)
            vz.remove(clone)
            assert "get_video_features" not in clone.model.__dict__
        assert isinstance(vzt.get_patch(model), vzt.LlavaOnevisionPatch)
    finally:
        vz.remove(model)


def test_bad_inputs_and_towers_are_named(model, images, video):
    with vz.patched(model, dominant=DOMINANT, contextual=CONTEXTUAL), torch.no_grad():
        with pytest.raises(ValueError, match=r"batch_num_images \[3\] counts 3 images, image_sizes has 2"):
            model.model.get_image_features(pixel_values=images, image_sizes=IMAGE_SIZES,
                                           batch_num_images=torch.tensor([3]))
        with pytest.raises(ValueError, match=r"pixel_values_videos must be \[videos, frames, 3, H, W\], got"):
            model.model.get_video_features(video[0])
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=56, patch_size=14)
    text = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=1, vocab_size=64)
    clip_tower = transformers.LlavaOnevisionModel(transformers.LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=62, video_token_index=63,
        vision_feature_select_strategy="default"))
    with pytest.raises(NotImplementedError, match="with a CLIP tower .* not supported"):
        vz.apply(clip_tower, dominant=4, contextual=1)
    assert vzt.get_patch(clip_tower) is None and "get_image_features" not in clip_tower.__dict__
