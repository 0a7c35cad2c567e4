// What every CUDA merge header shares: the launch macros, which launch a kernel with nvcc or, on a
// host compiler, under the thread-level emulation of tests/cuda_emulation (which must then be
// included first), and the block sizes and limits the kernels and their launch geometry agree on.
#pragma once
// Included by more than one .cu file: device functions are inline or templates (every kernel is a
// template), so that no symbol is defined twice at link time.

#include <cstddef>
#include <cstdint>

#include "../merge_math.h"

#if defined(__CUDACC__)
#define VZ_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  kernel<<<grid, block, shared_bytes, stream>>>(__VA_ARGS__)
#define VZ_DYNAMIC_SHARED(type, name)                                    \
  extern __shared__ __align__(16) unsigned char vz_dynamic_shared_raw[]; \
  type* name = reinterpret_cast<type*>(vz_dynamic_shared_raw)
#else
// Host build of the kernels: tests/cuda_emulation/cuda_emulation.h must be included first.
#define VZ_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  ::vz_emulation::launch(grid, block, shared_bytes, kernel, __VA_ARGS__)
#define VZ_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(::vz_emulation::dynamic_shared())
#endif

namespace visionzip::cuda {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;
constexpr int kPlanThreads = 256;  // plan_select_kernel: one block per image
constexpr int kPlanWarps = kPlanThreads / kWarp;
constexpr int kRadixBits = 8;  // top-k digits: 4 passes over the 32-bit keys
constexpr int kRadixBins = 1 << kRadixBits;
constexpr int kUnitStage = 128;  // channels of a target's metric loaded per round (4 loads a lane)
static_assert(kRadixBins == kPlanThreads, "one histogram bin per thread");
constexpr int kAssignThreads = 128;  // plan_assign_kernel: 4 warps of 32 tokens per block
constexpr int kAssignWarps = kAssignThreads / kWarp;
constexpr int kListThreads = 256;  // plan_lists_kernel: one warp per (image, target)
constexpr int kListWarps = kListThreads / kWarp;
constexpr int kListWindow = 16;                       // 32-token chunks of rows loaded per round (loads in flight)
constexpr int kTargetTile = 16;                       // targets scored per pass over a member's metric (registers)
constexpr int kMergeThreads = 256;                    // threads per merge block: channel lanes x rows
constexpr int kMemberUnroll = 8;                      // member rows loaded per round (independent loads in flight)
constexpr int64_t kMaxRowBlocks = int64_t{1} << 20;   // grid.x cap; the kernels stride over rows
constexpr int64_t kMaxPlanBlocks = int64_t{1} << 20;  // grid.x cap of 1b and 1c; they stride too
constexpr int64_t kMaxChannelBlocks = 65535;          // grid.y limit
// Dynamic shared memory for the unit targets in plan_assign_kernel, on top of its ~17 KB of static
// shared memory: within the 48 KB a block gets without opting in. Larger K * d are read from the
// global scratch (L2) instead.
constexpr size_t kMaxSharedUnitBytes = 24 * 1024;

}  // namespace visionzip::cuda
