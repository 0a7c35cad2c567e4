"""Which kernels serve which device.

- CPU tensors: the C++ kernels (csrc/cpu), always registered by ``_C``.
- CUDA tensors: the ops whose CUDA backend in the op table (op_table.py) is "triton" run the
  Triton kernels in triton_ops/, registered here under the CUDA key of the same ops (so the
  C++-defined schemas, the Python fake kernels, opcheck and torch.compile all keep working); the
  others have C++ CUDA kernels (csrc/cuda).
- The launchers in triton_ops/ take validated arguments: the kernel registered here runs the op's
  checks first (the C++ rules, through visionzip_kernels.checks, and the data rules that cost no
  device sync), then the launcher.
- ``VISIONZIP_BACKEND=triton`` (read once, at import) also routes CPU tensors of those ops
  through Triton. That needs ``TRITON_INTERPRET=1`` in the environment before the import; it is how
  the tests, and anyone without a GPU, check the Triton kernels.

triton_ops is imported at the first launch, not here, so that TRITON_INTERPRET can still be set
after ``import visionzip_kernels`` and before the first Triton call.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import os
import warnings
from collections.abc import Callable

import torch

from . import op_table

BACKEND_ENV = "VISIONZIP_BACKEND"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def triton_kernel(op: str) -> Callable:
    """The kernel registered for a Triton op (an op of the table with ``cuda="triton"``): it checks
    the arguments (the op's ``launch_checks``), imports triton_ops at the first call and runs the
    launcher of the same name, every argument passed by its schema name."""
    spec = op_table.BY_NAME[op]
    if spec.cuda != "triton":
        raise ValueError(f"visionzip::{op} has no Triton kernel (its CUDA backend is {spec.cuda!r})")
    # The dispatcher leaves out trailing arguments the caller left at their schema default
    # (ops.dominant_topk(scores, 7) arrives without keep_cls): the launch checks carry the schema's
    # names and defaults, so binding to their signature fills them in.
    signature = inspect.signature(spec.launch_checks)

    def kernel(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        spec.launch_checks(**bound.arguments)
        return getattr(importlib.import_module("triton_ops"), op)(**bound.arguments)

    kernel.__name__ = kernel.__qualname__ = f"triton_{op}"
    return kernel


def requested_cpu_backend() -> str:
    """The CPU backend asked for through VISIONZIP_BACKEND: "cpp" (default) or "triton"."""
    backend = os.environ.get(BACKEND_ENV, "cpp").strip().lower() or "cpp"
    if backend not in ("cpp", "triton"):
        raise ValueError(f"{BACKEND_ENV} must be 'cpp' or 'triton', got {backend!r}")
    return backend


def register() -> None:
    """Registers the Triton kernels of the table's Triton ops (CUDA always when triton is installed;
    CPU on request)."""
    cpu_triton = requested_cpu_backend() == "triton"
    if cpu_triton and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{BACKEND_ENV}=triton on CPU tensors needs TRITON_INTERPRET=1 set before import")
    if not triton_available():
        if cpu_triton:
            raise RuntimeError(f"{BACKEND_ENV}=triton needs the triton package")
        return
    for op in op_table.OPS:
        if op.cuda != "triton":
            continue
        torch.library.register_kernel(op.qualified_name, "cuda", triton_kernel(op.name))
        if cpu_triton:
            with warnings.catch_warnings():
                # Replacing the C++ CPU kernel is the point of the switch; torch warns about it.
                warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
                torch.library.register_kernel(op.qualified_name, "cpu", triton_kernel(op.name))
