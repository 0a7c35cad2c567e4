// CPU kernel of varlen_scores_and_metric (docs/SPEC.md "Packed (varlen) ops"): packed q, k [T, H, d]
// with cu_seqlens, attention within each image, pooled over merge units of 1 or 4 tokens.
//
// Memory: O(T * H) (the column sums per head and query chunk, at most 4 chunks) plus, per thread,
// one image's keys in fp32 and a [32, L] logits block (attention_tiles.h), never an L x L map. Deterministic: every
// output element is written by one task, each sum in a fixed order, so the bits do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

#include "../checks.h"
#include "attention_tiles.h"
#include "tensor_views.h"

namespace visionzip::cpu {
namespace {

// An image's queries are split into up to kMaxQuerySplits chunks of at least kSplitRows rows, so
// that one large image still gives many tasks; the split depends on the image's length alone (never
// on the thread count), and the chunks' partial column sums are added in chunk order.
constexpr int64_t kMaxQuerySplits = 4;
constexpr int64_t kSplitRows = 256;

int64_t query_splits(int64_t length) {
  return std::clamp<int64_t>((length + kSplitRows - 1) / kSplitRows, 1, kMaxQuerySplits);
}

// The query rows [begin, end) of chunk `split` of an image of `length` tokens: whole kBlockRows blocks
// but for the last chunk.
std::pair<int64_t, int64_t> query_chunk(int64_t length, int64_t split) {
  const int64_t splits = query_splits(length);
  const int64_t blocks = (length + kBlockRows - 1) / kBlockRows;
  const int64_t per_split = (blocks + splits - 1) / splits * kBlockRows;
  return {std::min(length, split * per_split), std::min(length, (split + 1) * per_split)};
}

// partial [kMaxQuerySplits, H, T]: column sums of each image's softmax, per head, per query chunk
// (chunks an image does not have are zero). Tasks are (head, image, chunk), head major, so that a
// thread's contiguous share of tasks mixes long and short images.
template <typename scalar_t>
void received_per_chunk(const at::Tensor& q, const at::Tensor& k, const std::vector<int64_t>& cu, float scale,
                        float* partial) {
  const int64_t T = k.size(0), H = k.size(1), d = k.size(2);
  const int64_t images = static_cast<int64_t>(cu.size()) - 1;
  int64_t max_length = 0;
  for (int64_t i = 0; i < images; ++i) max_length = std::max(max_length, cu[i + 1] - cu[i]);
  const scalar_t* q_ptr = q.const_data_ptr<scalar_t>();
  const scalar_t* k_ptr = k.const_data_ptr<scalar_t>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), ks0 = k.stride(0), ks1 = k.stride(1);
  const int64_t tasks_per_head = images * kMaxQuerySplits;
  at::parallel_for(0, H * tasks_per_head, 1, [&](int64_t begin, int64_t end) {
    ReceivedScratch scratch(max_length, d);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / tasks_per_head, i = task % tasks_per_head / kMaxQuerySplits;
      const int64_t split = task % kMaxQuerySplits;
      const int64_t start = cu[i], length = cu[i + 1] - cu[i];
      const auto [query_begin, query_end] = query_chunk(length, split);
      // A chunk the image does not have writes zeros (received_one_head clears its output first).
      received_one_head(q_ptr + start * qs0 + h * qs1, qs0, k_ptr + start * ks0 + h * ks1, ks0, length, d, scale,
                        scratch, partial + (split * H + h) * T + start, query_begin, query_end);
    }
  });
}

// For every merge unit j: scores[j] = mean over the unit's tokens of (mean over heads of the chunks'
// column sums, added in chunk order); metric[j] = k averaged over the unit's tokens, then over
// heads (summed in that order in the accumulator type, rounded once).
template <typename scalar_t>
void pool_units(const float* partial, const at::Tensor& k, int64_t unit, float* scores, scalar_t* metric) {
  using acc_t = metric_acc_t<scalar_t>;
  const int64_t T = k.size(0), H = k.size(1), d = k.size(2), units = T / unit;
  const scalar_t* k_ptr = k.const_data_ptr<scalar_t>();
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1);
  const auto unit_acc = static_cast<acc_t>(unit);
  at::parallel_for(0, units, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> head_sum(d), unit_sum(d);
    for (int64_t j = begin; j < end; ++j) {
      float received = 0.f;
      for (int64_t u = 0; u < unit; ++u) {
        const int64_t t = j * unit + u;
        float over_heads = 0.f;
        for (int64_t h = 0; h < H; ++h) {
          float column = partial[h * T + t];
          for (int64_t split = 1; split < kMaxQuerySplits; ++split) column += partial[(split * H + h) * T + t];
          over_heads += column;
        }
        received += over_heads / static_cast<float>(H);
      }
      scores[j] = received / static_cast<float>(unit);
      std::fill(head_sum.begin(), head_sum.end(), acc_t(0));
      for (int64_t h = 0; h < H; ++h) {
        std::fill(unit_sum.begin(), unit_sum.end(), acc_t(0));
        for (int64_t u = 0; u < unit; ++u) {
          const scalar_t* k_row = k_ptr + (j * unit + u) * ks0 + h * ks1;
          for (int64_t c = 0; c < d; ++c) unit_sum[c] += static_cast<acc_t>(widen(k_row[c]));
        }
        // Dividing by unit (1 or 4) is exact: this is the reference's mean over the unit, then heads.
        for (int64_t c = 0; c < d; ++c) head_sum[c] += unit_sum[c] / unit_acc;
      }
      write_head_mean(head_sum.data(), H, d, metric + j * d);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> varlen_scores_and_metric_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                                const at::Tensor& cu_seqlens, double scale,
                                                                int64_t unit) {
  constexpr const char* op = "varlen_scores_and_metric";
  check_varlen_scores_and_metric_args(q_in, k_in, cu_seqlens, unit);
  check_cu_seqlens_offsets(op, cu_seqlens, q_in.size(0), unit);
  const at::Tensor q = with_unit_last_stride(q_in);
  const at::Tensor k = with_unit_last_stride(k_in);
  const int64_t T = k.size(0), H = k.size(1), d = k.size(2);
  at::Tensor scores = at::empty({T / unit}, k.options().dtype(at::kFloat));
  at::Tensor metric = at::empty({T / unit, d}, k.options());
  if (T == 0) return {scores, metric};
  const at::Tensor offsets = cu_seqlens.to(at::kLong).contiguous();
  const std::vector<int64_t> cu(offsets.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>() + offsets.numel());
  at::Tensor partial = at::empty({kMaxQuerySplits, H, T}, scores.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), op, [&] {
    received_per_chunk<scalar_t>(q, k, cu, static_cast<float>(scale), partial.data_ptr<float>());
    pool_units<scalar_t>(partial.const_data_ptr<float>(), k, unit, scores.data_ptr<float>(),
                         metric.data_ptr<scalar_t>());
  });
  return {scores, metric};
}

}  // namespace

TORCH_LIBRARY_IMPL(visionzip, CPU, m) { m.impl("varlen_scores_and_metric", &varlen_scores_and_metric_cpu); }

}  // namespace visionzip::cpu
