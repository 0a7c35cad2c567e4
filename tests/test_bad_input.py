"""Bad input, one test per rule: the op raises the documented error type (ValueError for shape,
value and device rules, TypeError for dtype rules) with a message that names the argument, before
any kernel runs; nothing crashes and no input is modified.

Shape and dtype rules are metadata-only, so each is also checked through the fake/meta path (the
same op on ``device="meta"`` tensors runs the fake kernel, which checks through visionzip_kernels.checks)
and through the reference: all of them must give the same message, since every path runs the one
set of rules in csrc/checks.cpp. Value rules (keep indices, non-finite scores) need data and are
checked on CPU only.
"""

from __future__ import annotations

import re

import pytest
import torch

from visionzip_kernels import reference

ops = torch.ops.visionzip

B, N, C, H, d, D, K = 2, 17, 8, 2, 4, 5, 3

SIGNATURES = {
    "cls_attention": ("q_cls", "k", "scale"),
    "attention_received": ("q", "k", "scale"),
    "scores_and_metric": ("q", "k", "scale", "keep_cls"),
    "dominant_topk": ("scores", "dominant", "keep_cls"),
    "contextual_merge": ("hidden", "metric", "keep", "contextual"),
    "contextual_merge_backward": ("grad_tokens", "metric", "keep", "num_tokens"),
    "select_merge": ("hidden", "scores", "metric", "dominant", "contextual", "keep_cls"),
}


class Factory:
    """Tensors on one device: random data on CPU, no data on meta."""

    def __init__(self, device: str):
        self.device = device
        self.generator = torch.Generator().manual_seed(0)

    def __call__(self, *shape, dtype=torch.float32):
        if self.device == "meta":
            return torch.empty(shape, dtype=dtype, device="meta")
        return torch.randn(shape, generator=self.generator).to(dtype)

    def keep(self, b=B, dominant=D, n=N, dtype=torch.int64):
        if self.device == "meta":
            return torch.empty(b, dominant, dtype=dtype, device="meta")
        rows = [torch.randperm(n, generator=self.generator)[:dominant] for _ in range(b)]
        return (torch.stack(rows) if b else torch.empty(0, dominant, dtype=torch.int64)).to(dtype)


DEFAULTS = {
    "q_cls": lambda f: f(B, H, d),
    "q": lambda f: f(B, N, H, d),
    "k": lambda f: f(B, N, H, d),
    "scores": lambda f: f(B, N),
    "hidden": lambda f: f(B, N, C),
    "metric": lambda f: f(B, N, d),
    "keep": lambda f: f.keep(),
    "grad_tokens": lambda f: f(B, D + K, C),
    "scale": 0.5,
    "dominant": D,
    "contextual": K,
    "keep_cls": True,
    "num_tokens": N,
}


def make_args(op: str, device: str, changes: dict) -> list:
    f = Factory(device)
    args = []
    for name in SIGNATURES[op]:
        value = changes.get(name, DEFAULTS[name])
        args.append(value(f) if callable(value) else value)
    return args


_DTYPE_NAMES = {
    "torch.float32": "Float", "torch.float16": "Half", "torch.bfloat16": "BFloat16", "torch.float64": "Double",
    "torch.int64": "Long", "torch.int32": "Int", "torch.int16": "Short", "torch.int8": "Char",
    "torch.uint8": "Byte", "torch.bool": "Bool",
}


def normalized(message: str) -> str:
    """The first line, with Python's dtype spelling mapped to C++'s (torch.int32 -> Int)."""
    line = message.strip().splitlines()[0]
    return re.sub(r"torch\.\w+", lambda m: _DTYPE_NAMES.get(m.group(0), m.group(0)), line)


def assert_rejected(op: str, changes: dict, error: type, names, *, metadata_rule: bool = True,
                    reference_message: str = "same") -> str:
    """Calls the CPU op with ``changes`` applied to valid arguments and checks the rejection.

    metadata_rule: also reject the same call on meta tensors, with the same message.
    reference_message: "same" (reference raises the same error and message), "type" (same error
    type), or None (the reference does not check this rule)."""
    args = make_args(op, "cpu", changes)
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(error) as info:
        getattr(ops, op)(*args)
    message = normalized(str(info.value))
    assert message.startswith("visionzip"), message
    names = (names,) if isinstance(names, str) else names
    assert any(re.search(rf"(?<![\w.]){re.escape(n)}(?![\w(])", message) for n in names), (
        f"the message does not name {names}: {message!r}"
    )
    for name, now, then in zip(SIGNATURES[op], args, before):
        if isinstance(now, torch.Tensor):
            torch.testing.assert_close(now, then, rtol=0, atol=0, equal_nan=True, msg=f"{op} modified {name}")

    if reference_message is not None:
        with pytest.raises(error) as ref_info:
            getattr(reference, op)(*args)
        if reference_message == "same":
            assert normalized(str(ref_info.value)) == message, "reference and C++ messages differ"
    if metadata_rule:
        meta_args = make_args(op, "meta", changes)
        with pytest.raises(error) as meta_info:
            getattr(ops, op)(*meta_args)
        assert normalized(str(meta_info.value)) == message, "fake/meta (Python) and C++ messages differ"
    return message


def _ids(cases):
    return [f"{c[0]}-{c[1]}" if isinstance(c[1], str) else c[0] for c in cases]


# ---------------------------------------------------------------------------------------------
# Ranks

RANK_CASES = [
    ("cls_attention", "q_cls", lambda f: f(B, 1, H, d)),
    ("cls_attention", "k", lambda f: f(B, N, H * d)),
    ("attention_received", "q", lambda f: f(B, N, H * d)),
    ("attention_received", "k", lambda f: f(B, N, H, d, 1)),
    ("scores_and_metric", "q", lambda f: f(B, H, d)),
    ("scores_and_metric", "k", lambda f: f(B, N, H * d)),
    ("dominant_topk", "scores", lambda f: f(B * N)),
    ("contextual_merge", "hidden", lambda f: f(B, N)),
    ("contextual_merge", "metric", lambda f: f(B, N, 1, d)),
    ("contextual_merge", "keep", lambda f: f.keep()[0]),
    ("contextual_merge_backward", "grad_tokens", lambda f: f(B, D + K, C, 1)),
    ("contextual_merge_backward", "metric", lambda f: f(B, N)),
    ("contextual_merge_backward", "keep", lambda f: f.keep()[..., None]),
    ("select_merge", "hidden", lambda f: f(B, N, C, 1)),
    ("select_merge", "scores", lambda f: f(B, N, 1)),
    ("select_merge", "metric", lambda f: f(B, N)),
]


@pytest.mark.parametrize("op,arg,bad", RANK_CASES, ids=_ids(RANK_CASES))
def test_wrong_rank(op, arg, bad):
    message = assert_rejected(op, {arg: bad}, ValueError, arg)
    assert "-D tensor" in message


def test_every_tensor_argument_has_a_rank_case():
    for op, names in SIGNATURES.items():
        tensors = {n for n in names if callable(DEFAULTS[n])}
        assert tensors == {arg for o, arg, _ in RANK_CASES if o == op}, op


# ---------------------------------------------------------------------------------------------
# Dtypes (TypeError)

I32 = torch.int32
DTYPE_CASES = [
    ("cls_attention", "q_cls", {"q_cls": lambda f: f(B, H, d, dtype=I32), "k": lambda f: f(B, N, H, d, dtype=I32)}),
    ("attention_received", "q", {"q": lambda f: f(B, N, H, d, dtype=torch.int64),
                                 "k": lambda f: f(B, N, H, d, dtype=torch.int64)}),
    ("scores_and_metric", "q", {"q": lambda f: f(B, 1, H, d, dtype=I32), "k": lambda f: f(B, N, H, d, dtype=I32)}),
    ("dominant_topk", "scores", {"scores": lambda f: f(B, N, dtype=I32)}),
    ("contextual_merge", "hidden", {"hidden": lambda f: f(B, N, C, dtype=I32)}),
    ("contextual_merge", "metric", {"metric": lambda f: f(B, N, d, dtype=torch.bool)}),
    ("contextual_merge_backward", "grad_tokens", {"grad_tokens": lambda f: f(B, D + K, C, dtype=torch.int16)}),
    ("contextual_merge_backward", "metric", {"metric": lambda f: f(B, N, d, dtype=I32)}),
    ("select_merge", "hidden", {"hidden": lambda f: f(B, N, C, dtype=torch.uint8)}),
    ("select_merge", "scores", {"scores": lambda f: f(B, N, dtype=torch.int64)}),
    ("select_merge", "metric", {"metric": lambda f: f(B, N, d, dtype=I32)}),
]


@pytest.mark.parametrize("op,arg,changes", DTYPE_CASES, ids=_ids(DTYPE_CASES))
def test_non_float_dtype(op, arg, changes):
    assert_rejected(op, changes, TypeError, arg)


KEEP_DTYPE_CASES = [
    ("contextual_merge", "int32", I32), ("contextual_merge", "float32", torch.float32),
    ("contextual_merge_backward", "int32", I32), ("contextual_merge_backward", "int16", torch.int16),
]


@pytest.mark.parametrize("op,name,dtype", KEEP_DTYPE_CASES, ids=_ids(KEEP_DTYPE_CASES))
def test_keep_not_int64(op, name, dtype):
    message = assert_rejected(op, {"keep": lambda f: f.keep(dtype=dtype)}, TypeError, "keep")
    assert "int64" in message


QK_CASES = [
    ("cls_attention", "f32-bf16", {"k": lambda f: f(B, N, H, d, dtype=torch.bfloat16)}),
    ("cls_attention", "f16-f32", {"q_cls": lambda f: f(B, H, d, dtype=torch.float16)}),
    ("attention_received", "f16-f32", {"q": lambda f: f(B, N, H, d, dtype=torch.float16)}),
    ("attention_received", "f32-f64", {"k": lambda f: f(B, N, H, d, dtype=torch.float64)}),
    ("scores_and_metric", "f32-f16", {"k": lambda f: f(B, N, H, d, dtype=torch.float16)}),
]


@pytest.mark.parametrize("op,name,changes", QK_CASES, ids=_ids(QK_CASES))
def test_mismatched_q_k_dtypes(op, name, changes):
    message = assert_rejected(op, changes, TypeError, "k")
    assert "dtype" in message


# ---------------------------------------------------------------------------------------------
# Sizes that must agree (B, N, H, d)

SIZE_CASES = [
    ("cls_attention", "k.size(0)", {"k": lambda f: f(B + 1, N, H, d)}),
    ("cls_attention", "k.size(2)", {"k": lambda f: f(B, N, H + 1, d)}),
    ("cls_attention", "k.size(3)", {"q_cls": lambda f: f(B, H, d + 1)}),
    ("attention_received", "k.size(0)", {"k": lambda f: f(B + 1, N, H, d)}),
    ("attention_received", "k.size(1)", {"q": lambda f: f(B, N + 1, H, d)}),
    ("attention_received", "k.size(2)", {"k": lambda f: f(B, N, H + 1, d)}),
    ("attention_received", "k.size(3)", {"k": lambda f: f(B, N, H, d - 1)}),
    ("scores_and_metric", "k.size(0)", {"k": lambda f: f(B - 1, N, H, d)}),
    ("scores_and_metric", "k.size(2)", {"q": lambda f: f(B, 1, H + 1, d)}),
    ("scores_and_metric", "k.size(3)", {"k": lambda f: f(B, N, H, d + 2)}),
    ("scores_and_metric", "q.size(1)", {"q": lambda f: f(B, 1, H, d), "keep_cls": False}),
    ("contextual_merge", "metric.size(0)", {"metric": lambda f: f(B + 1, N, d)}),
    ("contextual_merge", "metric.size(1)", {"metric": lambda f: f(B, N - 1, d)}),
    ("contextual_merge", "keep.size(0)", {"keep": lambda f: f.keep(b=B + 1)}),
    ("contextual_merge_backward", "metric.size(0)", {"metric": lambda f: f(B - 1, N, d)}),
    ("contextual_merge_backward", "metric.size(1)", {"num_tokens": N + 1}),
    ("contextual_merge_backward", "keep.size(0)", {"keep": lambda f: f.keep(b=B - 1)}),
    ("select_merge", "scores.size(0)", {"scores": lambda f: f(B + 1, N)}),
    ("select_merge", "scores.size(1)", {"scores": lambda f: f(B, N + 1)}),
    ("select_merge", "metric.size(0)", {"metric": lambda f: f(B - 1, N, d)}),
    ("select_merge", "metric.size(1)", {"metric": lambda f: f(B, N + 2, d)}),
]


@pytest.mark.parametrize("op,what,changes", SIZE_CASES, ids=_ids(SIZE_CASES))
def test_mismatched_sizes(op, what, changes):
    message = assert_rejected(op, changes, ValueError, what.split(".")[0])
    assert what in message


# ---------------------------------------------------------------------------------------------
# Budget: 1 <= D <= N, 0 <= K <= N - D

DOMINANT_BELOW_ONE = [
    ("dominant_topk", "D=0-cls", {"dominant": 0}),
    ("dominant_topk", "D=-1-nocls", {"dominant": -1, "keep_cls": False}),
    ("select_merge", "D=0", {"dominant": 0}),
    ("contextual_merge", "keep[B,0]", {"keep": lambda f: f.keep(dominant=0)}),
    ("contextual_merge_backward", "keep[B,0]", {"keep": lambda f: f.keep(dominant=0)}),
]


@pytest.mark.parametrize("op,name,changes", DOMINANT_BELOW_ONE, ids=_ids(DOMINANT_BELOW_ONE))
def test_dominant_below_one(op, name, changes):
    # Ops given D as an int name `dominant`; ops given `keep` name keep.size(1).
    if "keep" in changes:
        message = assert_rejected(op, changes, ValueError, "keep.size(1)")
        assert "between 1 and N" in message
    else:
        message = assert_rejected(op, changes, ValueError, "dominant")
        assert ">= 1" in message


def _long_keep(f, extra=1):
    if f.device == "meta":
        return f.keep(dominant=N + extra)
    return torch.arange(N + extra).repeat(B, 1)  # values are never looked at: the budget fails first


DOMINANT_ABOVE_N = [
    ("dominant_topk", "D=N+1", {"dominant": N + 1}),
    ("select_merge", "D=N+1", {"dominant": N + 1, "contextual": 0}),
    ("contextual_merge", "keep[B,N+1]", {"keep": _long_keep, "contextual": 0}),
    ("contextual_merge_backward", "keep[B,N+1]",
     {"keep": _long_keep, "grad_tokens": lambda f: f(B, N + 1, C)}),
]


@pytest.mark.parametrize("op,name,changes", DOMINANT_ABOVE_N, ids=_ids(DOMINANT_ABOVE_N))
def test_dominant_above_n(op, name, changes):
    if "keep" in changes:
        message = assert_rejected(op, changes, ValueError, "keep.size(1)")
        assert f"between 1 and N ({N})" in message
    else:
        message = assert_rejected(op, changes, ValueError, "dominant")
        assert f"<= N ({N})" in message


CONTEXTUAL_NEGATIVE = [
    ("select_merge", "K=-1", {"contextual": -1}),
    ("contextual_merge", "K=-1", {"contextual": -1}),
]


@pytest.mark.parametrize("op,name,changes", CONTEXTUAL_NEGATIVE, ids=_ids(CONTEXTUAL_NEGATIVE))
def test_contextual_negative(op, name, changes):
    message = assert_rejected(op, changes, ValueError, "contextual")
    assert ">= 0" in message


def test_grad_tokens_shorter_than_dominant():
    """The backward's K is grad_tokens.size(1) - D: fewer rows than D is the K < 0 rule."""
    assert_rejected("contextual_merge_backward", {"grad_tokens": lambda f: f(B, D - 1, C)}, ValueError,
                    "grad_tokens.size(1)")


CONTEXTUAL_ABOVE_REST = [
    ("select_merge", "K=N-D+1", {"contextual": N - D + 1}),
    ("select_merge", "D=N,K=1", {"dominant": N, "contextual": 1}),
    ("contextual_merge", "K=N-D+1", {"contextual": N - D + 1}),
    ("contextual_merge_backward", "rows=N+1", {"grad_tokens": lambda f: f(B, N + 1, C)}),
]


@pytest.mark.parametrize("op,name,changes", CONTEXTUAL_ABOVE_REST, ids=_ids(CONTEXTUAL_ABOVE_REST))
def test_contextual_above_the_rest(op, name, changes):
    message = assert_rejected(op, changes, ValueError, "contextual")
    assert "<= N - dominant" in message


# ---------------------------------------------------------------------------------------------
# keep values (CPU only: they need data)


def _keep_with(value, at=(1, 2)):
    def build(f):
        keep = f.keep()
        keep[at] = value
        return keep
    return build


KEEP_RANGE_CASES = [
    ("contextual_merge", "N", {"keep": _keep_with(N)}),
    ("contextual_merge", "-1", {"keep": _keep_with(-1, at=(0, 0))}),
    ("contextual_merge", "2^40", {"keep": _keep_with(2**40)}),
    ("contextual_merge_backward", "N", {"keep": _keep_with(N)}),
    ("contextual_merge_backward", "-5", {"keep": _keep_with(-5)}),
]


@pytest.mark.parametrize("op,name,changes", KEEP_RANGE_CASES, ids=_ids(KEEP_RANGE_CASES))
def test_keep_out_of_range(op, name, changes):
    message = assert_rejected(op, changes, ValueError, "keep", metadata_rule=False)
    assert "out of range" in message


def _duplicate_keep(f):
    keep = f.keep()
    keep[1, 3] = keep[1, 0]
    return keep


@pytest.mark.parametrize("op", ["contextual_merge", "contextual_merge_backward"])
def test_keep_duplicate_indices(op):
    message = assert_rejected(op, {"keep": _duplicate_keep}, ValueError, "keep", metadata_rule=False)
    assert "distinct" in message


def test_reference_keep_rule_applies_without_contextual_tokens():
    """K = 0 never reads the metric, yet a bad keep is still named (not a bare index error)."""
    args = make_args("contextual_merge", "cpu", {"keep": _keep_with(N), "contextual": 0})
    with pytest.raises(ValueError) as kernel_info:
        ops.contextual_merge(*args)
    with pytest.raises(ValueError) as ref_info:
        reference.contextual_merge(*args)
    assert normalized(str(ref_info.value)) == normalized(str(kernel_info.value))


# ---------------------------------------------------------------------------------------------
# Non-finite scores (CPU only)


def _scores_with(value, dtype=torch.float32):
    def build(f):
        scores = f(B, N).to(dtype)
        scores[1, 7] = value
        return scores
    return build


NON_FINITE = [
    (op, f"{value}-{str(dtype)[6:]}", value, dtype)
    for op in ("dominant_topk", "select_merge")
    for value, dtype in ((float("nan"), torch.float32), (float("inf"), torch.float32), (-float("inf"), torch.bfloat16),
                         (float("nan"), torch.float16))
]


@pytest.mark.parametrize("op", ["dominant_topk", "select_merge"])
@pytest.mark.parametrize("value", [1e300, -1e300])
def test_fp64_scores_beyond_float32_are_named(op, value):
    message = assert_rejected(op, {"scores": _scores_with(value, torch.float64)}, ValueError, "scores",
                              metadata_rule=False)
    assert "outside float32's range" in message and "e+300" in message, message


@pytest.mark.parametrize("op,name,value,dtype", NON_FINITE, ids=[c[0] + "-" + c[1] for c in NON_FINITE])
def test_non_finite_scores(op, name, value, dtype):
    message = assert_rejected(op, {"scores": _scores_with(value, dtype)}, ValueError, "scores", metadata_rule=False)
    assert "finite" in message


# ---------------------------------------------------------------------------------------------
# Value rules of the packed merge's backward: the kernel and the reference name the backward op (the
# reference computes it through the forward, whose name it must not borrow).

VARLEN_T = 30


def _varlen_backward_args(**changes):
    g = torch.Generator().manual_seed(0)
    args = {"grad_tokens": torch.randn(15, C, generator=g), "scores": torch.randn(VARLEN_T, generator=g),
            "metric": torch.randn(VARLEN_T, d, generator=g), "cu_seqlens": torch.tensor([0, 12, VARLEN_T]),
            "dominant": [4, 6], "contextual": [2, 3]}
    args.update({name: change(args[name]) for name, change in changes.items()})
    return args


VARLEN_BACKWARD_VALUE_CASES = [
    ("cu first", {"cu_seqlens": lambda t: torch.tensor([1, 12, VARLEN_T])}, "cu_seqlens"),
    ("cu decreasing", {"cu_seqlens": lambda t: torch.tensor([0, 31, VARLEN_T])}, "cu_seqlens"),
    ("cu last", {"cu_seqlens": lambda t: torch.tensor([0, 12, 29])}, "cu_seqlens"),
    ("dominant above N_i", {"dominant": lambda t: [13, 0], "contextual": lambda t: [0, 2]}, "dominant"),
    ("nan score", {"scores": lambda t: t.index_fill(0, torch.tensor([17]), float("nan"))}, "scores"),
    ("fp64 score beyond fp32", {"scores": lambda t: t.double().index_fill(0, torch.tensor([5]), 1e300)}, "scores"),
]


@pytest.mark.parametrize("rule,changes,arg", VARLEN_BACKWARD_VALUE_CASES,
                         ids=[c[0] for c in VARLEN_BACKWARD_VALUE_CASES])
def test_varlen_backward_value_rules_name_the_backward(rule, changes, arg):
    args = _varlen_backward_args(**changes)
    with pytest.raises(ValueError) as kernel_info:
        ops.varlen_select_merge_backward(*args.values())
    message = normalized(str(kernel_info.value))
    assert message.startswith(f"visionzip.varlen_select_merge_backward: {arg}"), message
    with pytest.raises(ValueError) as ref_info:
        reference.varlen_select_merge_backward(*args.values())
    assert normalized(str(ref_info.value)) == message, "reference and C++ messages differ"


# ---------------------------------------------------------------------------------------------
# Empty non-batch dims (B = 0 is allowed: test_op_conformance.py::test_empty_batch)

EMPTY_CASES = [
    ("cls_attention", "k", {"k": lambda f: f(B, 0, H, d)}),
    ("cls_attention", "k", {"q_cls": lambda f: f(B, H, 0), "k": lambda f: f(B, N, H, 0)}),
    ("attention_received", "k", {"q": lambda f: f(B, N, 0, d), "k": lambda f: f(B, N, 0, d)}),
    ("scores_and_metric", "k", {"k": lambda f: f(B, 0, H, d)}),
    ("scores_and_metric", "q", {"q": lambda f: f(B, 0, H, d)}),
    ("dominant_topk", "scores", {"scores": lambda f: f(B, 0)}),
    ("contextual_merge", "hidden", {"hidden": lambda f: f(B, N, 0)}),
    ("contextual_merge", "hidden", {"hidden": lambda f: f(B, 0, C), "metric": lambda f: f(B, 0, d)}),
    ("contextual_merge", "metric", {"metric": lambda f: f(B, N, 0)}),
    ("contextual_merge_backward", "grad_tokens", {"grad_tokens": lambda f: f(B, D + K, 0)}),
    ("contextual_merge_backward", "metric", {"metric": lambda f: f(B, N, 0)}),
    ("select_merge", "hidden", {"hidden": lambda f: f(B, N, 0)}),
    ("select_merge", "hidden", {"hidden": lambda f: f(B, 0, C), "scores": lambda f: f(B, 0),
                                "metric": lambda f: f(B, 0, d)}),
    ("select_merge", "metric", {"metric": lambda f: f(B, N, 0)}),
]


@pytest.mark.parametrize("op,arg,changes", EMPTY_CASES, ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(EMPTY_CASES)])
def test_empty_dims(op, arg, changes):
    message = assert_rejected(op, changes, ValueError, arg)
    assert "must not be empty" in message


# ---------------------------------------------------------------------------------------------
# Devices: every tensor on the device of the first. A CPU/meta mix dispatches to the meta (Python)
# path, which must refuse it rather than compute shapes for tensors that cannot meet.

DEVICE_CASES = [
    ("cls_attention", "k"), ("attention_received", "k"), ("scores_and_metric", "k"), ("contextual_merge", "metric"),
    ("contextual_merge", "keep"), ("contextual_merge_backward", "metric"), ("contextual_merge_backward", "keep"),
    ("select_merge", "scores"), ("select_merge", "metric"),
]


@pytest.mark.parametrize("op,arg", DEVICE_CASES, ids=_ids(DEVICE_CASES))
def test_mixed_devices(op, arg):
    changes = {arg: lambda f, default=DEFAULTS[arg]: default(Factory("meta"))}
    message = assert_rejected(op, changes, ValueError, arg, metadata_rule=False)
    assert "same device" in message


# ---------------------------------------------------------------------------------------------
# Nothing is half-done: a rejected call leaves no state behind, and the next valid call works.


def test_valid_call_after_rejections():
    from helpers import assert_tokens_match_reference, merge_inputs

    hidden, scores, metric, keep = merge_inputs(B, N, C, D, K, True, d=d)
    for bad in ({"dominant": 0}, {"contextual": N}):
        with pytest.raises(ValueError):
            ops.select_merge(hidden, scores, metric, bad.get("dominant", D), bad.get("contextual", K), True)
    bad_scores = scores.clone()
    bad_scores[0, 3] = float("nan")
    with pytest.raises(ValueError):
        ops.select_merge(hidden, bad_scores, metric, D, K, True)
    tokens, got_keep = ops.select_merge(hidden, scores, metric, D, K, True)
    assert torch.equal(got_keep, keep)
    assert_tokens_match_reference(tokens, hidden, metric, keep, K, "after rejections")


# ---------------------------------------------------------------------------------------------
# The typed wrappers (visionzip_kernels.*) and compress check Python types the dispatcher would
# convert silently (True -> 1, tensor(5) -> 5) or reject in its own words (2**63).

WRAPPER_TYPE_CASES = [
    ("select_merge", "dominant", {"dominant": True}, TypeError),
    ("select_merge", "dominant", {"dominant": torch.tensor(5)}, TypeError),
    ("select_merge", "contextual", {"contextual": 3.0}, TypeError),
    ("select_merge", "keep_cls", {"keep_cls": 2}, TypeError),
    ("select_merge", "dominant", {"dominant": 2**63}, ValueError),
    ("dominant_topk", "dominant", {"dominant": False}, TypeError),
    ("dominant_topk", "keep_cls", {"keep_cls": 1}, TypeError),
    ("contextual_merge", "contextual", {"contextual": torch.tensor(3)}, TypeError),
    ("contextual_merge_backward", "num_tokens", {"num_tokens": -(2**64)}, ValueError),
    ("scores_and_metric", "keep_cls", {"keep_cls": "yes"}, TypeError),
]


@pytest.mark.parametrize("op,arg,changes,error", WRAPPER_TYPE_CASES,
                         ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(WRAPPER_TYPE_CASES)])
def test_wrappers_reject_wrong_python_types_by_name(op, arg, changes, error):
    import visionzip_kernels

    args = make_args(op, "cpu", changes)
    with pytest.raises(error, match=rf"visionzip\.{op}: {arg} must"):
        getattr(visionzip_kernels, op)(*args)


def test_compress_names_the_layout_it_expects():
    from visionzip_kernels import compress

    f = Factory("cpu")
    hidden, q, k = f(B, N, C), f(B, N, H, d), f(B, N, H, d)
    with pytest.raises(
        ValueError, match=r"k must be \[B, N, H, d\] with N = hidden.size\(1\) \(17\).*transpose\(1, 2\)"
    ):
        compress(hidden, dominant=D, contextual=K, q=q, k=k.transpose(1, 2))
    with pytest.raises(ValueError, match=r"q must be \[B, N, H, d\]"):
        compress(hidden, dominant=D, contextual=K, q=q.transpose(1, 2), k=k, keep_cls=False)
    tokens, keep = compress(hidden, dominant=D, contextual=K, q=q[:, :1], k=k)  # the CLS row alone is enough
    assert tokens.shape == (B, D + K, C) and keep.shape == (B, D)
