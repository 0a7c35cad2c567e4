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
#include <cstring>
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

at::Tensor dominant_topk_impl(const char* op, const at::Tensor& scores, int64_t dominant, bool keep_cls) {
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

// ---------------------------------------------------------------------------------------------
// Row loops of the plan and the merge, one cloned function per storage type (VZ_SIMD_CLONES): each
// element is computed alone, in the same order in every clone, so all of them give the same bits.

// Members whose similarities are summed together (independent sums keep the vector units busy) and
// targets per vector tile.
constexpr int kMemberGroup = 4;
constexpr int64_t kTargetTile = 16;

// 16 floats, operated on lane by lane (GCC/Clang vector extension): one AVX-512 register, two AVX2
// or four SSE ones, picked by the clone. Written out because the compiler, left to itself, vectorises
// the similarity loop over c with shuffles instead of over the targets.
typedef float TargetTile __attribute__((vector_size(kTargetTile * sizeof(float))));

// sims[g * k_pad + i] = m[g] . targets_t[:, i] for kMemberGroup members m (rows of d), each summed
// over c in ascending order as add_product does (a rounded product, then a rounded sum), as the CUDA
// kernels do; the lanes are the targets.
VZ_SIMD_CLONES
void group_similarities(const float* __restrict m, const float* __restrict targets_t, int64_t d, int64_t k_pad,
                        float* __restrict sims) {
  for (int64_t i0 = 0; i0 < k_pad; i0 += kTargetTile) {
    TargetTile acc[kMemberGroup] = {};
    for (int64_t c = 0; c < d; ++c) {
      TargetTile t;
      std::memcpy(&t, targets_t + c * k_pad + i0, sizeof(t));
      for (int g = 0; g < kMemberGroup; ++g) acc[g] = acc[g] + m[g * d + c] * t;
    }
    for (int g = 0; g < kMemberGroup; ++g) std::memcpy(sims + g * k_pad + i0, &acc[g], sizeof(acc[g]));
  }
}

// One value per member of a group.
typedef float GroupSims __attribute__((vector_size(kMemberGroup * sizeof(float))));
typedef int32_t GroupIndices __attribute__((vector_size(kMemberGroup * sizeof(int32_t))));

// The best of K targets for each member of a group (sims as group_similarities writes them): the
// rule of merge_math.h's beats (a NaN beats every number, the first NaN wins; otherwise the first
// maximum), lane by lane and without branches, since which target wins is data-dependent and a
// branch per comparison mispredicts.
GroupIndices group_argmax(const float* sims, int64_t k_pad, int64_t K) {
  GroupSims best_sim;
  for (int g = 0; g < kMemberGroup; ++g) best_sim[g] = sims[g * k_pad];
  GroupIndices best = {};
  for (int64_t i = 1; i < K; ++i) {
    GroupSims sim;
    for (int g = 0; g < kMemberGroup; ++g) sim[g] = sims[g * k_pad + i];
    const GroupIndices wins = (sim > best_sim) | ((sim != sim) & (best_sim == best_sim));
    best = wins ? GroupIndices{} + static_cast<int32_t>(i) : best;
    best_sim = wins ? sim : best_sim;
  }
  return best;
}

// out[0..d) = the metric row as fp32 (what metric.float() holds); returns the largest bit pattern of
// |out[c]|: below 0x7f800000 iff the row is finite, and then the bits of max |out[c]| (for floats >= 0
// the integer order of the bits is their order).
template <typename scalar_t>
[[gnu::always_inline]] inline uint32_t load_metric_row_body(const scalar_t* __restrict src, int64_t d,
                                                            float* __restrict out) {
  uint32_t max_bits = 0;
  for (int64_t c = 0; c < d; ++c) {
    const float v = static_cast<float>(widen(src[c]));
    out[c] = v;
    max_bits = std::max(max_bits, std::bit_cast<uint32_t>(v) & 0x7fffffffu);
  }
  return max_bits;
}

// acc[c] += hidden row, widened.
template <typename scalar_t>
[[gnu::always_inline]] inline void add_row_body(at::opmath_type<scalar_t>* __restrict acc,
                                                const scalar_t* __restrict src, int64_t width) {
  for (int64_t c = 0; c < width; ++c) acc[c] += widen(src[c]);
}

// dst = target + acc / divisor, rounded once to the storage type.
template <typename scalar_t>
[[gnu::always_inline]] inline void merged_row_body(scalar_t* __restrict dst, const scalar_t* __restrict target,
                                                   const at::opmath_type<scalar_t>* __restrict acc,
                                                   at::opmath_type<scalar_t> divisor, int64_t width) {
  for (int64_t c = 0; c < width; ++c) dst[c] = narrow<scalar_t>(widen(target[c]) + acc[c] / divisor);
}

// dst = src / divisor, rounded once to the storage type (a member's gradient).
template <typename scalar_t>
[[gnu::always_inline]] inline void divided_row_body(scalar_t* __restrict dst, const scalar_t* __restrict src,
                                                    at::opmath_type<scalar_t> divisor, int64_t width) {
  for (int64_t c = 0; c < width; ++c) dst[c] = narrow<scalar_t>(widen(src[c]) / divisor);
}

#define VZ_ROW_LOOPS(attribute, scalar_t)                                                                            \
  attribute uint32_t load_metric_row(const scalar_t* src, int64_t d, float* out) {                                   \
    return load_metric_row_body(src, d, out);                                                                        \
  }                                                                                                                  \
  attribute void add_row(at::opmath_type<scalar_t>* acc, const scalar_t* src, int64_t width) {                       \
    add_row_body(acc, src, width);                                                                                   \
  }                                                                                                                  \
  attribute void merged_row(scalar_t* dst, const scalar_t* target, const at::opmath_type<scalar_t>* acc,             \
                            at::opmath_type<scalar_t> divisor, int64_t width) {                                      \
    merged_row_body(dst, target, acc, divisor, width);                                                               \
  }                                                                                                                  \
  attribute void divided_row(scalar_t* dst, const scalar_t* src, at::opmath_type<scalar_t> divisor, int64_t width) { \
    divided_row_body(dst, src, divisor, width);                                                                      \
  }
VZ_ROW_LOOPS(VZ_SIMD_CLONES, float)
VZ_ROW_LOOPS(VZ_SIMD_CLONES, c10::BFloat16)
VZ_ROW_LOOPS(VZ_SIMD_CLONES, c10::Half)
VZ_ROW_LOOPS(inline, double)
#undef VZ_ROW_LOOPS

// ---------------------------------------------------------------------------------------------
// Merge plan: what every token becomes (docs/SPEC.md "Merging"), built per image from keep and metric.

struct MergePlan {
  at::Tensor role;     // [B, N] int8 TokenRole
  at::Tensor row;      // [B, N] int32 output row (-1 when dropped)
  at::Tensor targets;  // [B, K] int64 token index of each target
  at::Tensor counts;   // [B, K] int32 members per target
};

// Builds the plan of each image in three steps: roles and unit targets (setup), each member's most
// similar target (assign, over slices of the members), and the member counts. With at least as many
// images as threads, one task does all three for an image; with fewer (B = 1), the members of an
// image are split over the threads. Each member's target is computed the same way in both, so the
// plan does not depend on the thread count.
template <typename mscalar_t>
class PlanBuilder {
 public:
  PlanBuilder(const at::Tensor& metric, const at::Tensor& keep, int64_t contextual, MergePlan& plan)
      : B_(metric.size(0)), N_(metric.size(1)), d_(metric.size(2)), D_(keep.size(1)), K_(contextual),
        k_pad_((contextual + kTargetTile - 1) / kTargetTile * kTargetTile), step_(target_step(N_ - D_, contextual)),
        ms0_(metric.stride(0)), ms1_(metric.stride(1)), m_ptr_(metric.data_ptr<mscalar_t>()),
        keep_ptr_(keep.data_ptr<int64_t>()), role_ptr_(plan.role.data_ptr<int8_t>()),
        row_ptr_(plan.row.data_ptr<int32_t>()), target_ptr_(plan.targets.data_ptr<int64_t>()),
        count_ptr_(plan.counts.data_ptr<int32_t>()), targets_t_(B_ * d_ * k_pad_),
        members_(contextual > 0 ? B_ * N_ : 0) {}

  void build() {
    const int64_t threads = at::get_num_threads();
    const int64_t num_members = K_ > 0 ? N_ - D_ - K_ : 0;
    if (B_ >= threads || num_members == 0) {
      at::parallel_for(0, B_, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          setup(b);
          assign(b, 0, num_members);
          count(b);
        }
      });
      return;
    }
    at::parallel_for(0, B_, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) setup(b);
    });
    // Slices of whole member groups, so that every slice sums the same groups as one task would.
    const int64_t slices = std::min(ceil_div(threads, B_), ceil_div(num_members, kMemberGroup));
    const int64_t slice = ceil_div(ceil_div(num_members, slices), kMemberGroup) * kMemberGroup;
    at::parallel_for(0, B_ * slices, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / slices, first = (task % slices) * slice;
        assign(b, first, std::min(first + slice, num_members));
      }
    });
    for (int64_t b = 0; b < B_; ++b) count(b);
  }

 private:
  // Roles, output rows of dominant tokens and targets, the unit targets transposed to [d, k_pad]
  // (so that the similarity loop has no reduction), and the image's members in ascending order.
  void setup(int64_t b) {
    int8_t* role = role_ptr_ + b * N_;
    int32_t* row = row_ptr_ + b * N_;
    std::fill(role, role + N_, static_cast<int8_t>(K_ > 0 ? kMember : kDropped));
    std::fill(row, row + N_, -1);
    for (int64_t i = 0; i < D_; ++i) {
      const int64_t t = keep_ptr_[b * D_ + i];
      role[t] = kDominant;
      row[t] = static_cast<int32_t>(i);
    }
    if (K_ == 0) return;
    // Targets sit at positions 0, step, ..., (K-1)*step of the ascending not-kept tokens; their
    // metric is scaled by metric_scale, then normalised as m / max(||m||, eps) (docs/SPEC.md "Merging"
    // step 1).
    float* targets_t = targets_t_.data() + b * d_ * k_pad_;
    std::fill(targets_t, targets_t + d_ * k_pad_, 0.f);
    std::vector<float> m(d_);
    int32_t* members = members_.data() + b * N_;
    for (int64_t n = 0, pos = 0, num_members = 0; n < N_; ++n) {
      if (role[n] == kDominant) continue;
      const int64_t i = target_index(pos++, step_, K_);
      if (i < 0) {
        members[num_members++] = static_cast<int32_t>(n);
        continue;
      }
      role[n] = kTarget;
      row[n] = static_cast<int32_t>(D_ + i);
      target_ptr_[b * K_ + i] = n;
      const uint32_t max_bits = load_metric_row(m_ptr_ + b * ms0_ + n * ms1_, d_, m.data());
      const float scale = metric_scale(std::bit_cast<float>(max_bits));
      if (scale != 1.f) {
        for (int64_t c = 0; c < d_; ++c) m[c] *= scale;
      }
      float sum_sq = 0.f;
      for (int64_t c = 0; c < d_; ++c) sum_sq = add_product(sum_sq, m[c], m[c]);
      const float norm = clamped_norm(sum_sq);
      for (int64_t c = 0; c < d_; ++c) targets_t[c * k_pad_ + i] = m[c] / norm;
    }
  }

  // Each member of members[first, last) goes to its most cosine-similar target (merge_math.h's
  // beats: NaN first, then the first maximum). Dividing by the member's own norm scales all K
  // similarities alike, so the argmax skips it; the member is scaled by metric_scale as the targets
  // are (so no similarity under- or overflows and the assignment is scale invariant), and a member
  // with a non-finite metric goes to target 0, where the reference's all-NaN row sends it. Finite
  // members are summed kMemberGroup at a time.
  void assign(int64_t b, int64_t first, int64_t last) {
    if (first >= last) return;
    const int32_t* members = members_.data() + b * N_;
    const float* targets_t = targets_t_.data() + b * d_ * k_pad_;
    int32_t* row = row_ptr_ + b * N_;
    std::vector<float> group(kMemberGroup * d_, 0.f), sims(kMemberGroup * k_pad_);
    int32_t group_tokens[kMemberGroup];
    int filled = 0;
    const auto flush = [&] {
      group_similarities(group.data(), targets_t, d_, k_pad_, sims.data());
      const GroupIndices best = group_argmax(sims.data(), k_pad_, K_);
      for (int g = 0; g < filled; ++g) row[group_tokens[g]] = static_cast<int32_t>(D_ + best[g]);
      filled = 0;
    };
    for (int64_t j = first; j < last; ++j) {
      const int32_t n = members[j];
      float* m = group.data() + filled * d_;
      const uint32_t max_bits = load_metric_row(m_ptr_ + b * ms0_ + n * ms1_, d_, m);
      if (max_bits >= 0x7f800000u) {  // not finite
        row[n] = static_cast<int32_t>(D_);
        continue;
      }
      const float scale = metric_scale(std::bit_cast<float>(max_bits));
      if (scale != 1.f) {
        for (int64_t c = 0; c < d_; ++c) m[c] *= scale;
      }
      group_tokens[filled++] = n;
      if (filled == kMemberGroup) flush();
    }
    if (filled > 0) flush();  // the rows past `filled` hold earlier members: summed, not used
  }

  void count(int64_t b) {
    if (K_ == 0) return;
    const int8_t* role = role_ptr_ + b * N_;
    const int32_t* row = row_ptr_ + b * N_;
    int32_t* counts = count_ptr_ + b * K_;
    for (int64_t n = 0; n < N_; ++n) {
      if (role[n] == kMember) counts[row[n] - D_] += 1;
    }
  }

  const int64_t B_, N_, d_, D_, K_, k_pad_, step_, ms0_, ms1_;
  const mscalar_t* m_ptr_;
  const int64_t* keep_ptr_;
  int8_t* role_ptr_;
  int32_t* row_ptr_;
  int64_t* target_ptr_;
  int32_t* count_ptr_;
  std::vector<float> targets_t_;
  std::vector<int32_t> members_;
};

MergePlan build_plan(const at::Tensor& metric_in, const at::Tensor& keep_in, int64_t contextual) {
  // The metric is read in its own dtype and widened row by row (as metric.float() would).
  const at::Tensor metric = with_unit_last_stride(metric_in);
  const at::Tensor keep = keep_in.contiguous();
  const int64_t B = metric.size(0), N = metric.size(1), K = contextual;
  const auto opts = metric.options();
  MergePlan plan{at::empty({B, N}, opts.dtype(at::kChar)), at::empty({B, N}, opts.dtype(at::kInt)),
                 at::empty({B, K}, opts.dtype(at::kLong)), at::zeros({B, K}, opts.dtype(at::kInt))};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, metric.scalar_type(), "merge_plan",
                                  [&] { PlanBuilder<scalar_t>(metric, keep, contextual, plan).build(); });
  return plan;
}

// ---------------------------------------------------------------------------------------------
// Forward: one pass over hidden per (image, column chunk), tokens in ascending order.

template <typename scalar_t>
void merge_forward_kernel(const at::Tensor& hidden, const MergePlan& plan, int64_t D, int64_t K, at::Tensor& tokens) {
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
          add_row(sums.data() + (row[n] - D) * chunk, src, width);
        }
      }
      for (int64_t i = 0; i < K; ++i) {
        merged_row(out_img + (D + i) * C, h_img + target_ptr[b * K + i] * hs1, sums.data() + i * chunk,
                   static_cast<acc_t>(member_divisor(count_ptr[b * K + i])), width);
      }
    }
  });
}

at::Tensor merge_forward(const at::Tensor& hidden_in, const at::Tensor& metric, const at::Tensor& keep,
                         int64_t contextual) {
  const at::Tensor hidden = with_unit_last_stride(hidden_in);
  const int64_t B = hidden.size(0), C = hidden.size(2), D = keep.size(1);
  at::Tensor tokens = at::empty({B, D + contextual, C}, hidden.options());
  if (B == 0) return tokens;
  const MergePlan plan = build_plan(metric, keep, contextual);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "contextual_merge",
                                  [&] { merge_forward_kernel<scalar_t>(hidden, plan, D, contextual, tokens); });
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
      divided_row(dst, src, static_cast<acc_t>(member_divisor(count_ptr[b * K + (r - D)])), C);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Op entry points.

at::Tensor dominant_topk_cpu(const at::Tensor& scores, int64_t dominant, bool keep_cls) {
  check_dominant_topk_args(scores, dominant, keep_cls);
  return dominant_topk_impl("dominant_topk", scores, dominant, keep_cls);
}

at::Tensor contextual_merge_cpu(const at::Tensor& hidden, const at::Tensor& metric, const at::Tensor& keep,
                                int64_t contextual) {
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

std::tuple<at::Tensor, at::Tensor> select_merge_cpu(const at::Tensor& hidden, const at::Tensor& scores,
                                                    const at::Tensor& metric, int64_t dominant, int64_t contextual,
                                                    bool keep_cls) {
  check_select_merge_args(hidden, scores, metric, dominant, contextual, keep_cls);
  at::Tensor keep = dominant_topk_impl("select_merge", scores, dominant, keep_cls);
  return {merge_forward(hidden, metric, keep, contextual), keep};
}

}  // namespace

// The entry points of select_merge_cpu.h.

at::Tensor dominant_topk_unchecked(const char* op, const at::Tensor& scores, int64_t dominant) {
  return dominant_topk_impl(op, scores, dominant, /*keep_cls=*/false);
}

at::Tensor contextual_merge_unchecked(const at::Tensor& hidden, const at::Tensor& metric, const at::Tensor& keep,
                                      int64_t contextual) {
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "contextual_merge_backward",
                                  [&] { merge_backward_kernel<scalar_t>(grad, plan, D, contextual, grad_hidden); });
  return grad_hidden;
}

TORCH_LIBRARY_IMPL(visionzip, CPU, m) {
  m.impl("dominant_topk", &dominant_topk_cpu);
  m.impl("contextual_merge", &contextual_merge_cpu);
  m.impl("contextual_merge_backward", &contextual_merge_backward_cpu);
  m.impl("select_merge", &select_merge_cpu);
}

}  // namespace visionzip::cpu
