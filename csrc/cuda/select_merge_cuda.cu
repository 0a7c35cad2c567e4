// CUDA kernels of contextual_merge (forward, backward) and select_merge, registered under the CUDA
// dispatch key of the visionzip library. The kernels and their launchers are merge_kernels.cuh and
// the headers it includes (raw pointers, no ATen; also run on the host under tests/cuda_emulation);
// this file checks the arguments with the shared csrc/checks.h rules, allocates outputs and plan
// scratch through the caching allocator, and launches on the current stream. No device value is
// read on the host, so select_merge can be captured in a CUDA graph.
//
// GPU input policy (data-dependent rules need a sync to check): a keep index outside [0, N) gives a
// zero dominant row and marks no token; a repeated one marks its token once; non-finite scores
// rank by the order-preserving key of their bits (NaN above +inf). The CPU kernels reject all three.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "../checks.h"
#include "images.cuh"
#include "merge_kernels.cuh"
#include "merge_launch.h"
#include "scratch.cuh"

namespace visionzip::cuda {
namespace {

// tokens [B, D+K, C]. With scores defined, keep is written by the top-k first (select_merge).
at::Tensor merge(const char* op, const at::Tensor& hidden_in, const at::Tensor& metric, const at::Tensor& scores,
                 at::Tensor& keep, int64_t K, bool keep_cls) {
  const at::Tensor hidden = unit_last_stride(hidden_in);
  const int64_t B = hidden.size(0), N = hidden.size(1), C = hidden.size(2), D = keep.size(1);
  check_cuda_sizes(op, N, C);
  at::Tensor tokens = at::empty({B, D + K, C}, hidden.options());
  if (B == 0) return tokens;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const DenseImages images{B, N, D, K, metric.size(2)};
  const Scratch scratch(hidden, dense_plan_layout(B, N, K, metric.size(2)));
  if (scores.defined()) {
    const at::Tensor scores_f32 = scores.to(at::kFloat).contiguous();
    run_plan(metric, scores_f32.data_ptr<float>(), keep.data_ptr<int64_t>(), scratch, images, keep_cls, true, stream);
  } else if (K > 0) {
    run_plan(metric, nullptr, keep.data_ptr<int64_t>(), scratch, images, false, true, stream);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "visionzip_merge_cuda", [&] {
    launch_merge_forward<scalar_t, at::opmath_type<scalar_t>>(
        hidden.data_ptr<scalar_t>(), hidden.stride(0), hidden.stride(1), keep.data_ptr<int64_t>(), scratch.pointers(),
        tokens.data_ptr<scalar_t>(), images, C, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return tokens;
}

at::Tensor contextual_merge_cuda(const at::Tensor& hidden, const at::Tensor& metric, const at::Tensor& keep_in,
                                 int64_t contextual) {
  check_contextual_merge_args(hidden, metric, keep_in, contextual);
  const c10::cuda::CUDAGuard guard(hidden.device());
  at::Tensor keep = keep_in.contiguous();
  return merge("contextual_merge", hidden, metric, at::Tensor(), keep, contextual, false);
}

std::tuple<at::Tensor, at::Tensor> select_merge_cuda(const at::Tensor& hidden, const at::Tensor& scores,
                                                     const at::Tensor& metric, int64_t dominant, int64_t contextual,
                                                     bool keep_cls) {
  check_select_merge_args(hidden, scores, metric, dominant, contextual, keep_cls);
  const c10::cuda::CUDAGuard guard(hidden.device());
  at::Tensor keep = at::empty({hidden.size(0), dominant}, hidden.options().dtype(at::kLong));
  at::Tensor tokens = merge("select_merge", hidden, metric, scores, keep, contextual, keep_cls);
  return {tokens, keep};
}

at::Tensor contextual_merge_backward_cuda(const at::Tensor& grad_in, const at::Tensor& metric,
                                          const at::Tensor& keep_in, int64_t num_tokens) {
  check_contextual_merge_backward_args(grad_in, metric, keep_in, num_tokens);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = unit_last_stride(grad_in);
  at::Tensor keep = keep_in.contiguous();
  const int64_t B = grad.size(0), C = grad.size(2), D = keep.size(1), K = grad.size(1) - D, N = num_tokens;
  check_cuda_sizes("contextual_merge_backward", N, C);
  at::Tensor grad_hidden = at::empty({B, N, C}, grad.options());
  if (B == 0) return grad_hidden;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const DenseImages images{B, N, D, K, metric.size(2)};
  const Scratch scratch(grad, dense_plan_layout(B, N, K, metric.size(2)));
  run_plan(metric, nullptr, keep.data_ptr<int64_t>(), scratch, images, false, false, stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "visionzip_merge_backward_cuda", [&] {
    launch_merge_backward<scalar_t, at::opmath_type<scalar_t>>(grad.data_ptr<scalar_t>(), grad.stride(0),
                                                               grad.stride(1), scratch.pointers(),
                                                               grad_hidden.data_ptr<scalar_t>(), images, C, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_hidden;
}

}  // namespace

TORCH_LIBRARY_IMPL(visionzip, CUDA, m) {
  m.impl("contextual_merge", &contextual_merge_cuda);
  m.impl("contextual_merge_backward", &contextual_merge_backward_cuda);
  m.impl("select_merge", &select_merge_cuda);
}

}  // namespace visionzip::cuda
