"""varlen_scores_and_metric: packed images (Qwen2-VL's NaViT layout) with cu_seqlens.

Every backend is compared with the reference (visionzip_kernels.reference: a dense softmax per
image), and the reference with an independent oracle written the way upstream's Qwen2.5-VL port
computes it: one eager [H, T, T] softmax over all packed tokens with a block-diagonal mask per image,
mean over heads, sum over rows, ``view(-1, 4).mean`` for the 2x2 merge unit; the metric as
``k.view(-1, 4, H, d).mean(1).mean(1)``. The oracle runs in float64 on the same (possibly
low-precision) inputs, so fp32-accumulating kernels must match it at fp32 tolerances.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import visionzip_kernels
from visionzip_kernels import reference, upstream

from helpers import FP32_ATOL, FP32_RTOL, assert_close_verbose, assert_equal_verbose, assert_within_torch_error

ops = torch.ops.visionzip
OP = "varlen_scores_and_metric"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Image lengths: Qwen2.5-VL images are multiples of 4 tokens (2x2 merge units); unit 1 also takes
# odd lengths. Not powers of two, different sizes in one call, and a one-image case.
LENGTHS_UNIT4 = (4 * 37, 4 * 64, 4 * 145)
LENGTHS_UNIT1 = (37, 64, 145)


def packed_qk(lengths, H=4, d=20, dtype=torch.float32, seed=0, fused_qkv=False, device="cpu", peaked=1.0):
    """q, k [T, H, d] and cu_seqlens (int32) for images of the given lengths. ``fused_qkv``: q and k
    are slices of one [T, 3, H, d] tensor, as Qwen's vision blocks split their fused qkv projection
    (row stride 3*H*d, not contiguous)."""
    T = sum(lengths)
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(T, 3, H, d, generator=g) * peaked).to(dtype=dtype, device=device)
    if fused_qkv:
        q, k = qkv[:, 0], qkv[:, 1]
        assert not q.is_contiguous()
    else:
        q, k = qkv[:, 0].contiguous(), qkv[:, 1].contiguous()
    offsets = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    return q, k, offsets


def upstream_oracle(q, k, cu_seqlens, scale, unit):
    """visionzip_kernels.upstream's eager [H, T, T] way (block-diagonal mask per image, mean over
    heads, sum over rows, mean over units), in float64 on the given inputs."""
    return upstream.varlen_scores_and_metric(q.double(), k.double(), cu_seqlens, scale, unit)


def tolerances(dtype):
    """Scores are always fp32 sums (fp64 inputs too): fp32 tolerances. The metric is rounded once to
    k's dtype: one rounding step of it against the float64 oracle."""
    metric_rtol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, torch.finfo(dtype).eps)
    return dict(scores=(FP32_ATOL, 2 * FP32_RTOL), metric=(1e-6 if dtype != torch.float64 else 1e-12, metric_rtol))


def check_against_oracle(scores, metric, q, k, cu_seqlens, scale, unit, name):
    tol = tolerances(k.dtype)
    exact_scores, exact_metric = upstream_oracle(q, k, cu_seqlens, scale, unit)
    assert scores.dtype == torch.float32 and metric.dtype == k.dtype
    atol, rtol = tol["scores"]
    assert_close_verbose(scores, exact_scores, atol=atol, rtol=rtol, name=f"{name} scores vs oracle")
    atol, rtol = tol["metric"]
    assert_close_verbose(metric, exact_metric, atol=atol, rtol=rtol, name=f"{name} metric vs oracle")


def assert_metric_matches_reference(metric, ref_metric, k, name):
    """The kernels sum over the unit, then over heads, in order; torch's mean picks its own order
    over heads for some columns (vectorised), so the two differ by the accumulator's summation
    error (a few of its rounding steps of max |k|, where the mean cancels), then by at most one
    rounding step of k's dtype."""
    accumulator = torch.float64 if k.dtype == torch.float64 else torch.float32
    atol = 4 * torch.finfo(accumulator).eps * (k.double().abs().max().item() if k.numel() else 0.0)
    rtol = 1e-14 if metric.dtype == torch.float64 else torch.finfo(metric.dtype).eps
    assert_close_verbose(metric, ref_metric, atol=atol, rtol=rtol, name=name)


# ---------------------------------------------------------------------------------------------
# The reference against the upstream-style oracle


@pytest.mark.parametrize("unit,lengths", [(1, LENGTHS_UNIT1), (4, LENGTHS_UNIT4), (4, (4 * 90,)), (1, (1,))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_reference_matches_upstream_oracle(dtype, unit, lengths):
    q, k, cu = packed_qk(lengths, dtype=dtype, seed=unit)
    scale = q.shape[-1] ** -0.5
    scores, metric = reference.varlen_scores_and_metric(q, k, cu, scale, unit)
    check_against_oracle(scores, metric, q, k, cu, scale, unit, "reference")


def test_oracle_sees_image_boundaries():
    """The oracle (and so the tests) can fail: attention across images, as upstream's unmasked port
    computes it, gives different scores."""
    q, k, cu = packed_qk(LENGTHS_UNIT4, H=2, d=16, peaked=2.0)
    scale = 16**-0.5
    masked, _ = upstream_oracle(q, k, cu, scale, 4)
    one_image, _ = upstream_oracle(q, k, torch.tensor([0, q.shape[0]]), scale, 4)
    assert (masked - one_image).abs().max() > 0.1
    # Every image's scores sum to its length / unit (each query row sums to 1).
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        assert abs(masked[start // 4 : end // 4].sum().item() - (end - start) / 4) < 1e-9


# ---------------------------------------------------------------------------------------------
# The C++ CPU kernel


CPP_CASES = [
    (dtype, unit, lengths, fused)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    for unit, lengths in ((1, LENGTHS_UNIT1), (4, LENGTHS_UNIT4), (4, (4 * 300,)))  # 1200: four query chunks
    for fused in (False, True)
    if fused or dtype in (torch.float32, torch.bfloat16)
]


@pytest.mark.parametrize("dtype,unit,lengths,fused", CPP_CASES,
                         ids=[f"{str(c[0])[6:]}-unit{c[1]}-{len(c[2])}img-{'qkv' if c[3] else 'contig'}"
                              for c in CPP_CASES])
def test_cpp_vs_reference_and_oracle(dtype, unit, lengths, fused):
    H, d = (16, 80) if len(lengths) == 1 else (3, 20)  # Qwen2.5-VL's vision heads, and odd small ones
    q, k, cu = packed_qk(lengths, H=H, d=d, dtype=dtype, seed=len(lengths) + unit, fused_qkv=fused)
    scale = d**-0.5
    scores, metric = visionzip_kernels.varlen_scores_and_metric(q, k, cu, unit=unit)
    ref_scores, ref_metric = reference.varlen_scores_and_metric(q, k, cu, scale, unit)
    assert scores.shape == (q.shape[0] // unit,) and metric.shape == (q.shape[0] // unit, d)
    assert_close_verbose(scores, ref_scores, atol=FP32_ATOL, rtol=2 * FP32_RTOL, name="scores vs reference")
    assert_metric_matches_reference(metric, ref_metric, k, "metric vs reference")
    check_against_oracle(scores, metric, q, k, cu, scale, unit, "C++")
    if dtype in (torch.float16, torch.bfloat16):
        # docs/SPEC.md's low-precision bound: within 2x PyTorch's own error in that dtype.
        exact, _ = upstream_oracle(q, k, cu, scale, unit)
        native, _ = reference.varlen_scores_and_metric(q, k, cu, scale, unit, upcast=False)
        assert_within_torch_error(scores, exact, native.to(dtype), "scores vs PyTorch's own error")


@st.composite
def packed_shapes(draw):
    unit = draw(st.sampled_from([1, 4]))
    lengths = draw(st.lists(st.integers(0, 40).map(lambda n: n * unit), min_size=1, max_size=4))
    return unit, tuple(lengths), draw(st.integers(1, 5)), draw(st.integers(1, 37)), draw(st.booleans())


@given(packed_shapes())
@settings(max_examples=40)
def test_cpp_vs_reference_random_shapes(shape):
    """Random image lengths (empty and one-unit images included), head counts and head dims (odd,
    below one SIMD lane block), contiguous or fused-qkv layouts."""
    unit, lengths, H, d, fused = shape
    q, k, cu = packed_qk(lengths, H=H, d=d, seed=sum(lengths) + H + d, fused_qkv=fused and sum(lengths) > 0)
    scale = d**-0.5
    scores, metric = ops.varlen_scores_and_metric(q, k, cu, scale, unit)
    ref_scores, ref_metric = reference.varlen_scores_and_metric(q, k, cu, scale, unit)
    assert_close_verbose(scores, ref_scores, atol=FP32_ATOL, rtol=2 * FP32_RTOL, name="scores vs reference")
    assert_metric_matches_reference(metric, ref_metric, k, "metric vs reference")


def test_cpp_one_image_is_dense_attention_received():
    """One image, unit 1: the dense attention_received (a mean over query rows) times N."""
    q, k, cu = packed_qk((100,), H=4, d=24, seed=3)
    scale = 24**-0.5
    scores, metric = ops.varlen_scores_and_metric(q, k, cu, scale, 1)
    dense, dense_metric = ops.scores_and_metric(q[None], k[None], scale, False)
    assert_close_verbose(scores, dense[0] * 100, atol=FP32_ATOL, rtol=FP32_RTOL, name="scores vs dense")
    assert_equal_verbose(metric, dense_metric[0], "metric vs dense")


def test_cpp_each_image_is_its_own_call():
    """Packing changes nothing: each image's slice of the outputs is the one-image call's."""
    q, k, cu = packed_qk(LENGTHS_UNIT4, H=2, d=16, seed=5)
    scores, metric = ops.varlen_scores_and_metric(q, k, cu, 0.25, 4)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        alone = torch.tensor([0, end - start], dtype=torch.int64)
        s, m = ops.varlen_scores_and_metric(q[start:end], k[start:end], alone, 0.25, 4)
        assert_equal_verbose(scores[start // 4 : end // 4], s, "scores of one image")
        assert_equal_verbose(metric[start // 4 : end // 4], m, "metric of one image")


def test_cpp_empty_images_and_empty_batch():
    """Zero-length images are allowed anywhere (cu_seqlens non-decreasing); T = 0 gives empty outputs."""
    lengths = (0, 36, 0, 20, 0)
    q, k, cu = packed_qk(lengths, H=2, d=8, seed=7)
    scores, metric = ops.varlen_scores_and_metric(q, k, cu.long(), 0.3, 4)
    ref_scores, ref_metric = reference.varlen_scores_and_metric(q, k, cu, 0.3, 4)
    assert_close_verbose(scores, ref_scores, atol=FP32_ATOL, rtol=FP32_RTOL, name="scores")
    assert_metric_matches_reference(metric, ref_metric, k, "metric")
    check_against_oracle(scores, metric, q, k, cu, 0.3, 4, "C++ with empty images")
    for offsets in ([0], [0, 0, 0]):
        empty = torch.empty(0, 2, 8)
        s, m = ops.varlen_scores_and_metric(empty, empty, torch.tensor(offsets), 0.3, 4)
        assert s.shape == (0,) and m.shape == (0, 8)


def test_cpp_deterministic_across_thread_counts(num_threads):
    q, k, cu = packed_qk((4 * 37, 4 * 64, 4 * 145, 4 * 9), H=6, d=40, dtype=torch.bfloat16, seed=11, fused_qkv=True)
    results = []
    for threads in (1, 2, 3):
        num_threads(threads)
        results.append(ops.varlen_scores_and_metric(q, k, cu, 40**-0.5, 4))
    for threads, (scores, metric) in zip((2, 3), results[1:]):
        assert_equal_verbose(scores, results[0][0], f"scores with {threads} threads vs 1")
        assert_equal_verbose(metric, results[0][1], f"metric with {threads} threads vs 1")


def test_outputs_never_require_grad():
    q, k, cu = packed_qk((8, 12), H=2, d=8)
    q.requires_grad_(True)
    k.requires_grad_(True)
    scores, metric = visionzip_kernels.varlen_scores_and_metric(q, k, cu, unit=4)
    assert not scores.requires_grad and not metric.requires_grad


def test_inputs_are_not_modified():
    q, k, cu = packed_qk(LENGTHS_UNIT4, H=2, d=8, fused_qkv=True)
    before = [t.clone() for t in (q, k, cu)]
    ops.varlen_scores_and_metric(q, k, cu, 0.5, 4)
    for t, b in zip((q, k, cu), before):
        assert_equal_verbose(t, b, "input after the call")


def test_compile_fullgraph():
    torch._dynamo.reset()

    def step(q, k, cu):
        scores, metric = visionzip_kernels.varlen_scores_and_metric(q, k, cu, unit=4)
        return scores * 2, metric

    compiled = torch.compile(step, fullgraph=True)
    for seed in (0, 1):  # the second call reuses the graph
        q, k, cu = packed_qk(LENGTHS_UNIT4, H=2, d=16, seed=seed, fused_qkv=True)
        got = compiled(q, k, cu)
        eager = step(q, k, cu)
        assert_equal_verbose(got[0], eager[0], "compiled scores vs eager")
        assert_equal_verbose(got[1], eager[1], "compiled metric vs eager")
        ref_scores, _ = reference.varlen_scores_and_metric(q, k, cu, 0.25, 4)
        assert_close_verbose(got[0] / 2, ref_scores, atol=FP32_ATOL, rtol=FP32_RTOL, name="compiled vs reference")


def test_compile_dynamic_total_lengths():
    """Packed images of 5 total lengths (3 images, different sizes each call) under
    torch.compile(dynamic=True, fullgraph=True): at most 2 compilations, results equal to eager."""
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    def step(q, k, cu):
        return visionzip_kernels.varlen_scores_and_metric(q, k, cu, unit=4)

    compiled = torch.compile(step, backend=counting_backend, dynamic=True, fullgraph=True)
    for i in range(5):
        q, k, cu = packed_qk((16 + 4 * i, 12, 20 + 8 * i), H=2, d=16, seed=i, fused_qkv=True)
        got, eager = compiled(q, k, cu), step(q, k, cu)
        assert_equal_verbose(got[0], eager[0], f"T={q.shape[0]}: compiled scores vs eager")
        assert_equal_verbose(got[1], eager[1], f"T={q.shape[0]}: compiled metric vs eager")
    assert len(graphs) <= 2, f"{len(graphs)} compilations for 5 total lengths"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    q, k, cu = packed_qk((12, 0, 20), H=3, d=8, dtype=dtype, fused_qkv=dtype == torch.bfloat16)
    torch.library.opcheck(ops.varlen_scores_and_metric.default, (q, k, cu, 0.35), {"unit": 4})
    torch.library.opcheck(ops.varlen_scores_and_metric.default, (q, k, cu.long(), 0.35), {"unit": 1})


# ---------------------------------------------------------------------------------------------
# Bad input: ValueError / TypeError naming the argument, before any kernel runs. Metadata rules give
# the same message through the fake kernel (meta tensors) and the reference; cu_seqlens' values are
# data, checked where they live on the host (the C++ kernel and the reference).


def _args(device="cpu", T=24, H=2, d=8, dtype=torch.float32, cu=(0, 8, 24), cu_dtype=torch.int32, **changes):
    def make(shape, dt=dtype):
        return torch.empty(shape, dtype=dt, device="meta") if device == "meta" else torch.randn(shape).to(dt)

    args = dict(q=make((T, H, d)), k=make((T, H, d)),
                cu_seqlens=torch.tensor(cu, dtype=cu_dtype, device=device), scale=0.5, unit=4)
    args.update({name: (value(make) if callable(value) else value) for name, value in changes.items()})
    return args


def _normalized(message: str) -> str:
    return re.sub(r"\s+", " ", message.split("\n")[0]).strip()


def _rejected(error, names, metadata_rule, **changes):
    with pytest.raises(error) as info:
        ops.varlen_scores_and_metric(**_args(**changes))
    message = _normalized(str(info.value))
    assert message.startswith(f"visionzip.{OP}: "), message
    for name in [names] if isinstance(names, str) else names:
        assert re.search(rf"\b{name}\b", message), f"{name!r} not in {message!r}"
    with pytest.raises(error) as ref_info:
        reference.varlen_scores_and_metric(**_args(**changes))
    assert _normalized(str(ref_info.value)) == message, "reference and C++ messages differ"
    if metadata_rule:
        with pytest.raises(error) as meta_info:
            ops.varlen_scores_and_metric(**_args(device="meta", **changes))
        assert _normalized(str(meta_info.value)) == message, "fake/meta and C++ messages differ"
    return message


METADATA_RULES = {
    "q rank": (ValueError, "q", dict(q=lambda f: f((24, 16)))),
    "k rank": (ValueError, "k", dict(k=lambda f: f((1, 24, 2, 8)))),
    "q dtype": (TypeError, "q", dict(q=lambda f: f((24, 2, 8), torch.int32))),
    "k dtype": (TypeError, "k", dict(k=lambda f: f((24, 2, 8), torch.float16))),
    "k tokens": (ValueError, "k", dict(k=lambda f: f((20, 2, 8)))),
    "k heads": (ValueError, "k", dict(k=lambda f: f((24, 3, 8)))),
    "k head dim": (ValueError, "k", dict(k=lambda f: f((24, 2, 4)))),
    "no heads": (ValueError, "k", dict(H=0)),
    "cu_seqlens rank": (ValueError, "cu_seqlens", dict(cu=((0, 8, 24),))),
    "cu_seqlens dtype": (TypeError, "cu_seqlens", dict(cu_dtype=torch.float32)),
    "cu_seqlens empty": (ValueError, "cu_seqlens", dict(cu=())),
    "unit": (ValueError, "unit", dict(unit=2)),
    "unit 0": (ValueError, "unit", dict(unit=0)),
    "T not a multiple of unit": (ValueError, ["q", "unit"], dict(T=22, cu=(0, 8, 22))),
}


@pytest.mark.parametrize("rule", sorted(METADATA_RULES))
def test_bad_input_metadata(rule):
    error, names, changes = METADATA_RULES[rule]
    _rejected(error, names, True, **changes)


VALUE_RULES = {
    "first offset": ("cu_seqlens[0]", dict(cu=(4, 8, 24))),
    "decreasing": ("non-decreasing", dict(cu=(0, 16, 8, 24))),
    "last offset": ("cu_seqlens[-1]", dict(cu=(0, 8, 20))),
    "last offset beyond T": ("cu_seqlens[-1]", dict(cu=(0, 8, 28))),
    "length not a multiple of unit": ("image 0", dict(cu=(0, 6, 24))),
}


@pytest.mark.parametrize("rule", sorted(VALUE_RULES))
def test_bad_cu_seqlens_values(rule):
    words, changes = VALUE_RULES[rule]
    message = _rejected(ValueError, "cu_seqlens", False, **changes)
    assert words in message


def test_bad_device_and_wrapper_types():
    # A meta k beside a CPU q dispatches to the fake kernel, which names k and its device.
    with pytest.raises(ValueError, match=r"k must be on the same device as q"):
        ops.varlen_scores_and_metric(**_args(k=torch.empty(24, 2, 8, device="meta")))
    with pytest.raises(TypeError, match=r"unit must be an int"):
        visionzip_kernels.varlen_scores_and_metric(*list(_args().values())[:3], unit=4.0)
    # cu_seqlens may be on the CPU beside data elsewhere, but not on another device.
    with pytest.raises(ValueError, match=r"cu_seqlens must be on the device of q"):
        ops.varlen_scores_and_metric(**_args(device="meta", cu_seqlens=torch.tensor([0, 8, 24], device="meta"),
                                             q=torch.randn(24, 2, 8), k=torch.randn(24, 2, 8)))


# ---------------------------------------------------------------------------------------------
# The Triton kernels (CUDA; on CPU tensors under TRITON_INTERPRET=1, at small grids)

TRITON_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TRITON_CASES = [
    (torch.float32, 4, (12, 0, 36, 20), 2, 20),
    (torch.float16, 4, (36, 64), 2, 80),
    (torch.bfloat16, 1, (33, 7, 50), 1, 16),
    (torch.float64, 4, (44, 8), 1, 24),
]


def _triton_device(device):
    if device == "cuda":
        return pytest.param(device, marks=pytest.mark.cuda)
    return pytest.param(device, marks=pytest.mark.skipif(
        not INTERPRETED, reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest.py without CUDA)"))


@pytest.mark.parametrize("device", [_triton_device(d) for d in TRITON_DEVICES])
@pytest.mark.parametrize("dtype,unit,lengths,H,d", TRITON_CASES,
                         ids=[f"{str(c[0])[6:]}-unit{c[1]}-{len(c[2])}img-d{c[4]}" for c in TRITON_CASES])
def test_triton_vs_reference_and_cpp(dtype, unit, lengths, H, d, device):
    pytest.importorskip("triton")
    import triton_ops

    q, k, cu = packed_qk(lengths, H=H, d=d, dtype=dtype, seed=d, fused_qkv=True, device=device)
    scale = d**-0.5
    scores, metric = triton_ops.varlen_scores_and_metric(q, k, cu.to(device), scale, unit)
    ref_scores, ref_metric = reference.varlen_scores_and_metric(q.cpu(), k.cpu(), cu, scale, unit)
    cpp_scores, cpp_metric = ops.varlen_scores_and_metric(q.cpu(), k.cpu(), cu, scale, unit)
    assert_close_verbose(scores, ref_scores, atol=FP32_ATOL, rtol=2 * FP32_RTOL, name="Triton scores vs reference")
    assert_close_verbose(scores, cpp_scores, atol=FP32_ATOL, rtol=2 * FP32_RTOL, name="Triton scores vs C++")
    # The same sums in the same order, IEEE divisions: the C++ kernel's bits.
    assert_equal_verbose(metric, cpp_metric, "Triton metric vs C++")
    assert_metric_matches_reference(metric, ref_metric, k, "Triton metric vs reference")
    check_against_oracle(scores.cpu(), metric.cpu(), q.cpu(), k.cpu(), cu, scale, unit, "Triton")


@pytest.mark.parametrize("device", [_triton_device(d) for d in TRITON_DEVICES])
def test_triton_checks_and_empty(device):
    pytest.importorskip("triton")
    import triton_ops
    from visionzip_kernels import backends

    # The kernel registered for the op validates before the launcher (which takes valid arguments).
    kernel = backends.triton_kernel("varlen_scores_and_metric")
    q, k, cu = packed_qk((8, 12), H=1, d=16, device=device)
    with pytest.raises(ValueError, match=r"unit must be 1 or 4"):
        kernel(q, k, cu, 0.25, 3)
    # A CPU cu_seqlens is checked for free, whatever the data's device.
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] must equal"):
        kernel(q, k, torch.tensor([0, 8, 16]), 0.25, 4)
    empty = torch.empty(0, 1, 16, device=device)
    scores, metric = triton_ops.varlen_scores_and_metric(empty, empty, torch.tensor([0, 0], device=device), 0.25, 4)
    assert scores.shape == (0,) and metric.shape == (0, 16)


_DISPATCH_SCRIPT = """
import torch, triton_ops, visionzip_kernels as vz
from helpers import assert_close_verbose, assert_equal_verbose
from test_varlen_scores import packed_qk
from visionzip_kernels import reference
calls = []
original = triton_ops.varlen_scores_and_metric
triton_ops.varlen_scores_and_metric = lambda *a, **kw: calls.append(1) or original(*a, **kw)
q, k, cu = packed_qk((12, 0, 20), H=2, d=16, fused_qkv=True)
scores, metric = vz.varlen_scores_and_metric(q, k, cu, unit=4)
assert calls, "varlen_scores_and_metric did not run the Triton kernel"
ref_scores, ref_metric = reference.varlen_scores_and_metric(q, k, cu, 0.25, 4)
assert_close_verbose(scores, ref_scores, atol=1e-6, rtol=2e-5, name="scores")
assert_close_verbose(metric, ref_metric, atol=1e-6, rtol=1e-6, name="metric")
result = torch.library.opcheck(torch.ops.visionzip.varlen_scores_and_metric.default, (q, k, cu, 0.25, 4))
assert all(v == "SUCCESS" for v in result.values()), result
print("dispatch ok")
"""


@pytest.mark.skipif(not INTERPRETED, reason="the Triton route on CPU tensors needs TRITON_INTERPRET=1")
def test_backend_switch_routes_through_triton():
    """VISIONZIP_BACKEND=triton (read at import, so in a subprocess): the op runs the Triton launcher,
    which the dispatcher reaches with the C++ schema and the Python fake kernel (opcheck)."""
    pytest.importorskip("triton")
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, VISIONZIP_BACKEND="triton", TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", _DISPATCH_SCRIPT], cwd=Path(__file__).resolve().parent, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dispatch ok" in result.stdout
