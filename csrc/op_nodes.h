// What the C++ autograd nodes share (csrc/block_step.cpp: a block as one node; csrc/op_nodes.cpp:
// an op as one node): the op bodies they call back or replay, and the glue around an op's
// launches written once for both.
#pragma once

#include "launch_plan.h"

#include <ATen/FuncTorchTLS.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/autograd/variable.h>

#include <array>
#include <type_traits>

namespace vit_kernels {

// The op bodies the nodes call (or replay from their launch plans), set once from Python
// (ops/_nodes.load). Hidden like the pybind11 objects it holds.
struct VIT_KERNELS_HIDDEN OpBodies {
  pybind11::object layer_norm;           // ops/layer_norm._add_layer_norm_fwd_impl
  pybind11::object attention;            // ops/attention's forward impl
  pybind11::object bias_gelu;            // ops/bias_gelu's forward impl
  pybind11::object layer_norm_backward;  // ops/layer_norm.add_layer_norm_bwd_grads
  pybind11::object bias_gelu_backward;   // ops/bias_gelu.bias_gelu_backward_dbias
  pybind11::object attention_backward;   // ops/attention.flash_attention_bwd_packed(d_attn, q, k, v, out,
                                         //   lse, scale, p, seed, deterministic) -> packed [B, N, 3 * D]
  pybind11::object flash_attention_backward;  // ops/attention._flash_attention_bwd_impl -> (dq, dk, dv)
};
const OpBodies& op_bodies();  // raises when they were not set

// as_dtype in ops/_triton_helpers.py: no call when the dtype is already right.
at::Tensor as_dtype(const at::Tensor& t, at::ScalarType dtype);

pybind11::object dtype_object(at::ScalarType dtype);

// An add + LayerNorm's context attributes (ops/layer_norm._setup_context).
struct LayerNormMeta {
  bool has_residual, store_residual;
  at::ScalarType residual_dtype;  // the residual input's, where there is one
};

// ops/layer_norm.py's _backward: its two launches replayed from their plan (add_layer_norm_bwd_grads).
// `s`: its saved tensors (x with gamma, h, weight, bias, gamma, row_scale, stats).
struct LayerNormGrads {
  at::Tensor dx, dresidual, dweight, dbias, dgamma;
};
LayerNormGrads layer_norm_backward(const at::Tensor& dy, const at::Tensor& dresidual_out, const at::Tensor* s,
                                   const LayerNormMeta& m);

// ops/_triton_helpers.as_rows
at::Tensor as_rows(const at::Tensor& t, int64_t n_cols);

// ops/bias_gelu_linear.py's backward (_backward, _bias_gelu_linear_bwd_impl): its bias + GELU pass
// replayed from its plan (bias_gelu_backward_dbias; without `needs_dx`, the forward's), the
// sums and GEMMs here. Each gradient is computed where its `needs_` says so (dx with needs_dx).
struct MlpGrads {
  at::Tensor dx, dbias, dweight, dlinear_bias;
};
MlpGrads mlp_backward(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& bias, const at::Tensor& weight,
                      bool needs_dx, bool needs_bias, bool needs_weight, bool needs_linear_bias,
                      const pybind11::object& approximate, at::ScalarType linear_bias_dtype);

// An absent optional tensor as an undefined one (what an op body gets as None).
inline at::Tensor value_or_undefined(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

// Bit i set where tensor i is defined and requires a gradient (Python's ctx.needs_input_grad).
int64_t requires_grad_bits(at::ArrayRef<at::Tensor> tensors);

// The gradients of a node once they must not pass for constants: leading to a node that raises
// if differentiated (`what` names the node).
torch::autograd::variable_list error_on_differentiation(torch::autograd::variable_list out, const char* what);

// A node's backward: `compute()` runs holding the GIL (the op bodies are Python; the autograd
// engine's device threads run a backward without it) and with autograd off (Python's
// @once_differentiable). Under create_graph its gradients must not pass for constants (a gradient
// penalty would silently lose its term): error_on_differentiation.
template <typename Compute>
torch::autograd::variable_list once_differentiable(const char* what, Compute&& compute) {
  pybind11::gil_scoped_acquire gil;
  bool create_graph = at::GradMode::is_enabled();
  torch::autograd::variable_list out;
  {
    at::AutoGradMode no_grad(false);
    out = compute();
  }
  return create_graph ? error_on_differentiation(std::move(out), what) : out;
}

// A hand-written autograd node, made the way torch's generated ones are: a torch::autograd::Node
// whose members are its saved variables. A torch::autograd::Function costs several us more a call
// on each side of the step (its VariableInfo lists, the context's IValue map, _wrap_outputs, the
// CppNode's checks of what backward returns), host time that eager's generated nodes do not spend
// (benchmarks/results/cpu-host-overhead-2026-12-06.md). torch 2.6 holds nodes in std::shared_ptr
// (deleted through deleteNode, which unlinks long graphs without deep recursion), newer torch in
// c10::intrusive_ptr.
template <typename T>
auto make_node() {
  using NodePtr = decltype(torch::autograd::Edge::function);
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    return std::shared_ptr<T>(new T(), [](T* node) { deleteNode(node); });  // found by ADL: torch::autograd's
  } else {
    return c10::make_intrusive<T>();
  }
}

// A hand-written node's saves: N SavedVariables, unpacked together in its backward and released
// together after a backward that does not retain the graph. mutex_ (torch::autograd::Node's) guards
// them as it does in torch's generated nodes: a node's apply locks it too.
template <size_t N>
struct SavingNode : public torch::autograd::Node {
  torch::autograd::SavedVariable saved[N];

  std::array<at::Tensor, N> unpack_saved() {
    auto self = getptr();  // a saved output unpacks with its grad_fn: this node
    std::array<at::Tensor, N> out;
    for (size_t i = 0; i < N; ++i) out[i] = saved[i].unpack(self);
    return out;
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& v : saved) v.reset_data();
  }
};

// torch.autograd.graph.node_creation_hook (in newer torch) sees every node once it is wired and its
// saves are stored, as torch's own nodes and Functions fire it.
template <typename NodePtr>
void fire_creation_hooks(const NodePtr& node) {
#if __has_include(<torch/csrc/autograd/node_creation_hook.h>)
  torch::autograd::fire_node_creation_hooks(node);
#endif
}

// What torch::autograd::Function::apply checks first: under a functorch transform (torch.func.grad,
// vmap) a C++ node would silently see unwrapped tensors, so the transform raises instead.
inline void refuse_functorch_transforms() {
  if (const auto& functorch_tls = at::functorch::functorchTLSAccessor()) functorch_tls->checkSupportsCppAutogradFunction();
}

void define_op_nodes(pybind11::module_& m);

}  // namespace vit_kernels
