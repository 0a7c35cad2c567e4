// Building blocks of the plan kernels: a warp sum (plan_lists_kernel uses it too), a warp max, the block's
// exclusive scan, and the top-k (a radix select of the k-th largest score key, then the tied tokens
// in index order).
#pragma once

#include <cstdint>

#include "common.cuh"

namespace visionzip::cuda {

// The sum of value over the 32 lanes of a warp, returned to every lane.
__device__ __forceinline__ int warp_sum(int value) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_add_sync(kFullMask, value);
#else
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) value += __shfl_xor_sync(kFullMask, value, offset);
  return value;
#endif
}

// The largest value over the warp's lanes, in every lane (fmaxf: exact and order-free; NaNs are
// skipped, which only a row that is all NaN anyway can notice).
__device__ __forceinline__ float warp_max(float value) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    value = fmaxf(value, __shfl_xor_sync(kFullMask, value, offset));
  }
  return value;
}

// Block-wide helpers of plan_select_kernel (blockDim.x == kPlanThreads; every thread calls them).

// Exclusive prefix sum over the threads in thread order; *total gets the block total. Two
// barriers, the second after every thread has read warp_totals, so calls can follow each other.
__device__ __forceinline__ int block_exclusive_scan(int value, int* warp_totals, int* total) {
  const int lane = static_cast<int>(threadIdx.x) % kWarp, warp = static_cast<int>(threadIdx.x) / kWarp;
  int inclusive = value;
#pragma unroll
  for (int offset = 1; offset < kWarp; offset <<= 1) {
    const int up = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += up;
  }
  if (lane == kWarp - 1) warp_totals[warp] = inclusive;
  __syncthreads();
  int before = 0, sum = 0;
#pragma unroll
  for (int w = 0; w < kPlanWarps; ++w) {
    const int t = warp_totals[w];
    before += w < warp ? t : 0;
    sum += t;
  }
  __syncthreads();
  *total = sum;
  return before + inclusive - value;
}

// Shared memory of plan_select_kernel: the top-k's digit histogram, the scans' warp totals, the
// chosen digit, and each warp's kUnitStage staged channels of a target's metric.
struct SelectShared {
  int histogram[kRadixBins];
  int warp_totals[kPlanWarps];
  int digit, above;
  float staged[kPlanWarps][kUnitStage];
};

// The picked-th largest key among tokens first..N-1 (1 <= picked <= N - first), returned to every
// thread: a radix select from the top digit down. Each pass histograms the digit of the keys that
// share the digits chosen so far; thread t owns digit 255 - t, so an exclusive scan in thread order
// counts the keys with a larger digit, and the one thread whose digit holds the picked-th key
// publishes it. Four barriers a pass, scores re-read from L1/L2 (independent loads).
inline __device__ uint32_t kth_largest_key(const float* scores, int64_t first, int64_t N, int64_t picked,
                                           SelectShared& s) {
  const int tid = static_cast<int>(threadIdx.x);
  uint32_t prefix = 0, prefix_mask = 0;
  int64_t remaining = picked;  // rank of the wanted key among the keys that match the prefix
  for (int shift = 32 - kRadixBits; shift >= 0; shift -= kRadixBits) {
    // Bin tid was last read (by thread 255 - tid) before the scan of the previous pass: two barriers ago.
    s.histogram[tid] = 0;
    __syncthreads();
    for (int64_t n = first + tid; n < N; n += kPlanThreads) {
      const uint32_t key = score_key(scores[n]);
      if ((key & prefix_mask) == prefix) atomicAdd(s.histogram + ((key >> shift) & (kRadixBins - 1)), 1);
    }
    __syncthreads();
    const int digit = kRadixBins - 1 - tid;
    const int count = s.histogram[digit];
    int group = 0;
    const int above = block_exclusive_scan(count, s.warp_totals, &group);
    if (above < remaining && above + count >= remaining) {  // exactly one thread
      s.digit = digit;
      s.above = above;
    }
    __syncthreads();
    // (s.digit and s.above are next written after the next pass's barriers: no barrier needed here.)
    prefix |= static_cast<uint32_t>(s.digit) << shift;
    prefix_mask |= static_cast<uint32_t>(kRadixBins - 1) << shift;
    remaining -= s.above;
  }
  return prefix;
}

// keep[0..D) of one image, ascending: token 0 when keep_cls, then the D - first highest scores
// among tokens first..N-1, ties to the lower index. The radix select finds the (D - first)-th key;
// the tied tokens are then taken in index order through a scan over contiguous per-thread chunks.
inline __device__ void select_dominant(const float* scores, int64_t N, int64_t D, bool keep_cls, int64_t* keep,
                                       SelectShared& s) {
  const int64_t first = keep_cls ? 1 : 0;
  const int64_t picked = D - first;
  // picked == 0 (D == 1 with keep_cls): a threshold no key exceeds, and no tie is needed.
  const uint32_t threshold = picked > 0 ? kth_largest_key(scores, first, N, picked, s) : 0xffffffffu;
  // Fewer than `picked` keys are above the threshold; the first ties fill the rest.
  const int64_t chunk = (N - first + kPlanThreads - 1) / kPlanThreads;
  const int64_t begin = first + threadIdx.x * chunk;
  const int64_t end = begin + chunk < N ? begin + chunk : N;
  int above = 0, ties = 0;
  for (int64_t n = begin; n < end; ++n) {
    const uint32_t key = score_key(scores[n]);
    above += key > threshold;
    ties += key == threshold;
  }
  int total_above = 0, total_ties = 0;
  const int above_before = block_exclusive_scan(above, s.warp_totals, &total_above);
  const int ties_before = block_exclusive_scan(ties, s.warp_totals, &total_ties);
  const int64_t ties_needed = picked - total_above;
  int64_t position = first + above_before + (ties_before < ties_needed ? ties_before : ties_needed);
  int64_t tie_rank = ties_before;
  for (int64_t n = begin; n < end; ++n) {
    const uint32_t key = score_key(scores[n]);
    bool take = key > threshold;
    if (key == threshold) take = tie_rank++ < ties_needed;
    if (take) keep[position++] = n;
  }
  if (keep_cls && threadIdx.x == 0) keep[0] = 0;
}

}  // namespace visionzip::cuda
