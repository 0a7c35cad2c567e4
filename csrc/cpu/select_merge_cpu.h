// Building blocks of the dense CPU kernels (select_merge_cpu.cpp), for the packed (varlen) kernels
// that run the dense algorithm per image. Unchecked: the caller has validated the arguments (and the
// scores' finiteness); keep_cls is False and D = 0 is allowed.
#pragma once

#include <ATen/core/Tensor.h>

namespace visionzip::cpu {

// scores [B, N] -> keep [B, D] int64 ascending: the D highest scores, ties to the lower index.
at::Tensor dominant_topk_unchecked(const char* op, const at::Tensor& scores, int64_t dominant);
// hidden [B, N, C], metric [B, N, d], keep [B, D] -> [B, D + K, C]: dominant rows in keep's order,
// then the contextual rows in target order (docs/SPEC.md "Merging").
at::Tensor contextual_merge_unchecked(const at::Tensor& hidden, const at::Tensor& metric, const at::Tensor& keep,
                                      int64_t contextual);
// grad_tokens [B, D + K, C] -> grad of hidden [B, N, C], N = num_tokens.
at::Tensor contextual_merge_backward_unchecked(const at::Tensor& grad_tokens, const at::Tensor& metric,
                                               const at::Tensor& keep, int64_t num_tokens);

}  // namespace visionzip::cpu
