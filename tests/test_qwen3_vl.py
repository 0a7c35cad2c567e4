"""VisionZip on Qwen3-VL and Qwen3-VL-MoE (visionzip_kernels.integrations.transformers.qwen_vl, the QWEN3_VL
and QWEN3_VL_MOE families: the same vision side).

Tiny random models built from config (offline). Qwen3-VL's vision blocks are all full attention (no
windows), a learned position table is resampled to each image's grid, and the outputs of the blocks
``deepstack_visual_indexes`` go through their own mergers and are added to the first LLM layers at the
image tokens (DeepStack). The oracle (tests/qwen_oracle.py, ``upstream_way_deepstack``) runs the
UNPATCHED model, materialises the [H, T, T] softmax of the last block per image, and applies upstream's
topk / masks / one-hot merge to the main features and, with the same plan, to every DeepStack tensor.
The tests compare what the LLM receives (``inputs_embeds``, ``deepstack_visual_embeds``, 3-D
``position_ids``) with the oracle's.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Qwen3VLForConditionalGeneration"):
    pytest.skip(f"transformers {transformers.__version__} has no Qwen3-VL", allow_module_level=True)
if "mm_encoder_outputs" not in inspect.signature(transformers.Qwen3VLModel.forward).parameters:
    # Older Qwen3-VL forwards take no pre-encoded features; apply() refuses them (test_qwen_vl.py checks that).
    pytest.skip(f"transformers {transformers.__version__}'s Qwen3VLModel.forward takes no mm_encoder_outputs, which "
                "the VisionZip prompt (shrink_inputs) hands the DeepStack features through", allow_module_level=True)

from test_qwen_vl import (  # noqa: E402
    IMAGE,
    MERGE,
    PAD,
    PATCH,
    TOKEN_ATOL,
    TOKEN_RTOL,
    assert_separated,
    batch_inputs,
    build_tiny_qwen,
    llm_inputs,
    merged_tokens,
    prompt,
)

import visionzip_kernels as vz  # noqa: E402
from visionzip_kernels.integrations import transformers as vzt  # noqa: E402

from qwen_oracle import budget, upstream_way_deepstack  # noqa: E402

DEEPSTACK = [0, 1]  # the DeepStack layers of the tiny 3-block tower


def tiny_qwen3_vl(seed: int = 0, depth: int = 3, attn: str = "sdpa", moe: bool = False):
    """A random Qwen3-VL: vision width 32, 2 heads, ``depth`` blocks, a 4x4 learned position table,
    DeepStack from blocks 0 and 1; LLM width 48, 4 heads (head_dim 12), 3 layers (``moe``: Qwen3-VL-MoE,
    4 experts of width 32, 2 per token)."""
    text = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                intermediate_size=64, vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=PAD,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2],
                                 "mrope_interleaved": True})
    vision = dict(depth=depth, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=2, in_channels=3, out_hidden_size=48,
                  num_position_embeddings=16, deepstack_visual_indexes=DEEPSTACK)
    config_cls, model_cls = transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
        config_cls, model_cls = transformers.Qwen3VLMoeConfig, transformers.Qwen3VLMoeForConditionalGeneration
    return build_tiny_qwen(config_cls, model_cls, vision, text, seed, attn)


def oracle(model, pixels, grid):
    """The oracle for the images of ``grid``, each image on its own (its own softmax): per image
    (kept positions, kept main tokens, kept DeepStack tokens per layer)."""
    expected, start = [], 0
    for i, (_, h, w) in enumerate(grid.tolist()):
        with torch.no_grad():
            positions, kept, deepstack, scores = upstream_way_deepstack(model, pixels[start:start + h * w],
                                                                        grid[i:i + 1])
        assert_separated(scores, budget(scores.shape[0])[0])
        expected.append((positions[0], kept[0], deepstack[0]))
        start += h * w
    return expected


def original_positions(model, inputs):
    with torch.no_grad():
        positions, _ = model.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"])
    return positions


def expected_llm_inputs(model, inputs, expected):
    """The oracle's LLM inputs for ``inputs`` (left-padded rows; images in row-major order): the kept
    columns of every row (text and the oracle's kept image tokens), their token embeddings with the
    oracle's tokens at the image columns, the DeepStack rows, and the original 3-D positions."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    positions = original_positions(model, inputs)
    rows, image = [], 0
    for b in range(ids.shape[0]):
        columns = mask[b].nonzero().squeeze(1)
        is_image = ids[b, columns] == IMAGE
        keep = ~is_image
        image_columns = is_image.nonzero().squeeze(1)
        start = 0
        while start < image_columns.numel():
            kept_positions = expected[image][0]
            n = merged_tokens([tuple(inputs["image_grid_thw"][image, 1:].tolist())])[0]
            keep[image_columns[start + kept_positions]] = True
            start += n
            image += 1
        rows.append(columns[keep])
    width = max(r.numel() for r in rows)
    embeds, pos = [], []
    for b, r in enumerate(rows):
        row_embeds = model.get_input_embeddings()(ids[b, r])
        pad = width - r.numel()
        embeds.append((row_embeds, pad))
        pos.append((positions[:, b, r], pad))
    kept_main = torch.cat([e[1] for e in expected])
    kept_deepstack = [torch.cat([e[2][layer] for e in expected]) for layer in range(len(DEEPSTACK))]
    return rows, embeds, pos, kept_main, kept_deepstack


def assert_llm_inputs_equal_oracle(model, inputs, expected):
    shrunk = vzt.shrink_inputs(model, inputs)
    got = llm_inputs(model, shrunk)
    rows, embeds, pos, kept_main, kept_deepstack = expected_llm_inputs(model, inputs, expected)
    image_mask = got["visual_pos_masks"]
    assert torch.equal(image_mask, shrunk["input_ids"] == IMAGE)
    for b, r in enumerate(rows):
        n = r.numel()
        assert torch.equal(shrunk["input_ids"][b, -n:], inputs["input_ids"][b, r]), f"row {b}"
        assert torch.equal(got["position_ids"][:, b, -n:], pos[b][0]), f"row {b} positions"
        text = shrunk["input_ids"][b, -n:] != IMAGE
        assert torch.equal(got["inputs_embeds"][b, -n:][text], embeds[b][0][text]), f"row {b} text embeddings"
    torch.testing.assert_close(got["inputs_embeds"][image_mask], kept_main, atol=TOKEN_ATOL, rtol=TOKEN_RTOL)
    assert len(got["deepstack_visual_embeds"]) == len(DEEPSTACK)
    for layer, want in enumerate(kept_deepstack):
        torch.testing.assert_close(got["deepstack_visual_embeds"][layer], want, atol=TOKEN_ATOL, rtol=TOKEN_RTOL)
    return shrunk


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn, moe", [("sdpa", False), ("eager", False), ("sdpa", True)],
                         ids=["sdpa", "eager", "moe"])
def test_one_image_llm_inputs_equal_upstream_oracle(attn, moe):
    model = tiny_qwen3_vl(attn=attn, moe=moe)
    grids = [(8, 12)]
    inputs = batch_inputs([prompt(merged_tokens(grids))], grids)
    expected = oracle(model, inputs["pixel_values"], inputs["image_grid_thw"])
    vz.apply(model)
    with torch.no_grad():
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        assert isinstance(out, vzt.QwenVisionZipOutput)
        assert torch.equal(out.keep, expected[0][0])
        assert len(out.deepstack_features) == len(DEEPSTACK)
        assert_llm_inputs_equal_oracle(model, inputs, expected)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_two_images_and_a_batch_equal_per_image_oracles(moe):
    model = tiny_qwen3_vl(moe=moe)
    grids_a, grids_b = [(8, 12), (6, 10)], [(6, 6)]
    rows = [prompt(merged_tokens(grids_a), seed=1), prompt(merged_tokens(grids_b), seed=2)]
    both = batch_inputs(rows, grids_a + grids_b)
    expected = oracle(model, both["pixel_values"], both["image_grid_thw"])
    vz.apply(model)
    with torch.no_grad():
        assert_llm_inputs_equal_oracle(model, both, expected)  # a batch of two prompts, row 0 with two images
        one = batch_inputs([rows[0]], grids_a)
        assert_llm_inputs_equal_oracle(model, one, expected[:2])


def test_scoring_layer_option():
    model = tiny_qwen3_vl()
    vz.apply(model, layer=-2)
    patch = vzt.get_patch(model)
    assert patch.layer_index == 1 and patch.query_key.qkv_proj is model.model.visual.blocks[1].attn.qkv
    with pytest.raises(ValueError, match=r"layer must be in \[-3, 2\]"):
        vz.apply(model, layer=3)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_generate_two_images_and_a_batch(moe):
    model = tiny_qwen3_vl(moe=moe)
    vz.apply(model)
    grids = [(8, 12), (6, 10)]
    inputs = batch_inputs([prompt(merged_tokens(grids))], grids)
    with torch.no_grad():
        shrunk = vzt.shrink_inputs(model, inputs)
        generated = model.generate(**shrunk, max_new_tokens=4, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True)
        out = generated.sequences
        first = model(**shrunk).logits[:, -1]
    S = shrunk["input_ids"].shape[1]
    assert out.shape == (1, S + 4)
    assert torch.equal(out[:, :S], shrunk["input_ids"])
    torch.testing.assert_close(generated.logits[0], first, atol=1e-5, rtol=1e-5)
    # The second token without a cache: the new token at the original last position + 1, DeepStack again.
    step_inputs = dict(shrunk)
    step_inputs["input_ids"] = out[:, :S + 1]
    step_inputs["attention_mask"] = torch.cat([shrunk["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1)
    step_inputs["mm_token_type_ids"] = torch.cat([shrunk["mm_token_type_ids"], torch.zeros(1, 1, dtype=torch.int)],
                                                 1)
    step_inputs["position_ids"] = torch.cat([shrunk["position_ids"], shrunk["position_ids"][..., -1:] + 1], -1)
    with torch.no_grad():
        step = model(**step_inputs)
    torch.testing.assert_close(generated.logits[1], step.logits[:, -1], atol=1e-4, rtol=1e-4)
    grids_a, grids_b = [(8, 12)], [(6, 6)]
    batch = batch_inputs([prompt(merged_tokens(grids_a), seed=3), prompt(merged_tokens(grids_b), seed=4)],
                         grids_a + grids_b)
    with torch.no_grad():
        shrunk = vzt.shrink_inputs(model, batch)
        out = model.generate(**shrunk, max_new_tokens=3, do_sample=False)
    removed = [n - d - k for n, d, k in zip(*vzt.get_patch(model).budgets(batch["image_grid_thw"]))]
    assert shrunk["attention_mask"].sum(1).tolist() == [
        int(batch["attention_mask"][b].sum()) - removed[b] for b in range(2)]
    assert out.shape == (2, shrunk["input_ids"].shape[1] + 3)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_remove_restores_bit_for_bit(moe):
    model = tiny_qwen3_vl(moe=moe)
    stock = copy.deepcopy(model)
    grids = [(8, 12)]
    inputs = batch_inputs([prompt(merged_tokens(grids))], grids)
    vz.apply(model)
    with torch.no_grad():
        model(**vzt.shrink_inputs(model, inputs))
    vz.remove(model)
    assert vzt.get_patch(model) is None
    assert "get_image_features" not in model.model.__dict__
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, stock(**inputs).logits)
        ours = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        theirs = stock.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    assert torch.equal(ours.pooler_output[0], theirs.pooler_output[0])
    for a, b in zip(ours.deepstack_features, theirs.deepstack_features):
        assert torch.equal(a[0], b[0])


def test_stock_prompt_is_rejected():
    model = tiny_qwen3_vl()
    vz.apply(model)
    stock = batch_inputs([prompt(merged_tokens([(8, 12)]))], [(8, 12)])
    with pytest.raises(ValueError, match="shrink_inputs"):
        model(**stock)
    with pytest.raises(ValueError, match=r"holds 24 image placeholder tokens.*produces 16 image tokens"):
        model.generate(**stock, max_new_tokens=1)
