"""Imports a CUDA build of visionzip_kernels on a machine without a GPU and checks that every op has
a kernel under the CUDA dispatch key (C++ kernels from csrc/cuda, Triton ones registered in Python),
that the library holds device code for every arch of TORCH_CUDA_ARCH_LIST (when a cuobjdump is at
hand), and that the CPU path of the same build still works."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

import visionzip_kernels

# Every op of the table has a CUDA backend: C++ (csrc/cuda) or Triton (registered in Python).
OPS = visionzip_kernels.op_table.NAMES

assert torch.version.cuda, "this check needs the CUDA build of torch"
# torch has no public query for "is a kernel registered for this key" (torch.library can register
# kernels, not list them); this private one is what torch.library's own tests use.
missing = [op for op in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"visionzip::{op}", "CUDA")]
if missing:
    sys.exit(f"no CUDA kernel registered for: {', '.join(missing)}")

# Device code: one cubin per requested arch (cuobjdump from the toolkit, or the one Triton ships).
library = Path(visionzip_kernels._C.__file__)
cuobjdump = shutil.which("cuobjdump", path=os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin"))
if cuobjdump is None:
    bundled = Path(torch.__file__).parents[1] / "triton/backends/nvidia/bin/cuobjdump"
    cuobjdump = str(bundled) if bundled.exists() else None
if cuobjdump:
    listing = subprocess.run([cuobjdump, "--list-elf", str(library)], capture_output=True, text=True).stdout
    found = set(re.findall(r"\.sm_(\d+)a?\.cubin", listing))
    wanted = {a.split("+")[0].replace(".", "") for a in re.split(r"[;\s]+", os.environ.get("TORCH_CUDA_ARCH_LIST",
                                                                                           "8.0;9.0")) if a}
    if not wanted <= found:
        sys.exit(f"{library.name}: cubins for sm_{sorted(found)}, wanted sm_{sorted(wanted)}")
    print(f"cuda stage: device code for sm_{', sm_'.join(sorted(found))}")

# The CPU path of the same build still works.
hidden, scores, metric = torch.randn(2, 40, 16), torch.rand(2, 40), torch.randn(2, 40, 8)
tokens, keep = visionzip_kernels.select_merge(hidden, scores, metric, 5, 3)
expected, expected_keep = visionzip_kernels.reference.select_merge(hidden, scores, metric, 5, 3)
assert torch.equal(keep, expected_keep) and torch.allclose(tokens, expected, atol=1e-6)
print(f"cuda stage: torch {torch.__version__}, every op has a CUDA kernel: {', '.join(OPS)}")
