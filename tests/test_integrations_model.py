"""A patched model behaves like a model: torch.compile, deepcopy, pickle / torch.save, state_dict,
``.to``, ``output_hidden_states`` / ``output_attentions``; and the budget API (``tokens=`` / ``ratio=``).

The reference for every patched output here is the same model patched and run in eager (whose
equality with upstream's way is tests/test_integrations.py's job), or the unpatched model where
the patch must not change anything. Models are tiny random towers (compile time on 2 cores).

Compile tests use the default backend (inductor); ``VISIONZIP_TEST_COMPILE_BACKEND`` overrides it
(.ci/oldest_transformers.sh uses ``aot_eager`` there: the same dynamo tracing, without a second
round of code generation).
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import threading

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_integrations import _build, _peak_qk_, clip_tower, pixels, stock_input_ids, tiny_llava  # noqa: E402

import visionzip_kernels as vz  # noqa: E402
from visionzip_kernels.integrations import transformers as vzt  # noqa: E402

COMPILE_BACKEND = os.environ.get("VISIONZIP_TEST_COMPILE_BACKEND", "inductor")
COMPILED_ATOL = 1e-5  # inductor fuses and reorders fp32 arithmetic; keep must still be identical
COMPILED_RTOL = 1e-5


# ------------------------------------------------------------------------------------------------
# Tiny towers: 3 layers, C = 64, 4 heads, 56 px / 14 (16 patches; CLIP and DINOv2 add a CLS)


def tiny_tower(family: str, seed: int = 1, layers: int = 3):
    if family == "clip":
        return clip_tower(num_layers=layers, hidden=64, heads=4, image=56, patch=14, intermediate=128, seed=seed)
    if family == "siglip":
        config = transformers.SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                                 num_attention_heads=4, image_size=56, patch_size=14)
        model = _build(transformers.SiglipVisionModel, config, seed)
    else:
        config = transformers.Dinov2Config(hidden_size=64, num_attention_heads=4, num_hidden_layers=layers,
                                           mlp_ratio=2, image_size=56, patch_size=14, layerscale_value=0.5)
        model = _build(transformers.Dinov2Model, config, seed)
    _peak_qk_(model, 64, seed)
    return model


FAMILIES = ["clip", "siglip", "dinov2"]
TOKENS = {"clip": 17, "siglip": 16, "dinov2": 17}  # N at 56 px


def run(model, x, **kwargs):
    with torch.no_grad():
        return model(x, **kwargs)


def assert_same_output(a, b):
    assert torch.equal(a.keep, b.keep)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)


# ------------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_tower_fullgraph_equals_eager(family):
    """fullgraph=True: the whole patched forward (embeddings, layers 0..L, scores, select_merge) is
    one graph, with no exception or hook to break it."""
    model = vz.apply(tiny_tower(family, layers=2), dominant=5, contextual=3, layer=0)
    x = pixels(2, 56, seed=2)
    eager = run(model, x)
    compiled = run(torch.compile(model, fullgraph=True, backend=COMPILE_BACKEND), x)
    assert isinstance(compiled, vzt.VisionZipOutput)
    assert torch.equal(compiled.keep, eager.keep)
    torch.testing.assert_close(compiled.last_hidden_state, eager.last_hidden_state, atol=COMPILED_ATOL,
                               rtol=COMPILED_RTOL)


def test_compiled_llava_equals_eager():
    """A patched LLaVA compiled with the defaults (graph breaks allowed: the placeholder check runs
    eagerly): the same logits and image features as eager."""
    model = vz.apply(tiny_llava(vision_layers=2, text_layers=1), dominant=8, contextual=4)
    ids, mask = stock_input_ids([[1, 5, "<image>", 7, 8]], 64, 99)
    inputs = vzt.shrink_inputs(model, {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels(1, 112, 5)})
    with torch.no_grad():
        eager = model(**inputs).logits
        compiled = torch.compile(model, backend=COMPILE_BACKEND)(**inputs).logits
    torch.testing.assert_close(compiled, eager, atol=COMPILED_ATOL, rtol=COMPILED_RTOL)


# ------------------------------------------------------------------------------------------------
# deepcopy, pickle, torch.save, state_dict


def _saved_and_loaded(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_deepcopy_pickle_and_save_keep_the_patch(family):
    model = vz.apply(tiny_tower(family), dominant=5, contextual=3)
    x = pixels(2, 56, seed=3)
    expected = run(model, x)
    for name, other in (("deepcopy", copy.deepcopy(model)), ("pickle", pickle.loads(pickle.dumps(model))),
                        ("torch.save", _saved_and_loaded(model))):
        patch = vzt.get_patch(other)
        assert patch is not None and patch is not vzt.get_patch(model), name
        assert patch.model is other and patch.settings == {"dominant": 5, "contextual": 3, "layer": -2}, name
        assert_same_output(run(other, x), expected)
        vz.remove(other)  # the copy's removal leaves the original patched
        assert "forward" not in other.__dict__ and run(other, x).last_hidden_state.shape[1] == TOKENS[family]
        assert_same_output(run(model, x), expected)
    copied = copy.deepcopy(model)
    vz.remove(model)  # and the other way round
    assert_same_output(run(copied, x), expected)


def test_deepcopy_and_save_of_a_patched_llava():
    model = vz.apply(tiny_llava(vision_layers=2, text_layers=1), tokens=12)
    ids, mask = stock_input_ids([[1, "<image>", 6]], 64, 99)
    inputs = vzt.shrink_inputs(model, {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels(1, 112, 6)})
    with torch.no_grad():
        expected = model(**inputs).logits
        for other in (copy.deepcopy(model), _saved_and_loaded(model)):
            patch = vzt.get_patch(other)
            assert patch.llava is other.model and patch.tower_patch.model is other.model.vision_tower
            assert torch.equal(other(**inputs).logits, expected)
            vz.remove(other)
            assert not other.model._forward_pre_hooks and "get_image_features" not in other.model.__dict__
            with pytest.raises(ValueError, match="image"):  # unpatched again: wants 64 placeholders
                other(**inputs)
        assert torch.equal(model(**inputs).logits, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_round_trip(family):
    """The patch adds nothing to the state dict; loading one into a fresh patched model (other
    random weights) gives the same outputs."""
    source = tiny_tower(family, seed=1)
    keys = list(source.state_dict())
    vz.apply(source, dominant=5, contextual=3)
    assert list(source.state_dict()) == keys
    target = vz.apply(tiny_tower(family, seed=7), dominant=5, contextual=3)
    x = pixels(1, 56, seed=4)
    assert not torch.equal(run(target, x).last_hidden_state, run(source, x).last_hidden_state)
    target.load_state_dict(source.state_dict())
    assert_same_output(run(target, x), run(source, x))


@pytest.mark.parametrize("family", FAMILIES)
def test_to_dtype_and_device_after_apply(family):
    """``.to`` after ``apply`` moves the weights the patched forward uses: the same output as
    converting first and patching after."""
    x = pixels(2, 56, seed=5)
    converted_first = vz.apply(tiny_tower(family).to(torch.bfloat16), dominant=5, contextual=3)
    expected = run(converted_first, x.bfloat16())
    model = vz.apply(tiny_tower(family), dominant=5, contextual=3)
    model.to(torch.bfloat16)
    out = run(model, x.bfloat16())
    assert out.last_hidden_state.dtype == torch.bfloat16
    assert_same_output(out, expected)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        model.to(device)
        out = run(model, x.bfloat16().to(device))
        assert out.last_hidden_state.device.type == device
        assert torch.equal(out.keep.cpu(), expected.keep)
        torch.testing.assert_close(out.last_hidden_state.cpu(), expected.last_hidden_state, atol=2e-2, rtol=2e-2)


THREAD_FAMILIES = [*FAMILIES, "llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl",
                   "qwen3_5", "qwen3_5_moe"]
THREADS, ROUNDS = 8, 10


def _thread_case(family: str):
    """(patched tiny model, one input per thread, call(model, input) -> the tensors a result is judged by).
    The inputs differ per thread (for Qwen also in their grids, hence in token counts), so a call that
    read another call's state would get the wrong shapes or values."""
    if family in FAMILIES:
        model = vz.apply(tiny_tower(family), dominant=5, contextual=3)
        inputs = [pixels(1, 56, seed=20 + i) for i in range(THREADS)]

        def call_encoder(m, x):
            out = run(m, x)
            return out.keep, out.last_hidden_state
        return model, inputs, call_encoder
    if family == "llava":
        model = vz.apply(tiny_llava(vision_layers=2, text_layers=1), dominant=6, contextual=2)
        inputs = [pixels(1, 112, seed=20 + i) for i in range(THREADS)]

        def call(m, x):
            with torch.no_grad():
                out = m.get_image_features(pixel_values=x)
            return (out.keep, *out.pooler_output)
        return model, inputs, call
    if family == "llava_next":
        from test_llava_next import CROP_PX, IMAGE_SIZES, tiny_llava_next

        model = vz.apply(tiny_llava_next(), dominant=6, contextual=3)
        g = torch.Generator().manual_seed(5)
        inputs = [(torch.randn(1, 5, 3, CROP_PX, CROP_PX, generator=g), IMAGE_SIZES[i % 2:i % 2 + 1])
                  for i in range(THREADS)]

        def call(m, x):
            with torch.no_grad():
                out = m.get_image_features(pixel_values=x[0], image_sizes=x[1])
            return (out.keep, *out.pooler_output)
        return model, inputs, call
    if family == "llava_onevision":
        from test_llava_onevision import CROP_PX, IMAGE_SIZES, tiny_onevision

        # Images (anyres crops) and videos (compressed after the pooling: its own code path) per call.
        model = vz.apply(tiny_onevision(), dominant=6, contextual=3, video_pooling="after")
        g = torch.Generator().manual_seed(5)
        inputs = [(torch.randn(1, 5, 3, CROP_PX, CROP_PX, generator=g), IMAGE_SIZES[i % 2:i % 2 + 1],
                   torch.randn(1, 1 + i % 3, 3, CROP_PX, CROP_PX, generator=g)) for i in range(THREADS)]

        def call(m, x):
            with torch.no_grad():
                image = m.get_image_features(pixel_values=x[0], image_sizes=x[1])
                video = m.get_video_features(x[2])
            return (image.keep, *image.pooler_output, video.keep, video.pooler_output)
        return model, inputs, call
    from test_qwen_vl import images, tiny_qwen

    if family in ("qwen3_5", "qwen3_5_moe"):
        from test_qwen_vl import KINDS

        if family not in KINDS:
            pytest.skip(f"transformers {transformers.__version__}: VisionZip for Qwen3.5 needs 5.23's forward")
    if family == "qwen3_vl":
        from test_qwen3_vl import tiny_qwen3_vl

        model = vz.apply(tiny_qwen3_vl())
    else:
        model = vz.apply(tiny_qwen(family))
    grids = [[(8, 12)], [(6, 6)], [(4, 8), (8, 4)], [(8, 8)], [(6, 10), (4, 4)], [(12, 4)], [(4, 4)], [(10, 6)]]
    inputs = [(False, *images(grid, seed=20 + i)) for i, grid in enumerate(grids)]
    # Every other thread encodes a video of 2 or 3 temporal slices of its first grid instead.
    for i in range(1, THREADS, 2):
        _, pixel_rows, grid = inputs[i]
        t = 2 + i % 3 // 2
        inputs[i] = (True, pixel_rows[:int(grid[0].prod())].repeat(t, 1), grid[:1] * torch.tensor([t, 1, 1]))

    def call(m, x):
        video, pixel_rows, grid = x
        with torch.no_grad():
            out = (m.model.get_video_features if video else m.model.get_image_features)(pixel_rows, grid)
        deepstack = [t for layer in out.deepstack_features or [] for t in layer]
        return (out.keep, out.cu_seqlens, *out.pooler_output, *deepstack)
    return model, inputs, call


@pytest.mark.parametrize("family", THREAD_FAMILIES)
def test_concurrent_forwards_in_threads(family):
    """A call's state lives in its own locals: 8 threads x 10 rounds running one patched model at
    once get, every time, bit for bit what a serial call gets (every family, Qwen included, with
    images and videos encoded at once)."""
    model, inputs, call = _thread_case(family)
    expected = [call(model, x) for x in inputs]
    results = [[None] * ROUNDS for _ in inputs]
    errors = []
    start = threading.Barrier(len(inputs))

    def work(i):
        try:
            start.wait()
            for r in range(ROUNDS):
                results[i][r] = call(model, inputs[i])
        except Exception as error:  # reported below: a thread's exception would otherwise vanish
            errors.append(f"thread {i}: {type(error).__name__}: {error}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    wrong = [(i, r) for i, want in enumerate(expected) for r, got in enumerate(results[i])
             if len(got) != len(want) or not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(got, want))]
    assert not wrong, f"{len(wrong)} of {len(inputs) * ROUNDS} results differ from the serial call: {wrong[:8]}"


# ------------------------------------------------------------------------------------------------
# output_hidden_states / output_attentions


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layer", [-2, 0])
def test_hidden_states_are_those_of_the_layers_that_ran(family, layer):
    model = tiny_tower(family)
    x = pixels(2, 56, seed=6)
    full = run(model, x, output_hidden_states=True).hidden_states  # unpatched: embeddings + 3 layers
    assert len(full) == 4
    vz.apply(model, dominant=5, contextual=3, layer=layer)
    ran = layer % 3 + 1
    out = run(model, x, output_hidden_states=True)
    assert len(out.hidden_states) == ran + 1
    for i, (ours, theirs) in enumerate(zip(out.hidden_states, full)):
        assert torch.equal(ours, theirs), f"hidden_states[{i}]"
    assert_same_output(out, run(model, x))
    assert run(model, x).hidden_states is None
    tokens, hidden_states, keep = run(model, x, output_hidden_states=True, return_dict=False)
    assert torch.equal(keep, out.keep) and len(hidden_states) == ran + 1
    model.config.output_hidden_states = True  # the config's default is followed, as unpatched
    try:
        assert len(run(model, x).hidden_states) == ran + 1
    finally:
        model.config.output_hidden_states = False


@pytest.mark.parametrize("family", FAMILIES)
def test_output_attentions_raises_a_clear_error(family):
    model = vz.apply(tiny_tower(family), dominant=5, contextual=3)
    with pytest.raises(ValueError, match="computes no attention maps.*output_attentions=True is not supported"):
        run(model, pixels(1, 56), output_attentions=True)
    assert run(model, pixels(1, 56), output_attentions=False).attentions is None


# ------------------------------------------------------------------------------------------------
# The budget API


def test_split_budget_is_54_to_10_with_exact_rounding():
    assert [vz.split_budget(t) for t in (64, 128, 192, 32)] == [(54, 10), (108, 20), (162, 30), (27, 5)]
    assert all(vz.split_budget(t) == dk for t, dk in vz.BUDGETS.items())
    # contextual = floor(10 T / 64 + 1/2): 16 -> 2.5 -> 3 and 48 -> 7.5 -> 8 (halves up), 17 -> 2.66 -> 3.
    assert [vz.split_budget(t) for t in (1, 3, 4, 16, 17, 48, 577)] == [
        (1, 0), (3, 0), (3, 1), (13, 3), (14, 3), (40, 8), (487, 90)]
    for t in range(1, 700):
        d, k = vz.split_budget(t)
        assert d + k == t and d >= 1 and 0 <= k and abs(k - t * 10 / 64) <= 0.5
    with pytest.raises(ValueError, match="tokens must be >= 1"):
        vz.split_budget(0)
    with pytest.raises(TypeError, match="tokens must be an int"):
        vz.split_budget(64.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_tokens_and_ratio_on_every_encoder(family):
    model = tiny_tower(family)
    x = pixels(2, 56, seed=7)
    n = TOKENS[family]
    explicit = run(vz.apply(model, dominant=8, contextual=1), x)
    with vz.patched(model, tokens=9):
        assert vzt.get_patch(model).settings == {"dominant": 8, "contextual": 1, "layer": -2}
        assert_same_output(run(model, x), explicit)
    # ratio: T = floor(r N + 1/2) of this call's N tokens, then split 54:10.
    with vz.patched(model, ratio=0.5, layer=-1):
        assert vzt.get_patch(model).settings == {"ratio": 0.5, "layer": -1}
        out = run(model, x)
    expected_tokens = int(0.5 * n + 0.5)
    d, k = vz.split_budget(expected_tokens)
    assert out.last_hidden_state.shape == (2, d + k, 64) and out.keep.shape == (2, d)
    assert_same_output(out, run(vz.apply(model, dominant=d, contextual=k, layer=-1), x))
    assert vzt.get_patch(model).settings == {"dominant": d, "contextual": k, "layer": -1}
    vz.remove(model)


def test_ratio_follows_each_calls_token_count():
    """DINOv2 interpolates its position embeddings: N follows the input size, and so does a ratio."""
    model = vz.apply(tiny_tower("dinov2"), ratio=0.25)
    for size, n in ((56, 17), (112, 65)):
        out = run(model, pixels(1, size, seed=8))
        d, k = vz.split_budget(int(0.25 * n + 0.5))
        assert out.keep.shape == (1, d) and out.last_hidden_state.shape == (1, d + k, 64)


def test_budget_api_on_llava():
    """LLaVA resolves a ratio at apply time against its tower's N (65 here): the placeholder count
    is fixed before any image."""
    model = tiny_llava(vision_layers=2, text_layers=1)
    with vz.patched(model, tokens=12):
        patch = vzt.get_patch(model)
        assert (patch.dominant, patch.contextual, patch.tokens_per_image) == (10, 2, 12)
        assert model.get_image_features(pixel_values=pixels(1, 112)).pooler_output[0].shape == (12, 48)
    with vz.patched(model, ratio=0.3):
        patch = vzt.get_patch(model)
        assert patch.settings == {"ratio": 0.3, "layer": -2}
        assert (patch.dominant, patch.contextual) == vz.split_budget(20)  # floor(0.3 * 65 + 1/2) = 20
        assert model.get_image_features(pixel_values=pixels(1, 112)).pooler_output[0].shape == (20, 48)
    assert vzt.get_patch(model) is None


def test_bad_budgets_raise_clear_errors():
    model = tiny_tower("clip")
    for kwargs, error, match in [
        (dict(tokens=64, ratio=0.1), ValueError, "tokens= or ratio=, not both"),
        (dict(tokens=64, dominant=54), ValueError, "tokens= or dominant= / contextual=, not both"),
        (dict(ratio=0.1, contextual=10), ValueError, "ratio= or dominant= / contextual=, not both"),
        (dict(tokens=0), ValueError, "tokens must be >= 1"),
        (dict(tokens=6.5), TypeError, "tokens must be an int"),
        (dict(tokens=True), TypeError, "tokens must be an int"),
        (dict(ratio=0.0), ValueError, r"ratio must be in \(0, 1\]"),
        (dict(ratio=1.5), ValueError, r"ratio must be in \(0, 1\]"),
        (dict(ratio=float("nan")), ValueError, r"ratio must be in \(0, 1\]"),
        (dict(ratio="0.1"), TypeError, "ratio must be a float"),
    ]:
        with pytest.raises(error, match=match):
            vz.apply(model, **kwargs)
        assert vzt.get_patch(model) is None and "forward" not in model.__dict__
    with vz.patched(model, tokens=6), pytest.raises(TypeError, match=r"does not take \['head_mask'\]"):
        run(model, pixels(1, 56), head_mask=None)
    with vz.patched(model, tokens=18), pytest.raises(ValueError, match="must be <="):
        run(model, pixels(1, 56))  # 18 > N = 17: the op's own check, at run time
    with vz.patched(model, ratio=0.01), pytest.raises(ValueError, match="rounds to 0 tokens"):
        run(model, pixels(1, 56))  # 0.01 * 17 -> 0
