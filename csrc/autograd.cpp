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

at::Tensor call_contextual_merge(const at::Tensor& hidden, const at::Tensor& metric, const at::Tensor& keep,
                                 int64_t contextual) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("visionzip::contextual_merge", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(hidden, metric, keep, contextual);
}

at::Tensor call_contextual_merge_backward(const at::Tensor& grad_tokens, const at::Tensor& metric,
                                          const at::Tensor& keep, int64_t num_tokens) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("visionzip::contextual_merge_backward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(grad_tokens, metric, keep, num_tokens);
}

std::tuple<at::Tensor, at::Tensor> call_select_merge(const at::Tensor& hidden, const at::Tensor& scores,
                                                     const at::Tensor& metric, int64_t dominant, int64_t contextual,
                                                     bool keep_cls) {
  static const auto op = c10::Dispatcher::singleton()
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
    return {call_contextual_merge_backward(grads[0], saved[0], saved[1], num_tokens), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

class ContextualMergeBackward : public torch::autograd::Function<ContextualMergeBackward> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad_tokens, const at::Tensor& metric,
                            const at::Tensor& keep, int64_t num_tokens) {
    ctx->save_for_backward({metric, keep});
    ctx->saved_data["contextual"] = token_count(grad_tokens) - token_count(keep);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_contextual_merge_backward(grad_tokens, metric, keep, num_tokens);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const int64_t contextual = ctx->saved_data["contextual"].toInt();
    return {call_contextual_merge(grads[0], saved[0], saved[1], contextual), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class SelectMerge : public torch::autograd::Function<SelectMerge> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& scores,
                               const at::Tensor& metric, int64_t dominant, int64_t contextual, bool keep_cls) {
    const int64_t num_tokens = token_count(hidden);
    at::Tensor tokens, keep;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(tokens, keep) = call_select_merge(hidden, scores, metric, dominant, contextual, keep_cls);
    }
    ctx->save_for_backward({metric, keep});
    ctx->saved_data["num_tokens"] = num_tokens;
    ctx->mark_non_differentiable({keep});
    return {tokens, keep};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const int64_t num_tokens = ctx->saved_data["num_tokens"].toInt();
    return {call_contextual_merge_backward(grads[0], saved[0], saved[1], num_tokens),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

// Only the first tensor argument is differentiable; without it needing a gradient, the call goes
// straight to the kernel below the autograd keys (no graph node, no saved tensors).
bool needs_grad(const at::Tensor& differentiable) {
  return at::GradMode::is_enabled() && differentiable.requires_grad();
}

at::Tensor contextual_merge_autograd(const at::Tensor& hidden, const at::Tensor& metric, const at::Tensor& keep,
                                     int64_t contextual) {
  if (!needs_grad(hidden)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_contextual_merge(hidden, metric, keep, contextual);
  }
  return ContextualMerge::apply(hidden, metric, keep, contextual);
}

at::Tensor contextual_merge_backward_autograd(const at::Tensor& grad_tokens, const at::Tensor& metric,
                                              const at::Tensor& keep, int64_t num_tokens) {
  if (!needs_grad(grad_tokens)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_contextual_merge_backward(grad_tokens, metric, keep, num_tokens);
  }
  return ContextualMergeBackward::apply(grad_tokens, metric, keep, num_tokens);
}

std::tuple<at::Tensor, at::Tensor> select_merge_autograd(const at::Tensor& hidden, const at::Tensor& scores,
                                                         const at::Tensor& metric, int64_t dominant, int64_t contextual,
                                                         bool keep_cls) {
  if (!needs_grad(hidden)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_select_merge(hidden, scores, metric, dominant, contextual, keep_cls);
  }
  const variable_list out = SelectMerge::apply(hidden, scores, metric, dominant, contextual, keep_cls);
  return {out[0], out[1]};
}

// ---------------------------------------------------------------------------------------------
// varlen_select_merge: the same formulas per image. The backward recomputes the selection from the
// saved scores and metric (like the dense backward recomputes the assignment); the backward op is
// linear with the forward's tokens as its adjoint, so double backward is one forward call.

using VarlenOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

VarlenOutputs call_varlen_select_merge(const at::Tensor& hidden, const at::Tensor& scores, const at::Tensor& metric,
                                       const at::Tensor& cu_seqlens, c10::SymIntArrayRef dominant,
                                       c10::SymIntArrayRef contextual) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("visionzip::varlen_select_merge", "")
                             .typed<VarlenOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                  const at::Tensor&, c10::SymIntArrayRef, c10::SymIntArrayRef)>();
  return op.call(hidden, scores, metric, cu_seqlens, dominant, contextual);
}

at::Tensor call_varlen_select_merge_backward(const at::Tensor& grad_tokens, const at::Tensor& scores,
                                             const at::Tensor& metric, const at::Tensor& cu_seqlens,
                                             c10::SymIntArrayRef dominant, c10::SymIntArrayRef contextual) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("visionzip::varlen_select_merge_backward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, c10::SymIntArrayRef, c10::SymIntArrayRef)>();
  return op.call(grad_tokens, scores, metric, cu_seqlens, dominant, contextual);
}

void save_varlen(AutogradContext* ctx, const at::Tensor& scores, const at::Tensor& metric, const at::Tensor& cu_seqlens,
                 c10::SymIntArrayRef dominant, c10::SymIntArrayRef contextual) {
  ctx->save_for_backward({scores, metric, cu_seqlens});
  ctx->saved_data["dominant"] = c10::IValue(dominant);
  ctx->saved_data["contextual"] = c10::IValue(contextual);
}

class VarlenSelectMerge : public torch::autograd::Function<VarlenSelectMerge> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& scores,
                               const at::Tensor& metric, const at::Tensor& cu_seqlens, c10::SymIntArrayRef dominant,
                               c10::SymIntArrayRef contextual) {
    at::Tensor tokens, keep, cu_seqlens_out;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(tokens, keep, cu_seqlens_out) =
          call_varlen_select_merge(hidden, scores, metric, cu_seqlens, dominant, contextual);
    }
    save_varlen(ctx, scores, metric, cu_seqlens, dominant, contextual);
    ctx->mark_non_differentiable({keep, cu_seqlens_out});
    return {tokens, keep, cu_seqlens_out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    return {call_varlen_select_merge_backward(grads[0], saved[0], saved[1], saved[2],
                                              ctx->saved_data["dominant"].toSymIntVector(),
                                              ctx->saved_data["contextual"].toSymIntVector()),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

class VarlenSelectMergeBackward : public torch::autograd::Function<VarlenSelectMergeBackward> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad_tokens, const at::Tensor& scores,
                            const at::Tensor& metric, const at::Tensor& cu_seqlens, c10::SymIntArrayRef dominant,
                            c10::SymIntArrayRef contextual) {
    save_varlen(ctx, scores, metric, cu_seqlens, dominant, contextual);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_varlen_select_merge_backward(grad_tokens, scores, metric, cu_seqlens, dominant, contextual);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor tokens = std::get<0>(call_varlen_select_merge(grads[0], saved[0], saved[1], saved[2],
                                                                   ctx->saved_data["dominant"].toSymIntVector(),
                                                                   ctx->saved_data["contextual"].toSymIntVector()));
    return {tokens, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

VarlenOutputs varlen_select_merge_autograd(const at::Tensor& hidden, const at::Tensor& scores, const at::Tensor& metric,
                                           const at::Tensor& cu_seqlens, c10::SymIntArrayRef dominant,
                                           c10::SymIntArrayRef contextual) {
  if (!needs_grad(hidden)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_varlen_select_merge(hidden, scores, metric, cu_seqlens, dominant, contextual);
  }
  const variable_list out = VarlenSelectMerge::apply(hidden, scores, metric, cu_seqlens, dominant, contextual);
  return {out[0], out[1], out[2]};
}

at::Tensor varlen_select_merge_backward_autograd(const at::Tensor& grad_tokens, const at::Tensor& scores,
                                                 const at::Tensor& metric, const at::Tensor& cu_seqlens,
                                                 c10::SymIntArrayRef dominant, c10::SymIntArrayRef contextual) {
  if (!needs_grad(grad_tokens)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_varlen_select_merge_backward(grad_tokens, scores, metric, cu_seqlens, dominant, contextual);
  }
  return VarlenSelectMergeBackward::apply(grad_tokens, scores, metric, cu_seqlens, dominant, contextual);
}

}  // namespace

TORCH_LIBRARY_IMPL(visionzip, Autograd, m) {
  // The non-differentiable ops (the score ops, the top-k) fall through the Autograd key; they are
  // registered from Python, from the op table (visionzip_kernels/op_table.py).
  m.impl("contextual_merge", &contextual_merge_autograd);
  m.impl("contextual_merge_backward", &contextual_merge_backward_autograd);
  m.impl("select_merge", &select_merge_autograd);
  m.impl("varlen_select_merge", &varlen_select_merge_autograd);
  m.impl("varlen_select_merge_backward", &varlen_select_merge_backward_autograd);
}

}  // namespace visionzip
