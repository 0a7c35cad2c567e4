"""Smoke test of an installed visionzip-kernels (run by .ci/packaging_stage.sh from outside the checkout).

Checks that the package comes from site-packages, not a checkout; that the build record matches the
running torch; then runs every torch.ops.visionzip op on small inputs against
visionzip_kernels.reference, and select_merge under torch.compile(fullgraph=True).

    python -I smoke_test.py [CHECKOUT]    # CHECKOUT: a folder the package must not be imported from
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from collections.abc import Callable
from pathlib import Path

import torch

import visionzip_kernels
from visionzip_kernels import reference

B, N, C, H, d = 2, 37, 24, 4, 8
SCALE = d**-0.5
LENGTHS = (16, 20)  # two packed images, multiples of the merge unit 4
DOMINANT, CONTEXTUAL = 6, 3


def _random(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _dense_scores() -> torch.Tensor:
    return torch.softmax(_random(B, N, seed=1), dim=-1)


def _keep() -> torch.Tensor:
    return reference.dominant_topk(_dense_scores(), DOMINANT, True)


def _cu_seqlens() -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)


def _varlen_budgets() -> tuple[list[int], list[int]]:
    return [4, 5], [2, 3]


# op name -> the positional arguments of one call; the reference has the same signature.
OP_INPUTS: dict[str, Callable[[], tuple]] = {
    "cls_attention": lambda: (_random(B, H, d, seed=2), _random(B, N, H, d, seed=3), SCALE),
    "attention_received": lambda: (_random(B, N, H, d, seed=4), _random(B, N, H, d, seed=5), SCALE),
    "scores_and_metric": lambda: (_random(B, N, H, d, seed=6), _random(B, N, H, d, seed=7), SCALE, True),
    "dominant_topk": lambda: (_dense_scores(), DOMINANT, True),
    "contextual_merge": lambda: (_random(B, N, C, seed=8), _random(B, N, d, seed=9), _keep(), CONTEXTUAL),
    "contextual_merge_backward": lambda: (
        _random(B, DOMINANT + CONTEXTUAL, C, seed=10), _random(B, N, d, seed=9), _keep(), N),
    "select_merge": lambda: (_random(B, N, C, seed=8), _dense_scores(), _random(B, N, d, seed=9), DOMINANT,
                             CONTEXTUAL, True),
    "varlen_scores_and_metric": lambda: (_random(sum(LENGTHS), H, d, seed=11), _random(sum(LENGTHS), H, d, seed=12),
                                         _cu_seqlens(), SCALE, 4),
    "varlen_select_merge": lambda: (_random(sum(LENGTHS), C, seed=13), _random(sum(LENGTHS), seed=14),
                                    _random(sum(LENGTHS), d, seed=15), _cu_seqlens(), *_varlen_budgets()),
    "varlen_select_merge_backward": lambda: (_random(sum(_varlen_budgets()[0]) + sum(_varlen_budgets()[1]), C, seed=16),
                                             _random(sum(LENGTHS), seed=14), _random(sum(LENGTHS), d, seed=15),
                                             _cu_seqlens(), *_varlen_budgets()),
}


def _outputs(value) -> tuple[torch.Tensor, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _assert_same(name: str, got, expected) -> None:
    got, expected = _outputs(got), _outputs(expected)
    assert len(got) == len(expected), f"{name}: {len(got)} outputs, the reference gives {len(expected)}"
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g.shape == e.shape and g.dtype == e.dtype, f"{name}[{i}]: {g.shape} {g.dtype} vs {e.shape} {e.dtype}"
        if g.is_floating_point():
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5, msg=lambda m, i=i: f"{name}[{i}]: {m}")
        else:
            assert torch.equal(g, e), f"{name}[{i}]: {g} vs {e}"


def check_installed_copy(checkout: Path | None) -> None:
    location = Path(visionzip_kernels.__file__).resolve()
    if checkout is not None:
        assert checkout.resolve() not in location.parents, f"imported from the checkout: {location}"
    assert "site-packages" in location.parts, f"not an installed copy: {location}"
    assert visionzip_kernels.__version__ == importlib.metadata.version("visionzip-kernels")
    assert (location.parent / "py.typed").is_file(), "py.typed is not installed"
    info = importlib.import_module("visionzip_kernels._build_info")
    assert (info.TORCH_VERSION, info.TORCH_CUDA_VERSION) == (torch.__version__, torch.version.cuda or "cpu")
    print(f"smoke test: visionzip-kernels {visionzip_kernels.__version__} from {location.parent}, "
          f"built against torch {info.TORCH_VERSION}")


def check_op_list() -> None:
    # The package's op table names exactly the ops tested here.
    names = {op.name for op in visionzip_kernels.op_table.OPS}
    assert set(OP_INPUTS) == names, f"op table vs smoke test: {sorted(names ^ set(OP_INPUTS))}"


def check_ops() -> None:
    for name, make_inputs in OP_INPUTS.items():
        args = make_inputs()
        _assert_same(name, getattr(torch.ops.visionzip, name)(*args), getattr(reference, name)(*args))
    print(f"smoke test: {len(OP_INPUTS)} ops equal the reference")


def check_compile() -> None:
    hidden, scores, metric, *budget = OP_INPUTS["select_merge"]()
    compiled = torch.compile(visionzip_kernels.select_merge, fullgraph=True, backend="aot_eager")
    _assert_same("compiled select_merge", compiled(hidden, scores, metric, *budget),
                 torch.ops.visionzip.select_merge(hidden, scores, metric, *budget))
    print("smoke test: select_merge under torch.compile(fullgraph=True) equals eager")


def main() -> None:
    check_installed_copy(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    check_op_list()
    check_ops()
    check_compile()


if __name__ == "__main__":
    main()
