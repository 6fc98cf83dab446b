// Launch plans: an op body's allocations and launches at one signature, replayed without its Python.
// vit_kernels/ops/_plans.py says what a plan holds and when one is safe; csrc/launch_plan.cpp keys
// and replays them.
#pragma once

#include <ATen/core/Tensor.h>
#include <pybind11/pybind11.h>

#include <vector>

namespace vit_kernels {

// One argument of an op body: a tensor (undefined for None) or a Python scalar (float, int, bool,
// str, torch.dtype, None). Hidden like pybind11's own types, whose object it holds.
#if defined(__GNUC__)
#define VIT_KERNELS_HIDDEN __attribute__((visibility("hidden")))
#else
#define VIT_KERNELS_HIDDEN
#endif
struct VIT_KERNELS_HIDDEN OpArg {
  at::Tensor tensor;
  pybind11::object scalar;
  bool is_tensor;
  OpArg(const at::Tensor& t) : tensor(t), is_tensor(true) {}  // NOLINT: implicit on purpose
  OpArg(pybind11::object s) : scalar(std::move(s)), is_tensor(false) {}  // NOLINT
  pybind11::object to_python() const;
};

// The op bodies whose plans are kept, each in its own table.
enum class PlanSite {
  kAddLayerNormFwd, kAttentionFwd, kBiasGeluFwd, kAttentionBwd, kAddLayerNormBwd, kBiasGeluBwd,
  kFlashAttentionBwd,  // the per-op backward (dq, dk, dv apart); kAttentionBwd is the block's packed one
  kCount
};

// body(*args)'s tensors (a tuple's, or the one tensor it returns): replayed from the plan of this
// signature where one was recorded, else the body called (and, at a signature's second call,
// recorded). The GIL must be held.
std::vector<at::Tensor> call_planned(PlanSite site, const pybind11::object& body, const std::vector<OpArg>& args);

// _validate.checked_once's signature of args[0:n], appended to `key`: per tensor (exactly a
// torch.Tensor or a `parameter_type`, strided) its type, dtype, device, sizes and strides; per scalar
// what a plan's key holds. False for an argument it does not cover (another Tensor subclass,
// another type).
bool signature_key(std::vector<int64_t>& key, PyObject* const* args, size_t n, PyObject* parameter_type);

void define_launch_plans(pybind11::module_& m);

}  // namespace vit_kernels
