// Argument validation: every rule written once, here. The CPU and CUDA kernels call these; so do the
// fake (meta) kernels, the Triton launchers and the reference, through visionzip_kernels._C
// (csrc/python_module.cpp). Each check runs before any kernel and names the argument and the rule it
// broke. Sizes are read as SymInts, so the fake kernels can check symbolic shapes under
// torch.compile (a comparison then becomes a guard).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>
#include <c10/util/ArrayRef.h>

#include <vector>

namespace visionzip {

void check_cls_attention_args(const at::Tensor& q_cls, const at::Tensor& k);
void check_attention_received_args(const at::Tensor& q, const at::Tensor& k);
void check_scores_and_metric_args(const at::Tensor& q, const at::Tensor& k, bool keep_cls);
// 1 <= dominant <= N and 0 <= contextual <= N - dominant.
void check_budget(const char* op, const c10::SymInt& num_tokens, const c10::SymInt& dominant,
                  const c10::SymInt& contextual, bool keep_cls);
// Scores ([B, N] dense or [T] packed) are ranked in fp32: every score must be finite there, and a
// finite fp64 score beyond fp32's range is named as such (its fp32 value would read "inf").
// Data-dependent: it reads the values (on the host), so the CUDA kernels do not call it.
// scores_f32: the scores as contiguous fp32 on CPU, when the caller has them already.
void check_finite_scores(const char* op, const at::Tensor& scores, const at::Tensor& scores_f32);
void check_finite_scores(const char* op, const at::Tensor& scores);
// keep [B, D] int64 (its shape and dtype checked already): every entry in [0, num_tokens), distinct
// within a row; the first offence in row-major order is named. Data-dependent: it reads the values
// (copied to the host when elsewhere), so the CUDA kernels do not call it.
void check_keep_values(const char* op, const at::Tensor& keep, int64_t num_tokens);
void check_dominant_topk_args(const at::Tensor& scores, int64_t dominant, bool keep_cls);
void check_contextual_merge_args(const at::Tensor& hidden, const at::Tensor& metric, const at::Tensor& keep,
                                 int64_t contextual);
void check_contextual_merge_backward_args(const at::Tensor& grad_tokens, const at::Tensor& metric,
                                          const at::Tensor& keep, int64_t num_tokens);
void check_select_merge_args(const at::Tensor& hidden, const at::Tensor& scores, const at::Tensor& metric,
                             int64_t dominant, int64_t contextual, bool keep_cls);

// Packed (varlen) layout: cu_seqlens [n+1] int32/int64 on the data's device or on the CPU. The
// shape/dtype/device rule (no values read, so the fake kernels can apply it) ...
void check_cu_seqlens(const char* op, const at::Tensor& cu_seqlens, const char* data_name, const at::Tensor& data);
// ... and the value rule, data-dependent: cu[0] = 0, non-decreasing, cu[n] = total_tokens, every
// length divisible by unit. It reads the values, so only for a CPU cu_seqlens (never a fake one):
// a CUDA one would need a host sync.
void check_cu_seqlens_offsets(const char* op, const at::Tensor& cu_seqlens, int64_t total_tokens, int64_t unit);
// q, k [T, H, d] with cu_seqlens and unit in {1, 4}; T divisible by unit. Shapes only.
void check_varlen_scores_and_metric_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens,
                                         int64_t unit);

}  // namespace visionzip

// ---------------------------------------------------------------------------------------------
// Packed (varlen) images: tokens of n images concatenated along dim 0, image i being the rows
// cu_seqlens[i] .. cu_seqlens[i+1].
namespace visionzip {

// hidden [T, C], scores [T], metric [T, d], cu_seqlens [n+1], len(dominant) == len(contextual) == n,
// every budget >= 0. The rules that need cu_seqlens' values are read_cu_seqlens_and_check_budgets'.
void check_varlen_select_merge_args(const at::Tensor& hidden, const at::Tensor& scores, const at::Tensor& metric,
                                    const at::Tensor& cu_seqlens, c10::IntArrayRef dominant,
                                    c10::IntArrayRef contextual);
// grad_tokens [sum(D_i + K_i), C] and the forward's scores [T], metric [T, d], cu_seqlens, budgets.
void check_varlen_select_merge_backward_args(const at::Tensor& grad_tokens, const at::Tensor& scores,
                                             const at::Tensor& metric, const at::Tensor& cu_seqlens,
                                             c10::IntArrayRef dominant, c10::IntArrayRef contextual);
// The same rules on budgets that may be symbols (the fake kernels under torch.compile(dynamic=True)):
// signs and sums are compared symbolically, so tracing guards on them, never on a budget's value.
void check_varlen_select_merge_args(const at::Tensor& hidden, const at::Tensor& scores, const at::Tensor& metric,
                                    const at::Tensor& cu_seqlens, c10::SymIntArrayRef dominant,
                                    c10::SymIntArrayRef contextual);
void check_varlen_select_merge_backward_args(const at::Tensor& grad_tokens, const at::Tensor& scores,
                                             const at::Tensor& metric, const at::Tensor& cu_seqlens,
                                             c10::SymIntArrayRef dominant, c10::SymIntArrayRef contextual);
// Reads cu_seqlens (one small device-to-host copy when it is on a GPU) and returns it as host ints
// after check_cu_seqlens_offsets (unit 1) and, per image i of N_i = cu[i+1] - cu[i] tokens, the
// budget rules dominant[i] <= N_i and contextual[i] <= N_i - dominant[i].
std::vector<int64_t> read_cu_seqlens_and_check_budgets(const char* op, const at::Tensor& cu_seqlens, int64_t num_tokens,
                                                       c10::IntArrayRef dominant, c10::IntArrayRef contextual);

}  // namespace visionzip
