// Host-side pieces shared by the CUDA ops built on merge_kernels.cuh (select_merge_cuda.cu for the
// dense ops, varlen_merge_cuda.cu for the packed ones): size limits, the plan scratch as a tensor,
// and the plan launch for a metric tensor of any dtype.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>

#include "launch_geometry.cuh"
#include "merge_kernels.cuh"
#include "scratch.cuh"

namespace visionzip::cuda {

inline at::Tensor unit_last_stride(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

// Limits of the launch geometry and of the int32 plan entries, checked on shapes only. tokens_name
// says what N is in the message ("N", or an image's token count for the packed ops).
inline void check_cuda_sizes(const char* op, int64_t N, int64_t C, const char* tokens_name = "N") {
  TORCH_CHECK_VALUE(N < std::numeric_limits<int32_t>::max(), "visionzip.", op, ": ", tokens_name,
                    " must be < 2^31 on CUDA, got ", N);
  TORCH_CHECK_VALUE(channel_blocks(C, 1).count <= kMaxChannelBlocks, "visionzip.", op, ": C = ", C,
                    " is too large for the CUDA kernels");
}

// Plan scratch in one allocation (freed when the op returns; the stream orders its reuse).
struct Scratch {
  Scratch(const at::Tensor& like, const PlanLayout& plan_layout) : layout(plan_layout) {
    storage = at::empty({static_cast<int64_t>(layout.bytes)}, like.options().dtype(at::kByte));
  }
  PlanPointers pointers() const { return plan_pointers(storage.data_ptr(), layout); }
  PlanLayout layout;
  at::Tensor storage;
};

// The plan of metric (unit last stride or made so) into scratch; with scores, keep is written by the
// top-k first. Dense: metric [B, N, d]; packed: metric [T, d]; images.d is its d.
template <typename Images>
void run_plan(const at::Tensor& metric_in, const float* scores, int64_t* keep, const Scratch& scratch,
              const Images& images, bool keep_cls, bool build_lists, cudaStream_t stream) {
  const at::Tensor metric = unit_last_stride(metric_in);
  const int64_t sb = metric.dim() == 3 ? metric.stride(0) : 0, sn = metric.stride(metric.dim() - 2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, metric.scalar_type(), "visionzip_plan_cuda", [&] {
    launch_plan<scalar_t>(metric.data_ptr<scalar_t>(), sb, sn, scores, keep, scratch.pointers(), images, keep_cls,
                          build_lists, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace visionzip::cuda
