// CUDA kernels for contextual_merge (forward, backward) and select_merge.
//
// Three launches per call, all on the current stream, none reading a device value on the host, so
// the path can be captured in a CUDA graph:
//   1. plan:  one block per image. Roles of the tokens from keep, the ascending complement through a
//             block-wide prefix sum, the K strided targets, their unit metric, and each member's
//             most cosine-similar target (first maximum wins). select_merge runs the top-k in the
//             same block first (bisection over order-preserving score keys).
//   2. merge: one block per (output row, image, column chunk). Dominant rows are gathered;
//             contextual row i sums its members in ascending token order (no float atomics, fixed
//             order, deterministic) and adds the target. Vectorised 16-byte loads along C.
//   3. the backward: one block per (token, image, column chunk).
// Per-element arithmetic is shared with the CPU kernels through merge_math.h.
//
// Data-dependent input rules cannot be checked without a host sync. On CUDA, keep indices out of
// [0, N) are ignored (their dominant row is zero) and nothing is read or written out of bounds;
// non-finite scores rank by their key (NaN above +inf). The CPU kernels reject both.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "../checks.h"
#include "../merge_math.h"

namespace visionzip::cuda {
namespace {

constexpr int kPlanThreads = 256;

// Exclusive prefix sum of one int per thread over the block; returns the thread's prefix and
// writes the block total. Hillis-Steele over shared memory: blockDim.x == kPlanThreads.
__device__ int block_exclusive_scan(int value, int* total) {
  __shared__ int buffer[kPlanThreads];
  const int tid = threadIdx.x;
  buffer[tid] = value;
  __syncthreads();
  for (int offset = 1; offset < kPlanThreads; offset <<= 1) {
    const int add = tid >= offset ? buffer[tid - offset] : 0;
    __syncthreads();
    buffer[tid] += add;
    __syncthreads();
  }
  const int inclusive = buffer[tid];
  *total = buffer[kPlanThreads - 1];
  __syncthreads();
  return inclusive - value;
}

__device__ int block_count(int value) {
  __shared__ int sum;
  if (threadIdx.x == 0) sum = 0;
  __syncthreads();
  atomicAdd(&sum, value);  // integer atomics: the total does not depend on the order
  __syncthreads();
  const int result = sum;
  __syncthreads();
  return result;
}

// Top-k of one image's scores into keep (ascending), ties to the lower index. Each thread owns a
// contiguous chunk of tokens, so chunk order is token order and a scan over chunks orders ties.
__device__ void block_topk(const float* scores, int64_t n_tokens, int64_t dominant, bool keep_cls,
                           int64_t* keep) {
  const int64_t first = keep_cls ? 1 : 0;
  const int64_t picked = dominant - first;
  const int64_t chunk = (n_tokens + kPlanThreads - 1) / kPlanThreads;
  const int64_t begin = threadIdx.x * chunk;
  const int64_t end = begin + chunk < n_tokens ? begin + chunk : n_tokens;
  uint32_t threshold = 0;
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t candidate = threshold | (1u << bit);
    int local = 0;
    for (int64_t n = begin > first ? begin : first; n < end; ++n) local += score_key(scores[n]) >= candidate;
    if (block_count(local) >= picked) threshold = candidate;
  }
  int above = 0, ties = 0;
  for (int64_t n = begin > first ? begin : first; n < end; ++n) {
    const uint32_t key = score_key(scores[n]);
    above += key > threshold;
    ties += key == threshold;
  }
  int total_above = 0, total_ties = 0;
  const int above_before = block_exclusive_scan(above, &total_above);
  const int ties_before = block_exclusive_scan(ties, &total_ties);
  const int64_t ties_needed = picked - total_above;
  // Kept tokens before this chunk: all keys above the threshold, and the first ties_needed ties.
  int64_t position = first + above_before + (ties_before < ties_needed ? ties_before : ties_needed);
  int64_t tie_rank = ties_before;
  for (int64_t n = begin > first ? begin : first; n < end; ++n) {
    const uint32_t key = score_key(scores[n]);
    bool take = key > threshold;
    if (key == threshold) take = tie_rank++ < ties_needed;
    if (take) keep[position++] = n;
  }
  if (keep_cls && threadIdx.x == 0) keep[0] = 0;
  __syncthreads();
}


// Scratch of the plan, one row per image (allocated by the host, filled on the device).
struct PlanPointers {
  int8_t* role;          // [B, N] TokenRole
  int32_t* row;          // [B, N] output row, -1 when dropped
  int64_t* targets;      // [B, K] token of each target, -1 if none
  int32_t* counts;       // [B, K] members per target
  float* unit_targets;   // [B, K, d] unit metric of each target
};

__global__ void __launch_bounds__(kPlanThreads)
plan_kernel(const float* __restrict__ metric, const float* __restrict__ scores, int64_t* keep,
            PlanPointers plan, int64_t n_tokens, int64_t head_dim, int64_t dominant,
            int64_t contextual, bool keep_cls, bool select_first) {
  const int64_t b = blockIdx.x;
  const int64_t N = n_tokens, d = head_dim, D = dominant, K = contextual;
  int64_t* keep_b = keep + b * D;
  if (select_first) block_topk(scores + b * N, N, D, keep_cls, keep_b);

  int8_t* role = plan.role + b * N;
  int32_t* row = plan.row + b * N;
  int64_t* targets = plan.targets + b * K;
  int32_t* counts = plan.counts + b * K;
  float* unit = plan.unit_targets + b * K * d;
  const float* m_img = metric + b * N * d;

  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
    role[n] = K > 0 ? kMember : kDropped;
    row[n] = -1;
  }
  for (int64_t i = threadIdx.x; i < K; i += blockDim.x) {
    targets[i] = -1;
    counts[i] = 0;
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    const int64_t t = keep_b[i];
    if (t >= 0 && t < N) {
      role[t] = kDominant;
      row[t] = static_cast<int32_t>(i);
    }
  }
  __syncthreads();
  if (K == 0) return;

  // Positions of the not-kept tokens in ascending order: a scan over contiguous per-thread chunks.
  const int64_t chunk = (N + kPlanThreads - 1) / kPlanThreads;
  const int64_t begin = threadIdx.x * chunk;
  const int64_t end = begin + chunk < N ? begin + chunk : N;
  int rest_in_chunk = 0;
  for (int64_t n = begin; n < end; ++n) rest_in_chunk += role[n] != kDominant;
  int num_rest = 0;
  int64_t pos = block_exclusive_scan(rest_in_chunk, &num_rest);
  const int64_t step = target_step(num_rest, K);
  for (int64_t n = begin; n < end; ++n) {
    if (role[n] == kDominant) continue;
    const int64_t i = target_index(pos, step, K);
    if (i >= 0) {
      role[n] = kTarget;
      row[n] = static_cast<int32_t>(D + i);
      targets[i] = n;
    }
    ++pos;
  }
  __syncthreads();
  // Unit metric of each target: m / max(||m||, eps).
  for (int64_t i = threadIdx.x; i < K; i += blockDim.x) {
    const int64_t t = targets[i];
    float* u = unit + i * d;
    if (t < 0) {
      for (int64_t c = 0; c < d; ++c) u[c] = 0.f;
      continue;
    }
    const float* m = m_img + t * d;
    float sum_sq = 0.f;
    for (int64_t c = 0; c < d; ++c) sum_sq = add_product(sum_sq, m[c], m[c]);
    const float norm = clamped_norm(sum_sq);
    for (int64_t c = 0; c < d; ++c) u[c] = m[c] / norm;
  }
  __syncthreads();
  // Each member to its most similar target, the first maximum winning. The member's own norm
  // scales all K similarities alike, so it is skipped (as on the CPU).
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
    if (role[n] != kMember) continue;
    const float* m = m_img + n * d;
    int64_t best = 0;
    float best_sim = 0.f;
    for (int64_t i = 0; i < K; ++i) {
      const float* u = unit + i * d;
      float sim = 0.f;
      for (int64_t c = 0; c < d; ++c) sim = add_product(sim, m[c], u[c]);
      if (i == 0 || sim > best_sim) {
        best_sim = sim;
        best = i;
      }
    }
    row[n] = static_cast<int32_t>(D + best);
    atomicAdd(counts + best, 1);
  }
}

// Elements per 16-byte load.
template <typename scalar_t>
constexpr int kPack = static_cast<int>(16 / sizeof(scalar_t));

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

// One block per (output row, image, column chunk); each thread owns VEC consecutive channels.
template <typename scalar_t, int VEC>
__global__ void merge_forward_kernel(const scalar_t* __restrict__ hidden, scalar_t* __restrict__ tokens,
                                     const int64_t* __restrict__ keep, PlanPointers plan,
                                     int64_t n_tokens, int64_t channels, int64_t stride_hb,
                                     int64_t stride_hn, int64_t dominant, int64_t contextual) {
  using acc_t = at::opmath_type<scalar_t>;
  using pack_t = Pack<scalar_t, VEC>;
  const int64_t r = blockIdx.x, b = blockIdx.y;
  const int64_t c = (static_cast<int64_t>(blockIdx.z) * blockDim.x + threadIdx.x) * VEC;
  if (c >= channels) return;
  const int64_t D = dominant, K = contextual, N = n_tokens;
  const scalar_t* h_img = hidden + b * stride_hb + c;
  pack_t* out = reinterpret_cast<pack_t*>(tokens + (b * (D + K) + r) * channels + c);
  pack_t result;
  if (r < D) {
    const int64_t t = keep[b * D + r];
    if (t >= 0 && t < N) {
      result = *reinterpret_cast<const pack_t*>(h_img + t * stride_hn);
    } else {
      for (int j = 0; j < VEC; ++j) result.v[j] = scalar_t(0);
    }
    *out = result;
    return;
  }
  const int64_t i = r - D;
  const int8_t* role = plan.role + b * N;
  const int32_t* row = plan.row + b * N;
  acc_t sums[VEC];
  for (int j = 0; j < VEC; ++j) sums[j] = acc_t(0);
  for (int64_t n = 0; n < N; ++n) {  // ascending token order: a fixed summation order
    if (role[n] != kMember || row[n] != r) continue;
    const pack_t member = *reinterpret_cast<const pack_t*>(h_img + n * stride_hn);
    for (int j = 0; j < VEC; ++j) sums[j] += static_cast<acc_t>(member.v[j]);
  }
  const int64_t t = plan.targets[b * K + i];
  const acc_t divisor = member_divisor(plan.counts[b * K + i]);
  pack_t target;
  if (t >= 0) {
    target = *reinterpret_cast<const pack_t*>(h_img + t * stride_hn);
  } else {
    for (int j = 0; j < VEC; ++j) target.v[j] = scalar_t(0);
  }
  for (int j = 0; j < VEC; ++j) {
    result.v[j] = static_cast<scalar_t>(static_cast<acc_t>(target.v[j]) + sums[j] / divisor);
  }
  *out = result;
}

// One block per (token, image, column chunk): grad_hidden[b, n] from the row token n went to.
template <typename scalar_t, int VEC>
__global__ void merge_backward_kernel(const scalar_t* __restrict__ grad, scalar_t* __restrict__ grad_hidden,
                                      PlanPointers plan, int64_t n_tokens, int64_t channels,
                                      int64_t stride_gb, int64_t stride_gr, int64_t dominant,
                                      int64_t contextual) {
  using acc_t = at::opmath_type<scalar_t>;
  using pack_t = Pack<scalar_t, VEC>;
  const int64_t n = blockIdx.x, b = blockIdx.y;
  const int64_t c = (static_cast<int64_t>(blockIdx.z) * blockDim.x + threadIdx.x) * VEC;
  if (c >= channels) return;
  const int64_t N = n_tokens, K = contextual, D = dominant;
  const int8_t role = plan.role[b * N + n];
  const int32_t r = plan.row[b * N + n];
  pack_t* out = reinterpret_cast<pack_t*>(grad_hidden + (b * N + n) * channels + c);
  pack_t result;
  if (role == kDropped || r < 0) {
    for (int j = 0; j < VEC; ++j) result.v[j] = scalar_t(0);
  } else {
    const pack_t g = *reinterpret_cast<const pack_t*>(grad + b * stride_gb + r * stride_gr + c);
    if (role == kMember) {
      const acc_t divisor = member_divisor(plan.counts[b * K + (r - D)]);
      for (int j = 0; j < VEC; ++j) result.v[j] = static_cast<scalar_t>(static_cast<acc_t>(g.v[j]) / divisor);
    } else {
      result = g;
    }
  }
  *out = result;
}

// ---------------------------------------------------------------------------------------------
// Host side: checks, scratch allocation, launches. No device value is read on the host.

struct Plan {
  at::Tensor role, row, targets, counts, unit_targets;
  PlanPointers pointers() {
    return {role.data_ptr<int8_t>(), row.data_ptr<int32_t>(), targets.data_ptr<int64_t>(),
            counts.data_ptr<int32_t>(), unit_targets.data_ptr<float>()};
  }
};

Plan allocate_plan(const at::TensorOptions& options, int64_t B, int64_t N, int64_t K, int64_t d) {
  return {at::empty({B, N}, options.dtype(at::kChar)), at::empty({B, N}, options.dtype(at::kInt)),
          at::empty({B, K}, options.dtype(at::kLong)), at::empty({B, K}, options.dtype(at::kInt)),
          at::empty({B, K, d}, options.dtype(at::kFloat))};
}

// 16-byte packs where the layout allows them, else one element per thread.
template <typename scalar_t>
int pack_width(const void* base, int64_t channels, std::initializer_list<int64_t> strides) {
  constexpr int wide = kPack<scalar_t>;
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0 || channels % wide != 0) return 1;
  for (const int64_t s : strides) {
    if (s % wide != 0) return 1;
  }
  return wide;
}

// Calls launch with the pack width as a compile-time constant: 16-byte packs, or one element.
template <typename scalar_t, typename Launch>
void with_pack_width(int vec, Launch&& launch) {
  if (vec == 1) {
    launch(std::integral_constant<int, 1>{});
  } else {
    launch(std::integral_constant<int, kPack<scalar_t>>{});
  }
}

dim3 channel_grid(int64_t rows, int64_t batch, int64_t channels, int vec, int* threads) {
  const int64_t lanes = (channels + vec - 1) / vec;
  *threads = static_cast<int>(lanes < 256 ? ((lanes + 31) / 32) * 32 : 256);
  return dim3(static_cast<unsigned>(rows), static_cast<unsigned>(batch),
              static_cast<unsigned>((lanes + *threads - 1) / *threads));
}

at::Tensor unit_last_stride(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

template <typename scalar_t>
void launch_forward(const at::Tensor& hidden, at::Tensor& tokens, const at::Tensor& keep, Plan& plan,
                    int64_t D, int64_t K, cudaStream_t stream) {
  const int64_t B = hidden.size(0), N = hidden.size(1), C = hidden.size(2);
  const int vec = pack_width<scalar_t>(hidden.data_ptr(), C, {hidden.stride(0), hidden.stride(1)});
  int threads = 0;
  const dim3 grid = channel_grid(D + K, B, C, vec, &threads);
  with_pack_width<scalar_t>(vec, [&](auto vec_tag) {
    constexpr int V = decltype(vec_tag)::value;
    merge_forward_kernel<scalar_t, V><<<grid, threads, 0, stream>>>(
        hidden.data_ptr<scalar_t>(), tokens.data_ptr<scalar_t>(), keep.data_ptr<int64_t>(), plan.pointers(),
        N, C, hidden.stride(0), hidden.stride(1), D, K);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor merge(const at::Tensor& hidden_in, const at::Tensor& metric, const at::Tensor& scores,
                 at::Tensor& keep, int64_t D, int64_t K, bool keep_cls, bool select_first) {
  const at::Tensor hidden = unit_last_stride(hidden_in);
  const int64_t B = hidden.size(0), N = hidden.size(1), C = hidden.size(2), d = metric.size(2);
  at::Tensor tokens = at::empty({B, D + K, C}, hidden.options());
  if (B == 0) return tokens;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor metric_f32 = metric.to(at::kFloat).contiguous();
  const at::Tensor scores_f32 = select_first ? scores.to(at::kFloat).contiguous() : metric_f32;
  Plan plan = allocate_plan(hidden.options(), B, N, K, d);
  plan_kernel<<<static_cast<unsigned>(B), kPlanThreads, 0, stream>>>(
      metric_f32.data_ptr<float>(), scores_f32.data_ptr<float>(), keep.data_ptr<int64_t>(), plan.pointers(), N, d,
      D, K, keep_cls, select_first);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "contextual_merge_cuda", [&] {
    launch_forward<scalar_t>(hidden, tokens, keep, plan, D, K, stream);
  });
  return tokens;
}

at::Tensor contextual_merge_cuda(const at::Tensor& hidden, const at::Tensor& metric, const at::Tensor& keep_in,
                                 int64_t contextual) {
  check_contextual_merge_args(hidden, metric, keep_in, contextual);
  const c10::cuda::CUDAGuard guard(hidden.device());
  at::Tensor keep = keep_in.contiguous();
  return merge(hidden, metric, metric, keep, keep.size(1), contextual, false, false);
}

std::tuple<at::Tensor, at::Tensor> select_merge_cuda(const at::Tensor& hidden, const at::Tensor& scores,
                                                     const at::Tensor& metric, int64_t dominant,
                                                     int64_t contextual, bool keep_cls) {
  check_select_merge_args(hidden, scores, metric, dominant, contextual, keep_cls);
  const c10::cuda::CUDAGuard guard(hidden.device());
  at::Tensor keep = at::empty({hidden.size(0), dominant}, hidden.options().dtype(at::kLong));
  at::Tensor tokens = merge(hidden, metric, scores, keep, dominant, contextual, keep_cls, true);
  return {tokens, keep};
}

at::Tensor contextual_merge_backward_cuda(const at::Tensor& grad_in, const at::Tensor& metric,
                                          const at::Tensor& keep_in, int64_t num_tokens) {
  check_contextual_merge_backward_args(grad_in, metric, keep_in, num_tokens);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = unit_last_stride(grad_in);
  at::Tensor keep = keep_in.contiguous();
  const int64_t B = grad.size(0), C = grad.size(2), D = keep.size(1), K = grad.size(1) - D;
  const int64_t N = num_tokens, d = metric.size(2);
  at::Tensor grad_hidden = at::empty({B, N, C}, grad.options());
  if (B == 0) return grad_hidden;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor metric_f32 = metric.to(at::kFloat).contiguous();
  Plan plan = allocate_plan(grad.options(), B, N, K, d);
  plan_kernel<<<static_cast<unsigned>(B), kPlanThreads, 0, stream>>>(
      metric_f32.data_ptr<float>(), metric_f32.data_ptr<float>(), keep.data_ptr<int64_t>(), plan.pointers(), N, d,
      D, K, false, false);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "contextual_merge_backward_cuda", [&] {
    const int vec = pack_width<scalar_t>(grad.data_ptr(), C, {grad.stride(0), grad.stride(1)});
    int threads = 0;
    const dim3 grid = channel_grid(N, B, C, vec, &threads);
    with_pack_width<scalar_t>(vec, [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      merge_backward_kernel<scalar_t, V><<<grid, threads, 0, stream>>>(
          grad.data_ptr<scalar_t>(), grad_hidden.data_ptr<scalar_t>(), plan.pointers(), N, C, grad.stride(0),
          grad.stride(1), D, K);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_hidden;
}

}  // namespace

TORCH_LIBRARY_IMPL(visionzip, CUDA, m) {
  m.impl("contextual_merge", &contextual_merge_cuda);
  m.impl("contextual_merge_backward", &contextual_merge_backward_cuda);
  m.impl("select_merge", &select_merge_cuda);
}

}  // namespace visionzip::cuda
