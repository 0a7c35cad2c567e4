#include "checks.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace visionzip {
namespace {

void check_float(const char* op, const char* name, const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
                   "visionzip.", op, ": ", name, " must be float32, float16, bfloat16 or float64, got ", dtype);
}

void check_rank(const char* op, const char* name, const at::Tensor& t, int64_t rank, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == rank, "visionzip.", op, ": ", name, " must be a ", rank, "-D tensor ", layout,
                    ", got shape ", t.sym_sizes());
}

void check_same_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "visionzip.", op, ": ", name, " must be on the same device as ",
                    ref_name, " (", ref.device(), "), got ", t.device());
}

void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim, const char* ref_name,
               const c10::SymInt& expected, const char* what) {
  TORCH_CHECK_VALUE(t.sym_size(dim) == expected, "visionzip.", op, ": ", name, ".size(", dim, ") must equal ", what,
                    " of ", ref_name, " (", expected, "), got ", t.sym_size(dim));
}

void check_positive_sizes(const char* op, const char* name, const at::Tensor& t) {
  // Dim 0 is the batch: B == 0 is allowed and gives empty outputs. Every other dim must be > 0.
  for (int64_t i = 1; i < t.dim(); ++i) {
    TORCH_CHECK_VALUE(t.sym_size(i) > 0, "visionzip.", op, ": ", name, " must not be empty, got shape ", t.sym_sizes());
  }
}

void check_metric(const char* op, const at::Tensor& metric, const char* ref_name, const at::Tensor& ref) {
  check_rank(op, "metric", metric, 3, "[B, N, d]");
  check_float(op, "metric", metric);
  check_same_device(op, "metric", metric, ref_name, ref);
  check_positive_sizes(op, "metric", metric);
}

void check_keep(const char* op, const at::Tensor& keep, const at::Tensor& metric) {
  check_rank(op, "keep", keep, 2, "[B, D]");
  TORCH_CHECK_TYPE(keep.scalar_type() == at::kLong, "visionzip.", op, ": keep must be int64, got ", keep.scalar_type());
  check_same_device(op, "keep", keep, "metric", metric);
  check_dim(op, "keep", keep, 0, "metric", metric.sym_size(0), "the batch size");
  TORCH_CHECK_VALUE(keep.sym_size(1) >= 1 && keep.sym_size(1) <= metric.sym_size(1), "visionzip.", op,
                    ": keep.size(1) (D) must be between 1 and N (", metric.sym_size(1), "), got ", keep.sym_size(1));
}

// A query tensor [B, ..., H, d] against k [B, N, H, d]: ranks, dtypes, device, batch, heads, head dim.
void check_query_key(const char* op, const char* q_name, const at::Tensor& q, int64_t q_rank, const char* q_layout,
                     const at::Tensor& k) {
  check_rank(op, q_name, q, q_rank, q_layout);
  check_rank(op, "k", k, 4, "[B, N, H, d]");
  check_float(op, q_name, q);
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), "visionzip.", op, ": k must have the dtype of ", q_name, " (",
                   q.scalar_type(), "), got ", k.scalar_type());
  check_same_device(op, "k", k, q_name, q);
  check_dim(op, "k", k, 0, q_name, q.sym_size(0), "the batch size");
  check_dim(op, "k", k, 2, q_name, q.sym_size(-2), "the head count");
  check_dim(op, "k", k, 3, q_name, q.sym_size(-1), "the head dim");
  check_positive_sizes(op, "k", k);
}

// q and k of one layout: the same rank, a float dtype, one device and the same sizes.
void check_query_key_pair(const char* op, const at::Tensor& q, const at::Tensor& k, int64_t rank, const char* layout) {
  check_rank(op, "q", q, rank, layout);
  check_rank(op, "k", k, rank, layout);
  check_float(op, "q", q);
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), "visionzip.", op, ": k must have the dtype of q (",
                   q.scalar_type(), "), got ", k.scalar_type());
  check_same_device(op, "k", k, "q", q);
  for (int64_t dim = 0; dim < rank; ++dim) {
    check_dim(op, "k", k, dim, "q", q.sym_size(dim), "the same size");
  }
  check_positive_sizes(op, "k", k);  // dim 0 (B, or the packed T) may be 0: empty outputs
}

// Budgets: c10::IntArrayRef (the kernels) or c10::SymIntArrayRef (the fake kernels, under
// torch.compile a budget is a SymInt and must not be specialised by these checks).
template <class Budgets>
void check_budget_list(const char* op, const char* name, Budgets budgets, const c10::SymInt& num_images) {
  TORCH_CHECK_VALUE(num_images == static_cast<int64_t>(budgets.size()), "visionzip.", op, ": ", name,
                    " must hold one count per image (", num_images, " images: cu_seqlens.size(0) - 1), got ",
                    budgets.size());
  for (size_t i = 0; i < budgets.size(); ++i) {
    TORCH_CHECK_VALUE(budgets[i] >= 0, "visionzip.", op, ": ", name, "[", i, "] (image ", i, ") must be >= 0, got ",
                      budgets[i]);
  }
}

// The rules both packed merge ops share: scores [T] (its rank checked by the caller, first) and
// metric [T, d] on the device of `data` (hidden, or the gradient), cu_seqlens, and one budget >= 0
// per image in each list.
template <class Budgets>
void check_packed_merge_inputs(const char* op, const char* data_name, const at::Tensor& data, const at::Tensor& scores,
                               const at::Tensor& metric, const at::Tensor& cu_seqlens, Budgets dominant,
                               Budgets contextual) {
  check_float(op, "scores", scores);
  check_same_device(op, "scores", scores, data_name, data);
  check_rank(op, "metric", metric, 2, "[T, d]");
  check_float(op, "metric", metric);
  check_same_device(op, "metric", metric, data_name, data);
  check_dim(op, "metric", metric, 0, "scores", scores.sym_size(0), "the token count");
  check_positive_sizes(op, "metric", metric);
  check_cu_seqlens(op, cu_seqlens, data_name, data);
  const c10::SymInt num_images = cu_seqlens.sym_size(0) - 1;
  check_budget_list(op, "dominant", dominant, num_images);
  check_budget_list(op, "contextual", contextual, num_images);
}

template <class Budgets>
void varlen_select_merge_rules(const at::Tensor& hidden, const at::Tensor& scores, const at::Tensor& metric,
                               const at::Tensor& cu_seqlens, Budgets dominant, Budgets contextual) {
  constexpr const char* op = "varlen_select_merge";
  check_rank(op, "hidden", hidden, 2, "[T, C]");
  check_float(op, "hidden", hidden);
  check_positive_sizes(op, "hidden", hidden);
  check_rank(op, "scores", scores, 1, "[T]");
  check_dim(op, "scores", scores, 0, "hidden", hidden.sym_size(0), "the token count");
  check_packed_merge_inputs(op, "hidden", hidden, scores, metric, cu_seqlens, dominant, contextual);
}

template <class Budgets>
void varlen_select_merge_backward_rules(const at::Tensor& grad_tokens, const at::Tensor& scores,
                                        const at::Tensor& metric, const at::Tensor& cu_seqlens, Budgets dominant,
                                        Budgets contextual) {
  constexpr const char* op = "varlen_select_merge_backward";
  check_rank(op, "grad_tokens", grad_tokens, 2, "[sum(D_i + K_i), C]");
  check_float(op, "grad_tokens", grad_tokens);
  check_positive_sizes(op, "grad_tokens", grad_tokens);
  check_rank(op, "scores", scores, 1, "[T]");
  check_packed_merge_inputs(op, "grad_tokens", grad_tokens, scores, metric, cu_seqlens, dominant, contextual);
  c10::SymInt kept = 0;
  for (size_t i = 0; i < dominant.size(); ++i) kept = kept + dominant[i] + contextual[i];
  check_dim(op, "grad_tokens", grad_tokens, 0, "dominant + contextual", kept, "the sum");
}

}  // namespace

void check_budget(const char* op, const c10::SymInt& num_tokens, const c10::SymInt& dominant,
                  const c10::SymInt& contextual, bool keep_cls) {
  TORCH_CHECK_VALUE(dominant >= 1, "visionzip.", op, ": dominant must be >= 1",
                    keep_cls ? " (keep_cls=True always keeps token 0)" : "", ", got ", dominant);
  TORCH_CHECK_VALUE(dominant <= num_tokens, "visionzip.", op, ": dominant must be <= N (", num_tokens, "), got ",
                    dominant);
  TORCH_CHECK_VALUE(contextual >= 0, "visionzip.", op, ": contextual must be >= 0, got ", contextual);
  TORCH_CHECK_VALUE(contextual <= num_tokens - dominant, "visionzip.", op, ": contextual must be <= N - dominant (",
                    num_tokens, " - ", dominant, " = ", num_tokens - dominant, "), got ", contextual);
}

void check_cls_attention_args(const at::Tensor& q_cls, const at::Tensor& k) {
  check_query_key("cls_attention", "q_cls", q_cls, 3, "[B, H, d]", k);
}

void check_attention_received_args(const at::Tensor& q, const at::Tensor& k) {
  check_query_key_pair("attention_received", q, k, 4, "[B, N, H, d]");
}

void check_scores_and_metric_args(const at::Tensor& q, const at::Tensor& k, bool keep_cls) {
  constexpr const char* op = "scores_and_metric";
  check_query_key(op, "q", q, 4, "[B, M, H, d]", k);
  if (keep_cls) {
    check_positive_sizes(op, "q", q);
  } else {
    // Without a CLS token every token is a query.
    TORCH_CHECK_VALUE(q.sym_size(1) == k.sym_size(1), "visionzip.", op,
                      ": with keep_cls=False q.size(1) must equal the token count of k (", k.sym_size(1), "), got ",
                      q.sym_size(1));
  }
}

void check_dominant_topk_args(const at::Tensor& scores, int64_t dominant, bool keep_cls) {
  constexpr const char* op = "dominant_topk";
  check_rank(op, "scores", scores, 2, "[B, N]");
  check_float(op, "scores", scores);
  check_positive_sizes(op, "scores", scores);
  check_budget(op, scores.sym_size(1), dominant, 0, keep_cls);
}

void check_contextual_merge_args(const at::Tensor& hidden, const at::Tensor& metric, const at::Tensor& keep,
                                 int64_t contextual) {
  constexpr const char* op = "contextual_merge";
  check_rank(op, "hidden", hidden, 3, "[B, N, C]");
  check_float(op, "hidden", hidden);
  check_positive_sizes(op, "hidden", hidden);
  check_metric(op, metric, "hidden", hidden);
  check_dim(op, "metric", metric, 0, "hidden", hidden.sym_size(0), "the batch size");
  check_dim(op, "metric", metric, 1, "hidden", hidden.sym_size(1), "the token count");
  check_keep(op, keep, metric);
  check_budget(op, hidden.sym_size(1), keep.sym_size(1), contextual, /*keep_cls=*/false);
}

void check_contextual_merge_backward_args(const at::Tensor& grad_tokens, const at::Tensor& metric,
                                          const at::Tensor& keep, int64_t num_tokens) {
  constexpr const char* op = "contextual_merge_backward";
  check_rank(op, "grad_tokens", grad_tokens, 3, "[B, D+K, C]");
  check_float(op, "grad_tokens", grad_tokens);
  check_positive_sizes(op, "grad_tokens", grad_tokens);
  check_metric(op, metric, "grad_tokens", grad_tokens);
  check_dim(op, "metric", metric, 0, "grad_tokens", grad_tokens.sym_size(0), "the batch size");
  check_dim(op, "metric", metric, 1, "num_tokens", num_tokens, "the value");
  check_keep(op, keep, metric);
  const c10::SymInt contextual = grad_tokens.sym_size(1) - keep.sym_size(1);
  TORCH_CHECK_VALUE(contextual >= 0, "visionzip.", op, ": grad_tokens.size(1) must be >= D (", keep.sym_size(1),
                    "), got ", grad_tokens.sym_size(1));
  check_budget(op, num_tokens, keep.sym_size(1), contextual, /*keep_cls=*/false);
}

void check_select_merge_args(const at::Tensor& hidden, const at::Tensor& scores, const at::Tensor& metric,
                             int64_t dominant, int64_t contextual, bool keep_cls) {
  constexpr const char* op = "select_merge";
  check_rank(op, "hidden", hidden, 3, "[B, N, C]");
  check_float(op, "hidden", hidden);
  check_positive_sizes(op, "hidden", hidden);
  check_rank(op, "scores", scores, 2, "[B, N]");
  check_float(op, "scores", scores);
  check_same_device(op, "scores", scores, "hidden", hidden);
  check_dim(op, "scores", scores, 0, "hidden", hidden.sym_size(0), "the batch size");
  check_dim(op, "scores", scores, 1, "hidden", hidden.sym_size(1), "the token count");
  check_metric(op, metric, "hidden", hidden);
  check_dim(op, "metric", metric, 0, "hidden", hidden.sym_size(0), "the batch size");
  check_dim(op, "metric", metric, 1, "hidden", hidden.sym_size(1), "the token count");
  check_budget(op, hidden.sym_size(1), dominant, contextual, keep_cls);
}

void check_finite_scores(const char* op, const at::Tensor& scores, const at::Tensor& scores_f32) {
  const int64_t numel = scores_f32.numel(), N = scores_f32.dim() == 2 ? scores_f32.size(1) : numel;
  const float* s = scores_f32.const_data_ptr<float>();
  for (int64_t i = 0; i < numel; ++i) {
    if (std::isfinite(s[i])) continue;
    // scores[b, n] for dense [B, N] scores, scores[t] for packed [T] ones.
    const std::string index = scores_f32.dim() == 2 ? c10::str(i / N, ", ", i % N) : c10::str(i);
    const double original = scores.reshape(-1)[i].item<double>();
    TORCH_CHECK_VALUE(!std::isfinite(original), "visionzip.", op, ": scores[", index, "] = ", original,
                      " is outside float32's range (scores are ranked in float32)");
    TORCH_CHECK_VALUE(false, "visionzip.", op, ": scores must be finite, got scores[", index, "] = ", s[i]);
  }
}

void check_keep_values(const char* op, const at::Tensor& keep, int64_t num_tokens) {
  const int64_t B = keep.size(0), D = keep.size(1);
  const at::Tensor k = keep.to(at::kCPU).contiguous();
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

void check_finite_scores(const char* op, const at::Tensor& scores) {
  check_finite_scores(op, scores, scores.to(at::kCPU, at::kFloat).contiguous());
}

void check_cu_seqlens(const char* op, const at::Tensor& cu_seqlens, const char* data_name, const at::Tensor& data) {
  check_rank(op, "cu_seqlens", cu_seqlens, 1, "[n + 1]");
  TORCH_CHECK_TYPE(cu_seqlens.scalar_type() == at::kInt || cu_seqlens.scalar_type() == at::kLong, "visionzip.", op,
                   ": cu_seqlens must be int32 or int64, got ", cu_seqlens.scalar_type());
  TORCH_CHECK_VALUE(cu_seqlens.device() == data.device() || cu_seqlens.device().is_cpu(), "visionzip.", op,
                    ": cu_seqlens must be on the device of ", data_name, " (", data.device(), ") or on the CPU, got ",
                    cu_seqlens.device());
  TORCH_CHECK_VALUE(cu_seqlens.sym_size(0) >= 1, "visionzip.", op,
                    ": cu_seqlens must hold at least one offset (cu_seqlens[0] = 0), got shape ",
                    cu_seqlens.sym_sizes());
}

void check_cu_seqlens_offsets(const char* op, const at::Tensor& cu_seqlens, int64_t total_tokens, int64_t unit) {
  TORCH_CHECK(unit >= 1 && cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1 && cu_seqlens.device().is_cpu(),
              "visionzip.", op, ": check_cu_seqlens_offsets needs a CPU cu_seqlens [n + 1] and unit >= 1");
  const at::Tensor offsets = cu_seqlens.to(at::kLong).contiguous();
  const int64_t* cu = offsets.const_data_ptr<int64_t>();
  const int64_t n = offsets.size(0) - 1;
  TORCH_CHECK_VALUE(cu[0] == 0, "visionzip.", op, ": cu_seqlens[0] must be 0, got ", cu[0]);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t length = cu[i + 1] - cu[i];
    TORCH_CHECK_VALUE(length >= 0, "visionzip.", op, ": cu_seqlens must be non-decreasing, got cu_seqlens[", i + 1,
                      "] = ", cu[i + 1], " < cu_seqlens[", i, "] = ", cu[i]);
    TORCH_CHECK_VALUE(length % unit == 0, "visionzip.", op, ": image ", i, " has ", length, " tokens (cu_seqlens[",
                      i + 1, "] - cu_seqlens[", i, "]), not a multiple of unit (", unit, ")");
  }
  TORCH_CHECK_VALUE(cu[n] == total_tokens, "visionzip.", op, ": cu_seqlens[-1] must equal the token count T (",
                    total_tokens, "), got ", cu[n]);
}

void check_varlen_scores_and_metric_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens,
                                         int64_t unit) {
  constexpr const char* op = "varlen_scores_and_metric";
  check_query_key_pair(op, q, k, 3, "[T, H, d]");
  check_cu_seqlens(op, cu_seqlens, "q", q);
  TORCH_CHECK_VALUE(unit == 1 || unit == 4, "visionzip.", op, ": unit must be 1 or 4, got ", unit);
  TORCH_CHECK_VALUE(q.sym_size(0) % unit == 0, "visionzip.", op, ": q.size(0) (T = ", q.sym_size(0),
                    ") must be a multiple of unit (", unit, ")");
}

// ---------------------------------------------------------------------------------------------
// Packed (varlen) images.

// Each packed op's rules are one template over the budgets' type; these overloads are its two entry points.
void check_varlen_select_merge_args(const at::Tensor& hidden, const at::Tensor& scores, const at::Tensor& metric,
                                    const at::Tensor& cu_seqlens, c10::IntArrayRef dominant,
                                    c10::IntArrayRef contextual) {
  varlen_select_merge_rules(hidden, scores, metric, cu_seqlens, dominant, contextual);
}

void check_varlen_select_merge_args(const at::Tensor& hidden, const at::Tensor& scores, const at::Tensor& metric,
                                    const at::Tensor& cu_seqlens, c10::SymIntArrayRef dominant,
                                    c10::SymIntArrayRef contextual) {
  varlen_select_merge_rules(hidden, scores, metric, cu_seqlens, dominant, contextual);
}

void check_varlen_select_merge_backward_args(const at::Tensor& grad_tokens, const at::Tensor& scores,
                                             const at::Tensor& metric, const at::Tensor& cu_seqlens,
                                             c10::IntArrayRef dominant, c10::IntArrayRef contextual) {
  varlen_select_merge_backward_rules(grad_tokens, scores, metric, cu_seqlens, dominant, contextual);
}

void check_varlen_select_merge_backward_args(const at::Tensor& grad_tokens, const at::Tensor& scores,
                                             const at::Tensor& metric, const at::Tensor& cu_seqlens,
                                             c10::SymIntArrayRef dominant, c10::SymIntArrayRef contextual) {
  varlen_select_merge_backward_rules(grad_tokens, scores, metric, cu_seqlens, dominant, contextual);
}

std::vector<int64_t> read_cu_seqlens_and_check_budgets(const char* op, const at::Tensor& cu_seqlens, int64_t num_tokens,
                                                       c10::IntArrayRef dominant, c10::IntArrayRef contextual) {
  const at::Tensor cu_host = cu_seqlens.to(at::kCPU, at::kLong).contiguous();
  check_cu_seqlens_offsets(op, cu_host, num_tokens, /*unit=*/1);
  const int64_t* cu_ptr = cu_host.const_data_ptr<int64_t>();
  std::vector<int64_t> cu(cu_ptr, cu_ptr + cu_host.numel());
  const int64_t n = static_cast<int64_t>(cu.size()) - 1;
  for (int64_t i = 0; i < n && i < static_cast<int64_t>(dominant.size()); ++i) {
    const int64_t size = cu[i + 1] - cu[i];
    TORCH_CHECK_VALUE(dominant[i] <= size, "visionzip.", op, ": dominant[", i, "] must be <= N_", i, " (image ", i,
                      " has ", size, " tokens), got ", dominant[i]);
    TORCH_CHECK_VALUE(contextual[i] <= size - dominant[i], "visionzip.", op, ": contextual[", i, "] must be <= N_", i,
                      " - dominant[", i, "] (image ", i, ": ", size, " - ", dominant[i], " = ", size - dominant[i],
                      "), got ", contextual[i]);
  }
  return cu;
}

}  // namespace visionzip
