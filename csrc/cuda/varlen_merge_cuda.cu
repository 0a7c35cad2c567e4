// CUDA kernels of varlen_select_merge and its backward (docs/SPEC.md "Packed (varlen) select_merge").
// Per image, the dense CUDA launches of merge_kernels.cuh (the plan with the top-k, then the merge or
// the backward) on [1, N_i, ...] views, as select_merge does with keep_cls=False; then the image's
// rows are placed in original token order with ATen index ops on the same stream. Host values only:
// cu_seqlens is read once for the checks (one small device-to-host copy when it is on the GPU, none
// when it is on the CPU); the output sizes come from the host budgets, and cu_seqlens_out goes up
// through pinned memory without a sync. One set of launches per image: fine for a few images, not
// tuned for hundreds of frames.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../merge_math.h"
#include "merge_launch.h"

namespace visionzip::cuda {
namespace {

// The image's top-D (keep [1, D], ascending) and its plan, from its fp32 scores.
at::Tensor plan_image(const at::Tensor& metric_image, const float* scores, const Scratch& plan, int64_t D,
                      int64_t K, bool build_lists, cudaStream_t stream) {
  at::Tensor keep = at::empty({1, D}, metric_image.options().dtype(at::kLong));
  run_plan(metric_image, scores, keep.data_ptr<int64_t>(), plan, D, K, /*keep_cls=*/false, build_lists, stream);
  return keep;
}

// (the kept positions of one image, ascending; the dense output row of each). Dense rows are the
// dominant tokens in keep's order, then the targets: the not-kept tokens at positions 0, step, ...,
// (K-1)*step of the ascending rest (merge_math.h, as the plan picks them). Sizes are host values.
std::tuple<at::Tensor, at::Tensor> kept_positions(const at::Tensor& keep, int64_t N, int64_t K) {
  const int64_t D = keep.size(1);
  at::Tensor positions = keep[0];
  if (K > 0) {
    const at::Tensor is_kept = at::zeros({N}, keep.options().dtype(at::kByte)).index_fill_(0, keep[0], 1);
    const at::Tensor rest = at::argsort(is_kept, /*stable=*/true).narrow(0, 0, N - D);
    const at::Tensor targets = rest.index_select(0, at::arange(K, keep.options()) * target_step(N - D, K));
    positions = at::cat({keep[0], targets});
  }
  return at::sort(positions);
}

std::vector<int64_t> output_offsets(c10::IntArrayRef dominant, c10::IntArrayRef contextual) {
  std::vector<int64_t> offsets(dominant.size() + 1, 0);
  for (size_t i = 0; i < dominant.size(); ++i) offsets[i + 1] = offsets[i] + dominant[i] + contextual[i];
  return offsets;
}

// The offsets in cu_seqlens' dtype on its device, copied from pinned memory without a host sync.
at::Tensor offsets_tensor(const std::vector<int64_t>& offsets, const at::Tensor& cu_seqlens) {
  const int64_t n = static_cast<int64_t>(offsets.size());
  const bool to_gpu = cu_seqlens.is_cuda();
  at::Tensor host = at::empty({n}, at::TensorOptions().dtype(cu_seqlens.scalar_type()).pinned_memory(to_gpu));
  AT_DISPATCH_INDEX_TYPES(cu_seqlens.scalar_type(), "visionzip_varlen_offsets", [&] {
    index_t* p = host.data_ptr<index_t>();
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<index_t>(offsets[i]);
  });
  if (!to_gpu) return host;
  return at::empty({n}, cu_seqlens.options()).copy_(host, /*non_blocking=*/true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_select_merge_cuda(
    const at::Tensor& hidden_in, const at::Tensor& scores, const at::Tensor& metric,
    const at::Tensor& cu_seqlens, c10::IntArrayRef dominant, c10::IntArrayRef contextual) {
  constexpr const char* op = "varlen_select_merge";
  check_varlen_select_merge_args(hidden_in, scores, metric, cu_seqlens, dominant, contextual);
  const std::vector<int64_t> cu = check_cu_seqlens_values(op, cu_seqlens, hidden_in.size(0), dominant, contextual);
  const c10::cuda::CUDAGuard guard(hidden_in.device());
  const at::Tensor hidden = unit_last_stride(hidden_in);
  const std::vector<int64_t> offsets = output_offsets(dominant, contextual);
  const int64_t C = hidden.size(1), d = metric.size(1), total = offsets.back();
  at::Tensor tokens = at::empty({total, C}, hidden.options());
  at::Tensor keep_out = at::empty({total}, hidden.options().dtype(at::kLong));
  const at::Tensor scores_f32 = scores.to(at::kFloat).contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (size_t i = 0; i < dominant.size(); ++i) {
    const int64_t start = cu[i], N = cu[i + 1] - cu[i], D = dominant[i], K = contextual[i];
    if (D + K == 0) continue;
    check_cuda_sizes(op, N, C, "every image's token count");
    const Scratch plan(hidden, 1, N, K, d);
    const at::Tensor keep = plan_image(metric.narrow(0, start, N).unsqueeze(0),
                                       scores_f32.data_ptr<float>() + start, plan, D, K, true, stream);
    at::Tensor dense = at::empty({D + K, C}, hidden.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "visionzip_varlen_merge_cuda", [&] {
      launch_merge_forward<scalar_t, at::opmath_type<scalar_t>>(
          hidden.data_ptr<scalar_t>() + start * hidden.stride(0), N * hidden.stride(0), hidden.stride(0),
          keep.data_ptr<int64_t>(), plan.pointers(), dense.data_ptr<scalar_t>(), 1, N, C, D, K, stream);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const auto [positions, dense_rows] = kept_positions(keep, N, K);
    tokens.narrow(0, offsets[i], D + K).copy_(dense.index_select(0, dense_rows));
    keep_out.narrow(0, offsets[i], D + K).copy_(positions + start);
  }
  return {tokens, keep_out, offsets_tensor(offsets, cu_seqlens)};
}

at::Tensor varlen_select_merge_backward_cuda(const at::Tensor& grad_tokens, const at::Tensor& scores,
                                             const at::Tensor& metric, const at::Tensor& cu_seqlens,
                                             c10::IntArrayRef dominant, c10::IntArrayRef contextual) {
  constexpr const char* op = "varlen_select_merge_backward";
  check_varlen_select_merge_backward_args(grad_tokens, scores, metric, cu_seqlens, dominant, contextual);
  const std::vector<int64_t> cu = check_cu_seqlens_values(op, cu_seqlens, scores.size(0), dominant, contextual);
  const c10::cuda::CUDAGuard guard(grad_tokens.device());
  const std::vector<int64_t> offsets = output_offsets(dominant, contextual);
  const int64_t C = grad_tokens.size(1), d = metric.size(1);
  at::Tensor grad_hidden = at::empty({scores.size(0), C}, grad_tokens.options());
  const at::Tensor scores_f32 = scores.to(at::kFloat).contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (size_t i = 0; i < dominant.size(); ++i) {
    const int64_t start = cu[i], N = cu[i + 1] - cu[i], D = dominant[i], K = contextual[i];
    if (N == 0) continue;
    if (D + K == 0) {
      grad_hidden.narrow(0, start, N).zero_();
      continue;
    }
    check_cuda_sizes(op, N, C, "every image's token count");
    const Scratch plan(grad_tokens, 1, N, K, d);
    const at::Tensor keep = plan_image(metric.narrow(0, start, N).unsqueeze(0),
                                       scores_f32.data_ptr<float>() + start, plan, D, K, false, stream);
    const auto [positions, dense_rows] = kept_positions(keep, N, K);
    // The image's gradient rows back in dense order (dominant rows, then contextual rows).
    at::Tensor dense_grad = at::empty({D + K, C}, grad_tokens.options());
    dense_grad.index_copy_(0, dense_rows, grad_tokens.narrow(0, offsets[i], D + K));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dense_grad.scalar_type(),
                                    "visionzip_varlen_merge_backward_cuda", [&] {
      launch_merge_backward<scalar_t, at::opmath_type<scalar_t>>(
          dense_grad.data_ptr<scalar_t>(), (D + K) * C, C, plan.pointers(),
          grad_hidden.data_ptr<scalar_t>() + start * C, 1, N, C, D, K, stream);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return grad_hidden;
}

}  // namespace

TORCH_LIBRARY_IMPL(visionzip, CUDA, m) {
  m.impl("varlen_select_merge", &varlen_select_merge_cuda);
  m.impl("varlen_select_merge_backward", &varlen_select_merge_backward_cuda);
}

}  // namespace visionzip::cuda
