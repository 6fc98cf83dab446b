// One op as one C++ autograd node, on the per-op path (the path every swapped model takes outside
// the one-node block step: transformers', torchvision's, a model whose block the step does not
// fuse): add + LayerNorm, attention, and the fused MLP's bias + GELU + fc2.
//
// Why: an op under a Python autograd.Function pays for its Python on both sides of the step:
// apply, setup_context and save_for_backward in the forward, the engine's call back into Python
// and the backward glue in the backward. At the batch sizes where a ViT step is host-bound that is
// what makes the op slower than eager's two aten calls (benchmarks/results/, the per-op host
// rows). Here the node is C++, the forward body and the backward's launch are replayed from
// their launch plans (csrc/launch_plan.cpp), and the glue is C++ (layer_norm_backward, shared with
// the block node). Each node saves what its op's _setup_context saves and computes what its
// _backward computes, with the same roundings: tests/test_op_nodes.py holds them bit-equal.
//
// Also here: what the nodes share (op_nodes.h).

#include "op_nodes.h"

#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/python.h>

#include <algorithm>

namespace vit_kernels {

namespace py = pybind11;
using at::Tensor;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

namespace {
OpBodies* bodies = nullptr;  // never freed: a py::object must not outlive the interpreter's finalization
}

const OpBodies& op_bodies() {
  TORCH_CHECK(bodies != nullptr, "vit_kernels: the C++ nodes' op bodies were not set (ops/_nodes.load)");
  return *bodies;
}

Tensor as_dtype(const Tensor& t, at::ScalarType dtype) {
  return !t.defined() || t.scalar_type() == dtype ? t : t.to(dtype);
}

py::object dtype_object(at::ScalarType dtype) {
  return py::reinterpret_borrow<py::object>(reinterpret_cast<PyObject*>(torch::getTHPDtype(dtype)));
}

LayerNormGrads layer_norm_backward(const Tensor& dy, const Tensor& dresidual_out, const Tensor* s,
                                   const LayerNormMeta& m) {
  bool separate = m.has_residual && (s[4].defined() || s[5].defined() || m.residual_dtype != dy.scalar_type());
  auto r = call_planned(PlanSite::kAddLayerNormBwd, op_bodies().layer_norm_backward,
                        {dy, m.store_residual ? dresidual_out : Tensor(), s[0], s[1], s[2], s[3], s[4], s[5], s[6],
                         separate ? dtype_object(m.residual_dtype) : py::object(py::none())});
  LayerNormGrads g;
  g.dx = r[0];
  if (m.has_residual) g.dresidual = separate ? r[1] : r[0];
  size_t next = separate ? 2 : 1;  // then the gradient of each parameter given, in its dtype
  Tensor* grads[3] = {&g.dweight, &g.dbias, &g.dgamma};
  for (int i = 0; i < 3; ++i) {
    if (s[2 + i].defined()) *grads[i] = r[next++];
  }
  return g;
}

Tensor as_rows(const Tensor& t, int64_t n_cols) {
  Tensor t2 = t.reshape({-1, n_cols});
  return t2.stride(-1) == 1 || t2.size(0) == 0 ? t2 : t2.contiguous();
}

MlpGrads mlp_backward(const Tensor& dout, const Tensor& x, const Tensor& bias, const Tensor& weight, bool needs_dx,
                      bool needs_bias, bool needs_weight, bool needs_linear_bias, const py::object& approximate,
                      at::ScalarType linear_bias_dtype) {
  Tensor dout2 = as_rows(dout, weight.size(0)), x2 = as_rows(x, x.size(-1));
  MlpGrads g;
  Tensor y2;
  if (needs_dx) {
    y2 = needs_weight ? at::empty(x2.sizes(), x.options()) : Tensor();
    Tensor dz2 = at::matmul(dout2, weight);  // dY, overwritten with dz by the pass
    Tensor dbias = call_planned(PlanSite::kBiasGeluBwd, op_bodies().bias_gelu_backward,
                                {dz2, x2, bias, approximate, dz2, y2})[0];
    g.dx = dz2.view(x.sizes());
    if (needs_bias && bias.defined()) g.dbias = dbias;  // in bias's dtype
  } else if (needs_weight) {
    y2 = call_planned(PlanSite::kBiasGeluFwd, op_bodies().bias_gelu, {x2, bias, approximate})[0];
  }
  if (needs_weight) g.dweight = as_dtype(at::matmul(dout2.t(), y2), weight.scalar_type());
  if (needs_linear_bias) g.dlinear_bias = as_dtype(at::sum(dout2, {0}, false, at::kFloat), linear_bias_dtype);
  return g;
}

int64_t requires_grad_bits(at::ArrayRef<Tensor> tensors) {
  int64_t bits = 0;
  for (size_t i = 0; i < tensors.size(); ++i) bits |= int64_t(tensors[i].defined() && tensors[i].requires_grad()) << i;
  return bits;
}

variable_list error_on_differentiation(variable_list out, const char* what) {
  for (auto& g : out) {
    if (g.defined()) g = g.detach().requires_grad_(true);
  }
  auto error = std::make_shared<torch::autograd::DelayedError>(
      std::string("vit_kernels' ") + what + " is once differentiable: its backward cannot be differentiated "
      "(double backward)", static_cast<int64_t>(out.size()));
  return error->apply(std::move(out));
}

// ops/layer_norm's add_layer_norm_fwd: its _setup_context's saves and its _backward, as a
// hand-written node (make_node).
// saved: x with gamma, h (h_new where stored, else x), weight, bias, gamma, row_scale, stats.
struct AddLayerNormBackward : public SavingNode<7> {
  LayerNormMeta meta;

  std::string name() const override { return "vit_kernels::AddLayerNormBackward"; }

  // grads: (dy, dh_new), either undefined where its output was not used; one gradient per input
  // edge (x, residual, weight, bias, gamma), undefined where the input needs none.
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    return once_differentiable("add_layer_norm", [&] {
      auto s = unpack_saved();
      Tensor dy = grads[0];
      if (!dy.defined()) {
        const Tensor& like = s[0].defined() ? s[0] : s[1];
        dy = at::zeros(s[1].sizes(), s[1].options().dtype(like.scalar_type()));
      }
      auto g = layer_norm_backward(dy, grads[1], s.data(), meta);
      variable_list out{g.dx, g.dresidual, g.dweight, g.dbias, g.dgamma};
      for (int i = 0; i < 5; ++i) {
        if (!task_should_compute_output(i)) out[i] = Tensor();
      }
      return out;
    });
  }
};

// ops/attention's flash_attention_fwd: its _setup_context's saves and its _backward (make_node).
struct FlashAttentionBackward : public SavingNode<6> {  // saved: q, k, v, out, lse, seed
  double softmax_scale = 0, dropout_p = 0;
  bool deterministic = false;

  std::string name() const override { return "vit_kernels::FlashAttentionBackward"; }

  // grads: (dout), undefined where out was not used; one gradient per input edge (q, k, v).
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    return once_differentiable("flash_attention", [&] {
      variable_list out(3);
      if (!grads[0].defined()) return out;  // out was not used: no gradient
      auto s = unpack_saved();
      auto d = call_planned(PlanSite::kFlashAttentionBwd, op_bodies().flash_attention_backward,
                            {grads[0], s[0], s[1], s[2], s[3], s[4], py::float_(softmax_scale), py::float_(dropout_p),
                             s[5], py::bool_(deterministic)});
      for (int i = 0; i < 3; ++i) {
        if (task_should_compute_output(i)) out[i] = d[i];
      }
      return out;
    });
  }
};

// ops/bias_gelu_linear's bias_gelu_linear_fwd (the fused MLP's activation and fc2): its
// _setup_context's saves and its _backward (make_node).
struct BiasGeluLinearBackward : public SavingNode<3> {  // saved: x, bias, weight
  at::ScalarType linear_bias_dtype = at::ScalarType::Undefined;
  std::string approximate;

  std::string name() const override { return "vit_kernels::BiasGeluLinearBackward"; }

  // grads: (dout); one gradient per input edge (x, bias, weight, linear_bias).
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    return once_differentiable("bias_gelu_linear", [&] {
      variable_list out(4);
      if (!grads[0].defined()) return out;
      bool need[4];
      for (int i = 0; i < 4; ++i) need[i] = task_should_compute_output(i);
      auto s = unpack_saved();
      auto g = mlp_backward(grads[0], s[0], s[1], s[2], need[0] || need[1], need[1], need[2], need[3],
                            py::str(approximate), linear_bias_dtype);
      if (need[0]) out[0] = g.dx;
      if (need[1]) out[1] = g.dbias;
      if (need[2]) out[2] = g.dweight;
      if (need[3]) out[3] = g.dlinear_bias;
      return out;
    });
  }
};

namespace {

// (y, h_new or an empty tensor, stats), the arguments as add_layer_norm_fwd takes them (an
// undefined tensor for None); y and h_new from one AddLayerNormBackward where an input needs a gradient.
std::vector<Tensor> add_layer_norm_outputs(const Tensor& x, const Tensor& residual, const Tensor& weight,
                                           const Tensor& bias, const Tensor& gamma, const Tensor& row_scale,
                                           const py::object& eps, const py::object& residual_dtype,
                                           bool store_residual) {
  refuse_functorch_transforms();
  std::vector<Tensor> out;
  {
    at::AutoGradMode no_grad(false);
    out = call_planned(PlanSite::kAddLayerNormFwd, op_bodies().layer_norm,
                       {x, residual, weight, bias, gamma, row_scale, eps, residual_dtype, py::bool_(store_residual)});
  }
  if (torch::autograd::compute_requires_grad(x, residual, weight, bias, gamma)) {
    auto node = make_node<AddLayerNormBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(x, residual, weight, bias, gamma));
    torch::autograd::set_history(out[0], node);  // the outputs' (the gradients') order: y, h_new
    torch::autograd::set_history(out[1], node);
    Tensor saves[7] = {gamma.defined() ? x : Tensor(), store_residual ? out[1] : x, weight, bias, gamma, row_scale,
                       out[2]};
    for (int i = 0; i < 7; ++i) node->saved[i] = SavedVariable(saves[i], /*is_output=*/i == 1 && store_residual);
    node->meta = {residual.defined(), store_residual,
                  residual.defined() ? residual.scalar_type() : at::ScalarType::Undefined};
    fire_creation_hooks(node);
  }
  return out;
}

py::tuple add_layer_norm_node(const OptTensor& x, const OptTensor& residual, const OptTensor& weight,
                              const OptTensor& bias, const OptTensor& gamma, const OptTensor& row_scale,
                              const py::object& eps, const py::object& residual_dtype, bool store_residual) {
  auto out = add_layer_norm_outputs(value_or_undefined(x), value_or_undefined(residual), value_or_undefined(weight),
                                    value_or_undefined(bias), value_or_undefined(gamma), value_or_undefined(row_scale),
                                    eps, residual_dtype, store_residual);
  return py::make_tuple(out[0], out[1], out[2]);
}

// The public add_layer_norm's calls (ops/layer_norm.add_layer_norm) that reached this node, by
// signature, with what its Python derived from them. A later call at one of these signatures
// goes to the node from add_layer_norm_call, without the public function's Python: its checks
// (passed), its choice of path (the kernel's) and its derivations are all functions of the
// signature, so they would come out the same. What is not in the signature, add_layer_norm_call
// checks on every call, or the Python does before it (docs/design.md, "The public entry").
struct RememberedCall {
  std::vector<int64_t> key;
  py::object residual_dtype;
  bool store_residual;
};
struct RememberedCalls {
  py::object parameter_type;  // torch.nn.Parameter, a tensor type the signature covers
  std::vector<RememberedCall> calls;
};
RememberedCalls* remembered = nullptr;  // never freed, as `bodies`
constexpr size_t kMaxRememberedCalls = 64;  // past it the table is cleared and refilled as calls come
constexpr Py_ssize_t kPublicArguments = 8;  // x, residual, weight, bias, eps, gamma, row_scale, residual_in_fp32

// The public arguments' signature (signature_key's), or false where it does not cover one or eps
// is not a float (the public function hands the body float(eps)).
bool public_call_key(std::vector<int64_t>& key, PyObject* const* args) {
  if (remembered == nullptr || !PyFloat_CheckExact(args[4])) return false;
  key.reserve(64);
  return signature_key(key, args, kPublicArguments, remembered->parameter_type.ptr());
}

void remember_add_layer_norm_call(const py::tuple& args, py::object residual_dtype, bool store_residual) {
  TORCH_CHECK(args.size() == kPublicArguments, "remember_add_layer_norm_call: ", kPublicArguments,
              " public arguments, got ", args.size());
  std::vector<int64_t> key;
  if (!public_call_key(key, reinterpret_cast<PyTupleObject*>(args.ptr())->ob_item)) return;
  auto& calls = remembered->calls;
  if (std::any_of(calls.begin(), calls.end(), [&key](const RememberedCall& c) { return c.key == key; })) return;
  if (calls.size() >= kMaxRememberedCalls) calls.clear();
  calls.push_back({std::move(key), std::move(residual_dtype), store_residual});
}

// add_layer_norm(x, residual, weight, bias, eps, gamma, row_scale, residual_in_fp32), all eight
// positional, at a remembered signature: (y, h_new), as the public function returns them. None
// where it cannot tell that the public function's Python would reach this node: a signature not
// remembered, or a Python dispatch mode (FakeTensorMode, a tracer) or a functorch transform on.
// (The public function checks torch.compile and forward-mode AD before calling this.)
PyObject* add_layer_norm_call(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == kPublicArguments, "add_layer_norm_call takes ", kPublicArguments,
                   " positional arguments, got ", nargs);
  if (c10::impl::TorchDispatchModeTLS::stack_len() > 0 ||
      c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode)) {
    Py_RETURN_NONE;
  }
  std::vector<int64_t> key;
  if (!public_call_key(key, args)) Py_RETURN_NONE;
  const auto& calls = remembered->calls;
  auto found = std::find_if(calls.begin(), calls.end(), [&key](const RememberedCall& c) { return c.key == key; });
  if (found == calls.end()) Py_RETURN_NONE;
  // Copied out: the body and the launches run Python, which may change the table.
  py::object residual_dtype = found->residual_dtype;
  bool store_residual = found->store_residual;
  auto tensor = [&](int i) { return args[i] == Py_None ? Tensor() : THPVariable_Unpack(args[i]); };
  auto out = add_layer_norm_outputs(tensor(0), tensor(1), tensor(2), tensor(3), tensor(5), tensor(6),
                                    py::reinterpret_borrow<py::object>(args[4]), residual_dtype, store_residual);
  PyObject* result = PyTuple_New(2);
  if (result == nullptr) return nullptr;
  PyTuple_SET_ITEM(result, 0, THPVariable_Wrap(std::move(out[0])));
  if (store_residual) {
    PyTuple_SET_ITEM(result, 1, THPVariable_Wrap(std::move(out[1])));
  } else {
    Py_INCREF(args[0]);  // h_new *is* x
    PyTuple_SET_ITEM(result, 1, args[0]);
  }
  return result;
  END_HANDLE_TH_ERRORS
}

PyMethodDef add_layer_norm_call_def = {"add_layer_norm_call", reinterpret_cast<PyCFunction>(
    reinterpret_cast<void (*)()>(&add_layer_norm_call)), METH_FASTCALL, nullptr};

// (out, lse), the arguments as flash_attention_fwd takes them; out from one FlashAttentionBackward
// where an input needs a gradient.
py::tuple flash_attention_node(const Tensor& q, const Tensor& k, const Tensor& v, const py::object& softmax_scale,
                               const py::object& dropout_p, const OptTensor& seed, const py::object& deterministic) {
  refuse_functorch_transforms();
  Tensor seed_ = value_or_undefined(seed);
  std::vector<Tensor> out;
  {
    at::AutoGradMode no_grad(false);
    out = call_planned(PlanSite::kAttentionFwd, op_bodies().attention,
                       {q, k, v, softmax_scale, dropout_p, seed_, deterministic});
  }
  if (torch::autograd::compute_requires_grad(q, k, v)) {
    auto node = make_node<FlashAttentionBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(q, k, v));
    torch::autograd::set_history(out[0], node);
    Tensor saves[6] = {q, k, v, out[0], out[1], seed_};
    for (int i = 0; i < 6; ++i) node->saved[i] = SavedVariable(saves[i], /*is_output=*/i == 3);
    node->softmax_scale = softmax_scale.cast<double>();
    node->dropout_p = dropout_p.cast<double>();
    node->deterministic = deterministic.cast<bool>();
    fire_creation_hooks(node);
  }
  return py::make_tuple(out[0], out[1]);
}

// The fused MLP's bias + GELU + fc2, the arguments as bias_gelu_linear_fwd takes them; from one
// BiasGeluLinearBackward where an input needs a gradient.
Tensor bias_gelu_linear_node(const Tensor& x, const OptTensor& bias, const Tensor& weight, const OptTensor& linear_bias,
                             const py::object& approximate) {
  refuse_functorch_transforms();
  Tensor bias_ = value_or_undefined(bias), linear_bias_ = value_or_undefined(linear_bias);
  Tensor out;
  {
    at::AutoGradMode no_grad(false);
    Tensor gelu = call_planned(PlanSite::kBiasGeluFwd, op_bodies().bias_gelu, {x, bias_, approximate})[0];
    out = at::linear(gelu, weight, linear_bias);
  }
  if (torch::autograd::compute_requires_grad(x, bias_, weight, linear_bias_)) {
    auto node = make_node<BiasGeluLinearBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(x, bias_, weight, linear_bias_));
    torch::autograd::set_history(out, node);
    Tensor saves[3] = {x, bias_, weight};
    for (int i = 0; i < 3; ++i) node->saved[i] = SavedVariable(saves[i], /*is_output=*/false);
    node->linear_bias_dtype = linear_bias_.defined() ? linear_bias_.scalar_type() : at::ScalarType::Undefined;
    node->approximate = approximate.cast<std::string>();
    fire_creation_hooks(node);
  }
  return out;
}

void set_op_bodies(py::object layer_norm, py::object attention, py::object bias_gelu, py::object layer_norm_backward,
                   py::object bias_gelu_backward, py::object attention_backward, py::object flash_attention_backward) {
  if (bodies == nullptr) bodies = new OpBodies;
  if (remembered == nullptr) remembered = new RememberedCalls;
  remembered->parameter_type = py::module_::import("torch.nn").attr("Parameter");
  remembered->calls.clear();
  *bodies = OpBodies{std::move(layer_norm), std::move(attention), std::move(bias_gelu), std::move(layer_norm_backward),
                     std::move(bias_gelu_backward), std::move(attention_backward),
                     std::move(flash_attention_backward)};
}

}  // namespace

void define_op_nodes(py::module_& m) {
  m.def("set_op_bodies", &set_op_bodies);
  m.def("add_layer_norm_node", &add_layer_norm_node);
  m.add_object("add_layer_norm_call", py::reinterpret_steal<py::object>(PyCFunction_New(&add_layer_norm_call_def, nullptr)));
  m.def("remember_add_layer_norm_call", &remember_add_layer_norm_call);
  m.def("flash_attention_node", &flash_attention_node);
  m.def("bias_gelu_linear_node", &bias_gelu_linear_node);
}

}  // namespace vit_kernels
