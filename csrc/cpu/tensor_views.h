// Small helpers for the CPU kernels: strided row views with a unit-stride last dim, and the
// attribute that gives a hot loop an AVX2 clone.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <bit>
#include <cstdint>

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

// Exact widening to the accumulation type, from the raw bits for fp16 / bf16, written so that a loop
// of them vectorises (c10's conversions branch per element and stay scalar). Every fp16 and bf16 value
// is an fp32 value, so these give the same bits as c10's.
inline float widen(float x) { return x; }
inline double widen(double x) { return x; }
inline float widen(c10::BFloat16 x) { return std::bit_cast<float>(static_cast<uint32_t>(x.x) << 16); }
inline float widen(c10::Half x) {
  const uint32_t bits = x.x;
  const uint32_t magnitude = bits & 0x7fffu;
  // Exponent and mantissa moved to fp32's positions; the product with 2^112 rebiases the exponent
  // (15 -> 127) and turns subnormal halves into the equal normal floats, exactly.
  uint32_t widened = std::bit_cast<uint32_t>(std::bit_cast<float>(magnitude << 13) * 0x1p112f);
  widened |= magnitude >= 0x7c00u ? 0x7f800000u : 0u;  // inf and NaN keep an all-ones exponent
  return std::bit_cast<float>(widened | (bits & 0x8000u) << 16);
}

}  // namespace visionzip::cpu
