// The register-tiled logits and the softmax column sums behind received_one_head
// (attention_tiles.h), compiled once with an AVX2 clone beside the baseline one.
#include "attention_tiles.h"

#include <cmath>
#include <cstdint>
#include <cstring>

namespace visionzip::cpu {
namespace {

// Eight fp32 lanes (GCC/Clang vector extension): AVX2 registers in the AVX2 clone, pairs of SSE
// registers in the baseline one. Element-wise multiplies and adds only (never contracted into an
// FMA: neither clone enables it), so both clones give the same bits.
typedef float Lanes8 __attribute__((vector_size(32)));
typedef int32_t IntLanes8 __attribute__((vector_size(32)));

// Lanes go by reference, never by value: a 32-byte vector passed by value has a different ABI in
// the AVX2 and baseline clones (GCC's -Wpsabi), though everything here is inlined.
inline void load8(Lanes8& v, const float* p) { std::memcpy(&v, p, sizeof(v)); }

inline void store8(float* p, const Lanes8& v) { std::memcpy(p, &v, sizeof(v)); }

// x = exp(x) for x <= 0 (softmax logits minus their maximum), within 2 ulp of expf, eight at a time:
// Cody-Waite range reduction x = n ln2 + r, Cephes' degree-6 polynomial for exp(r), and 2^n through
// the exponent bits. Below -87.3 it returns exp(-87.3) ~ 1e-38, which a softmax sum cannot see.
inline void exp_nonpositive(Lanes8& x) {
  const Lanes8 lowest = Lanes8{} - 87.3f;
  x = x < lowest ? lowest : x;
  const float kRoundMagic = 12582912.f;  // 1.5 * 2^23: adding and subtracting it rounds to an int
  const Lanes8 n = (x * 1.44269504088896341f + kRoundMagic) - kRoundMagic;
  const Lanes8 r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  Lanes8 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  const IntLanes8 bits = (__builtin_convertvector(n, IntLanes8) + 127) << 23;
  Lanes8 two_to_n;
  std::memcpy(&two_to_n, &bits, sizeof(two_to_n));
  x = p * two_to_n;
}

}  // namespace

// logits[r, j] = sum_c queries[r, c] * keys_t[c, j] for r < rows (a multiple of kTileRows) and
// j < n_pad (a multiple of kTileCols), each summed over c in ascending order.
VZ_AVX2_CLONE
void query_key_logits(const float* __restrict queries, int64_t rows, const float* __restrict keys_t, int64_t d,
                      int64_t n_pad, float* __restrict logits) {
  for (int64_t r0 = 0; r0 < rows; r0 += kTileRows) {
    const float* q = queries + r0 * d;
    for (int64_t j0 = 0; j0 < n_pad; j0 += kTileCols) {
      Lanes8 a00 = {}, a01 = {}, a10 = {}, a11 = {}, a20 = {}, a21 = {}, a30 = {}, a31 = {};
      const float* k_col = keys_t + j0;
      for (int64_t c = 0; c < d; ++c, k_col += n_pad) {
        Lanes8 k0, k1;
        load8(k0, k_col);
        load8(k1, k_col + 8);
        const float q0 = q[c], q1 = q[d + c], q2 = q[2 * d + c], q3 = q[3 * d + c];
        a00 += q0 * k0;
        a01 += q0 * k1;
        a10 += q1 * k0;
        a11 += q1 * k1;
        a20 += q2 * k0;
        a21 += q2 * k1;
        a30 += q3 * k0;
        a31 += q3 * k1;
      }
      float* out = logits + r0 * n_pad + j0;
      store8(out, a00);
      store8(out + 8, a01);
      store8(out + n_pad, a10);
      store8(out + n_pad + 8, a11);
      store8(out + 2 * n_pad, a20);
      store8(out + 2 * n_pad + 8, a21);
      store8(out + 3 * n_pad, a30);
      store8(out + 3 * n_pad + 8, a31);
    }
  }
}

// For each of `rows` rows of logits [rows, n_pad]: softmax over the first n entries, added to
// received[0..n) row by row in ascending order. The padding (n..n_pad) is set to -inf, so it adds
// at most 15 * exp(-87.3) ~ 1e-37 to the sum. Max and sum reduce over eight fixed lanes, then the
// lanes in a fixed order.
VZ_AVX2_CLONE
void add_softmax_rows(float* __restrict logits, int64_t rows, int64_t n, int64_t n_pad, float* __restrict received) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = logits + r * n_pad;
    for (int64_t j = n; j < n_pad; ++j) row[j] = -INFINITY;
    Lanes8 max8, v;
    load8(max8, row);
    for (int64_t j = 8; j < n_pad; j += 8) {
      load8(v, row + j);
      max8 = v > max8 ? v : max8;
    }
    float max_logit = max8[0];
    for (int l = 1; l < 8; ++l) max_logit = max8[l] > max_logit ? max8[l] : max_logit;
    Lanes8 sum8 = {};
    for (int64_t j = 0; j < n_pad; j += 8) {
      load8(v, row + j);
      v -= max_logit;
      exp_nonpositive(v);
      store8(row + j, v);
      sum8 += v;
    }
    const float sum = ((sum8[0] + sum8[1]) + (sum8[2] + sum8[3])) + ((sum8[4] + sum8[5]) + (sum8[6] + sum8[7]));
    const float inv_sum = 1.f / sum;
    for (int64_t j = 0; j < n; ++j) received[j] += row[j] * inv_sum;
  }
}

}  // namespace visionzip::cpu
