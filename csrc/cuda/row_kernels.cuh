// The row kernels: the merge forward (dominant rows gathered, contextual rows averaged over their
// members) and its backward, reading the plan scratch; 16-byte packs along the channels where the
// alignment allows them (launch_geometry.cuh's pack_width).
#pragma once

#include <cstdint>

#include "common.cuh"
#include "images.cuh"
#include "scratch.cuh"

namespace visionzip::cuda {

// 2-3. Row kernels: blockDim = (channel lanes, rows); each lane owns VEC consecutive channels of
// one output row at a time and strides over the rows. Lanes of a warp share the row.

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

template <typename scalar_t, int VEC>
__device__ __forceinline__ Pack<scalar_t, VEC> load_pack(const scalar_t* p) {
  return *reinterpret_cast<const Pack<scalar_t, VEC>*>(p);
}

template <typename scalar_t, int VEC>
__device__ __forceinline__ Pack<scalar_t, VEC> zero_pack() {
  Pack<scalar_t, VEC> out;
#pragma unroll
  for (int j = 0; j < VEC; ++j) out.v[j] = static_cast<scalar_t>(0.f);
  return out;
}

// tokens [rows, C] contiguous (dense: [B, D+K, C]) from hidden (unit last stride; dense [B, N, C],
// packed [T, C]).
template <typename scalar_t, typename acc_t, int VEC, typename Images>
__global__ void __launch_bounds__(kMergeThreads)
    merge_forward_kernel(const scalar_t* __restrict__ hidden, int64_t hidden_sb, int64_t hidden_sn,
                         const int64_t* __restrict__ keep, PlanPointers plan, scalar_t* __restrict__ tokens,
                         Images images, int64_t C) {
  using pack_t = Pack<scalar_t, VEC>;
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (c >= C) return;  // no barriers in this kernel
  const int64_t contextual_rows = images.total_targets(), total = contextual_rows + images.total_dominant();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; g < total; g += stride) {
    // The contextual rows (long: a sum over members) come first, so that blocks start in roughly
    // decreasing order of work; then the dominant rows (one load each).
    const bool is_contextual = g < contextual_rows;
    // The row's entry in the per-target arrays (contextual) or in keep (dominant).
    const int64_t entry = is_contextual ? g : g - contextual_rows;
    const ImageSpan span = images.span(is_contextual ? images.image_of_target(entry) : images.image_of_dominant(entry));
    const int64_t D = span.D;
    const int64_t r = is_contextual ? D + (entry - span.target_base) : entry - span.keep_base;
    const scalar_t* h = hidden + span.batch * hidden_sb + span.first_row * hidden_sn + c;
    pack_t out;
    if (r < D) {
      const int64_t t = keep[entry];
      out = t >= 0 && t < span.N ? load_pack<scalar_t, VEC>(h + t * hidden_sn) : zero_pack<scalar_t, VEC>();
    } else {
      const int64_t i = entry;  // the target's entry
      const int32_t count = plan.counts[i];
      const int32_t* list = plan.members + span.token_base + plan.offsets[i];
      acc_t sums[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) sums[j] = acc_t(0);
      int32_t m = 0;
      for (; m + kMemberUnroll <= count; m += kMemberUnroll) {
        pack_t rows_in[kMemberUnroll];
#pragma unroll
        for (int u = 0; u < kMemberUnroll; ++u) rows_in[u] = load_pack<scalar_t, VEC>(h + list[m + u] * hidden_sn);
#pragma unroll
        for (int u = 0; u < kMemberUnroll; ++u) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) sums[j] += static_cast<acc_t>(rows_in[u].v[j]);
        }
      }
      for (; m < count; ++m) {
        const pack_t member = load_pack<scalar_t, VEC>(h + list[m] * hidden_sn);
#pragma unroll
        for (int j = 0; j < VEC; ++j) sums[j] += static_cast<acc_t>(member.v[j]);
      }
      const int32_t t = plan.targets[i];
      const pack_t target = t >= 0 ? load_pack<scalar_t, VEC>(h + t * hidden_sn) : zero_pack<scalar_t, VEC>();
      const acc_t divisor = member_divisor(count);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        out.v[j] = static_cast<scalar_t>(static_cast<acc_t>(target.v[j]) + sums[j] / divisor);
      }
    }
    *reinterpret_cast<pack_t*>(tokens + output_row<Images>(plan.place, span, r) * C + c) = out;
  }
}

// grad_hidden [tokens, C] contiguous (dense: [B, N, C]) from grad_tokens (unit last stride; dense
// [B, D+K, C] with strides (grad_sb, grad_sr), packed [rows, C] with row stride grad_sr).
template <typename scalar_t, typename acc_t, int VEC, typename Images>
__global__ void __launch_bounds__(kMergeThreads)
    merge_backward_kernel(const scalar_t* __restrict__ grad, int64_t grad_sb, int64_t grad_sr, PlanPointers plan,
                          scalar_t* __restrict__ grad_hidden, Images images, int64_t C) {
  using pack_t = Pack<scalar_t, VEC>;
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (c >= C) return;  // no barriers in this kernel
  const int64_t total = images.total_tokens();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; g < total; g += stride) {
    const int8_t role = plan.role[g];
    const int32_t r = plan.row[g];
    pack_t out;
    if (role == kDropped || r < 0) {
      out = zero_pack<scalar_t, VEC>();
    } else {
      const ImageSpan span = images.span(images.image_of_token(g));
      const int64_t out_row = output_row<Images>(plan.place, span, r);
      // Dense: out_row = b * (D + K) + r, read at b * grad_sb + r * grad_sr; packed: out_row * grad_sr.
      const int64_t offset = Images::kTokenOrder ? out_row * grad_sr : span.batch * grad_sb + r * grad_sr;
      out = load_pack<scalar_t, VEC>(grad + offset + c);
      if (role == kMember) {
        const acc_t divisor = member_divisor(plan.counts[span.target_base + (r - span.D)]);
#pragma unroll
        for (int j = 0; j < VEC; ++j) out.v[j] = static_cast<scalar_t>(static_cast<acc_t>(out.v[j]) / divisor);
      }
    }
    *reinterpret_cast<pack_t*>(grad_hidden + g * C + c) = out;
  }
}

}  // namespace visionzip::cuda
