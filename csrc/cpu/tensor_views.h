// Small helpers for the CPU kernels: strided row views with a unit-stride last dim.
#pragma once

#include <ATen/core/Tensor.h>

namespace visionzip::cpu {

// Kernels index every dim but the last by stride, so a view of a projection output
// (e.g. k_proj(x).view(B, N, H, d)) is read in place. Only a non-unit last stride forces a copy.
inline at::Tensor with_unit_last_stride(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

}  // namespace visionzip::cpu
