// Small helpers for the CPU kernels: strided row views with a unit-stride last dim, and the
// attribute that gives a hot loop an AVX2 clone.
#pragma once

#include <ATen/core/Tensor.h>

// An AVX2 clone of the function beside the baseline one, picked at run time. Neither enables FMA,
// so a loop of separate multiplies and adds gives the same bits in both.
#if defined(__x86_64__) && defined(__GNUC__)
#define VZ_AVX2_CLONE __attribute__((target_clones("avx2", "default")))
#else
#define VZ_AVX2_CLONE
#endif

namespace visionzip::cpu {

// Kernels index every dim but the last by stride, so a view of a projection output
// (e.g. k_proj(x).view(B, N, H, d)) is read in place. Only a non-unit last stride forces a copy.
inline at::Tensor with_unit_last_stride(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

}  // namespace visionzip::cpu
