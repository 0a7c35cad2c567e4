// CPU kernels of varlen_select_merge and its backward (docs/SPEC.md "Packed (varlen) select_merge").
// Each image of the packed batch runs the dense CPU algorithm with keep_cls=False on [1, N_i, ...]
// views (select_merge_cpu.h); its output rows, dominant rows then contextual rows in target order,
// are then placed in original token order. Images run in parallel when there are several (the dense
// kernels then run serially inside each), otherwise the dense kernels parallelise within the image.
// Row copies are plain byte copies, so no dtype dispatch is needed here.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstring>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../merge_math.h"
#include "select_merge_cpu.h"

namespace visionzip::cpu {
namespace {

// The kept positions of one image in ascending order, and for each the row of the dense output that
// holds its token: dominant i -> row i, target i -> row D + i. The targets are the non-dominant tokens
// at positions 0, step, ..., (K-1)*step of the ascending rest (merge_math.h, as the dense plan).
void kept_positions(const int64_t* keep, int64_t D, int64_t N, int64_t K, int64_t* positions, int64_t* dense_rows) {
  const int64_t step = target_step(N - D, K);
  int64_t next_dominant = 0, rest_pos = 0, j = 0;
  for (int64_t n = 0; n < N && j < D + K; ++n) {
    if (next_dominant < D && keep[next_dominant] == n) {
      positions[j] = n;
      dense_rows[j++] = next_dominant++;
      continue;
    }
    const int64_t target = target_index(rest_pos++, step, K);
    if (target >= 0) {
      positions[j] = n;
      dense_rows[j++] = D + target;
    }
  }
}

// Calls run_image(i) for every image: in parallel across images when there are several, so that the
// dense kernels inside run serially; with one image the dense kernels parallelise themselves.
template <typename F>
void for_each_image(int64_t num_images, const F& run_image) {
  if (num_images == 1) {
    run_image(0);
    return;
  }
  at::parallel_for(0, num_images, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) run_image(i);
  });
}

std::vector<int64_t> output_offsets(c10::IntArrayRef dominant, c10::IntArrayRef contextual) {
  std::vector<int64_t> offsets(dominant.size() + 1, 0);
  for (size_t i = 0; i < dominant.size(); ++i) offsets[i + 1] = offsets[i] + dominant[i] + contextual[i];
  return offsets;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_select_merge_cpu(
    const at::Tensor& hidden, const at::Tensor& scores, const at::Tensor& metric, const at::Tensor& cu_seqlens,
    c10::IntArrayRef dominant, c10::IntArrayRef contextual) {
  constexpr const char* op = "varlen_select_merge";
  check_varlen_select_merge_args(hidden, scores, metric, cu_seqlens, dominant, contextual);
  const std::vector<int64_t> cu =
      read_cu_seqlens_and_check_budgets(op, cu_seqlens, hidden.size(0), dominant, contextual);
  check_finite_scores(op, scores);
  const std::vector<int64_t> offsets = output_offsets(dominant, contextual);
  const int64_t C = hidden.size(1), total = offsets.back();
  at::Tensor tokens = at::empty({total, C}, hidden.options());
  at::Tensor keep = at::empty({total}, hidden.options().dtype(at::kLong));
  at::Tensor cu_out =
      at::tensor(c10::ArrayRef<int64_t>(offsets), cu_seqlens.options().dtype(at::kLong)).to(cu_seqlens.scalar_type());
  const size_t row_bytes = static_cast<size_t>(C) * hidden.element_size();
  char* tokens_ptr = static_cast<char*>(tokens.data_ptr());
  int64_t* keep_ptr = keep.data_ptr<int64_t>();

  for_each_image(static_cast<int64_t>(dominant.size()), [&](int64_t i) {
    const int64_t start = cu[i], N = cu[i + 1] - cu[i], D = dominant[i], K = contextual[i];
    if (D + K == 0) return;
    const at::Tensor local_keep = dominant_topk_unchecked(op, scores.narrow(0, start, N).unsqueeze(0), D);
    const at::Tensor dense =
        contextual_merge_unchecked(hidden.narrow(0, start, N).unsqueeze(0), metric.narrow(0, start, N).unsqueeze(0),
                                   local_keep, K);  // [1, D+K, C] contiguous
    std::vector<int64_t> positions(D + K), dense_rows(D + K);
    kept_positions(local_keep.const_data_ptr<int64_t>(), D, N, K, positions.data(), dense_rows.data());
    const char* dense_ptr = static_cast<const char*>(dense.const_data_ptr());
    for (int64_t j = 0; j < D + K; ++j) {
      std::memcpy(tokens_ptr + (offsets[i] + j) * row_bytes, dense_ptr + dense_rows[j] * row_bytes, row_bytes);
      keep_ptr[offsets[i] + j] = start + positions[j];
    }
  });
  return {tokens, keep, cu_out};
}

// The vector-Jacobian product: each image's gradient rows are put back in dense order and go through
// the dense backward (docs/SPEC.md "Gradients"); tokens of images with no budget get zeros.
at::Tensor varlen_select_merge_backward_cpu(const at::Tensor& grad_tokens, const at::Tensor& scores,
                                            const at::Tensor& metric, const at::Tensor& cu_seqlens,
                                            c10::IntArrayRef dominant, c10::IntArrayRef contextual) {
  constexpr const char* op = "varlen_select_merge_backward";
  check_varlen_select_merge_backward_args(grad_tokens, scores, metric, cu_seqlens, dominant, contextual);
  const std::vector<int64_t> cu =
      read_cu_seqlens_and_check_budgets(op, cu_seqlens, scores.size(0), dominant, contextual);
  check_finite_scores(op, scores);
  const std::vector<int64_t> offsets = output_offsets(dominant, contextual);
  const at::Tensor grad = grad_tokens.contiguous();
  const int64_t C = grad.size(1);
  at::Tensor grad_hidden = at::empty({scores.size(0), C}, grad.options());
  const size_t row_bytes = static_cast<size_t>(C) * grad.element_size();
  const char* grad_ptr = static_cast<const char*>(grad.const_data_ptr());
  char* out_ptr = static_cast<char*>(grad_hidden.data_ptr());

  for_each_image(static_cast<int64_t>(dominant.size()), [&](int64_t i) {
    const int64_t start = cu[i], N = cu[i + 1] - cu[i], D = dominant[i], K = contextual[i];
    if (N == 0) return;
    if (D + K == 0) {
      grad_hidden.narrow(0, start, N).zero_();
      return;
    }
    const at::Tensor local_keep = dominant_topk_unchecked(op, scores.narrow(0, start, N).unsqueeze(0), D);
    std::vector<int64_t> positions(D + K), dense_rows(D + K);
    kept_positions(local_keep.const_data_ptr<int64_t>(), D, N, K, positions.data(), dense_rows.data());
    at::Tensor dense_grad = at::empty({1, D + K, C}, grad.options());
    char* dense_ptr = static_cast<char*>(dense_grad.data_ptr());
    for (int64_t j = 0; j < D + K; ++j) {
      std::memcpy(dense_ptr + dense_rows[j] * row_bytes, grad_ptr + (offsets[i] + j) * row_bytes, row_bytes);
    }
    const at::Tensor image_grad = contextual_merge_backward_unchecked(
        dense_grad, metric.narrow(0, start, N).unsqueeze(0), local_keep, N);  // [1, N, C]
    std::memcpy(out_ptr + start * row_bytes, image_grad.const_data_ptr(), N * row_bytes);
  });
  return grad_hidden;
}

}  // namespace

TORCH_LIBRARY_IMPL(visionzip, CPU, m) {
  m.impl("varlen_select_merge", &varlen_select_merge_cpu);
  m.impl("varlen_select_merge_backward", &varlen_select_merge_backward_cpu);
}

}  // namespace visionzip::cpu
