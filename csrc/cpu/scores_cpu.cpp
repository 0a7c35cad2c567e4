// CPU kernels for the token scores: cls_attention and attention_received.
// fp32 math for every input dtype; deterministic (each output element is produced by one task in a
// fixed order, so the bits do not depend on the thread count).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../checks.h"
#include "tensor_views.h"

namespace visionzip::cpu {
namespace {

// Turns logits[0..n) into softmax probabilities in place.
void softmax_inplace(float* logits, int64_t n) {
  float max_logit = -INFINITY;
  for (int64_t j = 0; j < n; ++j) max_logit = std::max(max_logit, logits[j]);
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    logits[j] = std::exp(logits[j] - max_logit);
    sum += logits[j];
  }
  for (int64_t j = 0; j < n; ++j) logits[j] /= sum;
}

// q . k over d with eight independent partial sums (a fixed order, so the bits do not depend on
// anything but the inputs), which lets the compiler vectorise what a single running sum cannot.
template <typename scalar_t>
float dot_lanes(const float* q, const scalar_t* k, int64_t d) {
  float lanes[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t c = 0;
  for (; c + 8 <= d; c += 8) {
    for (int j = 0; j < 8; ++j) lanes[j] += q[c + j] * static_cast<float>(k[c + j]);
  }
  for (int j = 0; c < d; ++c, ++j) lanes[j] += q[c] * static_cast<float>(k[c]);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

// probs [B, H, N] fp32 -> out [B, N]: mean over heads, heads summed in order.
void mean_over_heads(const at::Tensor& per_head, at::Tensor& out, float divisor) {
  const int64_t B = per_head.size(0), H = per_head.size(1), N = per_head.size(2);
  const float* src = per_head.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, B * N, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t bn = begin; bn < end; ++bn) {
      const int64_t b = bn / N, j = bn % N;
      float sum = 0.f;
      for (int64_t h = 0; h < H; ++h) sum += src[(b * H + h) * N + j];
      dst[bn] = sum / divisor;
    }
  });
}

template <typename scalar_t>
void cls_attention_kernel(const at::Tensor& q_cls, const at::Tensor& k, float scale,
                          at::Tensor& per_head) {
  const int64_t B = k.size(0), N = k.size(1), H = k.size(2), d = k.size(3);
  const scalar_t* q_ptr = q_cls.data_ptr<scalar_t>();
  const scalar_t* k_ptr = k.data_ptr<scalar_t>();
  const int64_t qs0 = q_cls.stride(0), qs1 = q_cls.stride(1);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  float* probs = per_head.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query(d);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const scalar_t* q_row = q_ptr + b * qs0 + h * qs1;
      for (int64_t c = 0; c < d; ++c) query[c] = static_cast<float>(q_row[c]);
      float* logits = probs + bh * N;
      for (int64_t j = 0; j < N; ++j) {
        logits[j] = dot_lanes(query.data(), k_ptr + b * ks0 + j * ks1 + h * ks2, d) * scale;
      }
      softmax_inplace(logits, N);
    }
  });
}

template <typename scalar_t>
void attention_received_kernel(const at::Tensor& q, const at::Tensor& k, float scale,
                               at::Tensor& per_head) {
  const int64_t B = k.size(0), N = k.size(1), H = k.size(2), d = k.size(3);
  const scalar_t* q_ptr = q.data_ptr<scalar_t>();
  const scalar_t* k_ptr = k.data_ptr<scalar_t>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  float* column_sums = per_head.data_ptr<float>();
  // One task per (image, head): one query row of logits at a time, never an N x N map. The keys
  // are transposed to [d, N] so that the logits loop runs over contiguous j and vectorises.
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> keys_t(d * N), logits(N), query(d);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      for (int64_t j = 0; j < N; ++j) {
        const scalar_t* k_row = k_ptr + b * ks0 + j * ks1 + h * ks2;
        for (int64_t c = 0; c < d; ++c) keys_t[c * N + j] = static_cast<float>(k_row[c]);
      }
      float* received = column_sums + bh * N;
      std::fill(received, received + N, 0.f);
      for (int64_t i = 0; i < N; ++i) {
        const scalar_t* q_row = q_ptr + b * qs0 + i * qs1 + h * qs2;
        for (int64_t c = 0; c < d; ++c) query[c] = static_cast<float>(q_row[c]) * scale;
        std::fill(logits.begin(), logits.end(), 0.f);
        for (int64_t c = 0; c < d; ++c) {
          const float qc = query[c];
          const float* k_col = keys_t.data() + c * N;
          for (int64_t j = 0; j < N; ++j) logits[j] += qc * k_col[j];
        }
        softmax_inplace(logits.data(), N);
        for (int64_t j = 0; j < N; ++j) received[j] += logits[j];
      }
    }
  });
}

at::Tensor cls_attention_cpu(const at::Tensor& q_cls_in, const at::Tensor& k_in, double scale) {
  check_cls_attention_args(q_cls_in, k_in);
  const at::Tensor q_cls = with_unit_last_stride(q_cls_in);
  const at::Tensor k = with_unit_last_stride(k_in);
  const int64_t B = k.size(0), N = k.size(1), H = k.size(2);
  at::Tensor out = at::empty({B, N}, k.options().dtype(at::kFloat));
  if (B == 0) return out;
  at::Tensor per_head = at::empty({B, H, N}, out.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "cls_attention", [&] {
    cls_attention_kernel<scalar_t>(q_cls, k, static_cast<float>(scale), per_head);
  });
  mean_over_heads(per_head, out, static_cast<float>(H));
  return out;
}

at::Tensor attention_received_cpu(const at::Tensor& q_in, const at::Tensor& k_in, double scale) {
  check_attention_received_args(q_in, k_in);
  const at::Tensor q = with_unit_last_stride(q_in);
  const at::Tensor k = with_unit_last_stride(k_in);
  const int64_t B = k.size(0), N = k.size(1), H = k.size(2);
  at::Tensor out = at::empty({B, N}, k.options().dtype(at::kFloat));
  if (B == 0) return out;
  at::Tensor per_head = at::empty({B, H, N}, out.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "attention_received",
                                  [&] {
                                    attention_received_kernel<scalar_t>(
                                        q, k, static_cast<float>(scale), per_head);
                                  });
  mean_over_heads(per_head, out, static_cast<float>(H) * static_cast<float>(N));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(visionzip, CPU, m) {
  m.impl("cls_attention", &cls_attention_cpu);
  m.impl("attention_received", &attention_received_cpu);
}

}  // namespace visionzip::cpu
