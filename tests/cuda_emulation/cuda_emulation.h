// A small thread-level emulation of the CUDA features the merge kernels (csrc/cuda/*.cuh) use, so that the
// kernels themselves (indexing, barriers, warp votes and shuffles, scans, launch geometry) run and
// are tested on machines without a GPU. Every CUDA thread of a block is a std::thread; blocks run one
// after another, so `__shared__` becomes `static` storage. __syncthreads() is a block barrier and the
// warp primitives (shuffles, ballots) exchange values through per-warp slots between two warp
// barriers; integer atomics (global or shared) are std::atomic_ref. A thread that returns leaves the
// barriers (as an exited CUDA thread no longer counts).
//
// Not emulated: the memory model beyond what the barriers order, timing, launch limits (checked
// separately), float atomics, and device-only intrinsics (merge_math.h's __CUDA_ARCH__ branches).
#pragma once

#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace vz_emulation {

inline dim3 grid_dim, block_dim;
inline thread_local dim3 thread_idx, block_idx;
inline thread_local unsigned linear_tid = 0;

struct Block {
  Block(unsigned threads, size_t shared_bytes)
      : size(threads),
        barrier(static_cast<std::ptrdiff_t>(threads)),
        slots((threads + 31) / 32 * 32),
        dynamic_shared(shared_bytes / 16 + 1) {
    for (unsigned w = 0; w * 32 < threads; ++w) {
      const unsigned in_warp = threads - w * 32 < 32 ? threads - w * 32 : 32;
      warps.push_back(std::make_unique<std::barrier<>>(static_cast<std::ptrdiff_t>(in_warp)));
    }
  }
  unsigned size;
  std::barrier<> barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<uint64_t> slots;
  struct alignas(16) Chunk {
    unsigned char bytes[16];
  };
  std::vector<Chunk> dynamic_shared;  // extern __shared__, 16-byte aligned
};
inline Block* current = nullptr;

inline void* dynamic_shared() { return current->dynamic_shared.data(); }

inline unsigned lane() { return linear_tid % 32; }
inline unsigned warp_size() {
  const unsigned first = linear_tid / 32 * 32;
  return current->size - first < 32 ? current->size - first : 32;
}
inline std::barrier<>& warp_barrier() { return *current->warps[linear_tid / 32]; }

// Publishes this lane's value, then reads the value of lane src(lane) (own value if out of range).
template <typename T, typename Src>
T exchange(T value, Src src) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  uint64_t* slots = current->slots.data() + linear_tid / 32 * 32;
  uint64_t raw = 0;
  std::memcpy(&raw, &value, sizeof(T));
  slots[lane()] = raw;
  warp_barrier().arrive_and_wait();
  const long from = src(static_cast<long>(lane()));
  T out = value;
  if (from >= 0 && from < static_cast<long>(warp_size())) std::memcpy(&out, &slots[from], sizeof(T));
  warp_barrier().arrive_and_wait();
  return out;
}

// Runs kernel(args...) on grid x block threads, blocks one after another. One std::thread per CUDA
// thread of a block, created once per launch and reused for every block (thread creation dominates
// the cost of many small blocks); each block gets fresh barriers and dynamic shared memory.
template <typename... Params, typename... Args>
void launch(dim3 grid, dim3 block, size_t shared_bytes, void (*kernel)(Params...), Args... args) {
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
      grid.z > 65535 || block.z > 64 || shared_bytes > 48 * 1024) {
    throw std::invalid_argument("emulated launch: invalid configuration");
  }
  grid_dim = grid;
  block_dim = block;
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  std::unique_ptr<Block> state;
  // Main thread + workers meet before each block (the state is set up) and after it (all returned).
  std::barrier<> start(static_cast<std::ptrdiff_t>(threads) + 1), done(static_cast<std::ptrdiff_t>(threads) + 1);
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      linear_tid = t;
      thread_idx = dim3(t % block.x, t / block.x % block.y, t / (block.x * block.y));
      for (uint64_t k = 0; k < blocks; ++k) {
        start.arrive_and_wait();
        block_idx = dim3(static_cast<unsigned>(k % grid.x), static_cast<unsigned>(k / grid.x % grid.y),
                         static_cast<unsigned>(k / (uint64_t{grid.x} * grid.y)));
        kernel(static_cast<Params>(args)...);
        // An exited thread no longer takes part in barriers.
        warp_barrier().arrive_and_drop();
        current->barrier.arrive_and_drop();
        done.arrive_and_wait();
      }
    });
  }
  for (uint64_t k = 0; k < blocks; ++k) {
    state = std::make_unique<Block>(threads, shared_bytes);
    current = state.get();
    start.arrive_and_wait();
    done.arrive_and_wait();
    current = nullptr;
  }
  for (auto& th : pool) th.join();
}

}  // namespace vz_emulation

#define threadIdx (::vz_emulation::thread_idx)
#define blockIdx (::vz_emulation::block_idx)
#define blockDim (::vz_emulation::block_dim)
#define gridDim (::vz_emulation::grid_dim)

inline void __syncthreads() { ::vz_emulation::current->barrier.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::vz_emulation::warp_barrier().arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned, T value, int mask) {
  return ::vz_emulation::exchange(value, [mask](long l) { return l ^ mask; });
}
template <typename T>
T __shfl_sync(unsigned, T value, int src_lane) {
  return ::vz_emulation::exchange(value, [src_lane](long) { return static_cast<long>(src_lane % 32); });
}
template <typename T>
T __shfl_up_sync(unsigned, T value, unsigned delta) {
  return ::vz_emulation::exchange(value, [delta](long l) { return l - static_cast<long>(delta); });
}

inline unsigned __ballot_sync(unsigned, bool predicate) {
  using namespace ::vz_emulation;
  uint64_t* slots = current->slots.data() + linear_tid / 32 * 32;
  slots[lane()] = predicate ? 1 : 0;
  warp_barrier().arrive_and_wait();
  unsigned bits = 0;
  for (unsigned l = 0; l < warp_size(); ++l) bits |= slots[l] ? 1u << l : 0u;
  warp_barrier().arrive_and_wait();
  return bits;
}
inline bool __any_sync(unsigned mask, bool predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }

inline int atomicAdd(int* address, int value) { return std::atomic_ref<int>(*address).fetch_add(value); }

inline int atomicMax(int* address, int value) {
  std::atomic_ref<int> ref(*address);
  int old = ref.load();
  while (old < value && !ref.compare_exchange_weak(old, value)) {
  }
  return old;
}
