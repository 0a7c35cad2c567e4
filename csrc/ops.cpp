// The one schema block of the visionzip library. Backends register kernels with TORCH_LIBRARY_IMPL
// (csrc/cpu, csrc/cuda); autograd is registered in C++ (csrc/autograd.cpp) so that inference calls
// run no Python, and the fake kernels from Python (visionzip_kernels/ops.py), as pytorch/extension-cpp
// shows both.
#include <torch/library.h>

TORCH_LIBRARY(visionzip, m) {
  // [B,H,d], [B,N,H,d] -> [B,N] fp32: head-mean softmax attention of the CLS query.
  m.def("cls_attention(Tensor q_cls, Tensor k, float scale) -> Tensor");
  // [B,N,H,d] x2 -> [B,N] fp32: attention each token receives, mean over heads and queries.
  m.def("attention_received(Tensor q, Tensor k, float scale) -> Tensor");
  // q [B,M,H,d], k [B,N,H,d] -> (scores [B,N] fp32, metric [B,N,d] in k's dtype), k read once for
  // both: keep_cls=True gives cls_attention of q[:, 0] (M >= 1), keep_cls=False attention_received
  // (M = N); the metric is k averaged over heads.
  m.def(
      "scores_and_metric(Tensor q, Tensor k, float scale, bool keep_cls=True)"
      " -> (Tensor scores, Tensor metric)");
  // [B,N] -> keep [B,D] int64, ascending.
  m.def("dominant_topk(Tensor scores, int dominant, bool keep_cls=True) -> Tensor");
  // [B,N,C], [B,N,d], [B,D] -> [B,D+K,C].
  m.def("contextual_merge(Tensor hidden, Tensor metric, Tensor keep, int contextual) -> Tensor");
  // [B,D+K,C] -> grad of hidden [B,N,C], N = num_tokens.
  m.def(
      "contextual_merge_backward(Tensor grad_tokens, Tensor metric, Tensor keep, int num_tokens)"
      " -> Tensor");
  // dominant_topk followed by contextual_merge: -> ([B,D+K,C], [B,D]).
  m.def(
      "select_merge(Tensor hidden, Tensor scores, Tensor metric, int dominant, int contextual,"
      " bool keep_cls=True) -> (Tensor tokens, Tensor keep)");
  // Packed (varlen) scores: q, k [T,H,d] of images concatenated along T, image i = tokens
  // cu_seqlens[i]..cu_seqlens[i+1]; attention within each image only; pooled over groups of `unit`
  // consecutive tokens (1 or 4) -> (scores [T/unit] fp32, metric [T/unit, d] in k's dtype).
  m.def(
      "varlen_scores_and_metric(Tensor q, Tensor k, Tensor cu_seqlens, float scale, int unit=1)"
      " -> (Tensor scores, Tensor metric)");
  // Packed images (cu_seqlens [n+1] over T) with per-image budgets; per image the dense select_merge
  // with keep_cls=False, kept tokens in original order: hidden [T,C], scores [T], metric [T,d] ->
  // (tokens [sum(D_i+K_i),C], keep [sum(D_i+K_i)] int64 packed indices, cu_seqlens_out [n+1]).
  // The budgets are SymInt[] so that torch.compile traces them as symbols instead of specialising on
  // every budget list (the kernels take plain int lists: the dispatcher converts at the call).
  m.def(
      "varlen_select_merge(Tensor hidden, Tensor scores, Tensor metric, Tensor cu_seqlens,"
      " SymInt[] dominant, SymInt[] contextual) -> (Tensor tokens, Tensor keep, Tensor cu_seqlens_out)");
  // [sum(D_i+K_i),C] -> grad of hidden [T,C] (T = scores.size(0)); recomputes the selection.
  m.def(
      "varlen_select_merge_backward(Tensor grad_tokens, Tensor scores, Tensor metric,"
      " Tensor cu_seqlens, SymInt[] dominant, SymInt[] contextual) -> Tensor");
}
