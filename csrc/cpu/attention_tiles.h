// Shared pieces of the CPU score kernels (scores_cpu.cpp: dense [B, N, H, d]; varlen_scores_cpu.cpp:
// packed [T, H, d] with cu_seqlens): the metric's accumulation, and the attention each key of one
// (image, head) receives, summed over the queries without ever holding an N x N map.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "tensor_views.h"

namespace visionzip::cpu {

// The metric's accumulator: float32 for every input dtype but float64, which keeps its precision.
template <typename scalar_t>
using metric_acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// The metric row of one token from the head sum of its key rows (summed in head order): divided by
// H (what k.float().mean(dim=heads) computes) and rounded once to the input dtype.
template <typename scalar_t>
void write_head_mean(const metric_acc_t<scalar_t>* key_sum, int64_t H, int64_t d, scalar_t* metric_row) {
  const auto heads = static_cast<metric_acc_t<scalar_t>>(H);
  for (int64_t c = 0; c < d; ++c) metric_row[c] = static_cast<scalar_t>(key_sum[c] / heads);
}

// Query rows and key columns of one register tile of logits (4 x 16 fp32 accumulators).
constexpr int64_t kTileRows = 4;
constexpr int64_t kTileCols = 16;
// Query rows per block: a [32, N] logits block and the [d, N] keys stay in L2.
constexpr int64_t kBlockRows = 32;

// logits[r, j] = sum_c queries[r, c] * keys_t[c, j] for r < rows (a multiple of kTileRows) and
// j < n_pad (a multiple of kTileCols), each summed over c in ascending order (attention_tiles.cpp).
void query_key_logits(const float* __restrict queries, int64_t rows, const float* __restrict keys_t, int64_t d,
                      int64_t n_pad, float* __restrict logits);

// For each of `rows` rows of logits [rows, n_pad]: softmax over the first n entries, added to
// received[0..n) row by row in ascending order (attention_tiles.cpp).
void add_softmax_rows(float* __restrict logits, int64_t rows, int64_t n, int64_t n_pad, float* __restrict received);

inline int64_t padded_columns(int64_t n) { return (n + kTileCols - 1) / kTileCols * kTileCols; }

// One thread's scratch for received_one_head, sized for sequences of up to max_n tokens:
// O(max_n * (d + kBlockRows)) floats, never max_n^2.
struct ReceivedScratch {
  ReceivedScratch(int64_t max_n, int64_t d)
      : keys_t(d * padded_columns(max_n)), logits(kBlockRows * padded_columns(max_n)), queries(kBlockRows * d) {}
  std::vector<float> keys_t, logits, queries;
};

// received[j] = sum over the query rows i in [query_begin, query_end) of softmax_j(scale * q_i . k_j)
// over the n keys of one head of one image: q_rows / k_rows point at token 0's row of that head,
// rows row_stride apart (d contiguous). The keys are copied once to fp32 [d, n_pad]; the queries go
// through in blocks of kBlockRows: register-tiled logits, softmax, added to received in query order
// (so the bits depend on nothing but the inputs). The key padding (j >= n) holds stale values that
// add_softmax_rows masks to -inf, and query rows past a short last block give logits that it does
// not read.
template <typename scalar_t>
void received_one_head(const scalar_t* q_rows, int64_t q_row_stride, const scalar_t* k_rows, int64_t k_row_stride,
                       int64_t n, int64_t d, float scale, ReceivedScratch& scratch, float* received,
                       int64_t query_begin = 0, int64_t query_end = -1) {
  if (query_end < 0) query_end = n;
  std::fill(received, received + n, 0.f);
  if (n == 0 || query_begin >= query_end) return;
  const int64_t n_pad = padded_columns(n);
  float* keys_t = scratch.keys_t.data();
  float* queries = scratch.queries.data();
  // Transposed kTileCols keys at a time: each write is a run of kTileCols floats (one cache line),
  // not d scattered floats n_pad apart per key.
  for (int64_t j0 = 0; j0 < n; j0 += kTileCols) {
    const int64_t cols = std::min(kTileCols, n - j0);
    const scalar_t* k_block = k_rows + j0 * k_row_stride;
    for (int64_t c = 0; c < d; ++c) {
      float* dst = keys_t + c * n_pad + j0;
      for (int64_t j = 0; j < cols; ++j) dst[j] = static_cast<float>(widen(k_block[j * k_row_stride + c]));
    }
  }
  for (int64_t i0 = query_begin; i0 < query_end; i0 += kBlockRows) {
    const int64_t rows = std::min(kBlockRows, query_end - i0);
    const int64_t tiled_rows = (rows + kTileRows - 1) / kTileRows * kTileRows;
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* q_row = q_rows + (i0 + r) * q_row_stride;
      for (int64_t c = 0; c < d; ++c) queries[r * d + c] = static_cast<float>(widen(q_row[c])) * scale;
    }
    query_key_logits(queries, tiled_rows, keys_t, d, n_pad, scratch.logits.data());
    add_softmax_rows(scratch.logits.data(), rows, n, n_pad, received);
  }
}

}  // namespace visionzip::cpu
