// The Python module visionzip_kernels._C. Importing it loads the shared library, which runs its
// static TORCH_LIBRARY registrations, and it exposes the argument checks of csrc/checks.cpp to Python
// (visionzip_kernels.checks), so the fake kernels, the Triton launchers and the reference apply the
// very rules, and messages, of the C++ kernels. Only setup.py compiles this file; the CMake build is
// a plain libtorch library for torch.ops.load_library and needs no Python.
#include <torch/extension.h>

#include <exception>
#include <string>
#include <vector>

#include "checks.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  using at::Tensor;
  // c10's ValueError / TypeError as Python's, with the message alone (no C++ backtrace); local to
  // this module, so other extensions' exceptions are left alone.
  py::register_local_exception_translator([](std::exception_ptr raised) {
    try {
      if (raised) std::rethrow_exception(raised);
    } catch (const c10::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    } catch (const c10::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
    }
  });
  m.def(
      "cls_attention_args", [](const Tensor& q_cls, const Tensor& k) { visionzip::check_cls_attention_args(q_cls, k); },
      py::arg("q_cls"), py::arg("k"));
  m.def(
      "attention_received_args",
      [](const Tensor& q, const Tensor& k) { visionzip::check_attention_received_args(q, k); }, py::arg("q"),
      py::arg("k"));
  m.def(
      "scores_and_metric_args",
      [](const Tensor& q, const Tensor& k, bool keep_cls) { visionzip::check_scores_and_metric_args(q, k, keep_cls); },
      py::arg("q"), py::arg("k"), py::arg("keep_cls"));
  m.def(
      "dominant_topk_args",
      [](const Tensor& scores, int64_t dominant, bool keep_cls) {
        visionzip::check_dominant_topk_args(scores, dominant, keep_cls);
      },
      py::arg("scores"), py::arg("dominant"), py::arg("keep_cls"));
  m.def(
      "contextual_merge_args",
      [](const Tensor& hidden, const Tensor& metric, const Tensor& keep, int64_t contextual) {
        visionzip::check_contextual_merge_args(hidden, metric, keep, contextual);
      },
      py::arg("hidden"), py::arg("metric"), py::arg("keep"), py::arg("contextual"));
  m.def(
      "contextual_merge_backward_args",
      [](const Tensor& grad_tokens, const Tensor& metric, const Tensor& keep, int64_t num_tokens) {
        visionzip::check_contextual_merge_backward_args(grad_tokens, metric, keep, num_tokens);
      },
      py::arg("grad_tokens"), py::arg("metric"), py::arg("keep"), py::arg("num_tokens"));
  m.def(
      "select_merge_args",
      [](const Tensor& hidden, const Tensor& scores, const Tensor& metric, int64_t dominant, int64_t contextual,
         bool keep_cls) { visionzip::check_select_merge_args(hidden, scores, metric, dominant, contextual, keep_cls); },
      py::arg("hidden"), py::arg("scores"), py::arg("metric"), py::arg("dominant"), py::arg("contextual"),
      py::arg("keep_cls"));
  m.def(
      "finite_scores",
      [](const std::string& op, const Tensor& scores) { visionzip::check_finite_scores(op.c_str(), scores); },
      py::arg("op"), py::arg("scores"));
  m.def(
      "keep_values",
      [](const std::string& op, const Tensor& keep, int64_t num_tokens) {
        visionzip::check_keep_values(op.c_str(), keep, num_tokens);
      },
      py::arg("op"), py::arg("keep"), py::arg("num_tokens"));
  m.def(
      "budget",
      [](const std::string& op, int64_t num_tokens, int64_t dominant, int64_t contextual, bool keep_cls) {
        visionzip::check_budget(op.c_str(), num_tokens, dominant, contextual, keep_cls);
      },
      py::arg("op"), py::arg("num_tokens"), py::arg("dominant"), py::arg("contextual"), py::arg("keep_cls"));
  m.def(
      "varlen_scores_and_metric_args",
      [](const Tensor& q, const Tensor& k, const Tensor& cu_seqlens, int64_t unit) {
        visionzip::check_varlen_scores_and_metric_args(q, k, cu_seqlens, unit);
      },
      py::arg("q"), py::arg("k"), py::arg("cu_seqlens"), py::arg("unit"));
  m.def(
      "cu_seqlens_offsets",
      [](const std::string& op, const Tensor& cu_seqlens, int64_t total_tokens, int64_t unit) {
        visionzip::check_cu_seqlens_offsets(op.c_str(), cu_seqlens, total_tokens, unit);
      },
      py::arg("op"), py::arg("cu_seqlens"), py::arg("total_tokens"), py::arg("unit") = 1);
  // Packed (varlen) images. The budget lists may hold SymInts (the fake kernels under
  // torch.compile(dynamic=True)): taken as such, they are not turned into plain ints (a value guard).
  m.def(
      "varlen_select_merge_args",
      [](const Tensor& hidden, const Tensor& scores, const Tensor& metric, const Tensor& cu_seqlens,
         c10::SymIntArrayRef dominant, c10::SymIntArrayRef contextual) {
        visionzip::check_varlen_select_merge_args(hidden, scores, metric, cu_seqlens, dominant, contextual);
      },
      py::arg("hidden"), py::arg("scores"), py::arg("metric"), py::arg("cu_seqlens"), py::arg("dominant"),
      py::arg("contextual"));
  m.def(
      "varlen_select_merge_backward_args",
      [](const Tensor& grad_tokens, const Tensor& scores, const Tensor& metric, const Tensor& cu_seqlens,
         c10::SymIntArrayRef dominant, c10::SymIntArrayRef contextual) {
        visionzip::check_varlen_select_merge_backward_args(grad_tokens, scores, metric, cu_seqlens, dominant,
                                                           contextual);
      },
      py::arg("grad_tokens"), py::arg("scores"), py::arg("metric"), py::arg("cu_seqlens"), py::arg("dominant"),
      py::arg("contextual"));
  m.def(
      "read_cu_seqlens_and_check_budgets",
      [](const std::string& op, const Tensor& cu_seqlens, int64_t num_tokens, const std::vector<int64_t>& dominant,
         const std::vector<int64_t>& contextual) {
        return visionzip::read_cu_seqlens_and_check_budgets(op.c_str(), cu_seqlens, num_tokens, dominant, contextual);
      },
      py::arg("op"), py::arg("cu_seqlens"), py::arg("num_tokens"), py::arg("dominant"), py::arg("contextual"));
}
