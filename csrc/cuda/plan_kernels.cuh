// The plan kernels (1a select, 1b assign, 1c lists; see merge_kernels.cuh): keep, the token
// roles and output rows, the targets and their unit metric, each member's target, the member
// counts and lists, written to the plan scratch.
#pragma once

#include <cstdint>

#include "block_primitives.cuh"
#include "common.cuh"
#include "images.cuh"
#include "scratch.cuh"

namespace visionzip::cuda {

// 1. The plan.
//
// metric [B, N, d] (unit last stride, any row strides) in its own dtype, read as fp32. scores is
// [B, N] fp32 contiguous for select_merge (keep is then written), or null (keep is read).

// 1a for image b (every thread of the block calls it). The image's span is taken after the top-k
// again rather than held across it: the select's registers are the kernel's peak (holding the span
// made ptxas spill on sm_90, where this way it does not).
template <typename metric_t, typename Images>
__device__ void plan_image(const metric_t* metric, int64_t metric_sb, int64_t metric_sn, const float* scores_all,
                           int64_t* keep_all, PlanPointers plan, const Images& images, int64_t b, bool keep_cls,
                           SelectShared& select_shared) {
  const int64_t d = images.d;
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % kWarp, warp = tid / kWarp;
  if (scores_all != nullptr) {
    const ImageSpan first = images.span(b);
    select_dominant(scores_all + first.token_base, first.N, first.D, keep_cls, keep_all + first.keep_base,
                    select_shared);
    __syncthreads();
  }
  const ImageSpan span = images.span(b);
  const int64_t N = span.N, D = span.D, K = span.K;
  const int64_t* keep = keep_all + span.keep_base;
  const metric_t* m_img = metric + span.batch * metric_sb + span.first_row * metric_sn;
  int8_t* role = plan.role + span.token_base;
  int32_t* row = plan.row + span.token_base;
  int32_t* targets = plan.targets + span.target_base;
  int32_t* counts = plan.counts + span.target_base;
  for (int64_t n = tid; n < N; n += kPlanThreads) {
    role[n] = K > 0 ? kMember : kDropped;
    row[n] = -1;
  }
  for (int64_t i = tid; i < K; i += kPlanThreads) {
    targets[i] = -1;
    counts[i] = 0;
  }
  __syncthreads();
  for (int64_t i = tid; i < D; i += kPlanThreads) {
    const int64_t t = keep[i];
    if (t >= 0 && t < N) {
      role[t] = kDominant;
      atomicMax(row + t, static_cast<int32_t>(i));  // a repeated index keeps its last row
    }
  }
  __syncthreads();
  if (K == 0) return;

  // Position of every not-kept token among the not-kept ones: a scan over contiguous chunks.
  {
    const int64_t chunk = (N + kPlanThreads - 1) / kPlanThreads;
    const int64_t begin = tid * chunk;
    const int64_t end = begin + chunk < N ? begin + chunk : N;
    int rest = 0;
    for (int64_t n = begin; n < end; ++n) rest += role[n] != kDominant;
    int num_rest = 0;
    int64_t pos = block_exclusive_scan(rest, select_shared.warp_totals, &num_rest);
    const int64_t step = target_step(num_rest, K);
    for (int64_t n = begin; n < end; ++n) {
      if (role[n] == kDominant) continue;
      const int64_t i = target_index(pos, step, K);
      if (i >= 0) {
        role[n] = kTarget;
        row[n] = static_cast<int32_t>(D + i);
        targets[i] = static_cast<int32_t>(n);
      }
      ++pos;
    }
  }
  __syncthreads();

  // Unit metric of each target, m * s / max(||m * s||, eps) with s = metric_scale(max |m|), stored
  // transposed: unit[c * K_pad + i], zero in the padding. One warp per target: the lanes' max |m|
  // (warp_max), then lanes load kUnitStage channels at a time (coalesced) into shared memory, and every
  // lane sums their squares in channel order, as the CPU kernel's loop does.
  const int64_t k_pad = padded_targets(K);
  float* unit = plan.unit + span.unit_base;
  for (int64_t i = warp; i < k_pad; i += kPlanWarps) {
    const int64_t t = i < K ? targets[i] : -1;  // warp-uniform
    if (t < 0) {
      for (int64_t c = lane; c < d; c += kWarp) unit[c * k_pad + i] = 0.f;
      continue;
    }
    const metric_t* m = m_img + t * metric_sn;
    float max_abs = 0.f;
    for (int64_t c = lane; c < d; c += kWarp) max_abs = fmaxf(max_abs, fabsf(static_cast<float>(m[c])));
    const float scale = metric_scale(warp_max(max_abs));
    float* staged = select_shared.staged[warp];
    float sum_sq = 0.f;
    for (int64_t c0 = 0; c0 < d; c0 += kUnitStage) {
      __syncwarp();  // the previous chunk has been read
#pragma unroll
      for (int j = 0; j < kUnitStage / kWarp; ++j) {  // independent loads in flight
        const int64_t c = c0 + j * kWarp + lane;
        staged[j * kWarp + lane] = c < d ? static_cast<float>(m[c]) * scale : 0.f;
      }
      __syncwarp();
      const int width = d - c0 < kUnitStage ? static_cast<int>(d - c0) : kUnitStage;
      for (int l = 0; l < width; ++l) sum_sq = add_product(sum_sq, staged[l], staged[l]);  // broadcast reads
    }
    const float norm = clamped_norm(sum_sq);
    for (int64_t c = lane; c < d; c += kWarp) unit[c * k_pad + i] = static_cast<float>(m[c]) * scale / norm;
  }
}

// 1a, token order (packed): each kept token's rank among the image's kept tokens (a scan over
// contiguous chunks), so place[dense row] = rank, and keep_out[rank] = the token's packed index.
// Called after a barrier that follows plan_image (roles and rows are final).
__device__ __forceinline__ void place_in_token_order(PlanPointers plan, const ImageSpan& span, int64_t* keep_out,
                                                     SelectShared& select_shared) {
  const int tid = static_cast<int>(threadIdx.x);
  const int8_t* role = plan.role + span.token_base;
  const int32_t* row = plan.row + span.token_base;
  int32_t* place = plan.place + span.out_base;
  const int64_t chunk = (span.N + kPlanThreads - 1) / kPlanThreads;
  const int64_t begin = tid * chunk;
  const int64_t end = begin + chunk < span.N ? begin + chunk : span.N;
  int kept = 0;
  for (int64_t n = begin; n < end; ++n) kept += role[n] == kDominant || role[n] == kTarget;
  int total = 0;
  int64_t rank = block_exclusive_scan(kept, select_shared.warp_totals, &total);
  for (int64_t n = begin; n < end; ++n) {
    if (role[n] != kDominant && role[n] != kTarget) continue;
    place[row[n]] = static_cast<int32_t>(rank);
    if (keep_out != nullptr) keep_out[span.out_base + rank] = span.token_base + n;
    ++rank;
  }
}

// 1a. One block of kPlanThreads per image: keep, roles, targets, unit targets; counts zeroed; in
// token order also the placement of the kept rows.
template <typename metric_t, typename Images>
__global__ void __launch_bounds__(kPlanThreads)
    plan_select_kernel(const metric_t* __restrict__ metric, int64_t metric_sb, int64_t metric_sn,
                       const float* __restrict__ scores, int64_t* keep, PlanPointers plan, Images images,
                       bool keep_cls) {
  __shared__ SelectShared select_shared;
  for (int64_t b = blockIdx.x; b < images.count(); b += gridDim.x) {  // block-uniform
    __syncthreads();                                                  // the previous image's shared state has been read
    plan_image(metric, metric_sb, metric_sn, scores, keep, plan, images, b, keep_cls, select_shared);
    if constexpr (Images::kTokenOrder) {
      __syncthreads();
      place_in_token_order(plan, images.span(b), images.keep_out, select_shared);
    }
  }
}

// Stages channels [c0, c0 + 32) of the 32 tokens from g0 into the warp's tile, transposed
// (tile[channel][token]; coalesced loads along the channels), zeros past N and d.
template <typename metric_t>
__device__ __forceinline__ void stage_metric_chunk(float (*tile)[kWarp + 1], const metric_t* m_img, int64_t metric_sn,
                                                   int64_t g0, int64_t c0, int64_t N, int64_t d, int lane) {
  __syncwarp();  // the previous chunk has been read
  const int64_t c = c0 + lane;
  for (int r = 0; r < kWarp; ++r) {
    const int64_t t = g0 + r;
    tile[lane][r] = t < N && c < d ? static_cast<float>(m_img[t * metric_sn + c]) : 0.f;
  }
  __syncwarp();
}

// Four consecutive unit targets, one 16-byte shared (or global) load.
struct alignas(16) Float4 {
  float x, y, z, w;
};

// 1b. Each member to its most cosine-similar target, the first maximum winning. Blocks stride over
// (image, chunk of kAssignThreads tokens); a warp takes 32 consecutive tokens. Their metric is
// staged through shared memory 32 channels at a time (coalesced loads), and each lane sums
// m[c] * unit[c, i] over c in ascending order, as the CPU kernel does. The member's own norm scales
// all K similarities alike, so it is skipped; a first pass over the chunks finds each token's max
// |m| for metric_scale (tiny metrics must not underflow) and whether it is finite (a non-finite
// member goes to target 0), as the CPU does. unit_in_shared: the image's unit targets are copied to
// dynamic shared memory first (plan_launch decides from K_pad * d).
template <typename metric_t, typename Images>
__global__ void __launch_bounds__(kAssignThreads)
    plan_assign_kernel(const metric_t* __restrict__ metric, int64_t metric_sb, int64_t metric_sn, PlanPointers plan,
                       Images images, bool unit_in_shared) {
  const int64_t d = images.d;
  __shared__ float tiles[kAssignWarps][kWarp][kWarp + 1];  // per warp: [channel][token], padded
  VZ_DYNAMIC_SHARED(float, shared_unit);
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % kWarp, warp = tid / kWarp;
  float (*tile)[kWarp + 1] = tiles[warp];
  for (int64_t job = blockIdx.x; job < images.total_chunks(); job += gridDim.x) {  // block-uniform
    const int64_t b = images.image_of_chunk(job);
    const ImageSpan span = images.span(b);
    const int64_t N = span.N, D = span.D, K = span.K, k_pad = padded_targets(K);
    if (K == 0) continue;  // block-uniform: no members
    const float* unit = plan.unit + span.unit_base;
    if (unit_in_shared) {
      __syncthreads();                                             // the previous job's unit targets have been read
      const Float4* from = reinterpret_cast<const Float4*>(unit);  // K_pad is a multiple of 4
      Float4* to = reinterpret_cast<Float4*>(shared_unit);
      for (int64_t j = tid; j < d * k_pad / 4; j += kAssignThreads) to[j] = from[j];
      __syncthreads();
      unit = shared_unit;
    }
    const metric_t* m_img = metric + span.batch * metric_sb + span.first_row * metric_sn;
    const int8_t* role = plan.role + span.token_base;
    int32_t* row = plan.row + span.token_base;
    int32_t* counts = plan.counts + span.target_base;
    const int64_t g0 = (job - images.chunk_base(b)) * kAssignThreads + static_cast<int64_t>(warp) * kWarp;
    const int64_t n = g0 + lane;
    const bool is_member = n < N && role[n] == kMember;
    if (!__any_sync(kFullMask, is_member)) continue;  // warp-uniform; no block barrier follows
    float max_abs = 0.f;
    bool finite = true;
    for (int64_t c0 = 0; c0 < d; c0 += kWarp) {
      stage_metric_chunk(tile, m_img, metric_sn, g0, c0, N, d, lane);
      const int64_t width = d - c0 < kWarp ? d - c0 : kWarp;
      for (int64_t cc = 0; cc < width; ++cc) {
        const float v = tile[cc][lane];
        finite = finite && finite_value(v);
        max_abs = fmaxf(max_abs, fabsf(v));
      }
    }
    const float scale = metric_scale(max_abs);
    int64_t best = 0;
    float best_sim = 0.f;
    for (int64_t i0 = 0; i0 < K; i0 += kTargetTile) {
      float acc[kTargetTile];
#pragma unroll
      for (int j = 0; j < kTargetTile; ++j) acc[j] = 0.f;
      for (int64_t c0 = 0; c0 < d; c0 += kWarp) {
        stage_metric_chunk(tile, m_img, metric_sn, g0, c0, N, d, lane);
        const int64_t width = d - c0 < kWarp ? d - c0 : kWarp;
        for (int64_t cc = 0; cc < width; ++cc) {
          const float mc = tile[cc][lane] * scale;
          const Float4* u = reinterpret_cast<const Float4*>(unit + (c0 + cc) * k_pad + i0);
#pragma unroll
          for (int q = 0; q < kTargetTile / 4; ++q) {
            const Float4 u4 = u[q];
            acc[4 * q + 0] = add_product(acc[4 * q + 0], mc, u4.x);
            acc[4 * q + 1] = add_product(acc[4 * q + 1], mc, u4.y);
            acc[4 * q + 2] = add_product(acc[4 * q + 2], mc, u4.z);
            acc[4 * q + 3] = add_product(acc[4 * q + 3], mc, u4.w);
          }
        }
      }
#pragma unroll
      for (int j = 0; j < kTargetTile; ++j) {
        const int64_t i = i0 + j;
        if (i < K && (i == 0 || beats(acc[j], best_sim))) {
          best_sim = acc[j];
          best = i;
        }
      }
    }
    if (!finite) best = 0;  // the reference's similarities of a non-finite member are all NaN
    if (is_member) {
      row[n] = static_cast<int32_t>(D + best);
      atomicAdd(counts + best, 1);  // integer: the total does not depend on the order
    }
  }
}

// 1c. Member lists (CSR), one warp per (image, target), striding: offsets[i] = the sum of the
// earlier targets' counts; then the warp reads the rows of its image kListWindow chunks of 32
// tokens at a time (independent loads in flight) and writes its members in ascending token order,
// placed by ballots. A member of target i is a token with row D + i other than the target itself.
template <typename Images>
__global__ void __launch_bounds__(kListThreads) plan_lists_kernel(PlanPointers plan, Images images) {
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const unsigned lanes_below = (1u << lane) - 1u;
  const int64_t first_warp = static_cast<int64_t>(blockIdx.x) * kListWarps + static_cast<int>(threadIdx.x) / kWarp;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kListWarps;
  for (int64_t job = first_warp; job < images.total_targets(); job += warp_stride) {  // warp-uniform
    const ImageSpan span = images.span(images.image_of_target(job));
    const int64_t N = span.N, i = job - span.target_base;
    const int32_t* counts = plan.counts + span.target_base;
    int before = 0;
    for (int64_t j = lane; j < i; j += kWarp) before += counts[j];
    int64_t cursor = warp_sum(before);
    if (lane == 0) plan.offsets[job] = static_cast<int32_t>(cursor);
    const int32_t r = static_cast<int32_t>(span.D + i);
    const int32_t target = plan.targets[job];
    const int32_t* row = plan.row + span.token_base;
    int32_t* members = plan.members + span.token_base;
    for (int64_t n0 = 0; n0 < N; n0 += kListWindow * kWarp) {
      bool mine[kListWindow];
#pragma unroll
      for (int u = 0; u < kListWindow; ++u) {
        const int64_t n = n0 + u * kWarp + lane;
        mine[u] = n < N && row[n] == r && n != target;
      }
#pragma unroll
      for (int u = 0; u < kListWindow; ++u) {
        const unsigned ballot = __ballot_sync(kFullMask, mine[u]);
        if (mine[u]) members[cursor + __popc(ballot & lanes_below)] = static_cast<int32_t>(n0 + u * kWarp + lane);
        cursor += __popc(ballot);
      }
    }
  }
}

}  // namespace visionzip::cuda
