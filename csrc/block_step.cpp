// A pre-LN block's forward and backward as one C++ autograd node.
//
// vit_kernels/nn/block_step.py says what the one-node step fuses, when a block takes it and why.
// Here: the node, the aten work between the ops (casts, GEMMs, views, the Linears' backward
// formulas), what each op's setup_context saves and each op's backward glue (the sums and casts
// around its launches). The launches stay in each op's Python body (configs, grids, the bound
// launch), called back through `op_bodies()` (csrc/op_nodes.h) or replayed from its launch plan (csrc/launch_plan.cpp),
// so no op's kernel-side host logic is written twice. The ops run in the per-op path's order with
// its roundings: outputs and gradients are bit-equal to it (tests/test_block_step.py), which holds
// the glue written here to the Python it twins.
//
// Why C++: at the batch sizes where a ViT step is host-bound, Python's interpretation of ~30 aten
// calls a block, and of the ops' bodies, is host time eager's block does not spend
// (benchmarks/results/cpu-host-overhead-2026-12-06.md measures what it saves).

#include "op_nodes.h"

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

// What the backward reads, in the node's save_for_backward order: what each op's setup_context
// saves in the per-op path (ops/layer_norm.py, ops/attention.py, ops/bias_gelu_linear.py), then the
// Linears' inputs.
enum Saved {
  kLn1X, kLn1H, kLn1Weight, kLn1Bias, kLn1Gamma, kLn1RowScale, kLn1Stats,
  kQ, kK, kV, kAttnOut, kLse, kAttnSeed,
  kLn2X, kLn2H, kLn2Weight, kLn2Bias, kLn2Gamma, kLn2RowScale, kLn2Stats,
  kHidden, kMlpBias, kMlpWeight,
  kY1c, kQkvWc, kAttnOut2d, kProjWc, kY2c, kFc1Wc,
  kSavedCount
};

struct Forward {
  Tensor out, h2;
  variable_list saved;  // in Saved order, when a backward will run
  LayerNormMeta ln1, ln2;
  at::ScalarType y1_dtype, y2_dtype, fc2_bias_dtype;
};

// The block's forward with autograd off; with `for_backward`, what the backward needs.
Forward block_forward(const Spec& spec, bool for_backward, const std::array<Tensor, kSlots>& t) {
  const Tensor& branch = t[kBranch];
  const int64_t batch = branch.size(0), n_tokens = branch.size(1), dim = branch.size(2);
  const OpBodies& b = op_bodies();
  auto rd1 = residual_dtype(branch, t[kResidual], spec.residual_in_fp32_1);
  bool store = t[kResidual].defined() || t[kGammaIn].defined() || t[kRowScaleIn].defined() ||
               rd1 != branch.scalar_type();
  auto ln1 = call_planned(PlanSite::kAddLayerNormFwd, b.layer_norm,
                          {branch, t[kResidual], t[kNorm1Weight], t[kNorm1Bias], t[kGammaIn], t[kRowScaleIn],
                           spec.eps1, dtype_object(rd1), py::bool_(store)});
  Tensor y1 = ln1[0];
  Tensor h1 = store ? ln1[1] : branch;
  auto dtype = linear_compute_dtype(y1);
  Tensor y1c = as_dtype(y1, dtype), qkv_wc = as_dtype(t[kQkvWeight], dtype);
  Tensor qkv = at::linear(y1c, qkv_wc, opt(as_dtype(t[kQkvBias], dtype)));
  auto qkv_parts = qkv.view({batch, n_tokens, 3, spec.num_heads, spec.head_dim}).unbind(2);
  auto attn = call_planned(PlanSite::kAttentionFwd, b.attention,
                           {qkv_parts[0], qkv_parts[1], qkv_parts[2], spec.softmax_scale, spec.dropout_p, t[kSeed],
                            py::bool_(true)});
  Tensor attn_out = attn[0].view({batch, n_tokens, dim});
  Tensor proj_wc = as_dtype(t[kProjWeight], dtype);
  Tensor proj = at::linear(attn_out, proj_wc, opt(as_dtype(t[kProjBias], dtype)));
  auto rd2 = residual_dtype(proj, h1, spec.residual_in_fp32_2);
  auto ln2 = call_planned(PlanSite::kAddLayerNormFwd, b.layer_norm,
                          {proj, h1, t[kNorm2Weight], t[kNorm2Bias], t[kGamma1], t[kRowScale1], spec.eps2,
                           dtype_object(rd2), py::bool_(true)});
  Tensor y2 = ln2[0], h2 = ln2[1];
  Tensor y2c = as_dtype(y2, dtype), fc1_wc = as_dtype(t[kFc1Weight], dtype);
  Tensor hidden = at::linear(y2c, fc1_wc);
  // The fused MLP's impl, F.linear(bias_gelu(hidden, fc1_bias), fc2's weight, fc2's bias).
  Tensor fc2_wc = as_dtype(t[kFc2Weight], dtype).contiguous(), fc2_bc = as_dtype(t[kFc2Bias], dtype);
  Tensor gelu = call_planned(PlanSite::kBiasGeluFwd, b.bias_gelu, {hidden, t[kFc1Bias], spec.approximate})[0];
  Tensor out = at::linear(gelu, fc2_wc, opt(fc2_bc));
  Forward f;
  f.out = out;
  f.h2 = h2;
  f.ln1 = {t[kResidual].defined(), store, t[kResidual].defined() ? t[kResidual].scalar_type() : branch.scalar_type()};
  f.ln2 = {true, true, h1.scalar_type()};
  f.y1_dtype = y1.scalar_type();
  f.y2_dtype = y2.scalar_type();
  f.fc2_bias_dtype = fc2_bc.defined() ? fc2_bc.scalar_type() : dtype;
  if (for_backward) {
    f.saved = {t[kGammaIn].defined() ? branch : Tensor(), store ? ln1[1] : branch, t[kNorm1Weight], t[kNorm1Bias],
               t[kGammaIn], t[kRowScaleIn], ln1[2],
               qkv_parts[0], qkv_parts[1], qkv_parts[2], attn[0], attn[1], t[kSeed],
               t[kGamma1].defined() ? proj : Tensor(), h2, t[kNorm2Weight], t[kNorm2Bias], t[kGamma1], t[kRowScale1],
               ln2[2],
               hidden, t[kFc1Bias], fc2_wc,
               y1c, qkv_wc, attn_out, proj_wc, y2c, fc1_wc};
  }
  return f;
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
    for (int i = 0; i < kSlots; ++i) t[i] = value_or_undefined(*args[i]);
    int64_t needs = requires_grad_bits(t);  // bit i: slot i requires a gradient
    Forward f = block_forward(spec, true, t);
    ctx->save_for_backward(f.saved);
    ctx->saved_data["needs"] = needs;
    std::vector<int64_t> dtypes;  // y1, y2, fc2's bias as computed, then the parameters' (-1: absent)
    for (auto d : {f.y1_dtype, f.y2_dtype, f.fc2_bias_dtype}) dtypes.push_back(int64_t(d));
    for (int slot : {kQkvWeight, kQkvBias, kProjWeight, kProjBias, kFc1Weight, kFc2Weight, kFc2Bias}) {
      dtypes.push_back(t[slot].defined() ? int64_t(t[slot].scalar_type()) : -1);
    }
    ctx->saved_data["dtypes"] = dtypes;
    ctx->saved_data["layer_norms"] = std::vector<int64_t>{
        f.ln1.has_residual, f.ln1.store_residual, int64_t(f.ln1.residual_dtype),
        f.ln2.has_residual, f.ln2.store_residual, int64_t(f.ln2.residual_dtype)};
    ctx->saved_data["softmax_scale"] = spec.softmax_scale.cast<double>();
    ctx->saved_data["dropout_p"] = spec.dropout_p.cast<double>();
    ctx->saved_data["approximate"] = spec.approximate.cast<std::string>();
    return {f.out, f.h2};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return once_differentiable("one-node block step",
                               [&] { return run_backward(ctx, grads[0], grads[1], ctx->get_saved_variables()); });
  }

  static variable_list run_backward(AutogradContext* ctx, const Tensor& d_out, const Tensor& d_h2,
                                    const variable_list& s) {
    const OpBodies& b = op_bodies();
    int64_t needs = ctx->saved_data["needs"].toInt();
    auto need = [needs](int slot) { return bool(needs >> slot & 1); };
    auto d = ctx->saved_data["dtypes"].toIntVector();
    auto dtype = [&d](int i) { return static_cast<at::ScalarType>(d[i]); };
    auto opt_dtype = [&d](int i) {
      return d[i] < 0 ? std::nullopt : std::optional<at::ScalarType>(static_cast<at::ScalarType>(d[i]));
    };
    enum { kY1, kY2, kFc2BiasC, kQkvW, kQkvB, kProjW, kProjB, kFc1W, kFc2W, kFc2B };  // in `dtypes`
    auto l = ctx->saved_data["layer_norms"].toIntVector();
    LayerNormMeta ln1{bool(l[0]), bool(l[1]), static_cast<at::ScalarType>(l[2])};
    LayerNormMeta ln2{bool(l[3]), bool(l[4]), static_cast<at::ScalarType>(l[5])};

    auto mlp = mlp_backward(d_out, s[kHidden], s[kMlpBias], s[kMlpWeight], true, need(kFc1Bias), need(kFc2Weight),
                            need(kFc2Bias), py::str(ctx->saved_data["approximate"].toStringRef()), dtype(kFc2BiasC));
    Tensor d_fc2_weight = as_dtype(mlp.dweight, dtype(kFc2W));
    Tensor d_fc2_bias = d[kFc2B] < 0 ? Tensor() : as_dtype(mlp.dlinear_bias, dtype(kFc2B));
    auto fc1 = linear_backward(mlp.dx, s[kY2c], s[kFc1Wc], dtype(kY2), dtype(kFc1W), std::nullopt, need(kFc1Weight),
                               false);
    auto n2 = layer_norm_backward(fc1.dx, d_h2, &s[kLn2X], ln2);
    auto proj = linear_backward(n2.dx, s[kAttnOut2d], s[kProjWc], s[kAttnOut2d].scalar_type(), dtype(kProjW),
                                opt_dtype(kProjB), need(kProjWeight), need(kProjBias));
    Tensor d_qkv = call_planned(PlanSite::kAttentionBwd, b.attention_backward,
                                {proj.dx, s[kQ], s[kK], s[kV], s[kAttnOut], s[kLse],
                                 py::float_(ctx->saved_data["softmax_scale"].toDouble()),
                                 py::float_(ctx->saved_data["dropout_p"].toDouble()), s[kAttnSeed], py::bool_(true)})[0];
    auto qkv = linear_backward(d_qkv, s[kY1c], s[kQkvWc], dtype(kY1), dtype(kQkvW), opt_dtype(kQkvB),
                               need(kQkvWeight), need(kQkvBias));
    auto n1 = layer_norm_backward(qkv.dx, n2.dresidual, &s[kLn1X], ln1);
    Tensor d_branch = n1.dx;
    if (!ln1.store_residual) d_branch = d_branch + n2.dresidual;  // h1 was the branch itself
    // One gradient per forward argument: spec, then the slots.
    variable_list out(1 + kSlots);
    Tensor* g = out.data() + 1;
    g[kBranch] = d_branch;
    g[kResidual] = n1.dresidual;
    g[kGammaIn] = n1.dgamma;
    g[kNorm1Weight] = n1.dweight;
    g[kNorm1Bias] = n1.dbias;
    g[kQkvWeight] = qkv.dweight;
    g[kQkvBias] = qkv.dbias;
    g[kProjWeight] = proj.dweight;
    g[kProjBias] = proj.dbias;
    g[kGamma1] = n2.dgamma;
    g[kNorm2Weight] = n2.dweight;
    g[kNorm2Bias] = n2.dbias;
    g[kFc1Weight] = fc1.dweight;
    g[kFc1Bias] = mlp.dbias;
    g[kFc2Weight] = d_fc2_weight;
    g[kFc2Bias] = d_fc2_bias;
    for (int i = 0; i < kSlots; ++i) {
      if (!need(i)) g[i] = Tensor();  // an absent or frozen input gets none (CppNode insists)
    }
    return out;
  }
};

std::array<OptTensor, kSlots> slots(const py::args& tensors) {
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
  Forward f = block_forward(spec, false, t);
  return py::make_tuple(f.out, f.h2);
}

}  // namespace

void define_block_step(py::module_& m) {
  m.def("block_step", &block_step);
  m.def("block_forward_no_grad", &block_forward_no_grad);
  define_launch_plans(m);
  define_op_nodes(m);
}

}  // namespace vit_kernels
