// Per-element arithmetic shared by the C++ CPU kernels and the CUDA kernels, so that the CPU tests
// exercise the same formulas the GPU runs. Plain C++ with no ATen includes: it must stay cheap to
// include from .cu files.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define VZ_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define VZ_HOST_DEVICE inline
#endif

namespace visionzip {

// Same guard as torch.nn.functional.normalize: x / max(||x||, eps). A row scaled by metric_scale has
// a norm >= 1 unless it is zero, so eps only keeps a zero row's unit vector zero.
constexpr float kNormEps = 1e-12f;

// What a token becomes in the output of contextual_merge.
enum TokenRole : int8_t {
  kDominant = 0,  // copied to its own dominant row
  kTarget = 1,    // the base of one contextual row
  kMember = 2,    // averaged into the contextual row of its most similar target
  kDropped = 3,   // not kept and K == 0: contributes nothing
};

// Spacing of the K targets inside the M not-kept tokens (docs/SPEC.md: step = max(1, M // K)).
VZ_HOST_DEVICE int64_t target_step(int64_t num_rest, int64_t contextual) {
  const int64_t step = contextual > 0 ? num_rest / contextual : 1;
  return step > 1 ? step : 1;
}

// Index of the target at position `pos` of the ascending not-kept tokens, or -1: the targets sit
// at positions 0, step, ..., (K-1)*step.
VZ_HOST_DEVICE int64_t target_index(int64_t pos, int64_t step, int64_t contextual) {
  return pos % step == 0 && pos / step < contextual ? pos / step : -1;
}

// Top-k order: higher score first, ties to the lower token index.
VZ_HOST_DEVICE bool ranks_before(float score_a, int64_t index_a, float score_b, int64_t index_b) {
  return score_a > score_b || (score_a == score_b && index_a < index_b);
}

// max(||x||, eps) from the sum of squares; callers divide by it, as F.normalize does.
VZ_HOST_DEVICE float clamped_norm(float sum_of_squares) {
  const float norm = sqrtf(sum_of_squares);
  return norm > kNormEps ? norm : kNormEps;
}

// |v| is a finite float (false for +-inf and NaN).
VZ_HOST_DEVICE bool finite_value(float v) { return fabsf(v) <= 3.40282347e38f; }

// The assignment's argmax order, as torch.argmax: a NaN similarity beats every number (the first
// NaN wins), otherwise the first maximum wins.
VZ_HOST_DEVICE bool beats(float candidate, float best) {
  return candidate > best || (candidate != candidate && best == best);
}

// The power of two every metric row (targets and members) is multiplied by before anything else
// (docs/SPEC.md "Merging" step 1): 2^-e with e = ilogb(max |m|), which brings max |m| into [1, 2);
// e is taken >= -126, so a row whose max is subnormal gets 2^126 (its max lands in [2^-23, 1)); 1 for
// a zero or non-finite max. The product is one correctly rounded multiply, so a row multiplied by any
// power of two 2^p (no element under- or overflowing) gives the same bits as the row itself: the
// assignment is scale invariant, where a plain normalisation loses tiny rows to underflow (|m|^2 <
// 2^-149) and huge ones to overflow. For ordinary rows the unit vectors keep their bits (every
// product, sum, sqrt and quotient is scaled by an exact power of two) and the similarities are scaled
// alike, so the argmax is unchanged. The GPU computes it with ilogbf/ldexpf (reading the float's bits
// there makes ptxas spill in plan_select_kernel on sm_90); the host reads the bits, since ilogbf and
// ldexpf are library calls there and this runs once per metric row. Both give 2^-clamp(e) exactly.
VZ_HOST_DEVICE float metric_scale(float max_abs) {
  if (!(max_abs > 0.f) || !finite_value(max_abs)) return 1.f;
#if defined(__CUDA_ARCH__)
  const int exponent = ilogbf(max_abs);  // max_abs = f * 2^exponent, f in [1, 2); exponent in [-149, 127]
  return ldexpf(1.f, exponent > -126 ? -exponent : 126);
#else
  // The biased exponent e + 127 of a normal max (1..254); a subnormal max (0) counts as e = -126.
  const uint32_t exponent_bits = std::bit_cast<uint32_t>(max_abs) >> 23;
  const uint32_t biased = exponent_bits > 1u ? exponent_bits : 1u;
  // 2^-e has the biased exponent 127 - e = 254 - biased, except 2^-127, a subnormal float.
  return std::bit_cast<float>(biased < 254u ? (254u - biased) << 23 : 1u << 22);
#endif
}

// acc + a * b, rounded twice and never contracted into an FMA, so that the CUDA kernels pick the
// same assignment as the CPU kernels bit for bit (x86-64 builds here emit no FMA either).
VZ_HOST_DEVICE float add_product(float acc, float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(acc, __fmul_rn(a, b));
#else
  return acc + a * b;
#endif
}

// Order-preserving unsigned key of a float's bits (-0.0 folded into +0.0): a > b as floats iff
// key(a) > key(b). NaN keys sort above +inf.
VZ_HOST_DEVICE uint32_t score_key(float score) {
  union {
    float f;
    uint32_t u;
  } bits{score + 0.0f};
  return (bits.u & 0x80000000u) ? ~bits.u : (bits.u | 0x80000000u);
}

// The divisor of a contextual row's member mean: max(count, 1).
VZ_HOST_DEVICE float member_divisor(int32_t count) { return static_cast<float>(count > 1 ? count : 1); }

}  // namespace visionzip
