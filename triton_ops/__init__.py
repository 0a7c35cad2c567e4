"""Triton kernels for the visionzip ops (fused CLS attention + top-k, flash-style attention received)."""
