// Launch geometry (host, plain C++, shared with the emulation): the pack width and the grid and
// block of the row kernels, and the grids of the plan kernels.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common.cuh"

namespace visionzip::cuda {

// Elements of scalar_t per 16-byte load.
template <typename scalar_t>
constexpr int kPackWidth = static_cast<int>(16 / sizeof(scalar_t));

// 16-byte packs when the base, the row strides and C allow them, else one element per lane.
template <typename scalar_t>
int pack_width(const void* base, int64_t channels, int64_t stride_b, int64_t stride_n) {
  constexpr int64_t wide = kPackWidth<scalar_t>;
  const bool aligned = reinterpret_cast<uintptr_t>(base) % 16 == 0 && channels % wide == 0 && stride_b % wide == 0 &&
                       stride_n % wide == 0;
  return aligned ? static_cast<int>(wide) : 1;
}

// Merge geometry: blockDim = (channel lanes, rows), grid = (row blocks, channel blocks).
struct RowLaunch {
  dim3 grid, block;
};

// The channels of a row across the blocks: lanes (VEC channels each) per block, all kMergeThreads
// or, for a narrower row, its lanes rounded up to a warp; and the blocks along the channels (grid.y).
struct ChannelBlocks {
  int64_t lanes, count;
};

inline ChannelBlocks channel_blocks(int64_t channels, int vec) {
  const int64_t lanes = (channels + vec - 1) / vec;
  const int64_t x = lanes >= kMergeThreads ? kMergeThreads : (lanes + kWarp - 1) / kWarp * kWarp;
  return {x, (lanes + x - 1) / x};
}

inline RowLaunch row_launch(int64_t rows, int64_t channels, int vec) {
  const ChannelBlocks channel = channel_blocks(channels, vec);
  const int64_t x = channel.lanes, y = kMergeThreads / x;
  const int64_t row_blocks = (rows + y - 1) / y;
  return {dim3(static_cast<unsigned>(row_blocks < kMaxRowBlocks ? row_blocks : kMaxRowBlocks),
               static_cast<unsigned>(channel.count)),
          dim3(static_cast<unsigned>(x), static_cast<unsigned>(y))};
}

// Plan geometry: grid.x of the three plan kernels (each strides over its jobs beyond the cap) and
// whether plan_assign_kernel stages the unit targets in shared memory (unit_bytes of it).
struct PlanLaunch {
  unsigned select_blocks, assign_blocks, list_blocks;
  size_t unit_bytes;
  bool unit_in_shared;
};

template <typename Images>
PlanLaunch plan_launch(const Images& images) {
  const auto capped = [](int64_t blocks) {
    return static_cast<unsigned>(blocks < 1 ? 1 : blocks < kMaxPlanBlocks ? blocks : kMaxPlanBlocks);
  };
  const size_t unit_bytes = static_cast<size_t>(images.max_unit_floats()) * sizeof(float);
  return {capped(images.count()), capped(images.total_chunks()),
          capped((images.total_targets() + kListWarps - 1) / kListWarps), unit_bytes,
          unit_bytes <= kMaxSharedUnitBytes};
}

}  // namespace visionzip::cuda
