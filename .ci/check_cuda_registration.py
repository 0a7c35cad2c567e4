"""Imports a CUDA build of visionzip_kernels on a machine without a GPU and checks that every op has
a kernel under the CUDA dispatch key (C++ kernels from csrc/cuda, Triton ones registered in Python)."""

import sys

import torch

import visionzip_kernels

OPS = ("cls_attention", "attention_received", "dominant_topk", "contextual_merge", "contextual_merge_backward",
       "select_merge")

assert torch.version.cuda, "this check needs the CUDA build of torch"
# torch has no public query for "is a kernel registered for this key"; this one is what
# torch.library's own tests use.
missing = [op for op in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"visionzip::{op}", "CUDA")]
if missing:
    sys.exit(f"no CUDA kernel registered for: {', '.join(missing)}")
# The CPU path of the same build still works.
hidden, scores, metric = torch.randn(2, 40, 16), torch.rand(2, 40), torch.randn(2, 40, 8)
tokens, keep = visionzip_kernels.select_merge(hidden, scores, metric, 5, 3)
expected, expected_keep = visionzip_kernels.reference.select_merge(hidden, scores, metric, 5, 3)
assert torch.equal(keep, expected_keep) and torch.allclose(tokens, expected, atol=1e-6)
print(f"cuda stage: torch {torch.__version__}, every op has a CUDA kernel: {', '.join(OPS)}")
