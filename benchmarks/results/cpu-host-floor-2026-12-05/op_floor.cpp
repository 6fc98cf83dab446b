// Not part of the package: a measurement (benchmarks/results/cpu-host-overhead-2026-12-05.md, "The floor
// of one op as a C++ autograd node"). add + LayerNorm's host work as one C++ autograd node, no launch:
// the forward allocates y, h_new and the [2, rows] statistics and saves what the op saves; the backward
// allocates dx and the partial sums and reduces them (partials.sum(1).unbind(0)), as the op does.
// Called through a METH_FASTCALL function (no pybind11 argument parsing), checks of nothing.
#include <torch/extension.h>
#include <torch/csrc/autograd/python_variable.h>

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct AddLayerNormFloor : public torch::autograd::Function<AddLayerNormFloor> {
  static variable_list forward(AutogradContext* ctx, Tensor x, Tensor residual, Tensor weight, Tensor bias) {
    Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
    Tensor h = at::empty_like(x, at::MemoryFormat::Contiguous);
    Tensor stats = at::empty({2, x.numel() / x.size(-1)}, x.options().dtype(at::kFloat));
    ctx->save_for_backward({h, weight, bias, stats});
    ctx->set_materialize_grads(false);
    return {y, h};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    Tensor dy = grads[0];
    Tensor dx = at::empty_like(dy, at::MemoryFormat::Contiguous);
    auto param_grads = at::empty({2, 8, dy.size(-1)}, dy.options().dtype(at::kFloat)).sum(1).unbind(0);
    return {dx, dx, param_grads[0], param_grads[1]};
  }
};

static PyObject* add_layer_norm_floor(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  Tensor x = THPVariable_Unpack(args[0]), residual = THPVariable_Unpack(args[1]);
  Tensor weight = THPVariable_Unpack(args[2]), bias = THPVariable_Unpack(args[3]);
  variable_list out;
  if (at::GradMode::is_enabled() &&
      (x.requires_grad() || residual.requires_grad() || weight.requires_grad() || bias.requires_grad())) {
    out = AddLayerNormFloor::apply(x, residual, weight, bias);
  } else {
    out = {at::empty_like(x, at::MemoryFormat::Contiguous), at::empty_like(x, at::MemoryFormat::Contiguous),
           at::empty({2, x.numel() / x.size(-1)}, x.options().dtype(at::kFloat))};
  }
  return PyTuple_Pack(2, THPVariable_Wrap(out[0]), THPVariable_Wrap(out[1]));
  END_HANDLE_TH_ERRORS
}

static PyMethodDef methods[] = {
    {"add_layer_norm_floor", (PyCFunction)(void (*)(void))add_layer_norm_floor, METH_FASTCALL, ""},
    {nullptr, nullptr, 0, nullptr}};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { PyModule_AddFunctions(m.ptr(), methods); }
