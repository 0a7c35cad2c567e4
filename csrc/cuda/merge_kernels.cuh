// Device kernels and launchers of the CUDA merge path, on raw pointers and without ATen, so that the
// same code is compiled by nvcc (csrc/cuda/select_merge_cuda.cu, varlen_merge_cuda.cu) and, on
// machines without a GPU, by a host compiler against the thread-level emulation in
// tests/cuda_emulation (tests/test_merge_math.py).
//
// Launches on the caller's stream, none reading a device value on the host, so the path can be
// captured in a CUDA graph. Every kernel takes an image policy (DenseImages: B equal images;
// PackedImages: a table of images of different sizes and budgets), so a packed batch is one set of
// launches too. The plan is three short kernels, so that no image's work is one long serial block:
//   1a. plan_select_kernel, one block per image: the top-k of the scores (select_merge only; a
//       radix select over order-preserving keys, 8-bit digits, 4 passes of a shared-memory
//       histogram, then the tied tokens in index order through a block scan), the roles of the
//       tokens, the ascending complement of keep through a block scan, the K strided targets and
//       their unit metric (one warp per target, 128 channels at a time, the sum of squares in
//       channel order). It zeroes the member counts. Packed: it also ranks the image's kept tokens
//       in token order (a block scan), which places the output rows and gives keep.
//   1b. plan_assign_kernel, a grid over (chunks of 128 tokens, images), 32 tokens per warp: each
//       member's most cosine-similar target (first maximum wins; the targets' unit metric staged in
//       shared memory when it fits, the members' metric staged 32 channels at a time), its output
//       row, and the member counts (integer atomics: the totals do not depend on the order).
//   1c. plan_lists_kernel (forward only), one warp per (image, target): the target's offset (sum of
//       the earlier counts) and its members in ascending token order, placed by warp ballots over
//       the per-token rows (no atomics, so the order is fixed).
//   2. merge_forward_kernel: dominant rows gathered in keep order (packed: each row at its rank in
//      token order); contextual row i = target +
//      (sum of its members in list order) / max(count, 1): no float atomics, a fixed order, fp32
//      (fp64 for fp64) accumulation, 16-byte loads along C.
//   3. merge_backward_kernel: each token row of grad_hidden written once (docs/SPEC.md "Gradients");
//      the backward runs 1a and 1b (it needs the rows and counts, not the lists).
// The per-element arithmetic (target_step, target_index, clamped_norm, add_product, score_key,
// member_divisor) is csrc/merge_math.h, shared with the C++ CPU kernels, and it is applied in the
// same order, so keep, tokens and gradients equal the CPU kernels' bit for bit in every dtype.
//
// Inputs the host cannot check without a sync (keep values): a keep index outside [0, N) yields a
// zero dominant row and marks no token; a repeated one marks its token once (the gradient of that
// token comes from its last row). Nothing is read or written out of bounds either way.
#pragma once
// Included by more than one .cu file: device functions are inline or templates (every kernel is a
// template), so that no symbol is defined twice at link time.

#include <cstddef>
#include <cstdint>
#include <vector>

#include "../merge_math.h"

#if defined(__CUDACC__)
#define VZ_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  kernel<<<grid, block, shared_bytes, stream>>>(__VA_ARGS__)
#define VZ_DYNAMIC_SHARED(type, name)                                   \
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
constexpr int kListWindow = 16;     // 32-token chunks of rows loaded per round (loads in flight)
constexpr int kTargetTile = 16;     // targets scored per pass over a member's metric (registers)
constexpr int kMergeThreads = 256;  // threads per merge block: channel lanes x rows
constexpr int kMemberUnroll = 8;    // member rows loaded per round (independent loads in flight)
constexpr int64_t kMaxRowBlocks = int64_t{1} << 20;  // grid.x cap; the kernels stride over rows
constexpr int64_t kMaxPlanBlocks = int64_t{1} << 20;  // grid.x cap of 1b and 1c; they stride too
constexpr int64_t kMaxChannelBlocks = 65535;         // grid.y limit
// Dynamic shared memory for the unit targets in plan_assign_kernel, on top of its ~17 KB of static
// shared memory: within the 48 KB a block gets without opting in. Larger K * d are read from the
// global scratch (L2) instead.
constexpr size_t kMaxSharedUnitBytes = 24 * 1024;

// Plan scratch. Per-token arrays are indexed by an image's token_base + token, per-target arrays by
// its target_base + target (ImageSpan). Filled by the plan kernels; nothing in it is read on the host.
struct PlanPointers {
  int8_t* role;      // [tokens] TokenRole
  int32_t* row;      // [tokens] dense output row of the token (0..D+K), -1 when it has none
  int32_t* targets;  // [targets] token of each target
  int32_t* counts;   // [targets] members of each target
  int32_t* offsets;  // [targets] start of each target's members in the image's `members`
  int32_t* members;  // [tokens] per image: members of target 0, then of target 1, ...; each ascending
  float* unit;       // per image [d, K_pad]: unit metric of the targets, transposed (zero padded)
  int32_t* place;    // packed only, [rows]: rank in token order of each dense output row
};

VZ_HOST_DEVICE int64_t padded_targets(int64_t contextual) {
  return (contextual + kTargetTile - 1) / kTargetTile * kTargetTile;
}

// ---------------------------------------------------------------------------------------------
// The images of one launch.
//
// Dense (select_merge, contextual_merge): B images of N tokens and D + K output rows each, in
// tensors [B, N, ...] with a batch stride. Packed (varlen_select_merge): n images of N_i tokens
// along one axis [T, ...], each with its own D_i and K_i, described by a small device table built
// on the host (describe_packed). Every kernel maps its flat job index to (image, local index)
// through the policy, so one set of launches covers every image: the dense mapping is plain
// arithmetic, the packed one a binary search over the table's prefix sums (a few cached loads).

// One image, as a kernel sees it.
struct ImageSpan {
  int64_t N, D, K;
  int64_t token_base;   // its first entry in the per-token scratch (role, row, members) and scores
  int64_t keep_base;    // its first entry in keep
  int64_t target_base;  // its first entry in the per-target scratch (targets, counts, offsets)
  int64_t unit_base;    // its first float of the unit targets
  int64_t out_base;     // its first output row (tokens forward, grad_tokens backward)
  int64_t batch;        // its rows in a tensor of strides (sb, sn) start at element
  int64_t first_row;    //   batch * sb + first_row * sn (dense: b and 0; packed: 0 and token_base)
};

struct DenseImages {
  int64_t B, N, D, K, d;
  static constexpr bool kTokenOrder = false;  // output rows: D dominant rows, then K contextual
  VZ_HOST_DEVICE int64_t count() const { return B; }
  VZ_HOST_DEVICE int64_t chunks() const { return (N + kAssignThreads - 1) / kAssignThreads; }
  VZ_HOST_DEVICE int64_t total_tokens() const { return B * N; }
  VZ_HOST_DEVICE int64_t total_targets() const { return B * K; }
  VZ_HOST_DEVICE int64_t total_dominant() const { return B * D; }
  VZ_HOST_DEVICE int64_t total_chunks() const { return B * chunks(); }
  VZ_HOST_DEVICE int64_t max_unit_floats() const { return d * padded_targets(K); }
  VZ_HOST_DEVICE ImageSpan span(int64_t b) const {
    return {N, D, K, b * N, b * D, b * K, b * d * padded_targets(K), b * (D + K), b, 0};
  }
  VZ_HOST_DEVICE int64_t image_of_token(int64_t g) const { return g / N; }
  VZ_HOST_DEVICE int64_t image_of_target(int64_t j) const { return j / K; }
  VZ_HOST_DEVICE int64_t image_of_dominant(int64_t j) const { return j / D; }
  VZ_HOST_DEVICE int64_t image_of_chunk(int64_t j) const { return j / chunks(); }
  VZ_HOST_DEVICE int64_t chunk_base(int64_t b) const { return b * chunks(); }
};

// A row of the packed table: an image's sizes and the prefix sums that place it.
struct PackedImage {
  int64_t N, D, K;
  int64_t token_base, keep_base, target_base, unit_base, out_base, chunk_base;
};

struct PackedImages {
  const PackedImage* table;  // [n], where the kernels run
  int64_t n, d;              // images, metric channels
  int64_t tokens, targets, dominant, chunks, max_unit;  // totals (host values)
  int64_t* keep_out;  // [rows] the kept tokens' packed indices, ascending per image (null: not wanted)
  static constexpr bool kTokenOrder = true;  // output rows in original token order (plan.place)
  VZ_HOST_DEVICE int64_t count() const { return n; }
  VZ_HOST_DEVICE int64_t total_tokens() const { return tokens; }
  VZ_HOST_DEVICE int64_t total_targets() const { return targets; }
  VZ_HOST_DEVICE int64_t total_dominant() const { return dominant; }
  VZ_HOST_DEVICE int64_t total_chunks() const { return chunks; }
  VZ_HOST_DEVICE int64_t max_unit_floats() const { return max_unit; }
  VZ_HOST_DEVICE ImageSpan span(int64_t b) const {
    const PackedImage& p = table[b];
    return {p.N, p.D, p.K, p.token_base, p.keep_base, p.target_base, p.unit_base, p.out_base, 0, p.token_base};
  }
  // The last image whose base is <= j holds job j: a later image starts past j, and an empty image
  // before it shares its successor's base.
  template <int64_t PackedImage::*base>
  VZ_HOST_DEVICE int64_t image_of(int64_t j) const {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (table[mid].*base <= j) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    return lo;
  }
  VZ_HOST_DEVICE int64_t image_of_token(int64_t g) const { return image_of<&PackedImage::token_base>(g); }
  VZ_HOST_DEVICE int64_t image_of_target(int64_t j) const { return image_of<&PackedImage::target_base>(j); }
  VZ_HOST_DEVICE int64_t image_of_dominant(int64_t j) const { return image_of<&PackedImage::keep_base>(j); }
  VZ_HOST_DEVICE int64_t image_of_chunk(int64_t j) const { return image_of<&PackedImage::chunk_base>(j); }
  VZ_HOST_DEVICE int64_t chunk_base(int64_t b) const { return table[b].chunk_base; }
};

// The output row of dense row r (0..D+K: dominant rows, then contextual rows) of an image: r itself,
// or in token order its rank among the image's kept tokens.
template <typename Images>
__device__ __forceinline__ int64_t output_row(const int32_t* place, const ImageSpan& span, int64_t r) {
  if constexpr (Images::kTokenOrder) {
    return span.out_base + place[span.out_base + r];
  } else {
    return span.out_base + r;
  }
}

// Host: the packed table from cu_seqlens (n + 1 host values) and the budgets, with its totals.
struct PackedBatch {
  std::vector<PackedImage> table;
  int64_t d = 0;  // metric channels
  int64_t tokens = 0, targets = 0, dominant = 0, chunks = 0, rows = 0, unit_floats = 0, max_unit = 0;
};

inline PackedBatch describe_packed(const int64_t* cu, int64_t n, const int64_t* dominant, const int64_t* contextual,
                                   int64_t d) {
  PackedBatch batch;
  batch.d = d;
  batch.table.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t N = cu[i + 1] - cu[i], D = dominant[i], K = contextual[i], unit = d * padded_targets(K);
    batch.table.push_back(
        {N, D, K, cu[i], batch.dominant, batch.targets, batch.unit_floats, batch.rows, batch.chunks});
    batch.dominant += D;
    batch.targets += K;
    batch.unit_floats += unit;
    batch.rows += D + K;
    batch.chunks += (N + kAssignThreads - 1) / kAssignThreads;
    batch.max_unit = unit > batch.max_unit ? unit : batch.max_unit;
  }
  batch.tokens = n > 0 ? cu[n] : 0;
  return batch;
}

// The kernels' view of a packed batch whose table has been copied to `table`.
inline PackedImages packed_images(const PackedBatch& batch, const PackedImage* table, int64_t* keep_out) {
  return {table,         static_cast<int64_t>(batch.table.size()), batch.d, batch.tokens, batch.targets,
          batch.dominant, batch.chunks, batch.max_unit, keep_out};
}

// ---------------------------------------------------------------------------------------------
// Host-side layout and launch geometry (plain C++, shared with the emulation).

struct PlanLayout {
  size_t role, row, targets, counts, offsets, members, unit, place, bytes;
};

// Scratch for `tokens` tokens, `targets` targets, `unit_floats` unit-target floats and `placed`
// output rows in token order (packed only).
inline PlanLayout plan_layout(int64_t tokens, int64_t targets, int64_t unit_floats, int64_t placed) {
  const auto align = [](size_t x) { return (x + 15) & ~size_t{15}; };
  const size_t bn = static_cast<size_t>(tokens), bk = static_cast<size_t>(targets);
  PlanLayout l{};
  l.role = 0;
  l.row = align(l.role + bn * sizeof(int8_t));
  l.targets = align(l.row + bn * sizeof(int32_t));
  l.counts = align(l.targets + bk * sizeof(int32_t));
  l.offsets = align(l.counts + bk * sizeof(int32_t));
  l.members = align(l.offsets + bk * sizeof(int32_t));
  l.unit = align(l.members + bn * sizeof(int32_t));
  l.place = align(l.unit + static_cast<size_t>(unit_floats) * sizeof(float));
  l.bytes = align(l.place + static_cast<size_t>(placed) * sizeof(int32_t));
  return l;
}

inline PlanLayout dense_plan_layout(int64_t B, int64_t N, int64_t K, int64_t d) {
  return plan_layout(B * N, B * K, B * d * padded_targets(K), 0);
}

inline PlanLayout packed_plan_layout(const PackedBatch& batch) {
  return plan_layout(batch.tokens, batch.targets, batch.unit_floats, batch.rows);
}

inline PlanPointers plan_pointers(void* base, const PlanLayout& l) {
  char* p = static_cast<char*>(base);
  return {reinterpret_cast<int8_t*>(p + l.role),     reinterpret_cast<int32_t*>(p + l.row),
          reinterpret_cast<int32_t*>(p + l.targets), reinterpret_cast<int32_t*>(p + l.counts),
          reinterpret_cast<int32_t*>(p + l.offsets), reinterpret_cast<int32_t*>(p + l.members),
          reinterpret_cast<float*>(p + l.unit),      reinterpret_cast<int32_t*>(p + l.place)};
}

// Elements of scalar_t per 16-byte load.
template <typename scalar_t>
constexpr int kPackWidth = static_cast<int>(16 / sizeof(scalar_t));

// 16-byte packs when the base, the row strides and C allow them, else one element per lane.
template <typename scalar_t>
int pack_width(const void* base, int64_t channels, int64_t stride_b, int64_t stride_n) {
  constexpr int64_t wide = kPackWidth<scalar_t>;
  const bool aligned = reinterpret_cast<uintptr_t>(base) % 16 == 0 && channels % wide == 0 &&
                       stride_b % wide == 0 && stride_n % wide == 0;
  return aligned ? static_cast<int>(wide) : 1;
}

// Merge geometry: blockDim = (channel lanes, rows), grid = (row blocks, channel blocks).
struct RowLaunch {
  dim3 grid, block;
};

inline int64_t channel_blocks(int64_t channels, int vec) {
  const int64_t lanes = (channels + vec - 1) / vec;
  const int64_t x = lanes >= kMergeThreads ? kMergeThreads : (lanes + kWarp - 1) / kWarp * kWarp;
  return (lanes + x - 1) / x;
}

inline RowLaunch row_launch(int64_t rows, int64_t channels, int vec) {
  const int64_t lanes = (channels + vec - 1) / vec;
  const int64_t x = lanes >= kMergeThreads ? kMergeThreads : (lanes + kWarp - 1) / kWarp * kWarp;
  const int64_t y = kMergeThreads / x;
  const int64_t row_blocks = (rows + y - 1) / y;
  return {dim3(static_cast<unsigned>(row_blocks < kMaxRowBlocks ? row_blocks : kMaxRowBlocks),
               static_cast<unsigned>((lanes + x - 1) / x)),
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

// ---------------------------------------------------------------------------------------------
// Block-wide helpers of plan_select_kernel (blockDim.x == kPlanThreads; every thread calls them).

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
inline __device__ uint32_t kth_largest_key(const float* scores, int64_t first, int64_t N, int64_t picked, SelectShared& s) {
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

// ---------------------------------------------------------------------------------------------
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
    __syncthreads();  // the previous image's shared state has been read
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
  float(*tile)[kWarp + 1] = tiles[warp];
  for (int64_t job = blockIdx.x; job < images.total_chunks(); job += gridDim.x) {  // block-uniform
    const int64_t b = images.image_of_chunk(job);
    const ImageSpan span = images.span(b);
    const int64_t N = span.N, D = span.D, K = span.K, k_pad = padded_targets(K);
    if (K == 0) continue;  // block-uniform: no members
    const float* unit = plan.unit + span.unit_base;
    if (unit_in_shared) {
      __syncthreads();  // the previous job's unit targets have been read
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

// ---------------------------------------------------------------------------------------------
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
    const int64_t j = is_contextual ? g : g - contextual_rows;
    const ImageSpan span = images.span(is_contextual ? images.image_of_target(j) : images.image_of_dominant(j));
    const int64_t D = span.D;
    const int64_t r = is_contextual ? D + (j - span.target_base) : j - span.keep_base;
    const scalar_t* h = hidden + span.batch * hidden_sb + span.first_row * hidden_sn + c;
    pack_t out;
    if (r < D) {
      const int64_t t = keep[j];
      out = t >= 0 && t < span.N ? load_pack<scalar_t, VEC>(h + t * hidden_sn) : zero_pack<scalar_t, VEC>();
    } else {
      const int64_t i = j;  // the target's entry
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

// ---------------------------------------------------------------------------------------------
// Launchers (host). The caller allocates the plan scratch (dense_plan_layout, packed_plan_layout)
// and checks launch errors. `images` is DenseImages or PackedImages.

// The plan: 1a, then (some K > 0) 1b, then (build_lists) 1c. build_lists: the forward needs the
// member lists, the backward only the rows and counts.
template <typename metric_t, typename Images>
void launch_plan(const metric_t* metric, int64_t metric_sb, int64_t metric_sn, const float* scores, int64_t* keep,
                 PlanPointers plan, const Images& images, bool keep_cls, bool build_lists,
                 cudaStream_t stream) {
  const PlanLaunch geometry = plan_launch(images);
  auto* select = &plan_select_kernel<metric_t, Images>;
  VZ_LAUNCH(select, dim3(geometry.select_blocks), dim3(kPlanThreads), 0, stream, metric, metric_sb, metric_sn, scores,
            keep, plan, images, keep_cls);
  if (images.total_targets() == 0) return;
  auto* assign = &plan_assign_kernel<metric_t, Images>;
  VZ_LAUNCH(assign, dim3(geometry.assign_blocks), dim3(kAssignThreads),
            geometry.unit_in_shared ? geometry.unit_bytes : 0, stream, metric, metric_sb, metric_sn, plan, images,
            geometry.unit_in_shared);
  if (!build_lists) return;
  auto* lists = &plan_lists_kernel<Images>;
  VZ_LAUNCH(lists, dim3(geometry.list_blocks), dim3(kListThreads), 0, stream, plan, images);
}

// tokens from hidden (rows of strides hidden_sb, hidden_sn; packed: hidden_sb unused).
template <typename scalar_t, typename acc_t, typename Images>
void launch_merge_forward(const scalar_t* hidden, int64_t hidden_sb, int64_t hidden_sn, const int64_t* keep,
                          PlanPointers plan, scalar_t* tokens, const Images& images, int64_t C, cudaStream_t stream) {
  const int64_t rows = images.total_dominant() + images.total_targets();
  if (rows == 0) return;
  const int vec = pack_width<scalar_t>(hidden, C, hidden_sb, hidden_sn);
  const RowLaunch geometry = row_launch(rows, C, vec);
  if (vec == kPackWidth<scalar_t>) {
    auto* kernel = &merge_forward_kernel<scalar_t, acc_t, kPackWidth<scalar_t>, Images>;
    VZ_LAUNCH(kernel, geometry.grid, geometry.block, 0, stream, hidden, hidden_sb, hidden_sn, keep, plan, tokens,
              images, C);
  } else {
    auto* kernel = &merge_forward_kernel<scalar_t, acc_t, 1, Images>;
    VZ_LAUNCH(kernel, geometry.grid, geometry.block, 0, stream, hidden, hidden_sb, hidden_sn, keep, plan, tokens,
              images, C);
  }
}

// grad_hidden from grad_tokens (rows of strides grad_sb, grad_sr; packed: grad_sb unused).
template <typename scalar_t, typename acc_t, typename Images>
void launch_merge_backward(const scalar_t* grad, int64_t grad_sb, int64_t grad_sr, PlanPointers plan,
                           scalar_t* grad_hidden, const Images& images, int64_t C, cudaStream_t stream) {
  const int64_t rows = images.total_tokens();
  if (rows == 0) return;
  const int vec = pack_width<scalar_t>(grad, C, grad_sb, grad_sr);
  const RowLaunch geometry = row_launch(rows, C, vec);
  if (vec == kPackWidth<scalar_t>) {
    auto* kernel = &merge_backward_kernel<scalar_t, acc_t, kPackWidth<scalar_t>, Images>;
    VZ_LAUNCH(kernel, geometry.grid, geometry.block, 0, stream, grad, grad_sb, grad_sr, plan, grad_hidden, images, C);
  } else {
    auto* kernel = &merge_backward_kernel<scalar_t, acc_t, 1, Images>;
    VZ_LAUNCH(kernel, geometry.grid, geometry.block, 0, stream, grad, grad_sb, grad_sr, plan, grad_hidden, images, C);
  }
}

}  // namespace visionzip::cuda
