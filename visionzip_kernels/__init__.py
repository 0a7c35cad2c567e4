"""visionzip-kernels: VisionZip token selection and merging as fused torch.ops.visionzip.* ops.

Importing the package loads the compiled kernels and their autograd (``_C``) first, then registers,
from the op table (``op_table``), the fake kernels and the Autograd fallthrough of the
non-differentiable ops, then the Triton kernels for CUDA tensors (see ``backends``).
"""

import torch  # noqa: F401  (loads libtorch, which _C links against)

# isort: off
# _build_check before _C: under a torch other than the build's, a clear ImportError, not an undefined symbol.
from . import _build_check  # noqa: F401
from . import _C  # noqa: F401  (loads the TORCH_LIBRARY registrations)
# isort: on
from . import backends, op_table, ops, reference
from .api import BUDGETS, compress, split_budget, varlen_select_merge_many
from .ops import *  # noqa: F403  (the typed wrappers: ops.__all__, which is the op table's public ops)

__all__ = ["BUDGETS", "backends", "compress", "op_table", "ops", "reference", "split_budget",
           "varlen_select_merge_many", *op_table.PUBLIC]
__version__ = "0.1.0"  # the one version: pyproject.toml reads it from here (setuptools, without importing)

op_table.register()
backends.register()

# The transformers integration (visionzip_kernels.integrations), loaded on first use so that
# `import visionzip_kernels` does not import transformers.
_INTEGRATION_EXPORTS = ("apply", "remove", "patched")


def __getattr__(name: str):
    if name in _INTEGRATION_EXPORTS:
        try:
            from . import integrations
        except ImportError as exc:
            # AttributeError (not ImportError) so that hasattr(visionzip_kernels, "apply") is False.
            raise AttributeError(
                f"visionzip_kernels.{name} needs transformers (pip install -r requirements-integrations.txt): {exc}"
            ) from exc
        return getattr(integrations, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_INTEGRATION_EXPORTS))
