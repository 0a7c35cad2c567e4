// The plan scratch: the arrays the plan kernels fill and the row kernels read (PlanPointers), and
// their layout in one device allocation (plain C++ on the host, shared with the emulation).
#pragma once

#include <cstddef>
#include <cstdint>

#include "images.cuh"

namespace visionzip::cuda {

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

}  // namespace visionzip::cuda
