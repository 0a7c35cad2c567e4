// The image policies: which images one launch covers and where each one's data lies.
// DenseImages (B equal images) and PackedImages (a device table of images of different sizes and
// budgets, built on the host by describe_packed) map a flat job index to its image and ImageSpan.
#pragma once

#include <cstdint>
#include <vector>

#include "common.cuh"

namespace visionzip::cuda {

// Targets per image rounded up to kTargetTile: the row length of its transposed unit targets.
VZ_HOST_DEVICE int64_t padded_targets(int64_t contextual) {
  return (contextual + kTargetTile - 1) / kTargetTile * kTargetTile;
}

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
  const PackedImage* table;                             // [n], where the kernels run
  int64_t n, d;                                         // images, metric channels
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
  template <int64_t PackedImage::* base>
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
    batch.table.push_back({N, D, K, cu[i], batch.dominant, batch.targets, batch.unit_floats, batch.rows, batch.chunks});
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
  return {table,         static_cast<int64_t>(batch.table.size()),
          batch.d,       batch.tokens,
          batch.targets, batch.dominant,
          batch.chunks,  batch.max_unit,
          keep_out};
}

}  // namespace visionzip::cuda
