// C entry points that run the CUDA merge kernels (csrc/cuda/*.cuh) under the host emulation, through the same
// launchers the CUDA extension uses, on caller-owned buffers (torch tensors from Python, ctypes).
// dtype codes: 0 float32, 1 float64, 2 float16, 3 bfloat16 (c10::Half / c10::BFloat16, as on CUDA).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdio>
#include <exception>
#include <vector>

#include "cuda_emulation.h"
// (after the emulation)
#include "../../csrc/cuda/images.cuh"
#include "../../csrc/cuda/launch_geometry.cuh"
#include "../../csrc/cuda/merge_kernels.cuh"
#include "../../csrc/cuda/scratch.cuh"

namespace {

using namespace visionzip::cuda;

template <typename F>
int with_dtype(int code, F&& f) {
  switch (code) {
    case 0: f(float{}, float{}); return 0;
    case 1: f(double{}, double{}); return 0;
    case 2: f(c10::Half{}, float{}); return 0;
    case 3: f(c10::BFloat16{}, float{}); return 0;
    default: return -2;
  }
}

// Plan scratch, 16-byte aligned, filled with a pattern so that unwritten reads show.
struct Scratch {
  explicit Scratch(const PlanLayout& plan_layout) : layout(plan_layout), storage(layout.bytes / 16 + 1) {
    std::memset(storage.data(), 0x5a, storage.size() * 16);
  }
  PlanPointers pointers() { return plan_pointers(storage.data(), layout); }
  PlanLayout layout;
  struct alignas(16) Chunk {
    unsigned char bytes[16];
  };
  std::vector<Chunk> storage;
};

template <typename F>
int guarded(F&& f) {
  try {
    return f();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "emulation: %s\n", e.what());
    return -1;
  }
}

}  // namespace

extern "C" {

// select_merge (scores != null: keep is written) or contextual_merge (keep is read).
int vz_emu_merge(int hidden_dtype, const void* hidden, int64_t hidden_sb, int64_t hidden_sn, int metric_dtype,
                 const void* metric, int64_t metric_sb, int64_t metric_sn, const float* scores, int64_t* keep,
                 void* tokens, int64_t B, int64_t N, int64_t C, int64_t d, int64_t D, int64_t K, int keep_cls) {
  return guarded([&] {
    Scratch scratch(dense_plan_layout(B, N, K, d));
    const PlanPointers plan = scratch.pointers();
    const DenseImages images{B, N, D, K, d};
    if (scores != nullptr || K > 0) {
      const int rc = with_dtype(metric_dtype, [&](auto metric_tag, auto) {
        using metric_t = decltype(metric_tag);
        launch_plan<metric_t>(static_cast<const metric_t*>(metric), metric_sb, metric_sn, scores, keep, plan, images,
                              keep_cls != 0, /*build_lists=*/true, nullptr);
      });
      if (rc != 0) return rc;
    }
    return with_dtype(hidden_dtype, [&](auto scalar_tag, auto acc_tag) {
      using scalar_t = decltype(scalar_tag);
      using acc_t = decltype(acc_tag);
      launch_merge_forward<scalar_t, acc_t>(static_cast<const scalar_t*>(hidden), hidden_sb, hidden_sn, keep, plan,
                                            static_cast<scalar_t*>(tokens), images, C, nullptr);
    });
  });
}

int vz_emu_merge_backward(int grad_dtype, const void* grad, int64_t grad_sb, int64_t grad_sr, int metric_dtype,
                          const void* metric, int64_t metric_sb, int64_t metric_sn, int64_t* keep,
                          void* grad_hidden, int64_t B, int64_t N, int64_t C, int64_t d, int64_t D, int64_t K) {
  return guarded([&] {
    Scratch scratch(dense_plan_layout(B, N, K, d));
    const PlanPointers plan = scratch.pointers();
    const DenseImages images{B, N, D, K, d};
    const int rc = with_dtype(metric_dtype, [&](auto metric_tag, auto) {
      using metric_t = decltype(metric_tag);
      launch_plan<metric_t>(static_cast<const metric_t*>(metric), metric_sb, metric_sn, nullptr, keep, plan, images,
                            false, /*build_lists=*/false, nullptr);
    });
    if (rc != 0) return rc;
    return with_dtype(grad_dtype, [&](auto scalar_tag, auto acc_tag) {
      using scalar_t = decltype(scalar_tag);
      using acc_t = decltype(acc_tag);
      launch_merge_backward<scalar_t, acc_t>(static_cast<const scalar_t*>(grad), grad_sb, grad_sr, plan,
                                             static_cast<scalar_t*>(grad_hidden), images, C, nullptr);
    });
  });
}

// varlen_select_merge (backward == 0: data is hidden [T, C]; the tokens go to `out`, the kept indices
// to keep_out) or its backward (data is grad_tokens; grad_hidden goes to `out`), through the packed
// launches: cu [n + 1] and the budgets are host values, as the CUDA op has them after its checks;
// rows have unit last stride.
int vz_emu_varlen(int data_dtype, const void* data, int64_t data_sr, int metric_dtype, const void* metric,
                  int64_t metric_sn, const float* scores, const int64_t* cu, int64_t n, const int64_t* dominant,
                  const int64_t* contextual, int64_t C, int64_t d, int backward, void* out, int64_t* keep_out) {
  return guarded([&] {
    const PackedBatch batch = describe_packed(cu, n, dominant, contextual, d);
    Scratch scratch(packed_plan_layout(batch));
    const PlanPointers plan = scratch.pointers();
    const PackedImages images = packed_images(batch, batch.table.data(), backward ? nullptr : keep_out);
    std::vector<int64_t> keep(static_cast<size_t>(batch.dominant) + 1, -7);
    const int rc = with_dtype(metric_dtype, [&](auto metric_tag, auto) {
      using metric_t = decltype(metric_tag);
      launch_plan<metric_t>(static_cast<const metric_t*>(metric), 0, metric_sn, scores, keep.data(), plan, images, false,
                            /*build_lists=*/backward == 0, nullptr);
    });
    if (rc != 0) return rc;
    return with_dtype(data_dtype, [&](auto scalar_tag, auto acc_tag) {
      using scalar_t = decltype(scalar_tag);
      using acc_t = decltype(acc_tag);
      if (backward) {
        launch_merge_backward<scalar_t, acc_t>(static_cast<const scalar_t*>(data), 0, data_sr, plan,
                                               static_cast<scalar_t*>(out), images, C, nullptr);
      } else {
        launch_merge_forward<scalar_t, acc_t>(static_cast<const scalar_t*>(data), 0, data_sr, keep.data(), plan,
                                              static_cast<scalar_t*>(out), images, C, nullptr);
      }
    });
  });
}

// The merge launch geometry for `rows` rows of C channels at pack width vec:
// out = {grid.x, grid.y, grid.z, block.x, block.y, block.z}.
void vz_emu_row_launch(int64_t rows, int64_t C, int vec, int64_t* out) {
  const RowLaunch g = row_launch(rows, C, vec);
  const int64_t values[6] = {g.grid.x, g.grid.y, g.grid.z, g.block.x, g.block.y, g.block.z};
  for (int i = 0; i < 6; ++i) out[i] = values[i];
}

// The plan launch geometry: out = {select blocks, assign blocks, list blocks, unit bytes, unit in shared}.
void vz_emu_plan_launch(int64_t B, int64_t N, int64_t d, int64_t K, int64_t* out) {
  const PlanLaunch g = plan_launch(DenseImages{B, N, 1, K, d});
  const int64_t values[5] = {g.select_blocks, g.assign_blocks, g.list_blocks, static_cast<int64_t>(g.unit_bytes),
                             g.unit_in_shared ? 1 : 0};
  for (int i = 0; i < 5; ++i) out[i] = values[i];
}

int64_t vz_emu_channel_blocks(int64_t C, int vec) { return channel_blocks(C, vec).count; }

}  // extern "C"
