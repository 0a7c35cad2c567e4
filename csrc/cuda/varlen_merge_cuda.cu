// CUDA kernels of varlen_select_merge and its backward (docs/SPEC.md "Packed (varlen) select_merge").
// One set of launches for all the images of a packed batch, whatever their sizes and budgets: the
// kernels of merge_kernels.cuh with a PackedImages table (each job finds its image by a binary search
// over the table's prefix sums). The plan also ranks each image's kept tokens, so the merge writes
// every row straight to its place in original token order, and keep comes from the plan too.
//
// Host values only: cu_seqlens is read once for the checks (one small device-to-host copy when it is
// on the GPU, none when it is on the CPU); the table, the output sizes and cu_seqlens_out come from
// it and the host budgets, and go up through pinned memory without a sync.
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
#include <cstring>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "images.cuh"
#include "merge_kernels.cuh"
#include "merge_launch.h"
#include "scratch.cuh"

namespace visionzip::cuda {
namespace {

// `count` bytes of host data as a tensor of `dtype` on `device`, copied from pinned memory without a
// host sync (the caching host allocator keeps the pinned block until the copy has run).
at::Tensor upload(const void* data, int64_t count, at::ScalarType dtype, const at::Device& device) {
  const bool to_gpu = device.is_cuda();
  at::Tensor host = at::empty({count}, at::TensorOptions().dtype(dtype).pinned_memory(to_gpu));
  std::memcpy(host.data_ptr(), data, static_cast<size_t>(count) * host.element_size());
  if (!to_gpu) return host;
  return at::empty({count}, at::TensorOptions().dtype(dtype).device(device)).copy_(host, /*non_blocking=*/true);
}

// The batch's table on the kernels' device ([n] PackedImage rows as bytes).
at::Tensor upload_table(const PackedBatch& batch, const at::Device& device) {
  const int64_t bytes = static_cast<int64_t>(batch.table.size() * sizeof(PackedImage));
  return upload(batch.table.data(), bytes, at::kByte, device);
}

// cu_seqlens_out: the cumulative D_i + K_i, in cu_seqlens' dtype and on its device.
at::Tensor output_offsets(const PackedBatch& batch, const at::Tensor& cu_seqlens) {
  const size_t n = batch.table.size();
  std::vector<int64_t> offsets(n + 1, batch.rows);
  for (size_t i = 0; i < n; ++i) offsets[i] = batch.table[i].out_base;
  const at::Tensor wide = upload(offsets.data(), static_cast<int64_t>(n + 1), at::kLong, cu_seqlens.device());
  return cu_seqlens.scalar_type() == at::kLong ? wide : wide.to(cu_seqlens.scalar_type());
}

// The host description of a call, after the rules that need cu_seqlens' values (read here, once)
// and every image's size limits.
PackedBatch checked_batch(const char* op, const at::Tensor& cu_seqlens, int64_t num_tokens, c10::IntArrayRef dominant,
                          c10::IntArrayRef contextual, int64_t d, int64_t C) {
  const std::vector<int64_t> cu = read_cu_seqlens_and_check_budgets(op, cu_seqlens, num_tokens, dominant, contextual);
  PackedBatch batch =
      describe_packed(cu.data(), static_cast<int64_t>(dominant.size()), dominant.data(), contextual.data(), d);
  for (const PackedImage& image : batch.table) check_cuda_sizes(op, image.N, C, "every image's token count");
  return batch;
}

// The plan of every image, enqueued: the table on the device, the scratch, and keep (the top-D_i of
// each image, in dense order). keep_out (forward) also gets the kept tokens' packed indices.
struct PackedPlan {
  PackedPlan(const PackedBatch& batch, const at::Tensor& like, const at::Tensor& scores, const at::Tensor& metric,
             int64_t* keep_out, bool build_lists, cudaStream_t stream)
      : table(upload_table(batch, like.device())),
        images(packed_images(batch, reinterpret_cast<const PackedImage*>(table.data_ptr()), keep_out)),
        scratch(like, packed_plan_layout(batch)), keep(at::empty({batch.dominant}, like.options().dtype(at::kLong))) {
    const at::Tensor scores_f32 = scores.to(at::kFloat).contiguous();
    run_plan(metric, scores_f32.data_ptr<float>(), keep.data_ptr<int64_t>(), scratch, images, /*keep_cls=*/false,
             build_lists, stream);
  }
  at::Tensor table;
  PackedImages images;
  Scratch scratch;
  at::Tensor keep;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_select_merge_cuda(
    const at::Tensor& hidden_in, const at::Tensor& scores, const at::Tensor& metric, const at::Tensor& cu_seqlens,
    c10::IntArrayRef dominant, c10::IntArrayRef contextual) {
  constexpr const char* op = "varlen_select_merge";
  check_varlen_select_merge_args(hidden_in, scores, metric, cu_seqlens, dominant, contextual);
  const c10::cuda::CUDAGuard guard(hidden_in.device());
  const at::Tensor hidden = unit_last_stride(hidden_in);
  const int64_t C = hidden.size(1);
  const PackedBatch batch = checked_batch(op, cu_seqlens, hidden.size(0), dominant, contextual, metric.size(1), C);
  at::Tensor tokens = at::empty({batch.rows, C}, hidden.options());
  at::Tensor keep_out = at::empty({batch.rows}, hidden.options().dtype(at::kLong));
  const at::Tensor cu_seqlens_out = output_offsets(batch, cu_seqlens);
  if (batch.rows == 0) return {tokens, keep_out, cu_seqlens_out};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const PackedPlan plan(batch, hidden, scores, metric, keep_out.data_ptr<int64_t>(), /*build_lists=*/true, stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "visionzip_varlen_merge_cuda", [&] {
    launch_merge_forward<scalar_t, at::opmath_type<scalar_t>>(hidden.data_ptr<scalar_t>(), 0, hidden.stride(0),
                                                              plan.keep.data_ptr<int64_t>(), plan.scratch.pointers(),
                                                              tokens.data_ptr<scalar_t>(), plan.images, C, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {tokens, keep_out, cu_seqlens_out};
}

at::Tensor varlen_select_merge_backward_cuda(const at::Tensor& grad_in, const at::Tensor& scores,
                                             const at::Tensor& metric, const at::Tensor& cu_seqlens,
                                             c10::IntArrayRef dominant, c10::IntArrayRef contextual) {
  constexpr const char* op = "varlen_select_merge_backward";
  check_varlen_select_merge_backward_args(grad_in, scores, metric, cu_seqlens, dominant, contextual);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = unit_last_stride(grad_in);
  const int64_t C = grad.size(1);
  const PackedBatch batch = checked_batch(op, cu_seqlens, scores.size(0), dominant, contextual, metric.size(1), C);
  at::Tensor grad_hidden = at::empty({batch.tokens, C}, grad.options());
  if (batch.tokens == 0) return grad_hidden;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const PackedPlan plan(batch, grad, scores, metric, /*keep_out=*/nullptr, /*build_lists=*/false, stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "visionzip_varlen_merge_backward_cuda",
                                  [&] {
                                    launch_merge_backward<scalar_t, at::opmath_type<scalar_t>>(
                                        grad.data_ptr<scalar_t>(), 0, grad.stride(0), plan.scratch.pointers(),
                                        grad_hidden.data_ptr<scalar_t>(), plan.images, C, stream);
                                  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_hidden;
}

}  // namespace

TORCH_LIBRARY_IMPL(visionzip, CUDA, m) {
  m.impl("varlen_select_merge", &varlen_select_merge_cuda);
  m.impl("varlen_select_merge_backward", &varlen_select_merge_backward_cuda);
}

}  // namespace visionzip::cuda
