// Small helpers for the CPU kernels: strided row views with a unit-stride last dim, and the
// attribute that gives a hot loop an AVX2 clone.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <bit>
#include <cmath>
#include <cstdint>

// An AVX2 clone of the function beside the baseline one, picked at run time. Neither enables FMA,
// so a loop of separate multiplies and adds gives the same bits in both.
#if defined(__x86_64__) && defined(__GNUC__)
#define VZ_AVX2_CLONE __attribute__((target_clones("avx2", "default")))
#else
#define VZ_AVX2_CLONE
#endif

// AVX-512 (x86-64-v4) and AVX2 clones beside the baseline one, picked at run time. x86-64-v4 has FMA,
// so contraction of a * b + c is switched off here (as in the build flags): every clone then rounds
// each operation as the baseline one does, and gives the same bits.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VZ_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default"), optimize("fp-contract=off")))
#else
#define VZ_SIMD_CLONES VZ_AVX2_CLONE
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

// Rounding from the accumulation type to the storage type with the same bits as c10's conversions in
// this build (no F16C: round to nearest even, overflow to inf, NaN to the type's canonical quiet NaN),
// written without a branch per element so that a loop of them vectorises.
template <typename scalar_t, typename acc_t>
inline scalar_t narrow(acc_t x) {
  return static_cast<scalar_t>(x);
}
template <>
inline c10::BFloat16 narrow<c10::BFloat16, float>(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;  // ties to the even result
  return c10::BFloat16(static_cast<uint16_t>(x != x ? 0x7fc0u : rounded), c10::BFloat16::from_bits());
}
template <>
inline c10::Half narrow<c10::Half, float>(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  const uint32_t magnitude_x2 = bits + bits;  // sign shifted out
  // |x| * 2^112 overflows to inf exactly where fp16 does; * 2^-110 brings it back. Adding 2^e, with
  // 2^e's exponent 13 above |x|'s (at least 2^-1, fp16's subnormal spacing 2^-24 shifted by 2^23),
  // makes the fp32 addition round |x| at fp16's last mantissa bit, to nearest even.
  const float scaled = (std::fabs(x) * 0x1p112f) * 0x1p-110f;
  uint32_t exponent_x2 = magnitude_x2 & 0xff000000u;
  exponent_x2 = exponent_x2 < 0x71000000u ? 0x71000000u : exponent_x2;
  const uint32_t sum = std::bit_cast<uint32_t>(std::bit_cast<float>((exponent_x2 >> 1) + 0x07800000u) + scaled);
  // The sum's exponent and mantissa bits now hold fp16's (the mantissa carry may bump the exponent).
  const uint32_t magnitude = ((sum >> 13) & 0x7c00u) + (sum & 0x0fffu);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  return c10::Half(static_cast<uint16_t>(sign | (magnitude_x2 > 0xff000000u ? 0x7e00u : magnitude)),
                   c10::Half::from_bits());
}

}  // namespace visionzip::cpu
