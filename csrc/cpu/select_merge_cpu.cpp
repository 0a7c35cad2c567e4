// CPU kernels for dominant_topk, contextual_merge (forward and backward) and select_merge.
// Parallel over images, rows and column chunks; fp32 (opmath) accumulation; no float atomics, and
// every output element is written by one task in a fixed order, so results are bitwise independent
// of the thread count. Every output shape follows from the input shapes and the int arguments.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "../checks.h"
#include "../merge_math.h"
#include "select_merge_cpu.h"
#include "tensor_views.h"

namespace visionzip::cpu {
namespace {

// Column chunks are only for parallelism at small B: whole rows stream best.
constexpr int64_t kMinColumnChunk = 64;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t column_chunk(int64_t batch, int64_t channels) {
  const int64_t threads = at::get_num_threads();
  if (batch >= threads) return channels;
  const int64_t chunks = std::min(ceil_div(2 * threads, batch), ceil_div(channels, kMinColumnChunk));
  return ceil_div(ceil_div(channels, chunks), 16) * 16;
}

// ---------------------------------------------------------------------------------------------
// dominant_topk

at::Tensor dominant_topk_impl(const char* op, const at::Tensor& scores, int64_t dominant,
                              bool keep_cls) {
  const at::Tensor s = scores.to(at::kFloat).contiguous();
  check_finite_scores(op, scores, s);
  const int64_t B = s.size(0), N = s.size(1);
  at::Tensor keep = at::empty({B, dominant}, scores.options().dtype(at::kLong));
  const float* s_ptr = s.data_ptr<float>();
  int64_t* keep_ptr = keep.data_ptr<int64_t>();
  const int64_t first = keep_cls ? 1 : 0;
  const int64_t picked = dominant - first;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> order(N - first);
    for (int64_t b = begin; b < end; ++b) {
      const float* row = s_ptr + b * N;
      std::iota(order.begin(), order.end(), first);
      const auto before = [row](int64_t a, int64_t c) { return ranks_before(row[a], a, row[c], c); };
      if (picked > 0 && picked < static_cast<int64_t>(order.size())) {
        std::nth_element(order.begin(), order.begin() + picked, order.end(), before);
      }
      std::sort(order.begin(), order.begin() + picked);
      int64_t* out = keep_ptr + b * dominant;
      if (keep_cls) out[0] = 0;
      std::copy(order.begin(), order.begin() + picked, out + first);
    }
  });
  return keep;
}

// sims[0..k_pad) = m . targets_t[:, i] for one member. No reduction in the inner loop, so it
// vectorises; the AVX2 clone (picked at run time, no FMA contraction) gives the same bits as the
// baseline one because every lane sums over c in the same order.
VZ_AVX2_CLONE
void member_similarities(const float* __restrict m, const float* __restrict targets_t, int64_t d,
                         int64_t k_pad, float* __restrict sims) {
  // Eight targets at a time, accumulated in a local array the compiler keeps in registers.
  for (int64_t i0 = 0; i0 < k_pad; i0 += 8) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int64_t c = 0; c < d; ++c) {
      const float mc = m[c];
      const float* t = targets_t + c * k_pad + i0;
      for (int j = 0; j < 8; ++j) acc[j] = add_product(acc[j], mc, t[j]);
    }
    for (int j = 0; j < 8; ++j) sims[i0 + j] = acc[j];
  }
}

// ---------------------------------------------------------------------------------------------
// Merge plan: what every token becomes (docs/SPEC.md "Merging"), built per image from keep and metric.

struct MergePlan {
  at::Tensor role;     // [B, N] int8 TokenRole
  at::Tensor row;      // [B, N] int32 output row (-1 when dropped)
  at::Tensor targets;  // [B, K] int64 token index of each target
  at::Tensor counts;   // [B, K] int32 members per target
};

void check_keep_values(const char* op, const at::Tensor& keep, int64_t num_tokens) {
  const int64_t B = keep.size(0), D = keep.size(1);
  const at::Tensor k = keep.contiguous();
  const int64_t* ptr = k.data_ptr<int64_t>();
  std::vector<char> seen(num_tokens);
  for (int64_t b = 0; b < B; ++b) {
    std::fill(seen.begin(), seen.end(), 0);
    for (int64_t i = 0; i < D; ++i) {
      const int64_t t = ptr[b * D + i];
      TORCH_CHECK_VALUE(t >= 0 && t < num_tokens, "visionzip.", op, ": keep[", b, ", ", i, "] = ", t,
                        " is out of range for N = ", num_tokens);
      TORCH_CHECK_VALUE(!seen[t], "visionzip.", op, ": keep[", b, "] must hold distinct token indices, ", t,
                        " appears twice");
      seen[t] = 1;
    }
  }
}

MergePlan build_plan(const at::Tensor& metric_in, const at::Tensor& keep_in, int64_t contextual) {
  const at::Tensor metric = metric_in.to(at::kFloat).contiguous();
  const at::Tensor keep = keep_in.contiguous();
  const int64_t B = metric.size(0), N = metric.size(1), d = metric.size(2);
  const int64_t D = keep.size(1), K = contextual, M = N - D;
  const auto opts = metric.options();
  MergePlan plan{at::empty({B, N}, opts.dtype(at::kChar)), at::empty({B, N}, opts.dtype(at::kInt)),
                 at::empty({B, K}, opts.dtype(at::kLong)), at::zeros({B, K}, opts.dtype(at::kInt))};
  const float* m_ptr = metric.data_ptr<float>();
  const int64_t* keep_ptr = keep.data_ptr<int64_t>();
  int8_t* role_ptr = plan.role.data_ptr<int8_t>();
  int32_t* row_ptr = plan.row.data_ptr<int32_t>();
  int64_t* target_ptr = plan.targets.data_ptr<int64_t>();
  int32_t* count_ptr = plan.counts.data_ptr<int32_t>();
  const int64_t step = target_step(M, K);

  // Similarities against the targets are computed K_pad at a time from a [d, K_pad] transposed
  // copy of the unit targets, so the inner loop has no reduction and vectorises.
  const int64_t k_pad = (K + 7) / 8 * 8;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> targets_t(d * k_pad), sims(k_pad), scaled(d);
    for (int64_t b = begin; b < end; ++b) {
      int8_t* role = role_ptr + b * N;
      int32_t* row = row_ptr + b * N;
      int64_t* targets = target_ptr + b * K;
      int32_t* counts = count_ptr + b * K;
      const float* m_img = m_ptr + b * N * d;
      std::fill(role, role + N, static_cast<int8_t>(K > 0 ? kMember : kDropped));
      std::fill(row, row + N, -1);
      for (int64_t i = 0; i < D; ++i) {
        const int64_t t = keep_ptr[b * D + i];
        role[t] = kDominant;
        row[t] = static_cast<int32_t>(i);
      }
      if (K == 0) continue;
      // Targets sit at positions 0, step, ..., (K-1)*step of the ascending not-kept tokens; their
      // metric is normalised as m / max(||m||, eps) (docs/SPEC.md "Merging" step 1).
      std::fill(targets_t.begin(), targets_t.end(), 0.f);
      for (int64_t n = 0, pos = 0; n < N; ++n) {
        if (role[n] == kDominant) continue;
        const int64_t i = target_index(pos, step, K);
        if (i >= 0) {
          role[n] = kTarget;
          row[n] = static_cast<int32_t>(D + i);
          targets[i] = n;
          const float* m = m_img + n * d;
          float sum_sq = 0.f;
          for (int64_t c = 0; c < d; ++c) sum_sq = add_product(sum_sq, m[c], m[c]);
          const float norm = clamped_norm(sum_sq);
          for (int64_t c = 0; c < d; ++c) targets_t[c * k_pad + i] = m[c] / norm;
        }
        ++pos;
      }
      // Each member goes to its most cosine-similar target (merge_math.h's beats: NaN first, then
      // the first maximum). Dividing by the member's own norm scales all K similarities alike, so
      // the argmax skips it; a power of two (member_scale) keeps tiny metrics from underflowing, and
      // a member with a non-finite metric goes to target 0, where the reference's all-NaN row sends it.
      for (int64_t n = 0; n < N; ++n) {
        if (role[n] != kMember) continue;
        const float* m = m_img + n * d;
        float max_abs = 0.f;
        bool finite = true;
        for (int64_t c = 0; c < d; ++c) {
          finite = finite && finite_value(m[c]);
          max_abs = std::max(max_abs, std::fabs(m[c]));
        }
        int64_t best = 0;
        if (finite) {
          const float scale = member_scale(max_abs);
          if (scale != 1.f) {
            for (int64_t c = 0; c < d; ++c) scaled[c] = m[c] * scale;
            m = scaled.data();
          }
          member_similarities(m, targets_t.data(), d, k_pad, sims.data());
          for (int64_t i = 1; i < K; ++i) {
            if (beats(sims[i], sims[best])) best = i;
          }
        }
        row[n] = static_cast<int32_t>(D + best);
        counts[best] += 1;
      }
    }
  });
  return plan;
}

// ---------------------------------------------------------------------------------------------
// Forward: one pass over hidden per (image, column chunk), tokens in ascending order.

template <typename scalar_t>
void merge_forward_kernel(const at::Tensor& hidden, const MergePlan& plan, int64_t D, int64_t K,
                          at::Tensor& tokens) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = hidden.size(0), N = hidden.size(1), C = hidden.size(2);
  const int64_t hs0 = hidden.stride(0), hs1 = hidden.stride(1);
  const int64_t rows_out = D + K;
  const scalar_t* h_ptr = hidden.data_ptr<scalar_t>();
  scalar_t* out_ptr = tokens.data_ptr<scalar_t>();
  const int8_t* role_ptr = plan.role.data_ptr<int8_t>();
  const int32_t* row_ptr = plan.row.data_ptr<int32_t>();
  const int64_t* target_ptr = plan.targets.data_ptr<int64_t>();
  const int32_t* count_ptr = plan.counts.data_ptr<int32_t>();
  // Each task streams the rows of one image (or one column chunk of it) in ascending token order.
  const int64_t chunk = column_chunk(B, C);
  const int64_t chunks = ceil_div(C, chunk);

  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sums(K * chunk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks;
      const int64_t c0 = (task % chunks) * chunk;
      const int64_t width = std::min(chunk, C - c0);
      const scalar_t* h_img = h_ptr + b * hs0 + c0;
      scalar_t* out_img = out_ptr + b * rows_out * C + c0;
      const int8_t* role = role_ptr + b * N;
      const int32_t* row = row_ptr + b * N;
      std::fill(sums.begin(), sums.end(), acc_t(0));
      for (int64_t n = 0; n < N; ++n) {
        const scalar_t* src = h_img + n * hs1;
        if (role[n] == kDominant) {
          std::copy(src, src + width, out_img + row[n] * C);
        } else if (role[n] == kMember) {
          acc_t* __restrict acc = sums.data() + (row[n] - D) * chunk;
          const scalar_t* __restrict row_src = src;
          for (int64_t c = 0; c < width; ++c) acc[c] += widen(row_src[c]);
        }
      }
      for (int64_t i = 0; i < K; ++i) {
        const scalar_t* target = h_img + target_ptr[b * K + i] * hs1;
        const acc_t divisor = member_divisor(count_ptr[b * K + i]);
        const acc_t* acc = sums.data() + i * chunk;
        scalar_t* dst = out_img + (D + i) * C;
        for (int64_t c = 0; c < width; ++c) {
          dst[c] = static_cast<scalar_t>(widen(target[c]) + acc[c] / divisor);
        }
      }
    }
  });
}

at::Tensor merge_forward(const at::Tensor& hidden_in, const at::Tensor& metric,
                         const at::Tensor& keep, int64_t contextual) {
  const at::Tensor hidden = with_unit_last_stride(hidden_in);
  const int64_t B = hidden.size(0), C = hidden.size(2), D = keep.size(1);
  at::Tensor tokens = at::empty({B, D + contextual, C}, hidden.options());
  if (B == 0) return tokens;
  const MergePlan plan = build_plan(metric, keep, contextual);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(),
                                  "contextual_merge", [&] {
                                    merge_forward_kernel<scalar_t>(hidden, plan, D, contextual,
                                                                   tokens);
                                  });
  return tokens;
}

// ---------------------------------------------------------------------------------------------
// Backward (docs/SPEC.md "Gradients"): each token row of grad_hidden is written once.

template <typename scalar_t>
void merge_backward_kernel(const at::Tensor& grad, const MergePlan& plan, int64_t D, int64_t K,
                           at::Tensor& grad_hidden) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = grad_hidden.size(0), N = grad_hidden.size(1), C = grad_hidden.size(2);
  const int64_t gs0 = grad.stride(0), gs1 = grad.stride(1);
  const scalar_t* g_ptr = grad.data_ptr<scalar_t>();
  scalar_t* out_ptr = grad_hidden.data_ptr<scalar_t>();
  const int8_t* role_ptr = plan.role.data_ptr<int8_t>();
  const int32_t* row_ptr = plan.row.data_ptr<int32_t>();
  const int32_t* count_ptr = plan.counts.data_ptr<int32_t>();

  at::parallel_for(0, B * N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bn = begin; bn < end; ++bn) {
      const int64_t b = bn / N;
      scalar_t* dst = out_ptr + bn * C;
      const int8_t role = role_ptr[bn];
      if (role == kDropped) {
        std::fill(dst, dst + C, scalar_t(0));
        continue;
      }
      const int32_t r = row_ptr[bn];
      const scalar_t* src = g_ptr + b * gs0 + r * gs1;
      if (role != kMember) {
        std::copy(src, src + C, dst);
        continue;
      }
      const acc_t divisor = member_divisor(count_ptr[b * K + (r - D)]);
      for (int64_t c = 0; c < C; ++c) {
        dst[c] = static_cast<scalar_t>(widen(src[c]) / divisor);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Op entry points.

at::Tensor dominant_topk_cpu(const at::Tensor& scores, int64_t dominant, bool keep_cls) {
  check_dominant_topk_args(scores, dominant, keep_cls);
  return dominant_topk_impl("dominant_topk", scores, dominant, keep_cls);
}

at::Tensor contextual_merge_cpu(const at::Tensor& hidden, const at::Tensor& metric,
                                const at::Tensor& keep, int64_t contextual) {
  check_contextual_merge_args(hidden, metric, keep, contextual);
  check_keep_values("contextual_merge", keep, hidden.size(1));
  return merge_forward(hidden, metric, keep, contextual);
}

at::Tensor contextual_merge_backward_cpu(const at::Tensor& grad_tokens, const at::Tensor& metric,
                                         const at::Tensor& keep, int64_t num_tokens) {
  check_contextual_merge_backward_args(grad_tokens, metric, keep, num_tokens);
  check_keep_values("contextual_merge_backward", keep, num_tokens);
  return contextual_merge_backward_unchecked(grad_tokens, metric, keep, num_tokens);
}

std::tuple<at::Tensor, at::Tensor> select_merge_cpu(const at::Tensor& hidden,
                                                    const at::Tensor& scores,
                                                    const at::Tensor& metric, int64_t dominant,
                                                    int64_t contextual, bool keep_cls) {
  check_select_merge_args(hidden, scores, metric, dominant, contextual, keep_cls);
  at::Tensor keep = dominant_topk_impl("select_merge", scores, dominant, keep_cls);
  return {merge_forward(hidden, metric, keep, contextual), keep};
}

}  // namespace

// The entry points of select_merge_cpu.h.

at::Tensor dominant_topk_unchecked(const char* op, const at::Tensor& scores, int64_t dominant) {
  return dominant_topk_impl(op, scores, dominant, /*keep_cls=*/false);
}

at::Tensor contextual_merge_unchecked(const at::Tensor& hidden, const at::Tensor& metric,
                                      const at::Tensor& keep, int64_t contextual) {
  return merge_forward(hidden, metric, keep, contextual);
}

at::Tensor contextual_merge_backward_unchecked(const at::Tensor& grad_tokens, const at::Tensor& metric,
                                               const at::Tensor& keep, int64_t num_tokens) {
  const at::Tensor grad = with_unit_last_stride(grad_tokens);
  const int64_t B = grad.size(0), C = grad.size(2), D = keep.size(1);
  const int64_t contextual = grad.size(1) - D;
  at::Tensor grad_hidden = at::empty({B, num_tokens, C}, grad.options());
  if (B == 0) return grad_hidden;
  const MergePlan plan = build_plan(metric, keep, contextual);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "contextual_merge_backward", [&] {
                                    merge_backward_kernel<scalar_t>(grad, plan, D, contextual,
                                                                    grad_hidden);
                                  });
  return grad_hidden;
}

TORCH_LIBRARY_IMPL(visionzip, CPU, m) {
  m.impl("dominant_topk", &dominant_topk_cpu);
  m.impl("contextual_merge", &contextual_merge_cpu);
  m.impl("contextual_merge_backward", &contextual_merge_backward_cpu);
  m.impl("select_merge", &select_merge_cpu);
}

}  // namespace visionzip::cpu
