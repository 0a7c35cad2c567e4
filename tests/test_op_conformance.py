"""Op conformance: torch.library.opcheck on every op (schema, autograd registration, fake kernel,
AOT dispatch), gradcheck / gradgradcheck in float64 for the merge, torch.compile(fullgraph=True)
against eager and the reference, and empty batches (B = 0)."""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

from visionzip_kernels import op_table, reference

from helpers import (
    FP32_ATOL,
    FP32_RTOL,
    assert_close_verbose,
    assert_equal_verbose,
    assert_tokens_match_reference,
    make_case,
    merge_inputs,
    packed_inputs,
    separated_scores,
)

ops = torch.ops.visionzip


def _merge(dtype=torch.float32, strided=False, B=2, N=33, C=24, D=6, K=5):
    hidden, scores, metric, keep = merge_inputs(B, N, C, D, K, True, dtype, strided=strided, d=8)
    return hidden, scores, metric, keep, D, K


def _samples(op: str, dtype: torch.dtype, strided: bool, requires_grad: bool):
    """(args, kwargs) for one opcheck call; requires_grad only on the differentiable argument."""
    if op in ("cls_attention", "attention_received", "scores_and_metric"):
        case = make_case(2, 33, 1, H=3, d=8, dtype=dtype, strided=strided)
        if op == "scores_and_metric":
            # bf16 also covers keep_cls=False
            return (case.q, case.k, case.scale), {"keep_cls": dtype == torch.float32}
        q = case.q[:, 0] if op == "cls_attention" else case.q
        return (q, case.k, case.scale), {}
    if op == "varlen_scores_and_metric":
        # Two images (12 + 20 tokens) packed, merge unit 4; strided: q and k are views of a fused qkv.
        case = make_case(1, 32, 1, H=3, d=8, dtype=dtype, strided=strided)
        cu_seqlens = torch.tensor([0, 12, 32], dtype=torch.int32)
        return (case.q[0], case.k[0], cu_seqlens, case.scale), {"unit": 4}
    if op.startswith("varlen_"):
        return _varlen_samples(op, dtype, strided, requires_grad)
    hidden, scores, metric, keep, D, K = _merge(dtype, strided)
    if op == "dominant_topk":
        return (scores.to(dtype), D), {"keep_cls": False}
    if op == "contextual_merge":
        return (hidden.detach().clone().requires_grad_(requires_grad), metric, keep, K), {}
    if op == "contextual_merge_backward":
        g = torch.randn(hidden.shape[0], D + K, hidden.shape[2]).to(dtype)
        return (g.requires_grad_(requires_grad), metric, keep, hidden.shape[1]), {}
    if op == "select_merge":
        return (hidden.detach().clone().requires_grad_(requires_grad), scores, metric, D, K), {"keep_cls": True}
    raise AssertionError(op)


def _varlen_samples(op: str, dtype: torch.dtype, strided: bool, requires_grad: bool):
    sizes, dominant, contextual = [40, 17, 29], [5, 17, 0], [6, 0, 5]
    hidden, scores, metric, cu = packed_inputs(sizes, dominant, contextual, C=8, d=4, dtype=dtype, strided=strided)
    if op == "varlen_select_merge":
        return (hidden.detach().clone().requires_grad_(requires_grad), scores, metric, cu, dominant, contextual), {}
    if op == "varlen_select_merge_backward":
        grad = torch.randn(sum(dominant) + sum(contextual), 8).to(dtype).requires_grad_(requires_grad)
        return (grad, scores, metric, cu, dominant, contextual), {}
    raise AssertionError(op)


# The op list comes from the op table; test_op_table_matches_the_schema_block ties it to csrc/ops.cpp.
ALL_OPS = list(op_table.NAMES)
DIFFERENTIABLE = {op.name for op in op_table.OPS if op.differentiable}
OPCHECK_CASES = (
    [(op, torch.float32, False, False) for op in ALL_OPS]
    + [(op, torch.float32, False, True) for op in sorted(DIFFERENTIABLE)]
    + [(op, torch.bfloat16, True, op in DIFFERENTIABLE) for op in ALL_OPS]
)


@pytest.mark.parametrize(
    "op,dtype,strided,requires_grad",
    OPCHECK_CASES,
    ids=[
        f"{o}-{str(d)[6:]}-{'strided' if s else 'contig'}-{'grad' if r else 'nograd'}" for o, d, s, r in OPCHECK_CASES
    ],
)
def test_opcheck(op, dtype, strided, requires_grad):
    args, kwargs = _samples(op, dtype, strided, requires_grad)
    torch.library.opcheck(getattr(ops, op).default, args, kwargs)


@pytest.mark.parametrize("op", sorted(DIFFERENTIABLE))
def test_inference_calls_run_no_python(op):
    """With no input requiring grad, a differentiable op goes from torch's op object to the kernel
    without a Python frame: its autograd is registered in C++ (csrc/autograd.cpp)."""
    args, kwargs = _samples(op, torch.float32, False, requires_grad=False)
    frames = []

    def record(frame, event, arg):
        if event == "call":
            frames.append(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")

    overload = getattr(ops, op).default
    sys.setprofile(record)
    try:
        overload(*args, **kwargs)
    finally:
        sys.setprofile(None)
    # OpOverload.__call__ itself is Python (torch/_ops.py); nothing else may run.
    others = [f for f in frames if not f.replace("\\", "/").endswith("torch/_ops.py:__call__")]
    assert others == [], f"{op} ran Python on the inference path: {others}"


@pytest.mark.parametrize("op", sorted(set(ALL_OPS) - DIFFERENTIABLE))
def test_non_differentiable_ops_never_require_grad(op):
    """docs/SPEC.md "Gradients": q, k, scores and metric get no gradient. Inputs that require grad give
    outputs that do not (no graph, no "autograd kernel was not registered" warning)."""
    args, kwargs = _samples(op, torch.float32, False, requires_grad=False)
    args = tuple(a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                 else a for a in args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = getattr(ops, op)(*args, **kwargs)
    for t in out if isinstance(out, tuple) else (out,):
        assert not t.requires_grad and t.grad_fn is None, f"{op} output requires grad"


ROOT = Path(__file__).resolve().parents[1]


def _cpp_names(path: str, pattern: str) -> list[str]:
    return re.findall(pattern, (ROOT / path).read_text())


def test_op_table_matches_the_schema_block():
    """The C++ schema block (csrc/ops.cpp) and the op table name the same ops, both ways, and so do the
    schemas torch holds for the namespace; csrc/autograd.cpp implements autograd for exactly the
    table's differentiable ops (the others fall through, registered from the table)."""
    defined = _cpp_names("csrc/ops.cpp", r'm\.def\(\s*"(\w+)\(')
    assert len(defined) == len(set(defined)), f"an op defined twice in csrc/ops.cpp: {defined}"
    assert set(defined) == set(op_table.NAMES), (
        f"only in csrc/ops.cpp: {set(defined) - set(op_table.NAMES)}; only in the table: "
        f"{set(op_table.NAMES) - set(defined)}")
    for name in op_table.NAMES:
        assert getattr(ops, name).default.name() == f"visionzip::{name}"
    autograd = set(_cpp_names("csrc/autograd.cpp", r'm\.impl\(\s*"(\w+)"'))
    assert autograd == DIFFERENTIABLE, f"autograd.cpp: {sorted(autograd)}, table: {sorted(DIFFERENTIABLE)}"


def _schema_arguments(name: str) -> list[tuple[str, str | None]]:
    """(argument name, default text or None) of ``name``'s schema in csrc/ops.cpp."""
    text = re.sub(r'"\s*"', "", (ROOT / "csrc/ops.cpp").read_text())  # join C++'s adjacent string literals
    arguments = re.search(rf'm\.def\(\s*"{name}\((.*?)\)\s*->', text, re.S).group(1)
    parsed = []
    for argument in arguments.split(", "):
        declaration, _, default = argument.partition("=")
        parsed.append((declaration.split()[-1], default or None))
    return parsed


@pytest.mark.parametrize("name", [op.name for op in op_table.OPS if op.launch_checks is not None])
def test_launch_checks_take_the_schema_arguments(name):
    """The Triton kernel binds the dispatcher's arguments to the op's launch checks, whose defaults fill
    in what a caller left out: names, order and defaults must be the schema's."""
    import inspect

    def value(default: str | None):  # the schema's default text as Python's value (bool or int here)
        if default is None:
            return None
        return {"True": True, "False": False}[default] if default in ("True", "False") else int(default)

    parameters = inspect.signature(op_table.BY_NAME[name].launch_checks).parameters.values()
    got = [(p.name, None if p.default is inspect.Parameter.empty else p.default) for p in parameters]
    assert got == [(arg, value(default)) for arg, default in _schema_arguments(name)]


def test_public_wrappers_come_from_the_table():
    import visionzip_kernels

    assert list(visionzip_kernels.ops.__all__) == list(op_table.PUBLIC)
    for name in op_table.PUBLIC:
        assert name in visionzip_kernels.__all__
        assert getattr(visionzip_kernels, name) is op_table.BY_NAME[name].wrapper


def test_every_op_is_opchecked():
    assert {case[0] for case in OPCHECK_CASES} == set(ALL_OPS)
    assert {case[0] for case in OPCHECK_CASES if case[3]} == DIFFERENTIABLE
    defined = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("visionzip::")}
    assert defined == set(ALL_OPS), f"ops without a conformance test: {defined - set(ALL_OPS)}"


# ---------------------------------------------------------------------------------------------
# gradcheck / gradgradcheck in float64. Thousands of tiny calls: one thread, so that a busy machine
# (OpenMP barriers waiting on a descheduled thread) cannot make them crawl.


@pytest.mark.parametrize("D,K", [(6, 5), (1, 0), (3, 30)])  # K = N - D: every rest token is a target
def test_gradcheck_contextual_merge(D, K, num_threads):
    num_threads(1)
    hidden, _, metric, keep, _, _ = _merge(torch.float64, B=2, N=33, C=4, D=D, K=K)
    hidden.requires_grad_()
    fn = lambda h: ops.contextual_merge(h, metric, keep, K)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden,))
    assert torch.autograd.gradgradcheck(fn, (hidden,))


def test_gradcheck_select_merge(num_threads):
    num_threads(1)
    hidden, scores, metric, _, D, K = _merge(torch.float64, C=4)
    hidden.requires_grad_()
    fn = lambda h: ops.select_merge(h, scores, metric, D, K, True)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden,))
    assert torch.autograd.gradgradcheck(fn, (hidden,))


def test_gradcheck_contextual_merge_backward(num_threads):
    """The backward op is differentiable too (its adjoint is the forward merge)."""
    num_threads(1)
    _, _, metric, keep, D, K = _merge(torch.float64, C=4)
    g = torch.randn(2, D + K, 4, dtype=torch.float64, requires_grad=True)
    fn = lambda grad: ops.contextual_merge_backward(grad, metric, keep, 33)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (g,))
    assert torch.autograd.gradgradcheck(fn, (g,))


def test_gradient_is_the_reference_jacobian(num_threads):
    """The full Jacobian of the kernel's merge (by autograd) equals the reference's."""
    num_threads(1)
    hidden, _, metric, keep, D, K = _merge(torch.float64, C=2, N=20, D=4, K=3)
    jac = torch.autograd.functional.jacobian(lambda h: ops.contextual_merge(h, metric, keep, K), hidden)
    ref = torch.autograd.functional.jacobian(lambda h: reference.contextual_merge(h, metric, keep, K), hidden)
    assert_close_verbose(jac, ref, atol=1e-12, rtol=1e-12, name="jacobian")


# ---------------------------------------------------------------------------------------------
# torch.compile


def test_compile_select_merge_fullgraph():
    torch._dynamo.reset()

    def step(hidden, scores, metric):
        tokens, keep = ops.select_merge(hidden, scores, metric, 54, 10, True)
        return tokens * 2, keep

    compiled = torch.compile(step, fullgraph=True)
    for seed in (0, 1):  # the second call reuses the compiled graph
        hidden, scores, metric, keep = merge_inputs(2, 577, 64, 54, 10, True, seed=seed, d=16)
        tokens, got_keep = compiled(hidden, scores, metric)
        eager_tokens, eager_keep = step(hidden, scores, metric)
        assert_equal_verbose(got_keep, eager_keep, "compiled keep vs eager")
        assert_close_verbose(tokens, eager_tokens, atol=0, rtol=0, name="compiled tokens vs eager")
        assert_equal_verbose(got_keep, keep, "compiled keep vs reference")
        assert_tokens_match_reference(tokens / 2, hidden, metric, keep, 10, "compiled vs reference")


def test_compile_dynamic_batch_and_backward():
    """One graph for two batch sizes (the fake kernels' shapes are symbolic in B), and the
    registered backward traced by AOT autograd: hidden.grad matches the reference's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    # aot_eager: the guards come from dynamo and the fake kernels alone (inductor adds size guards of
    # its own for the loss's reduction).
    counter = CompileCounterWithBackend("aot_eager")

    def loss(hidden, scores, metric):
        tokens, _ = ops.select_merge(hidden, scores, metric, 54, 10, True)
        return (tokens.float() ** 2).sum()

    compiled = torch.compile(loss, backend=counter, fullgraph=True, dynamic=True)
    for B in (2, 5):
        hidden, scores, metric, keep = merge_inputs(B, 577, 32, 54, 10, True, seed=B, d=16)
        hidden.requires_grad_()
        (grad,) = torch.autograd.grad(compiled(hidden, scores, metric), hidden)
        ref_hidden = hidden.detach().clone().requires_grad_()
        ref_loss = (reference.contextual_merge(ref_hidden, metric, keep, 10) ** 2).sum()
        (ref_grad,) = torch.autograd.grad(ref_loss, ref_hidden)
        assert_close_verbose(grad, ref_grad, atol=1e-5, rtol=FP32_RTOL, name=f"compiled grad, B={B}")
    assert counter.frame_count == 1, f"recompiled for a new batch size ({counter.frame_count} frames)"


def test_compile_compress_fullgraph():
    from visionzip_kernels.api import compress

    torch._dynamo.reset()
    case = make_case(2, 577, 64, H=4, d=16, strided=True)
    fn = lambda hidden, q, k: compress(hidden, dominant=54, contextual=10, q=q, k=k)  # noqa: E731
    tokens, keep = torch.compile(fn, fullgraph=True)(case.hidden, case.q, case.k)
    eager_tokens, eager_keep = fn(case.hidden, case.q, case.k)
    assert_equal_verbose(keep, eager_keep, "compress keep vs eager")
    assert_close_verbose(tokens, eager_tokens, atol=FP32_ATOL, rtol=FP32_RTOL, name="compress tokens vs eager")
    ref_scores = reference.cls_attention(case.q[:, 0], case.k, case.scale)
    ref_tokens, ref_keep = reference.select_merge(case.hidden, ref_scores, case.k.mean(dim=2), 54, 10, True)
    assert_equal_verbose(keep, ref_keep, "compress keep vs reference")
    assert_close_verbose(tokens, ref_tokens, atol=FP32_ATOL, rtol=FP32_RTOL, name="compress tokens vs reference")


# ---------------------------------------------------------------------------------------------
# Empty batches: B = 0 gives empty outputs of the right shapes (kernel, meta path, reference).


def _empty_batch_calls(device: str):
    N, C, H, d, D, K = 17, 8, 2, 4, 5, 3
    z = lambda *shape, dtype=torch.float32: torch.zeros(0, *shape, dtype=dtype, device=device)  # noqa: E731
    keep = z(D, dtype=torch.int64)
    no_images = torch.zeros(1, dtype=torch.int64, device=device)
    return {
        "cls_attention": (("cls_attention", (z(H, d), z(N, H, d), 0.5)), (0, N)),
        "attention_received": (("attention_received", (z(N, H, d), z(N, H, d), 0.5)), (0, N)),
        "scores_and_metric": (("scores_and_metric", (z(1, H, d), z(N, H, d), 0.5, True)), ((0, N), (0, N, d))),
        "dominant_topk": (("dominant_topk", (z(N), D, True)), (0, D)),
        "contextual_merge": (("contextual_merge", (z(N, C), z(N, d), keep, K)), (0, D + K, C)),
        "contextual_merge_backward": (("contextual_merge_backward", (z(D + K, C), z(N, d), keep, N)), (0, N, C)),
        "select_merge": (("select_merge", (z(N, C), z(N), z(N, d), D, K, True)), ((0, D + K, C), (0, D))),
        # no images: T = 0, cu_seqlens = [0]
        "varlen_select_merge": (("varlen_select_merge", (z(C), z(), z(d), no_images, [], [])), ((0, C), (0,), (1,))),
        "varlen_select_merge_backward": (("varlen_select_merge_backward", (z(C), z(), z(d), no_images, [], [])),
                                         (0, C)),
        # Packed: T = 0 tokens, cu_seqlens = [0] (no images).
        "varlen_scores_and_metric": (
            ("varlen_scores_and_metric", (z(H, d), z(H, d), torch.zeros(1, dtype=torch.int32, device=device), 0.5, 4)),
            ((0,), (0, d))),
    }


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("op", ALL_OPS)
def test_empty_batch(op, device):
    (name, args), shape = _empty_batch_calls(device)[op]
    out = getattr(ops, name)(*args)
    # The reference runs on CPU tensors of the same shapes.
    ref = getattr(reference, name)(*(torch.zeros(a.shape, dtype=a.dtype) if isinstance(a, torch.Tensor) else a
                                     for a in args))
    outs, refs, shapes = (out, ref, shape) if isinstance(out, tuple) else ((out,), (ref,), (shape,))
    for o, r, s in zip(outs, refs, shapes):
        assert tuple(o.shape) == s == tuple(r.shape), f"{op}: {tuple(o.shape)}, reference {tuple(r.shape)}, want {s}"
        assert o.dtype == r.dtype and o.device.type == device


def test_empty_batch_autograd():
    hidden = torch.zeros(0, 17, 8, requires_grad=True)
    tokens, keep = ops.select_merge(hidden, torch.zeros(0, 17), torch.zeros(0, 17, 4), 5, 3)
    tokens.sum().backward()
    assert hidden.grad.shape == hidden.shape and keep.shape == (0, 5)
    assert separated_scores(0, 17).shape == (0, 17)
