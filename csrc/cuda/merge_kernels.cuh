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
// The parts, each in its own header: common.cuh (launch macros, constants), images.cuh (the image
// policies and the packed table), scratch.cuh (the plan scratch and its layout), launch_geometry.cuh,
// block_primitives.cuh (scan, radix select), plan_kernels.cuh and row_kernels.cuh. This header adds
// the host launchers that run them in order.

#include <cstdint>

#include "common.cuh"
#include "images.cuh"
#include "launch_geometry.cuh"
#include "plan_kernels.cuh"
#include "row_kernels.cuh"
#include "scratch.cuh"

namespace visionzip::cuda {

// Launchers (host). The caller allocates the plan scratch (dense_plan_layout, packed_plan_layout)
// and checks launch errors. `images` is DenseImages or PackedImages.

// The plan: 1a, then (some K > 0) 1b, then (build_lists) 1c. build_lists: the forward needs the
// member lists, the backward only the rows and counts.
template <typename metric_t, typename Images>
void launch_plan(const metric_t* metric, int64_t metric_sb, int64_t metric_sn, const float* scores, int64_t* keep,
                 PlanPointers plan, const Images& images, bool keep_cls, bool build_lists, cudaStream_t stream) {
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
