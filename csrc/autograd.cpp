// Autograd of the differentiable ops (docs/SPEC.md "Gradients"), registered in C++ under the Autograd key so
// that a call with no input requiring grad goes from the dispatcher to the kernel without entering
// Python (a Python autograd kernel costs microseconds a call). Device-agnostic: the kernels below
// are reached through the dispatcher, so CPU and CUDA share these formulas.
//
// tokens is linear in hidden once keep and the assignment are fixed: the backward recomputes the
// assignment from (metric, keep) instead of keeping plan tensors alive between forward and backward.
// The backward is linear too, and its adjoint is the forward merge, so double backward is one
// contextual_merge of the incoming gradient.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

namespace visionzip {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_contextual_merge(const at::Tensor& hidden, const at::Tensor& metric,
                                 const at::Tensor& keep, int64_t contextual) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("visionzip::contextual_merge", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, int64_t)>();
  return op.call(hidden, metric, keep, contextual);
}

at::Tensor call_contextual_merge_backward(const at::Tensor& grad_tokens, const at::Tensor& metric,
                                          const at::Tensor& keep, int64_t num_tokens) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("visionzip::contextual_merge_backward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, int64_t)>();
  return op.call(grad_tokens, metric, keep, num_tokens);
}

std::tuple<at::Tensor, at::Tensor> call_select_merge(const at::Tensor& hidden,
                                                     const at::Tensor& scores,
                                                     const at::Tensor& metric, int64_t dominant,
                                                     int64_t contextual, bool keep_cls) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("visionzip::select_merge", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, int64_t, int64_t, bool)>();
  return op.call(hidden, scores, metric, dominant, contextual, keep_cls);
}

// The token count as a plain int: concrete in eager mode, specialised under torch.compile (the
// schemas take int, not SymInt).
int64_t token_count(const at::Tensor& t) { return t.sym_size(1).guard_int(__FILE__, __LINE__); }

class ContextualMerge : public torch::autograd::Function<ContextualMerge> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& metric,
                            const at::Tensor& keep, int64_t contextual) {
    ctx->save_for_backward({metric, keep});
    ctx->saved_data["num_tokens"] = token_count(hidden);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_contextual_merge(hidden, metric, keep, contextual);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const int64_t num_tokens = ctx->saved_data["num_tokens"].toInt();
    return {call_contextual_merge_backward(grads[0], saved[0], saved[1], num_tokens), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

class ContextualMergeBackward : public torch::autograd::Function<ContextualMergeBackward> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad_tokens,
                            const at::Tensor& metric, const at::Tensor& keep, int64_t num_tokens) {
    ctx->save_for_backward({metric, keep});
    ctx->saved_data["contextual"] = token_count(grad_tokens) - token_count(keep);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_contextual_merge_backward(grad_tokens, metric, keep, num_tokens);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const int64_t contextual = ctx->saved_data["contextual"].toInt();
    return {call_contextual_merge(grads[0], saved[0], saved[1], contextual), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

class SelectMerge : public torch::autograd::Function<SelectMerge> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& hidden,
                               const at::Tensor& scores, const at::Tensor& metric, int64_t dominant,
                               int64_t contextual, bool keep_cls) {
    const int64_t num_tokens = token_count(hidden);
    at::Tensor tokens, keep;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(tokens, keep) =
          call_select_merge(hidden, scores, metric, dominant, contextual, keep_cls);
    }
    ctx->save_for_backward({metric, keep});
    ctx->saved_data["num_tokens"] = num_tokens;
    ctx->mark_non_differentiable({keep});
    return {tokens, keep};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const int64_t num_tokens = ctx->saved_data["num_tokens"].toInt();
    return {call_contextual_merge_backward(grads[0], saved[0], saved[1], num_tokens), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Only the first tensor argument is differentiable; without it needing a gradient, the call goes
// straight to the kernel below the autograd keys (no graph node, no saved tensors).
bool needs_grad(const at::Tensor& differentiable) {
  return at::GradMode::is_enabled() && differentiable.requires_grad();
}

at::Tensor contextual_merge_autograd(const at::Tensor& hidden, const at::Tensor& metric,
                                     const at::Tensor& keep, int64_t contextual) {
  if (!needs_grad(hidden)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_contextual_merge(hidden, metric, keep, contextual);
  }
  return ContextualMerge::apply(hidden, metric, keep, contextual);
}

at::Tensor contextual_merge_backward_autograd(const at::Tensor& grad_tokens,
                                              const at::Tensor& metric, const at::Tensor& keep,
                                              int64_t num_tokens) {
  if (!needs_grad(grad_tokens)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_contextual_merge_backward(grad_tokens, metric, keep, num_tokens);
  }
  return ContextualMergeBackward::apply(grad_tokens, metric, keep, num_tokens);
}

std::tuple<at::Tensor, at::Tensor> select_merge_autograd(const at::Tensor& hidden,
                                                         const at::Tensor& scores,
                                                         const at::Tensor& metric,
                                                         int64_t dominant, int64_t contextual,
                                                         bool keep_cls) {
  if (!needs_grad(hidden)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_select_merge(hidden, scores, metric, dominant, contextual, keep_cls);
  }
  const variable_list out =
      SelectMerge::apply(hidden, scores, metric, dominant, contextual, keep_cls);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(visionzip, Autograd, m) {
  // The score ops and the top-k are not differentiable (docs/SPEC.md "Gradients": q, k, scores and metric get
  // no gradient; the selection is discrete): falling through the autograd key, their outputs never
  // require grad, whatever their inputs do, and backward never meets them.
  for (const char* op : {"cls_attention", "attention_received", "scores_and_metric", "dominant_topk",
                         "varlen_scores_and_metric"}) {
    m.impl(op, torch::CppFunction::makeFallthrough());
  }
  m.impl("contextual_merge", &contextual_merge_autograd);
  m.impl("contextual_merge_backward", &contextual_merge_backward_autograd);
  m.impl("select_merge", &select_merge_autograd);
}

}  // namespace visionzip
