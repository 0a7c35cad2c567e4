"""VisionZip on Qwen videos (``pixel_values_videos`` / ``video_grid_thw``) and mixed image + video prompts,
for every Qwen family: Qwen2-VL, Qwen2.5-VL, Qwen3.5 and Qwen3-VL (DeepStack).

The tower attends within each temporal slice of a video, so VisionZip scores and merges per slice, each
slice with the image budget of its h*w/4 merge units. The oracle (tests/qwen_oracle.py,
``upstream_way_per_slice``) runs the UNPATCHED model's ``get_video_features``, materialises the eager
[H, h*w, h*w] softmax of the last block per slice and applies upstream's topk / masks / one-hot merge per
slice (and, with the same plan, to every DeepStack tensor). The tests compare what the language model
receives (``inputs_embeds``, ``deepstack_visual_embeds``, the 3-D ``position_ids``) with the oracle's,
the positions with the stock ``get_rope_index`` of the ORIGINAL prompt (Qwen2.5-VL's
``second_per_grid_ts`` and the Qwen3 generation's per-frame timestamps included).
"""

from __future__ import annotations

import copy
import inspect
from typing import NamedTuple

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_qwen_vl import (  # noqa: E402
    IMAGE,
    KINDS,
    MERGE,
    PIXEL_DIM,
    TOKEN_ATOL,
    TOKEN_RTOL,
    VEND,
    VIDEO,
    VSTART,
    assert_separated,
    left_padded,
    llm_inputs,
    tiny_qwen,
)

import visionzip_kernels as vz  # noqa: E402
from visionzip_kernels.integrations import transformers as vzt  # noqa: E402

from qwen_oracle import budget, upstream_way_per_slice  # noqa: E402

QWEN3_VL_SUPPORTED = hasattr(transformers, "Qwen3VLModel") and "mm_encoder_outputs" in inspect.signature(
    transformers.Qwen3VLModel.forward).parameters
ALL_KINDS = (*KINDS, *(("qwen3_vl",) if QWEN3_VL_SUPPORTED else ()))
# A text timestamp and its own <vision_start> ... <vision_end> run per frame:
TIMESTAMPED = ("qwen3_vl", "qwen3_5", "qwen3_5_moe")
UNIT = MERGE * MERGE


def build(kind: str, seed: int = 0):
    if kind == "qwen3_vl":
        from test_qwen3_vl import tiny_qwen3_vl

        return tiny_qwen3_vl(seed=seed)
    return tiny_qwen(kind, seed=seed)


class Item(NamedTuple):
    """One image or video of a prompt, as the tests build it."""

    kind: str  # "image" / "video"
    grid: torch.Tensor  # [1, 3] (t, h, w) in patches
    pixels: torch.Tensor  # [t*h*w, PIXEL_DIM]
    row: int  # the prompt (batch row) it is in


# An item as a test names it: ("image", (h, w)) or ("video", (t, h, w)), in patches.
def item_grid(item) -> list[int]:
    kind, size = item
    return [1, *size] if kind == "image" else list(size)


def item_tokens(model_kind: str, item, g: torch.Generator) -> list[int]:
    """The placeholder run of one item, as the model's processor writes it."""
    t, h, w = item_grid(item)
    per_slice = h * w // UNIT
    if item[0] == "image":
        return [VSTART] + [IMAGE] * per_slice + [VEND]
    if model_kind in TIMESTAMPED:  # "<t seconds>" before each frame's own vision run
        ids = []
        for _ in range(t):
            ids += torch.randint(3, 90, (2,), generator=g).tolist() + [VSTART] + [VIDEO] * per_slice + [VEND]
        return ids
    return [VSTART] + [VIDEO] * (t * per_slice) + [VEND]


def mixed_inputs(model_kind: str, rows: list[list], seed: int = 0) -> tuple[dict, list[Item]]:
    """Left-padded processor-like inputs for prompts whose items (images and videos) are ``rows``; the
    pixels of every item, in prompt order. Qwen2.5-VL videos get ``second_per_grid_ts`` (not 1, so that
    the temporal positions depend on it)."""
    g = torch.Generator().manual_seed(seed)
    ids_rows, items = [], []
    for b, row in enumerate(rows):
        ids = torch.randint(3, 90, (4,), generator=g).tolist()
        for item in row:
            ids += item_tokens(model_kind, item, g) + torch.randint(3, 90, (3,), generator=g).tolist()
            grid = item_grid(item)
            pixels = torch.randn(grid[0] * grid[1] * grid[2], PIXEL_DIM, generator=g)
            items.append(Item(item[0], torch.tensor([grid]), pixels, b))
        ids_rows.append(ids)
    input_ids, attention_mask = left_padded(ids_rows)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
              "mm_token_type_ids": (input_ids == IMAGE).int() + 2 * (input_ids == VIDEO).int()}
    inputs.update(visual_inputs(items))
    if model_kind == "qwen2_5_vl" and "video_grid_thw" in inputs:
        inputs["second_per_grid_ts"] = torch.tensor([2.0 + i for i in range(inputs["video_grid_thw"].shape[0])])
    return inputs, items


def visual_inputs(items: list[Item]) -> dict:
    """The processor's pixel and grid tensors of ``items``: images and videos each packed in order."""
    out = {}
    for kind, pixels_key, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                       ("video", "pixel_values_videos", "video_grid_thw")):
        chosen = [item for item in items if item.kind == kind]
        if chosen:
            out[grid_key] = torch.cat([item.grid for item in chosen])
            out[pixels_key] = torch.cat([item.pixels for item in chosen])
    return out


def single_row_inputs(inputs: dict, items: list[Item], b: int) -> dict:
    """Row ``b`` of a batch as a prompt of its own (its padding dropped, its items' pixels and grids)."""
    columns = inputs["attention_mask"][b].bool()
    alone = {k: inputs[k][b:b + 1, columns] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    alone.update(visual_inputs([item for item in items if item.row == b]))
    if "second_per_grid_ts" in inputs:
        videos = [item.row for item in items if item.kind == "video"]
        alone["second_per_grid_ts"] = inputs["second_per_grid_ts"][torch.tensor(videos) == b]
    return alone


def original_positions(model, inputs):
    keys = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
    with torch.no_grad():
        positions, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                                  attention_mask=inputs["attention_mask"],
                                                  **{k: inputs[k] for k in keys if k in inputs})
    return positions


def oracle(model, items):
    """Per item (in prompt order): (kept positions into its units, kept tokens, kept DeepStack tokens)."""
    expected = []
    for item in items:
        with torch.no_grad():
            positions, kept, deepstack, scores = upstream_way_per_slice(model, item.pixels, item.grid,
                                                                        video=item.kind == "video")
        n = int(item.grid[0, 1] * item.grid[0, 2]) // UNIT
        for start in range(0, scores.shape[0], n):
            assert_separated(scores[start:start + n], budget(n)[0])
        expected.append((positions, kept, deepstack))
    return expected


def assert_llm_inputs_equal_oracle(model, inputs, items, expected):
    """The shrunk prompt's ids, positions, visual rows (and DeepStack rows) equal the oracle's; returns it."""
    shrunk = vzt.shrink_inputs(model, inputs)
    assert "pixel_values" not in shrunk and "pixel_values_videos" not in shrunk
    got = llm_inputs(model, shrunk)
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    positions = original_positions(model, inputs)
    for b in range(ids.shape[0]):
        columns = mask[b].nonzero().squeeze(1)
        row = ids[b, columns]
        keep = (row != IMAGE) & (row != VIDEO)
        for token in (IMAGE, VIDEO):  # each modality's placeholders, in order, hold its items' units
            placeholder_columns = (row == token).nonzero().squeeze(1)
            start = 0
            for item, (kept_units, _, _) in zip(items, expected):
                if item.row == b and (item.kind == "image") == (token == IMAGE):
                    keep[placeholder_columns[start + kept_units]] = True
                    start += int(item.grid.prod()) // UNIT
        kept_columns = columns[keep]
        n = kept_columns.numel()
        assert int(shrunk["attention_mask"][b].sum()) == n, f"row {b} length"
        assert torch.equal(shrunk["input_ids"][b, -n:], ids[b, kept_columns]), f"row {b} ids"
        assert torch.equal(got["position_ids"][:, b, -n:], positions[:, b, kept_columns]), f"row {b} positions"
        text = (shrunk["input_ids"][b, -n:] != IMAGE) & (shrunk["input_ids"][b, -n:] != VIDEO)
        text_embeds = model.get_input_embeddings()(ids[b, kept_columns])
        assert torch.equal(got["inputs_embeds"][b, -n:][text], text_embeds[text]), f"row {b} text embeddings"
    visual = (shrunk["input_ids"] == IMAGE) | (shrunk["input_ids"] == VIDEO)
    # Visual rows in prompt order: items of row 0, then row 1, ...; images and videos interleaved as prompted.
    torch.testing.assert_close(got["inputs_embeds"][visual], torch.cat([e[1] for e in expected]),
                               atol=TOKEN_ATOL, rtol=TOKEN_RTOL)
    if expected[0][2]:  # Qwen3-VL: the DeepStack rows at the same visual positions
        assert torch.equal(got["visual_pos_masks"], visual)
        for layer, rows in enumerate(got["deepstack_visual_embeds"]):
            torch.testing.assert_close(rows, torch.cat([e[2][layer] for e in expected]), atol=TOKEN_ATOL,
                                       rtol=TOKEN_RTOL)
    return shrunk


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_one_video_llm_inputs_equal_upstream_oracle(kind):
    model = build(kind)
    inputs, items = mixed_inputs(kind, [[("video", (3, 8, 12))]])  # 3 temporal slices of 24 merge units
    expected = oracle(model, items)
    vz.apply(model)
    with torch.no_grad():
        out = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        assert isinstance(out, vzt.QwenVisionZipOutput)
        assert torch.equal(out.keep, expected[0][0])
        D, K = budget(24)
        assert out.cu_seqlens.tolist() == [0, 3 * (D + K)]  # every slice keeps the image budget of its 24 units
        shrunk = assert_llm_inputs_equal_oracle(model, inputs, items, expected)
    assert int(shrunk["attention_mask"].sum()) == int(inputs["attention_mask"].sum()) - 3 * (24 - D - K)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_mixed_image_and_video_batch_equals_per_item_oracles(kind):
    model = build(kind)
    rows = [[("image", (8, 12)), ("video", (2, 6, 10)), ("image", (6, 6))], [("video", (3, 8, 8))]]
    inputs, items = mixed_inputs(kind, rows, seed=1)
    expected = oracle(model, items)
    vz.apply(model)
    with torch.no_grad():
        shrunk = assert_llm_inputs_equal_oracle(model, inputs, items, expected)
        # The same rows alone give the same prompt rows.
        for b in range(len(rows)):
            mine = [i for i, item in enumerate(items) if item.row == b]
            alone = single_row_inputs(inputs, items, b)
            alone_items = [items[i]._replace(row=0) for i in mine]
            alone_shrunk = assert_llm_inputs_equal_oracle(model, alone, alone_items, [expected[i] for i in mine])
            n = alone_shrunk["input_ids"].shape[1]
            assert torch.equal(shrunk["input_ids"][b, -n:], alone_shrunk["input_ids"][0])
            assert torch.equal(shrunk["position_ids"][:, b, -n:], alone_shrunk["position_ids"][:, 0])
    removed = 0
    for kind_, size in (item for row in rows for item in row):
        t, h, w = item_grid((kind_, size))
        D, K = budget(h * w // UNIT)
        removed += t * (h * w // UNIT - D - K)
    assert int(shrunk["attention_mask"].sum()) == int(inputs["attention_mask"].sum()) - removed


def test_second_per_grid_ts_changes_the_kept_positions():
    """The oracle's positions depend on second_per_grid_ts (so the equality above checks it is passed on)."""
    model = tiny_qwen("qwen2_5_vl")
    inputs, _ = mixed_inputs("qwen2_5_vl", [[("video", (3, 8, 12))]])
    without = {k: v for k, v in inputs.items() if k != "second_per_grid_ts"}
    assert not torch.equal(original_positions(model, inputs), original_positions(model, without))
    vz.apply(model)
    with torch.no_grad():
        a, b = vzt.shrink_inputs(model, inputs), vzt.shrink_inputs(model, without)
    assert torch.equal(a["input_ids"], b["input_ids"]) and not torch.equal(a["position_ids"], b["position_ids"])


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_generate_with_a_mixed_prompt(kind):
    model = build(kind)
    vz.apply(model)
    inputs, _ = mixed_inputs(kind, [[("image", (8, 12)), ("video", (2, 6, 10))], [("video", (3, 6, 6))]], seed=2)
    with torch.no_grad():
        shrunk = vzt.shrink_inputs(model, inputs)
        generated = model.generate(**shrunk, max_new_tokens=3, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True)
        first = model(**shrunk).logits[:, -1]
    S = shrunk["input_ids"].shape[1]
    assert generated.sequences.shape == (2, S + 3)
    assert torch.equal(generated.sequences[:, :S], shrunk["input_ids"])
    torch.testing.assert_close(generated.logits[0], first, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_remove_restores_video_features_bit_for_bit(kind):
    model = build(kind)
    stock = copy.deepcopy(model)
    inputs, _ = mixed_inputs(kind, [[("video", (2, 8, 12))]])
    vz.apply(model)
    with torch.no_grad():
        model(**vzt.shrink_inputs(model, inputs))
    vz.remove(model)
    assert "get_video_features" not in model.model.__dict__ and "get_image_features" not in model.model.__dict__
    pixels, grid = inputs["pixel_values_videos"], inputs["video_grid_thw"]
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, stock(**inputs).logits)
        ours, theirs = model.model.get_video_features(pixels, grid), stock.model.get_video_features(pixels, grid)
    assert torch.equal(ours.pooler_output[0], theirs.pooler_output[0])


def test_stock_video_prompt_and_a_budget_larger_than_a_slice_are_refused():
    model = tiny_qwen("qwen2_vl")
    vz.apply(model)
    inputs, _ = mixed_inputs("qwen2_vl", [[("video", (2, 8, 12))]])
    D, K = budget(24)
    with pytest.raises(ValueError, match=rf"holds 48 video placeholder tokens.*produces {2 * (D + K)} video tokens"):
        model(**inputs)
    vz.apply(model, dominant=20, contextual=2)  # 22 <= 24 units per slice of this video, > 9 of a 6x6 one
    small, _ = mixed_inputs("qwen2_vl", [[("video", (2, 6, 6))]])
    with pytest.raises(ValueError, match=r"video 0 \(temporal slice 0\).*9 merged tokens"):
        vzt.shrink_inputs(model, small)
    no_grid = {k: v for k, v in inputs.items() if k != "video_grid_thw"}
    with pytest.raises(KeyError, match="pixel_values_videos.*video_grid_thw"):
        vzt.shrink_inputs(model, no_grid)
