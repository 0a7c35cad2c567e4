"""VisionZip on Qwen2-VL / Qwen2.5-VL / Qwen3.5 (visionzip_kernels.integrations.transformers.qwen_vl).

Tiny random models built from config (offline, ~1 s each). The oracle (tests/qwen_oracle.py) is
written the way upstream's Qwen2.5-VL port computes it: the unpatched model runs, a hook takes the
last block's input and rotary (cos, sin), q/k are recomputed from ``norm1`` and ``qkv`` with the
rotate-half formula, the full [H, T, T] softmax is materialised for one image, mean over heads, sum
over rows, mean per merge unit of 4, ``argsort(window_index)``, topk, masks, bmm similarity, one-hot
bmm merge, and the kept tokens are put in original order.

Random-init attention is nearly uniform (near-ties everywhere), so every model gets its q/k rows of
``qkv`` re-initialised with a larger std (peaked attention, like a trained tower), and every
comparison first asserts that the oracle's top-k boundary has no near-tie.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

import visionzip_kernels as vz  # noqa: E402
from visionzip_kernels.integrations import transformers as vzt  # noqa: E402
from visionzip_kernels.integrations.transformers import qwen_vl  # noqa: E402

from helpers import topk_is_separated  # noqa: E402
from qwen_oracle import budget, upstream_way  # noqa: E402

PATCH = 4  # pixels per patch side (tiny; Qwen uses 14)
MERGE = 2  # spatial_merge_size: 2x2 patches per LLM token
PIXEL_DIM = 3 * 2 * PATCH * PATCH  # channels * temporal_patch_size * patch * patch
IMAGE, VIDEO, VSTART, VEND, PAD = 100, 101, 102, 103, 0
TOKEN_ATOL = 1e-5
TOKEN_RTOL = 1e-5
# Qwen3.5 needs a forward that takes mm_encoder_outputs (5.23; 5.17's refuses input_ids beside inputs_embeds):
# apply() refuses older ones (test_qwen3_generation_on_an_older_transformers_is_refused).
QWEN3_5_SUPPORTED = hasattr(transformers, "Qwen3_5Model") and "mm_encoder_outputs" in inspect.signature(
    transformers.Qwen3_5Model.forward).parameters
QWEN3_5_MOE_SUPPORTED = QWEN3_5_SUPPORTED and hasattr(transformers, "Qwen3_5MoeForConditionalGeneration")
KINDS = ("qwen2_vl", "qwen2_5_vl", *(("qwen3_5",) if QWEN3_5_SUPPORTED else ()),
         *(("qwen3_5_moe",) if QWEN3_5_MOE_SUPPORTED else ()))


# ------------------------------------------------------------------------------------------------
# Tiny models


def tiny_qwen(kind: str, seed: int = 0, depth: int = 2, attn: str = "sdpa"):
    """A random Qwen2-VL / Qwen2.5-VL / Qwen3.5 / Qwen3.5-MoE (vision width 32, 2 heads, ``depth`` blocks; LLM
    width 48, 2 layers). Qwen2.5-VL: window of 2x2 merge units, the last block full-attention. Qwen3.5: a
    learned 4x4 position table resampled per image; one linear-attention and one full-attention LLM layer
    (Qwen3.5-MoE: MoE feed-forwards, 4 experts of width 32, 2 per token, and a shared expert)."""
    text = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=PAD,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2]})
    vision = dict(depth=depth, num_heads=2, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2,
                  in_channels=3)
    if kind in ("qwen3_5", "qwen3_5_moe"):  # no windows, a learned 4x4 position table; a hybrid LLM
        text.update(head_dim=12, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                    linear_num_value_heads=4, layer_types=["linear_attention", "full_attention"])
        text["rope_parameters"].update(mrope_section=[1, 1, 1], mrope_interleaved=True, partial_rotary_factor=0.5)
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=48, num_position_embeddings=16)
        model_cls, config_cls = transformers.Qwen3_5ForConditionalGeneration, transformers.Qwen3_5Config
        if kind == "qwen3_5_moe":
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                        shared_expert_intermediate_size=32)
            model_cls, config_cls = transformers.Qwen3_5MoeForConditionalGeneration, transformers.Qwen3_5MoeConfig
    elif kind == "qwen2_5_vl":
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=48, window_size=2 * MERGE * PATCH,
                      fullatt_block_indexes=[depth - 1])
        model_cls, config_cls = transformers.Qwen2_5_VLForConditionalGeneration, transformers.Qwen2_5_VLConfig
    else:
        vision.update(embed_dim=32, mlp_ratio=2, hidden_size=48)
        model_cls, config_cls = transformers.Qwen2VLForConditionalGeneration, transformers.Qwen2VLConfig
    return build_tiny_qwen(config_cls, model_cls, vision, text, seed, attn)


def build_tiny_qwen(config_cls, model_cls, vision: dict, text: dict, seed: int, attn: str):
    """A random model of ``model_cls`` from the vision / text config dicts, with this file's special
    token ids, the given attention implementation and peaked q/k (so top-k choices are well separated)."""
    config = config_cls(vision_config=vision, text_config=text, image_token_id=IMAGE, video_token_id=VIDEO,
                        vision_start_token_id=VSTART, vision_end_token_id=VEND, pad_token_id=PAD)
    config._attn_implementation = attn
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).eval()
        _peak_qk_(model, seed)
    return model


def _peak_qk_(model, seed: int, logit_std: float = 2.5) -> None:
    """q and k rows of every vision block's fused qkv ~ N(0, s): peaked attention."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for block in model.model.visual.blocks:
            qkv = block.attn.qkv
            dim = qkv.out_features // 3
            std = (logit_std / qkv.in_features) ** 0.5
            qkv.weight[: 2 * dim].copy_(torch.randn(2 * dim, qkv.in_features, generator=g) * std)
            qkv.bias[: 2 * dim].zero_()


def images(grids: list[tuple[int, int]], seed: int = 0):
    """pixel_values [sum(h*w), PIXEL_DIM] and image_grid_thw [n, 3] for images of h x w patches."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor([[1, h, w] for h, w in grids])
    pixels = torch.randn(int(grid.prod(-1).sum()), PIXEL_DIM, generator=g)
    return pixels, grid


def prompt(image_tokens: list[int], text: int = 5, seed: int = 0) -> list[int]:
    """Token ids: text, then per image <vision_start> N_i x <image> <vision_end> text."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (text,), generator=g).tolist()
    for n in image_tokens:
        ids += [VSTART] + [IMAGE] * n + [VEND] + torch.randint(3, 90, (text,), generator=g).tolist()
    return ids


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, S], attention_mask [B, S]) of token lists ``rows``, padded on the left with PAD."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, width - len(r):] = torch.tensor(r)
        attention_mask[b, width - len(r):] = 1
    return input_ids, attention_mask


def batch_inputs(rows: list[list[int]], grids: list[tuple[int, int]], seed: int = 0) -> dict:
    """Left-padded processor-like inputs for prompts ``rows`` whose images are ``grids`` in order."""
    input_ids, attention_mask = left_padded(rows)
    pixels, grid = images(grids, seed)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": (input_ids == IMAGE).int(),
            "pixel_values": pixels, "image_grid_thw": grid}


def merged_tokens(grids) -> list[int]:
    return [h * w // (MERGE * MERGE) for h, w in grids]


def llm_inputs(model, inputs) -> dict:
    """What the language model receives from ``model(**inputs)``: inputs_embeds, position_ids (and on Qwen3-VL
    deepstack_visual_embeds, visual_pos_masks) (a forward pre-hook on the language model, removed after)."""
    seen = {}

    def take(module, args, kwargs):
        seen.update({k: kwargs.get(k) for k in ("inputs_embeds", "deepstack_visual_embeds", "visual_pos_masks",
                                               "position_ids")})

    handle = model.model.language_model.register_forward_pre_hook(take, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen


# ------------------------------------------------------------------------------------------------
# The upstream-style oracle


def oracle_one_image(model, pixels, grid, dominant: float = 0.65, contextual: float = 0.05):
    """Upstream's way (tests/qwen_oracle.py) on the UNPATCHED model for ONE image: (kept positions
    [D+K] ascending, kept tokens [D+K, C_llm], scores [N] in original order, D)."""
    with torch.no_grad():
        positions, kept, scores = upstream_way(model, pixels, grid, dominant, contextual)
    return positions[0], kept[0], scores, budget(scores.shape[0], dominant, contextual)[0]


def assert_separated(scores: torch.Tensor, dominant: int) -> None:
    assert topk_is_separated(scores[None], dominant, keep_cls=False), "near-tie at the oracle's top-k boundary"


# ------------------------------------------------------------------------------------------------
# Vision side: one image, several images


@pytest.mark.parametrize("kind, attn", [(kind, "sdpa") for kind in KINDS] + [("qwen2_5_vl", "eager")])
def test_one_image_equals_upstream_oracle(kind, attn):
    model = tiny_qwen(kind, attn=attn)
    pixels, grid = images([(8, 12)])
    positions, kept, scores, D = oracle_one_image(model, pixels, grid)
    assert_separated(scores, D)
    vz.apply(model)
    with torch.no_grad():
        out = model.model.get_image_features(pixels, grid)
    assert isinstance(out, vzt.QwenVisionZipOutput)
    assert torch.equal(out.keep, positions)
    assert out.cu_seqlens.tolist() == [0, kept.shape[0]]
    assert out.cu_seqlens.device.type == "cpu"  # built from the host grid: the op reads no device bounds
    torch.testing.assert_close(out.pooler_output[0], kept, atol=TOKEN_ATOL, rtol=TOKEN_RTOL)
    # The conditional-generation class delegates to the same replacement.
    with torch.no_grad():
        again = model.get_image_features(pixels, grid)
    assert torch.equal(again.pooler_output[0], out.pooler_output[0])


@pytest.mark.parametrize("kind", KINDS)
def test_several_images_equal_per_image_oracles(kind):
    model = tiny_qwen(kind)
    grids = [(8, 12), (6, 6), (10, 8)]
    pixels, grid = images(grids)
    expected, start = [], 0
    for i, (h, w) in enumerate(grids):
        one = pixels[start:start + h * w]
        start += h * w
        positions, kept, scores, D = oracle_one_image(model, one, grid[i:i + 1])
        assert_separated(scores, D)
        expected.append((positions, kept))
    vz.apply(model)
    with torch.no_grad():
        out = model.model.get_image_features(pixels, grid)
    offsets = [0]
    for n in merged_tokens(grids):
        offsets.append(offsets[-1] + n)
    cu = out.cu_seqlens.tolist()
    for i, (positions, kept) in enumerate(expected):
        assert torch.equal(out.keep[cu[i]:cu[i + 1]] - offsets[i], positions), f"image {i}"
        torch.testing.assert_close(out.pooler_output[i], kept, atol=TOKEN_ATOL, rtol=TOKEN_RTOL)


def test_budget_as_count_and_ratio():
    model = tiny_qwen("qwen2_5_vl")
    pixels, grid = images([(8, 12), (6, 6)])  # 24 and 9 merged tokens
    vz.apply(model, dominant=5, contextual=2)
    with torch.no_grad():
        out = model.model.get_image_features(pixels, grid)
    assert [p.shape[0] for p in out.pooler_output] == [7, 7]
    vz.apply(model, dominant=0.5, contextual=0.2)  # int(0.5 N) + max(int(0.2 N), 1)
    with torch.no_grad():
        out = model.model.get_image_features(pixels, grid)
    assert [p.shape[0] for p in out.pooler_output] == [12 + 4, 4 + 1]
    assert vzt.get_patch(model).settings == {"dominant": 0.5, "contextual": 0.2, "layer": -1}
    # The budget API shared with the other families: tokens= per image split 54:10 (7 -> 6 + 1),
    # ratio= as the ratios r * 54/64 and r * 10/64 with upstream's rounding per image.
    vz.apply(model, tokens=7)
    assert vzt.get_patch(model).settings == {"dominant": 6, "contextual": 1, "layer": -1}
    vz.apply(model, ratio=0.64)  # 24 tokens: int(0.54 * 24) + max(int(0.1 * 24), 1) = 12 + 2; 9: 4 + 1
    with torch.no_grad():
        out = model.model.get_image_features(pixels, grid)
    assert [p.shape[0] for p in out.pooler_output] == [12 + 2, 4 + 1]
    with pytest.raises(ValueError, match="not both"):
        vz.apply(model, tokens=7, dominant=3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs(dtype):
    """A half-precision model runs: tokens in its dtype, finite, every image's budget met (the op
    tests compare the half-precision kernels with the reference)."""
    model = tiny_qwen("qwen2_5_vl")
    pixels, grid = images([(8, 12), (6, 10)])
    vz.apply(model.to(dtype))
    with torch.no_grad():
        out = model.model.get_image_features(pixels.to(dtype), grid)
    assert all(p.dtype == dtype for p in out.pooler_output)
    counts = [sum(budget(n)) for n in merged_tokens([(8, 12), (6, 10)])]
    assert [p.shape[0] for p in out.pooler_output] == counts
    assert all(torch.isfinite(p).all() for p in out.pooler_output)


# ------------------------------------------------------------------------------------------------
# LLM side: shrink_inputs, positions, batches, generate


def _original_positions(model, inputs):
    with torch.no_grad():
        positions, _ = model.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"])
    return positions


@pytest.mark.parametrize("kind", KINDS)
def test_shrink_inputs_keeps_original_positions(kind):
    model = tiny_qwen(kind)
    grids = [(8, 12), (6, 10)]
    inputs = batch_inputs([prompt(merged_tokens(grids))], grids)
    positions = _original_positions(model, inputs)
    vz.apply(model)
    with torch.no_grad():
        shrunk = vzt.shrink_inputs(model, inputs)
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    removed = sum(merged_tokens(grids)) - int(features.cu_seqlens[-1])
    assert shrunk["input_ids"].shape[1] == inputs["input_ids"].shape[1] - removed
    assert "pixel_values" not in shrunk
    # The kept columns of the original prompt, rebuilt from keep: their ids and positions.
    image_columns = (inputs["input_ids"][0] == IMAGE).nonzero().squeeze(1)
    kept_columns = torch.cat([(inputs["input_ids"][0] != IMAGE).nonzero().squeeze(1), image_columns[features.keep]])
    kept_columns = kept_columns.sort().values
    assert torch.equal(shrunk["input_ids"][0], inputs["input_ids"][0, kept_columns])
    assert torch.equal(shrunk["position_ids"][:, 0], positions[:, 0, kept_columns])
    image_rows = shrunk["inputs_embeds"][0][shrunk["input_ids"][0] == IMAGE]
    assert torch.equal(image_rows, torch.cat(list(features.pooler_output)))


@pytest.mark.parametrize("kind", KINDS)
def test_batch_equals_single_calls(kind):
    model = tiny_qwen(kind)
    grids_a, grids_b = [(8, 12)], [(6, 6), (4, 8)]
    vz.apply(model)
    rows = [prompt(merged_tokens(grids_a), seed=1), prompt(merged_tokens(grids_b), seed=2)]
    both = batch_inputs(rows, grids_a + grids_b)
    single = [batch_inputs([rows[0]], grids_a), batch_inputs([rows[1]], grids_b)]
    single[1]["pixel_values"] = both["pixel_values"][8 * 12:]
    with torch.no_grad():
        shrunk = vzt.shrink_inputs(model, both)
        logits = model(**shrunk).logits
        for b, inputs in enumerate(single):
            alone = vzt.shrink_inputs(model, inputs)
            n = alone["input_ids"].shape[1]
            assert torch.equal(shrunk["input_ids"][b, -n:], alone["input_ids"][0])
            assert torch.equal(shrunk["position_ids"][:, b, -n:], alone["position_ids"][:, 0])
            assert int(shrunk["attention_mask"][b].sum()) == n
            torch.testing.assert_close(logits[b, -n:], model(**alone).logits[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_generate_two_images_and_a_batch(kind):
    model = tiny_qwen(kind)
    vz.apply(model)
    # Two images in one prompt.
    grids = [(8, 12), (6, 10)]
    inputs = batch_inputs([prompt(merged_tokens(grids))], grids)
    with torch.no_grad():
        shrunk = vzt.shrink_inputs(model, inputs)
        generated = model.generate(**shrunk, max_new_tokens=4, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True)
        out = generated.sequences
        first = model(**shrunk).logits[:, -1].argmax(-1)
    S = shrunk["input_ids"].shape[1]
    assert out.shape == (1, S + 4)
    assert torch.equal(out[:, :S], shrunk["input_ids"])
    assert torch.equal(out[:, S], first)
    # The second token, recomputed without a cache: the new token sits at the original last position + 1.
    with torch.no_grad():
        new_token = model.get_input_embeddings()(out[:, S:S + 1])
        step = model(inputs_embeds=torch.cat([shrunk["inputs_embeds"], new_token], 1),
                     position_ids=torch.cat([shrunk["position_ids"], shrunk["position_ids"][..., -1:] + 1], -1),
                     attention_mask=torch.cat([shrunk["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1))
    assert torch.equal(step.logits[:, -1].argmax(-1), out[:, S + 1])
    torch.testing.assert_close(generated.logits[1], step.logits[:, -1], atol=1e-4, rtol=1e-4)
    # A batch of two prompts with images of different sizes (left padding).
    grids_a, grids_b = [(8, 12)], [(6, 6)]
    batch = batch_inputs([prompt(merged_tokens(grids_a), seed=3), prompt(merged_tokens(grids_b), seed=4)],
                         grids_a + grids_b)
    with torch.no_grad():
        shrunk = vzt.shrink_inputs(model, batch)
        out = model.generate(**shrunk, max_new_tokens=3, do_sample=False)
    budgets = vzt.get_patch(model).budgets(batch["image_grid_thw"])
    removed = [n - d - k for n, d, k in zip(*budgets)]
    assert shrunk["attention_mask"].sum(1).tolist() == [
        int(batch["attention_mask"][b].sum()) - removed[b] for b in range(2)]
    assert out.shape == (2, shrunk["input_ids"].shape[1] + 3)


# ------------------------------------------------------------------------------------------------
# remove(), registry, bad input


@pytest.mark.parametrize("kind", KINDS)
def test_remove_restores_bit_for_bit(kind):
    model = tiny_qwen(kind)
    stock = copy.deepcopy(model)
    grids = [(8, 12)]
    inputs = batch_inputs([prompt(merged_tokens(grids))], grids)
    vz.apply(model)
    with torch.no_grad():
        model(**vzt.shrink_inputs(model, inputs))
    vz.remove(model)
    assert vzt.get_patch(model) is None
    assert "get_image_features" not in model.model.__dict__
    assert not model.model._forward_pre_hooks
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    with torch.no_grad():
        ours, theirs = model(**inputs), stock(**inputs)
        assert torch.equal(ours.logits, theirs.logits)
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        expected = stock.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    assert torch.equal(features.pooler_output[0], expected.pooler_output[0])


def test_deepcopy_of_a_patched_model_is_patched_on_its_own():
    model = tiny_qwen("qwen2_5_vl")
    vz.apply(model)
    clone = copy.deepcopy(model)
    patch = vzt.get_patch(clone)
    assert patch is not vzt.get_patch(model) and patch.model is clone
    assert patch.query_key.qkv_proj is clone.model.visual.blocks[-1].attn.qkv
    pixels, grid = images([(8, 12)])
    with torch.no_grad():
        ours, theirs = model.model.get_image_features(pixels, grid), clone.model.get_image_features(pixels, grid)
    assert torch.equal(ours.pooler_output[0], theirs.pooler_output[0]) and torch.equal(ours.keep, theirs.keep)
    vz.remove(clone)
    assert "get_image_features" not in clone.model.__dict__ and not clone.model._forward_pre_hooks
    assert vzt.get_patch(model) is not None and "get_image_features" in model.model.__dict__


def test_registry_describes_fused_qkv_after_rotary():
    model = tiny_qwen("qwen2_5_vl")
    query_key = qwen_vl.fused_query_key(qwen_vl.blocks(model.model.visual)[-1])
    assert isinstance(query_key, qwen_vl.FusedQueryKey)
    assert query_key.qkv_proj is model.model.visual.blocks[-1].attn.qkv
    assert query_key.attention_input is model.model.visual.blocks[-1].norm1
    assert isinstance(model.model.visual, qwen_vl.QWEN2_5_VL_TOWER.model_class())
    assert model.model.visual.config.model_type in qwen_vl.QWEN2_5_VL_TOWER.model_types
    assert query_key.rotary is not None
    assert query_key.num_heads * query_key.head_dim * 3 == query_key.qkv_proj.out_features
    with pytest.raises(TypeError, match="apply VisionZip to the whole Qwen2_5_VLForConditionalGeneration"):
        vz.apply(model.model.visual)  # the packed tower alone is not a stand-alone encoder


def test_bad_input():
    model = tiny_qwen("qwen2_5_vl")
    pixels, grid = images([(8, 12), (6, 6)])  # 24 and 9 merged tokens
    vz.apply(model, dominant=8, contextual=2)
    with pytest.raises(ValueError, match=r"image 1 \(grid t, h, w = \[1, 6, 6\]\) has 9 merged tokens"):
        model.model.get_image_features(pixels, grid)
    vz.apply(model)
    with pytest.raises(ValueError, match="mismatched grids"):
        model.model.get_image_features(pixels[:-4], grid)
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        model.model.get_image_features(pixels[: 7 * 6 + 36], torch.tensor([[1, 7, 6], [1, 6, 6]]))
    inputs = batch_inputs([prompt(merged_tokens([(8, 12)]))], [(8, 12)])
    inputs["image_grid_thw"] = torch.tensor([[1, 8, 8]])
    inputs["pixel_values"] = inputs["pixel_values"][:64]
    with pytest.raises(ValueError, match="mismatched grids"):
        vzt.shrink_inputs(model, inputs)
    stock = batch_inputs([prompt(merged_tokens([(8, 12)]))], [(8, 12)])
    with pytest.raises(ValueError, match="shrink_inputs"):
        model(**stock)
    # generate() encodes the images first and passes the features, not pixel_values: the same message.
    with pytest.raises(ValueError, match=r"holds 24 image placeholder tokens.*produces 16 image tokens.*shrink_inputs"):
        model.generate(**stock, max_new_tokens=1)
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        vz.apply(model, dominant=1.5)
    with pytest.raises(TypeError, match="dominant must be an int"):
        vz.apply(model, dominant="all")
    vz.remove(model)
    with pytest.raises(TypeError, match=r"Qwen2.5-VL model\) is not patched by VisionZip; call visionzip_kernels"):
        vzt.shrink_inputs(model, stock)
    deeper = tiny_qwen("qwen2_5_vl", depth=3)
    with pytest.raises(ValueError, match="full-attention block"):
        vz.apply(deeper, layer=-2)
    assert vzt.get_patch(deeper) is None


def test_qwen3_generation_on_an_older_transformers_is_refused():
    """Qwen3-VL's prompt hands the DeepStack features to forward as mm_encoder_outputs (tests/test_qwen3_vl.py),
    and Qwen3.5's older forward refuses input_ids beside inputs_embeds: on a transformers whose forwards lack
    mm_encoder_outputs (5.17) apply() gives a clear error."""
    if hasattr(transformers, "Qwen3_5Model") and not QWEN3_5_SUPPORTED:
        stale = transformers.Qwen3_5ForConditionalGeneration(transformers.Qwen3_5Config(
            vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH,
                               out_hidden_size=48, num_position_embeddings=16),
            text_config=dict(hidden_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=12, intermediate_size=64, vocab_size=128, linear_key_head_dim=8,
                             linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
                             layer_types=["full_attention"])))
        with pytest.raises(NotImplementedError, match="Qwen3.5 needs a transformers whose .* mm_encoder_outputs"):
            vz.apply(stale)
    if not hasattr(transformers, "Qwen3VLForConditionalGeneration"):
        pytest.skip(f"transformers {transformers.__version__} has no Qwen3-VL")
    if "mm_encoder_outputs" in inspect.signature(transformers.Qwen3VLModel.forward).parameters:
        pytest.skip(f"transformers {transformers.__version__} supports it (tests/test_qwen3_vl.py)")
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH,
                  spatial_merge_size=MERGE, out_hidden_size=48, num_position_embeddings=16,
                  deepstack_visual_indexes=[0])
    text = dict(hidden_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                intermediate_size=64, vocab_size=128,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2]})
    model = transformers.Qwen3VLForConditionalGeneration(transformers.Qwen3VLConfig(vision_config=vision,
                                                                                     text_config=text))
    with pytest.raises(NotImplementedError, match="takes mm_encoder_outputs"):
        vz.apply(model)
    assert vzt.get_patch(model) is None
