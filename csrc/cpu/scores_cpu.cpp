// CPU kernels for the token scores: cls_attention, attention_received and scores_and_metric.
// fp32 math for every input dtype; deterministic (each output element is produced by one task in a
// fixed order, so the bits do not depend on the thread count).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../merge_math.h"
#include "attention_tiles.h"
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

// The metric row of one token, on its own.
template <typename scalar_t>
void head_mean_row(const scalar_t* k_row, int64_t H, int64_t d, int64_t head_stride, metric_acc_t<scalar_t>* acc,
                   scalar_t* metric_row) {
  using acc_t = metric_acc_t<scalar_t>;
  std::fill(acc, acc + d, acc_t(0));
  for (int64_t h = 0; h < H; ++h) {
    const scalar_t* k_head = k_row + h * head_stride;
    for (int64_t c = 0; c < d; ++c) acc[c] += static_cast<acc_t>(k_head[c]);
  }
  write_head_mean(acc, H, d, metric_row);
}

// One token: its CLS logit for every head (dot_lanes' lane order, so the same bits) and the head sum
// of its key rows in head order into acc (zeroed by the caller), each key row read once.
template <typename scalar_t>
void token_logits_and_key_sum(const float* __restrict queries, const scalar_t* __restrict k_row, int64_t H, int64_t d,
                              int64_t head_stride, float scale, float* __restrict logits, int64_t logits_head_stride,
                              metric_acc_t<scalar_t>* __restrict acc) {
  using acc_t = metric_acc_t<scalar_t>;
  for (int64_t h = 0; h < H; ++h) {
    const scalar_t* __restrict k_head = k_row + h * head_stride;
    const float* __restrict q = queries + h * d;
    float lanes[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    int64_t c = 0;
    for (; c + 8 <= d; c += 8) {
      for (int j = 0; j < 8; ++j) {
        lanes[j] += q[c + j] * static_cast<float>(k_head[c + j]);
        acc[c + j] += static_cast<acc_t>(k_head[c + j]);
      }
    }
    for (int j = 0; c < d; ++c, ++j) {
      lanes[j] += q[c] * static_cast<float>(k_head[c]);
      acc[c] += static_cast<acc_t>(k_head[c]);
    }
    const float dot = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    logits[h * logits_head_stride] = dot * scale;
  }
}

// One pass over k, token-major (each key row is read once, contiguously): the CLS logits
// logits[b, h, j] = scale * q_cls[b, h] . k[b, j, h], and, when metric is given, the head-mean key.
// Tasks are (image, token chunk); every output element is written by one task.
template <typename scalar_t>
void cls_logits_and_metric(const scalar_t* q_ptr, int64_t qs0, int64_t qs1, const at::Tensor& k, float scale,
                           float* logits, scalar_t* metric) {
  const int64_t B = k.size(0), N = k.size(1), H = k.size(2), d = k.size(3);
  const scalar_t* k_ptr = k.const_data_ptr<scalar_t>();
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  constexpr int64_t kChunk = 64;
  const int64_t chunks = (N + kChunk - 1) / kChunk;
  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> queries(H * d);
    std::vector<metric_acc_t<scalar_t>> acc(d);
    int64_t loaded = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, j0 = task % chunks * kChunk, j1 = std::min(N, j0 + kChunk);
      if (b != loaded) {
        for (int64_t h = 0; h < H; ++h) {
          for (int64_t c = 0; c < d; ++c) queries[h * d + c] = static_cast<float>(q_ptr[b * qs0 + h * qs1 + c]);
        }
        loaded = b;
      }
      for (int64_t j = j0; j < j1; ++j) {
        const scalar_t* k_row = k_ptr + b * ks0 + j * ks1;
        if (metric == nullptr) {
          for (int64_t h = 0; h < H; ++h) {
            logits[(b * H + h) * N + j] = dot_lanes(queries.data() + h * d, k_row + h * ks2, d) * scale;
          }
          continue;
        }
        std::fill(acc.begin(), acc.end(), metric_acc_t<scalar_t>(0));
        token_logits_and_key_sum(queries.data(), k_row, H, d, ks2, scale, logits + b * H * N + j, N, acc.data());
        write_head_mean(acc.data(), H, d, metric + (b * N + j) * d);
      }
    }
  });
}

// logits [B*H, N] -> softmax of each row, in place, one task per row.
void softmax_rows(float* logits, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) softmax_inplace(logits + r * n, n);
  });
}

// metric [B, N, d] = k averaged over heads, one task per token range.
template <typename scalar_t>
void head_mean(const at::Tensor& k, scalar_t* metric) {
  const int64_t B = k.size(0), N = k.size(1), H = k.size(2), d = k.size(3);
  const scalar_t* k_ptr = k.const_data_ptr<scalar_t>();
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  at::parallel_for(0, B * N, 64, [&](int64_t begin, int64_t end) {
    std::vector<metric_acc_t<scalar_t>> acc(d);
    for (int64_t bn = begin; bn < end; ++bn) {
      head_mean_row(k_ptr + bn / N * ks0 + bn % N * ks1, H, d, ks2, acc.data(), metric + bn * d);
    }
  });
}

template <typename scalar_t>
void attention_received_kernel(const at::Tensor& q, const at::Tensor& k, float scale, at::Tensor& per_head) {
  const int64_t B = k.size(0), N = k.size(1), H = k.size(2), d = k.size(3);
  const scalar_t* q_ptr = q.data_ptr<scalar_t>();
  const scalar_t* k_ptr = k.data_ptr<scalar_t>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  float* column_sums = per_head.data_ptr<float>();
  // One task per (image, head), never an N x N map (received_one_head, attention_tiles.h).
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    ReceivedScratch scratch(N, d);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      received_one_head(q_ptr + b * qs0 + h * qs2, qs1, k_ptr + b * ks0 + h * ks2, ks1, N, d, scale, scratch,
                        column_sums + bh * N);
    }
  });
}

// CLS scores [B, N] from q_cls [B, H, d] (any row strides), and the metric when wanted.
at::Tensor cls_scores(const at::Tensor& q_cls, const at::Tensor& k, double scale, at::Tensor* metric) {
  const int64_t B = k.size(0), N = k.size(1), H = k.size(2);
  at::Tensor out = at::empty({B, N}, k.options().dtype(at::kFloat));
  if (B == 0) return out;
  at::Tensor per_head = at::empty({B, H, N}, out.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "cls_attention", [&] {
    cls_logits_and_metric<scalar_t>(q_cls.const_data_ptr<scalar_t>(), q_cls.stride(0), q_cls.stride(1), k,
                                    static_cast<float>(scale), per_head.data_ptr<float>(),
                                    metric ? metric->data_ptr<scalar_t>() : nullptr);
  });
  softmax_rows(per_head.data_ptr<float>(), B * H, N);
  mean_over_heads(per_head, out, static_cast<float>(H));
  return out;
}

at::Tensor cls_attention_cpu(const at::Tensor& q_cls_in, const at::Tensor& k_in, double scale) {
  check_cls_attention_args(q_cls_in, k_in);
  return cls_scores(with_unit_last_stride(q_cls_in), with_unit_last_stride(k_in), scale, nullptr);
}

at::Tensor received_scores(const at::Tensor& q, const at::Tensor& k, double scale) {
  const int64_t B = k.size(0), N = k.size(1), H = k.size(2);
  at::Tensor out = at::empty({B, N}, k.options().dtype(at::kFloat));
  if (B == 0) return out;
  at::Tensor per_head = at::empty({B, H, N}, out.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "attention_received", [&] {
    attention_received_kernel<scalar_t>(q, k, static_cast<float>(scale), per_head);
  });
  mean_over_heads(per_head, out, static_cast<float>(H) * static_cast<float>(N));
  return out;
}

at::Tensor attention_received_cpu(const at::Tensor& q_in, const at::Tensor& k_in, double scale) {
  check_attention_received_args(q_in, k_in);
  return received_scores(with_unit_last_stride(q_in), with_unit_last_stride(k_in), scale);
}

std::tuple<at::Tensor, at::Tensor> scores_and_metric_cpu(const at::Tensor& q_in, const at::Tensor& k_in, double scale,
                                                         bool keep_cls) {
  check_scores_and_metric_args(q_in, k_in, keep_cls);
  const at::Tensor q = with_unit_last_stride(q_in);
  const at::Tensor k = with_unit_last_stride(k_in);
  at::Tensor metric = at::empty({k.size(0), k.size(1), k.size(3)}, k.options());
  if (k.size(0) == 0) return {at::empty({0, k.size(1)}, k.options().dtype(at::kFloat)), metric};
  if (keep_cls) {
    // The CLS row of q as a [B, H, d] view; the metric comes out of the same pass over k.
    at::Tensor scores = cls_scores(q.select(1, 0), k, scale, &metric);
    return {scores, metric};
  }
  // attention_received reads k once per (image, head) task; the metric is one more pass.
  at::Tensor scores = received_scores(q, k, scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "scores_and_metric",
                                  [&] { head_mean<scalar_t>(k, metric.data_ptr<scalar_t>()); });
  return {scores, metric};
}

}  // namespace

TORCH_LIBRARY_IMPL(visionzip, CPU, m) {
  m.impl("cls_attention", &cls_attention_cpu);
  m.impl("attention_received", &attention_received_cpu);
  m.impl("scores_and_metric", &scores_and_metric_cpu);
}

}  // namespace visionzip::cpu
