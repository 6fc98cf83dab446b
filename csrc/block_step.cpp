// A pre-LN block's forward and backward as one C++ autograd node.
//
// vit_kernels/nn/block_step.py says what the one-node step fuses, when a block takes it and why.
// Here: the node, and the aten work between the ops (casts, GEMMs, views, the Linears' backward
// formulas). Each op's kernels are launched by that op's Python `impl` and registered `backward`,
// called back through `Bridge`, so that no op's host logic (configs, grids, validation, the bound
// launch) is written twice. The ops run in the per-op path's order with its roundings: outputs
// and gradients are bit-equal to it (tests/test_block_step.py).
//
// Why C++ for the glue: at the batch sizes where a ViT step is host-bound, Python's interpretation
// of ~30 aten calls a block is host time eager's block does not spend
// (benchmarks/results/cpu-host-overhead-2026-12-06.md measures what it saves).

#include "launch_plan.h"

#include <ATen/autocast_mode.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/python.h>

#include <optional>

namespace vit_kernels {
namespace {

namespace py = pybind11;
using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

// The Python functions this node calls, set once by nn/block_step.py at its first C++ step.
struct Bridge {
  py::object setup;                // _setup(op, tape, inputs, output): op's context appended to tape
  py::object layer_norm, attention, mlp;            // the FusedOps
  py::object bias_gelu;            // the MLP's first part (its impl is bias_gelu then fc2's F.linear)
  py::object layer_norm_impl, attention_impl;       // the FusedOps' impls
  py::object layer_norm_backward, mlp_backward;     // their registered backwards
  py::object attention_backward;   // _attention_backward(d_attn, q, k, v, out, lse, scale, p, seed,
                                   //   deterministic) -> packed [B, N, 3 * D] gradient
};
Bridge* bridge = nullptr;  // never freed: a py::object must not outlive the interpreter's finalization

// The tensor arguments, in the order of nn/block.py's _one_node_block_step call after `spec`.
enum Slot {
  kBranch, kResidual, kGammaIn, kRowScaleIn, kSeed, kNorm1Weight, kNorm1Bias, kQkvWeight, kQkvBias,
  kProjWeight, kProjBias, kGamma1, kRowScale1, kNorm2Weight, kNorm2Bias, kFc1Weight, kFc1Bias, kFc2Weight,
  kFc2Bias, kSlots
};

// BlockStepSpec's fields; the floats and the string stay Python objects, passed on to the ops as they are.
struct Spec {
  py::object eps1, eps2, softmax_scale, dropout_p, approximate;
  bool residual_in_fp32_1, residual_in_fp32_2;
  int64_t num_heads, head_dim;

  explicit Spec(const py::handle& spec)
      : eps1(spec.attr("eps1")), eps2(spec.attr("eps2")), softmax_scale(spec.attr("softmax_scale")),
        dropout_p(spec.attr("dropout_p")), approximate(spec.attr("approximate")),
        residual_in_fp32_1(spec.attr("residual_in_fp32_1").cast<bool>()),
        residual_in_fp32_2(spec.attr("residual_in_fp32_2").cast<bool>()),
        num_heads(spec.attr("num_heads").cast<int64_t>()), head_dim(spec.attr("head_dim").cast<int64_t>()) {}
};

// The tape of op contexts, kept in the node's saved_data (torch's own holder of a Python object is
// not exported to extensions). Only this file reads it back; TorchScript never sees it.
struct TapeHolder final : c10::ivalue::PyObjectHolder {
  explicit TapeHolder(py::object tape) : tape(std::move(tape)) {}
  ~TapeHolder() override {
    py::gil_scoped_acquire gil;  // the node may be freed on the autograd engine's thread
    tape = py::object();
  }
  PyObject* getPyObject() override { return tape.ptr(); }
  c10::InferredType tryToInferType() override { return c10::InferredType("a vit_kernels block step's tape"); }
  c10::IValue toIValue(const c10::TypePtr&, std::optional<int32_t>) override {
    TORCH_CHECK(false, "a vit_kernels block step's tape has no TorchScript value");
  }
  std::string toStr() override { return "<vit_kernels block step tape>"; }
  std::vector<at::Tensor> extractTensors() override { return {}; }
  py::object tape;
};

py::object or_none(const Tensor& t) { return t.defined() ? py::cast(t) : py::none(); }
Tensor tensor_or_undefined(const py::handle& h) { return h.is_none() ? Tensor() : h.cast<Tensor>(); }
Tensor value_or_undefined(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }

// as_dtype in ops/_triton_helpers.py: no call when the dtype is already right.
Tensor as_dtype(const Tensor& t, at::ScalarType dtype) {
  return !t.defined() || t.scalar_type() == dtype ? t : t.to(dtype);
}

// _dispatch.linear_compute_dtype: autocast's dtype for a Linear on x, else x's.
at::ScalarType linear_compute_dtype(const Tensor& x) {
  auto device = x.device().type();
  if (x.scalar_type() != at::kDouble && at::autocast::is_autocast_enabled(device)) {
    return at::autocast::get_autocast_dtype(device);
  }
  return x.scalar_type();
}

// reference.residual_dtype
at::ScalarType residual_dtype(const Tensor& x, const Tensor& residual, bool residual_in_fp32) {
  if (residual_in_fp32) return x.scalar_type() != at::kDouble ? at::kFloat : at::kDouble;
  return residual.defined() ? residual.scalar_type() : x.scalar_type();
}

std::optional<Tensor> opt(const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; }

struct Forward {
  Tensor out, h2;
  variable_list linear_saved;  // (y1c, qkv_wc, attn_out, proj_wc, y2c, fc1_wc)
  at::ScalarType y1_dtype, y2_dtype;
};

// Appends op's context to the tape, as autograd would set it up for this call.
void setup_op(const py::object& op, const py::object& tape, const std::vector<OpArg>& inputs,
              const std::vector<Tensor>& out) {
  py::tuple in(inputs.size()), outputs(out.size());
  for (size_t i = 0; i < inputs.size(); ++i) in[i] = inputs[i].to_python();
  for (size_t i = 0; i < out.size(); ++i) outputs[i] = py::cast(out[i]);
  bridge->setup(op, tape, in, outputs.size() == 1 ? py::object(outputs[0]) : py::object(outputs));
}

// An op's impl, replayed from its launch plan where one was recorded (csrc/launch_plan.cpp); with a
// tape, the op's context appended to it as autograd would set it up.
std::vector<Tensor> run_op(PlanSite site, const py::object& impl, const py::object& op, const py::object& tape,
                           const std::vector<OpArg>& inputs) {
  std::vector<Tensor> out = call_planned(site, impl, inputs);
  if (!tape.is_none()) setup_op(op, tape, inputs, out);
  return out;
}

py::object dtype_object(at::ScalarType dtype) {
  return py::reinterpret_borrow<py::object>(reinterpret_cast<PyObject*>(torch::getTHPDtype(dtype)));
}

// The block's forward with autograd off, each op's context on `tape` (None: no backward).
Forward block_forward(const Spec& spec, const py::object& tape, const std::array<Tensor, kSlots>& t) {
  const Tensor& branch = t[kBranch];
  const int64_t batch = branch.size(0), n_tokens = branch.size(1), dim = branch.size(2);
  Bridge& b = *bridge;
  auto rd1 = residual_dtype(branch, t[kResidual], spec.residual_in_fp32_1);
  bool store = t[kResidual].defined() || t[kGammaIn].defined() || t[kRowScaleIn].defined() ||
               rd1 != branch.scalar_type();
  auto ln1 = run_op(PlanSite::kAddLayerNormFwd, b.layer_norm_impl, b.layer_norm, tape,
                    {branch, t[kResidual], t[kNorm1Weight], t[kNorm1Bias], t[kGammaIn], t[kRowScaleIn], spec.eps1,
                     dtype_object(rd1), py::bool_(store)});
  Tensor y1 = ln1[0];
  Tensor h1 = store ? ln1[1] : branch;
  auto dtype = linear_compute_dtype(y1);
  Tensor y1c = as_dtype(y1, dtype), qkv_wc = as_dtype(t[kQkvWeight], dtype);
  Tensor qkv = at::linear(y1c, qkv_wc, opt(as_dtype(t[kQkvBias], dtype)));
  auto qkv_parts = qkv.view({batch, n_tokens, 3, spec.num_heads, spec.head_dim}).unbind(2);
  auto attn = run_op(PlanSite::kAttentionFwd, b.attention_impl, b.attention, tape,
                     {qkv_parts[0], qkv_parts[1], qkv_parts[2], spec.softmax_scale, spec.dropout_p, t[kSeed],
                      py::bool_(true)});
  Tensor attn_out = attn[0].view({batch, n_tokens, dim});
  Tensor proj_wc = as_dtype(t[kProjWeight], dtype);
  Tensor proj = at::linear(attn_out, proj_wc, opt(as_dtype(t[kProjBias], dtype)));
  auto rd2 = residual_dtype(proj, h1, spec.residual_in_fp32_2);
  auto ln2 = run_op(PlanSite::kAddLayerNormFwd, b.layer_norm_impl, b.layer_norm, tape,
                    {proj, h1, t[kNorm2Weight], t[kNorm2Bias], t[kGamma1], t[kRowScale1], spec.eps2, dtype_object(rd2),
                     py::bool_(true)});
  Tensor y2 = ln2[0], h2 = ln2[1];
  Tensor y2c = as_dtype(y2, dtype), fc1_wc = as_dtype(t[kFc1Weight], dtype);
  Tensor hidden = at::linear(y2c, fc1_wc);
  // The fused MLP's impl, F.linear(bias_gelu(hidden, fc1_bias), fc2's weight, fc2's bias), with its
  // bias + GELU planned.
  Tensor fc2_wc = as_dtype(t[kFc2Weight], dtype).contiguous(), fc2_bc = as_dtype(t[kFc2Bias], dtype);
  Tensor gelu = call_planned(PlanSite::kBiasGeluFwd, b.bias_gelu, {hidden, t[kFc1Bias], spec.approximate})[0];
  Tensor out = at::linear(gelu, fc2_wc, opt(fc2_bc));
  if (!tape.is_none()) setup_op(b.mlp, tape, {hidden, t[kFc1Bias], fc2_wc, fc2_bc, spec.approximate}, {out});
  return {out, h2, {y1c, qkv_wc, attn_out, proj_wc, y2c, fc1_wc}, y1.scalar_type(), y2.scalar_type()};
}

// aten's backward of F.linear (addmm / mm on the rows of a row-major [..., in] input), autocast's casts
// undone: dx in x's dtype before the cast, dweight and dbias in the parameters'.
struct LinearGrads {
  Tensor dx, dweight, dbias;
};
LinearGrads linear_backward(const Tensor& grad, const Tensor& x, const Tensor& weight, at::ScalarType x_dtype,
                            at::ScalarType weight_dtype, std::optional<at::ScalarType> bias_dtype, bool needs_weight,
                            bool needs_bias) {
  Tensor grad2 = grad.reshape({-1, grad.size(-1)});
  auto dx_shape = grad.sizes().vec();
  dx_shape.back() = weight.size(1);
  LinearGrads g;
  g.dx = as_dtype(grad2.mm(weight).view(dx_shape), x_dtype);
  if (needs_weight) g.dweight = as_dtype(grad2.t().mm(x.reshape({-1, x.size(-1)})), weight_dtype);
  if (needs_bias) g.dbias = as_dtype(grad2.sum(0), *bias_dtype);
  return g;
}

constexpr int kTapeLength = 4;  // add + LayerNorm 1, attention, add + LayerNorm 2, MLP

struct BlockStep : public torch::autograd::Function<BlockStep> {
  // One parameter a slot, in Slot order: apply() finds the node's inputs among its arguments.
  static variable_list forward(AutogradContext* ctx, const Spec& spec, const OptTensor& branch, const OptTensor& residual, const OptTensor& gamma_in,
                               const OptTensor& row_scale_in, const OptTensor& seed, const OptTensor& norm1_weight,
                               const OptTensor& norm1_bias, const OptTensor& qkv_weight, const OptTensor& qkv_bias,
                               const OptTensor& proj_weight, const OptTensor& proj_bias, const OptTensor& gamma1,
                               const OptTensor& row_scale1, const OptTensor& norm2_weight, const OptTensor& norm2_bias,
                               const OptTensor& fc1_weight, const OptTensor& fc1_bias, const OptTensor& fc2_weight,
                               const OptTensor& fc2_bias) {
    const std::array<const OptTensor*, kSlots> args = {
        &branch, &residual, &gamma_in, &row_scale_in, &seed, &norm1_weight, &norm1_bias, &qkv_weight, &qkv_bias,
        &proj_weight, &proj_bias, &gamma1, &row_scale1, &norm2_weight, &norm2_bias, &fc1_weight, &fc1_bias,
        &fc2_weight, &fc2_bias};
    std::array<Tensor, kSlots> t;
    int64_t needs = 0;  // bit i: slot i requires a gradient (Python's ctx.needs_input_grad)
    for (int i = 0; i < kSlots; ++i) {
      t[i] = value_or_undefined(*args[i]);
      if (t[i].defined() && t[i].requires_grad()) needs |= int64_t{1} << i;
    }
    py::list tape;
    Forward f = block_forward(spec, tape, t);
    py::object mlp = tape[3];
    mlp.attr("needs_input_grad") = py::make_tuple(true, bool(needs >> kFc1Bias & 1), bool(needs >> kFc2Weight & 1),
                                                  bool(needs >> kFc2Bias & 1), false);
    variable_list saved;
    std::vector<int64_t> counts;
    for (const auto& op_ctx : tape) {
      py::tuple op_saved = op_ctx.attr("saved_tensors");
      counts.push_back(static_cast<int64_t>(op_saved.size()));
      for (const auto& s : op_saved) saved.push_back(tensor_or_undefined(s));
      py::delattr(op_ctx, "saved_tensors");
    }
    saved.insert(saved.end(), f.linear_saved.begin(), f.linear_saved.end());
    ctx->save_for_backward(saved);
    c10::intrusive_ptr<c10::ivalue::PyObjectHolder> holder = c10::make_intrusive<TapeHolder>(std::move(tape));
    ctx->saved_data["tape"] = c10::IValue(std::move(holder));
    ctx->saved_data["counts"] = counts;
    ctx->saved_data["needs"] = needs;
    ctx->saved_data["y_dtypes"] = std::vector<int64_t>{int64_t(f.y1_dtype), int64_t(f.y2_dtype)};
    std::vector<int64_t> param_dtypes;
    for (int slot : {kQkvWeight, kQkvBias, kProjWeight, kProjBias, kFc1Weight, kFc2Weight, kFc2Bias}) {
      param_dtypes.push_back(t[slot].defined() ? int64_t(t[slot].scalar_type()) : -1);
    }
    ctx->saved_data["param_dtypes"] = param_dtypes;
    return {f.out, f.h2};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    py::gil_scoped_acquire gil;
    variable_list saved = ctx->get_saved_variables();
    py::list tape = py::reinterpret_borrow<py::list>(ctx->saved_data["tape"].toPyObject());
    auto counts = ctx->saved_data["counts"].toIntVector();
    size_t next = 0;
    for (int i = 0; i < kTapeLength; ++i) {
      py::tuple op_saved(counts[i]);
      for (int64_t j = 0; j < counts[i]; ++j) op_saved[j] = or_none(saved[next++]);
      tape[i].attr("saved_tensors") = op_saved;
    }
    variable_list linear_saved(saved.begin() + next, saved.end());
    variable_list attention_saved(saved.begin() + counts[0], saved.begin() + counts[0] + counts[1]);
    // Nothing on the tape may keep a saved tensor past this call: an unpacked output (h2) refers to
    // this node through its grad_fn, and that cycle through Python objects would keep the block's
    // activations alive until Python's cyclic collector found them, hundreds of steps later, its
    // passes costing the host about a millisecond a step (test_a_step_leaves_no_reference_cycle).
    struct Untape {
      py::list& tape;
      ~Untape() {
        for (const auto& op_ctx : tape) {
          if (py::hasattr(op_ctx, "saved_tensors")) py::delattr(op_ctx, "saved_tensors");
        }
      }
    } untape{tape};
    // Once differentiable (Python's @once_differentiable): computed without a graph, and under
    // create_graph the gradients lead to a node that fails if differentiated.
    bool create_graph = at::GradMode::is_enabled();
    variable_list out;
    {
      at::AutoGradMode no_grad(false);
      out = run_backward(ctx, tape, grads[0], grads[1], linear_saved, attention_saved);
    }
    bool grads_need_grad = false;
    for (const auto& g : grads) grads_need_grad |= g.defined() && g.requires_grad();
    if (!create_graph || !grads_need_grad) return out;
    for (auto& g : out) {
      if (g.defined()) g = g.detach().requires_grad_(true);
    }
    auto error = std::make_shared<torch::autograd::DelayedError>(
        "vit_kernels' one-node block step is once differentiable: its backward cannot be differentiated "
        "(double backward)", static_cast<int64_t>(out.size()));
    return error->apply(std::move(out));
  }

  static variable_list run_backward(AutogradContext* ctx, const py::list& tape, const Tensor& d_out,
                                    const Tensor& d_h2, const variable_list& linear_saved,
                                    const variable_list& attention_saved) {
    Bridge& b = *bridge;
    const Tensor &y1c = linear_saved[0], &qkv_wc = linear_saved[1], &attn_out = linear_saved[2],
                 &proj_wc = linear_saved[3], &y2c = linear_saved[4], &fc1_wc = linear_saved[5];
    int64_t needs = ctx->saved_data["needs"].toInt();
    auto need = [needs](int slot) { return bool(needs >> slot & 1); };
    auto y_dtypes = ctx->saved_data["y_dtypes"].toIntVector();
    auto p = ctx->saved_data["param_dtypes"].toIntVector();
    auto dtype = [](int64_t code) { return static_cast<at::ScalarType>(code); };
    auto opt_dtype = [](int64_t code) {
      return code < 0 ? std::nullopt : std::optional<at::ScalarType>(static_cast<at::ScalarType>(code));
    };
    py::tuple mlp = b.mlp_backward(tape[3], d_out);
    Tensor d_hidden = tensor_or_undefined(mlp[0]), d_fc1_bias = tensor_or_undefined(mlp[1]);
    Tensor d_fc2_weight = as_dtype(tensor_or_undefined(mlp[2]), dtype(p[5]));
    Tensor d_fc2_bias = p[6] < 0 ? Tensor() : as_dtype(tensor_or_undefined(mlp[3]), dtype(p[6]));
    auto fc1 = linear_backward(d_hidden, y2c, fc1_wc, dtype(y_dtypes[1]), dtype(p[4]), std::nullopt,
                               need(kFc1Weight), false);
    py::tuple ln2 = b.layer_norm_backward(tape[2], fc1.dx, d_h2, py::none());
    Tensor d_proj = tensor_or_undefined(ln2[0]), d_h1 = tensor_or_undefined(ln2[1]);
    auto proj = linear_backward(d_proj, attn_out, proj_wc, attn_out.scalar_type(), dtype(p[2]), opt_dtype(p[3]),
                                need(kProjWeight), need(kProjBias));
    const variable_list& a = attention_saved;  // q, k, v, out, lse, seed
    py::object attention = tape[1];
    Tensor d_qkv = call_planned(PlanSite::kAttentionBwd, b.attention_backward,
                                {proj.dx, a[0], a[1], a[2], a[3], a[4], py::object(attention.attr("softmax_scale")),
                                 py::object(attention.attr("dropout_p")), a[5],
                                 py::object(attention.attr("deterministic"))})[0];
    auto qkv = linear_backward(d_qkv, y1c, qkv_wc, dtype(y_dtypes[0]), dtype(p[0]), opt_dtype(p[1]),
                               need(kQkvWeight), need(kQkvBias));
    bool store_residual = tape[0].attr("store_residual").cast<bool>();
    py::tuple ln1 = b.layer_norm_backward(tape[0], qkv.dx, store_residual ? or_none(d_h1) : py::none(), py::none());
    Tensor d_branch = tensor_or_undefined(ln1[0]);
    if (!store_residual) d_branch = d_branch + d_h1;  // h1 was the branch itself
    // One gradient per forward argument: spec, then the slots.
    variable_list out(1 + kSlots);
    Tensor* g = out.data() + 1;
    g[kBranch] = d_branch;
    g[kResidual] = tensor_or_undefined(ln1[1]);
    g[kGammaIn] = tensor_or_undefined(ln1[4]);
    g[kNorm1Weight] = tensor_or_undefined(ln1[2]);
    g[kNorm1Bias] = tensor_or_undefined(ln1[3]);
    g[kQkvWeight] = qkv.dweight;
    g[kQkvBias] = qkv.dbias;
    g[kProjWeight] = proj.dweight;
    g[kProjBias] = proj.dbias;
    g[kGamma1] = tensor_or_undefined(ln2[4]);
    g[kNorm2Weight] = tensor_or_undefined(ln2[2]);
    g[kNorm2Bias] = tensor_or_undefined(ln2[3]);
    g[kFc1Weight] = fc1.dweight;
    g[kFc1Bias] = d_fc1_bias;
    g[kFc2Weight] = d_fc2_weight;
    g[kFc2Bias] = d_fc2_bias;
    for (int i = 0; i < kSlots; ++i) {
      if (!need(i)) g[i] = Tensor();  // an absent or frozen input gets none (CppNode insists)
    }
    return out;
  }
};

std::array<OptTensor, kSlots> slots(const py::args& tensors) {
  TORCH_CHECK(bridge != nullptr, "vit_kernels: the block step's Python functions were not set (nn/block_step.py)");
  TORCH_CHECK(static_cast<int>(tensors.size()) == kSlots, "block_step: expected ", int(kSlots), " tensors, got ",
              tensors.size());
  std::array<OptTensor, kSlots> out;
  for (int i = 0; i < kSlots; ++i) {
    if (!tensors[i].is_none()) out[i] = tensors[i].cast<Tensor>();
  }
  return out;
}

// (branch_out, residual_out) as one autograd node; `tensors` in Slot order, None for an absent one.
py::tuple block_step(const py::object& spec_object, const py::args& tensors) {
  Spec spec(spec_object);
  auto s = slots(tensors);
  auto outputs = BlockStep::apply(spec, s[kBranch], s[kResidual], s[kGammaIn], s[kRowScaleIn], s[kSeed],
                                  s[kNorm1Weight], s[kNorm1Bias], s[kQkvWeight], s[kQkvBias], s[kProjWeight],
                                  s[kProjBias], s[kGamma1], s[kRowScale1], s[kNorm2Weight], s[kNorm2Bias],
                                  s[kFc1Weight], s[kFc1Bias], s[kFc2Weight], s[kFc2Bias]);
  return py::make_tuple(outputs[0], outputs[1]);
}

// The same ops without a node (no input needs a gradient: inference).
py::tuple block_forward_no_grad(const py::object& spec_object, const py::args& tensors) {
  Spec spec(spec_object);
  auto s = slots(tensors);
  std::array<Tensor, kSlots> t;
  for (int i = 0; i < kSlots; ++i) t[i] = value_or_undefined(s[i]);
  Forward f = block_forward(spec, py::none(), t);
  return py::make_tuple(f.out, f.h2);
}

void set_block_step_bridge(py::object setup, py::object layer_norm, py::object attention, py::object mlp,
                           py::object bias_gelu, py::object layer_norm_backward, py::object mlp_backward,
                           py::object attention_backward) {
  if (bridge == nullptr) bridge = new Bridge;
  py::object layer_norm_impl = layer_norm.attr("impl"), attention_impl = attention.attr("impl");
  *bridge = Bridge{std::move(setup), std::move(layer_norm), std::move(attention), std::move(mlp), std::move(bias_gelu),
                   std::move(layer_norm_impl), std::move(attention_impl), std::move(layer_norm_backward),
                   std::move(mlp_backward), std::move(attention_backward)};
}

}  // namespace

void define_block_step(py::module_& m) {
  m.def("set_block_step_bridge", &set_block_step_bridge);
  m.def("block_step", &block_step);
  m.def("block_forward_no_grad", &block_forward_no_grad);
  define_launch_plans(m);
}

}  // namespace vit_kernels
