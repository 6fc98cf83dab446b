// Launch plans, keyed and replayed (vit_kernels/ops/_plans.py records them and says why).
//
// A signature is a vector of integers: per tensor argument its dtype, device, sizes, strides,
// address modulo 16 (Triton specializes pointers on 16-byte alignment) and which earlier argument
// shares its address, or a mark for None; per scalar its type and value. A site's first call at a
// signature runs the body; its second records (ops/_plans.record; a few times while its launches
// are not all bound yet); later ones replay: the outputs by at::empty_strided, each launch by a
// direct call of the compiled kernel's C launcher with the arguments Triton's bound path would
// hand it (pointers as integers), on the current stream, and only on the device Triton launched
// on while recording. A signature the recording refused runs the body on every call.

#include "launch_plan.h"

#include <ATen/ATen.h>
#include <torch/csrc/Dtype.h>
#include <torch/python.h>

#include <algorithm>
#include <cstring>
#include <memory>

namespace vit_kernels {

namespace py = pybind11;
using at::Tensor;

py::object OpArg::to_python() const {
  if (!is_tensor) return scalar;
  return tensor.defined() ? py::cast(tensor) : py::none();
}

namespace {

struct PlanArgument {
  int kind;  // 0: the constant `value`; 1: input `index`'s address; 2, 3: output's, scratch's `index` plus `offset`
  int index;
  int64_t offset;
  py::object value;
};

struct PlanLaunch {
  py::object run, function, metadata;
  py::object grid[3];
  std::vector<PlanArgument> arguments;
};

struct PlanOutput {
  std::vector<int64_t> sizes, strides;
  at::TensorOptions options;
};

struct Plan {
  std::vector<PlanOutput> outputs;
  std::vector<PlanLaunch> launches;
  std::vector<std::pair<int64_t, at::Device>> scratch;  // bytes, device
};

enum class State { kSeen, kRefused, kPlanned };

struct Entry {
  std::vector<int64_t> key;
  State state;
  std::shared_ptr<const Plan> plan;
  int64_t device;  // the device Triton launched on while recording
  int attempts;    // recordings made
};

constexpr int kMaxAttempts = 3;  // recordings of a signature whose launches were not all bound yet
constexpr size_t kMaxEntries = 64;  // per site; past it the table is cleared and refilled as calls come

// What the plans need from Python, set once by nn/block_step.py; `record` None: plans are off.
struct Bridge {
  py::object record;           // ops/_plans.record(body, *args) -> (result, plan or None, try again)
  py::object launcher_module;  // ops/_launcher: its `driver` (device and stream, as the Launcher asks)
  py::object hooks_installed;  // ops/_launcher._hooks_installed
  py::object traced;           // _dispatch.TRACED_LAUNCHES
  std::vector<Entry> sites[static_cast<int>(PlanSite::kCount)];
  // The attribute names read on every call, made once (pybind11's attr(const char*) makes a
  // string each time).
  py::str on{"on"}, driver{"driver"}, active{"active"}, get_current_device{"get_current_device"},
      get_current_stream{"get_current_stream"};
};
Bridge* bridge = nullptr;  // never freed: its py::objects must not outlive the interpreter's finalization

int64_t float_bits(double value) {
  int64_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

// Appends a scalar's key; false for a type a signature does not cover.
bool scalar_key(std::vector<int64_t>& key, PyObject* value) {
  if (value == Py_None) {
    key.push_back(-2);
  } else if (PyBool_Check(value)) {
    key.insert(key.end(), {-3, value == Py_True});
  } else if (PyLong_CheckExact(value)) {
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (overflow != 0) return false;
    key.insert(key.end(), {-4, static_cast<int64_t>(v)});
  } else if (PyFloat_CheckExact(value)) {
    key.insert(key.end(), {-5, float_bits(PyFloat_AS_DOUBLE(value))});
  } else if (THPDtype_Check(value)) {
    key.insert(key.end(), {-6, static_cast<int64_t>(reinterpret_cast<THPDtype*>(value)->scalar_type)});
  } else if (PyUnicode_CheckExact(value)) {
    Py_ssize_t n = 0;
    const char* chars = PyUnicode_AsUTF8AndSize(value, &n);
    if (chars == nullptr) {
      PyErr_Clear();
      return false;
    }
    key.insert(key.end(), {-7, static_cast<int64_t>(n)});
    for (Py_ssize_t i = 0; i < n; i += 8) {
      int64_t word = 0;
      std::memcpy(&word, chars + i, std::min<Py_ssize_t>(8, n - i));
      key.push_back(word);
    }
  } else {
    return false;
  }
  return true;
}

// `address`: this tensor's; `earlier`: the addresses of the arguments before it (an address no
// tensor has for a non-tensor or None). The key notes the first of them at this tensor's address (an op may be
// handed one tensor twice, to write it in place: a plan maps a pointer to the first).
void tensor_key(std::vector<int64_t>& key, const Tensor& t, const void* address, const void* const* earlier,
                size_t n_earlier) {
  if (!t.defined()) {
    key.push_back(-1);
    return;
  }
  key.insert(key.end(), {static_cast<int64_t>(t.scalar_type()), static_cast<int64_t>(t.device().type()),
                         static_cast<int64_t>(t.device().index()), t.dim()});
  key.insert(key.end(), t.sizes().begin(), t.sizes().end());
  key.insert(key.end(), t.strides().begin(), t.strides().end());
  key.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(address) & 15));
  int64_t same_address = -1;
  for (size_t j = 0; j < n_earlier && same_address < 0; ++j) {
    if (earlier[j] == address) same_address = static_cast<int64_t>(j);
  }
  key.push_back(same_address);
}

std::shared_ptr<const Plan> plan_from_python(const py::handle& description) {
  auto plan = std::make_shared<Plan>();
  py::tuple outputs = description[py::int_(0)], launches = description[py::int_(1)];
  for (const auto& out : outputs) {
    py::tuple o = py::reinterpret_borrow<py::tuple>(out);
    plan->outputs.push_back({o[0].cast<std::vector<int64_t>>(), o[1].cast<std::vector<int64_t>>(),
                             at::TensorOptions().dtype(o[2].cast<at::ScalarType>()).device(o[3].cast<at::Device>())});
  }
  for (const auto& launch : launches) {
    py::tuple l = py::reinterpret_borrow<py::tuple>(launch);
    PlanLaunch p;
    p.run = l[0];
    p.function = l[1];
    p.metadata = l[2];
    py::tuple grid = l[3];
    for (int i = 0; i < 3; ++i) p.grid[i] = grid[i];
    for (const auto& argument : py::reinterpret_borrow<py::tuple>(l[4])) {
      py::tuple a = py::reinterpret_borrow<py::tuple>(argument);
      p.arguments.push_back({a[0].cast<int>(), a[1].cast<int>(), a[2].cast<int64_t>(), a[3]});
    }
    plan->launches.push_back(std::move(p));
  }
  for (const auto& s : py::reinterpret_borrow<py::tuple>(description[py::int_(2)])) {
    py::tuple bytes_device = py::reinterpret_borrow<py::tuple>(s);
    plan->scratch.emplace_back(bytes_device[0].cast<int64_t>(), bytes_device[1].cast<at::Device>());
  }
  return plan;
}

PyObject* address_of(const Tensor& t, int64_t offset) {
  return PyLong_FromUnsignedLongLong(reinterpret_cast<uintptr_t>(t.const_data_ptr()) + offset);
}

std::vector<Tensor> replay(const Plan& plan, const std::vector<OpArg>& args, const py::object& active,
                           const py::object& device) {
  std::vector<Tensor> outputs;
  outputs.reserve(plan.outputs.size());
  for (const auto& o : plan.outputs) outputs.push_back(at::empty_strided(o.sizes, o.strides, o.options));
  if (plan.launches.empty()) return outputs;
  std::vector<Tensor> scratch;  // freed after the launches: the caching allocator orders reuse on the stream
  for (const auto& [bytes, device] : plan.scratch) {
    scratch.push_back(at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(device)));
  }
  py::object stream = active.attr(bridge->get_current_stream)(device);
  std::vector<PyObject*> argv;
  std::vector<py::object> made;  // the addresses made for this launch
  for (const auto& launch : plan.launches) {
    argv.assign({launch.grid[0].ptr(), launch.grid[1].ptr(), launch.grid[2].ptr(), stream.ptr(),
                 launch.function.ptr(), launch.metadata.ptr(), Py_None, Py_None, Py_None});
    made.clear();
    for (const auto& a : launch.arguments) {
      if (a.kind == 0) {
        argv.push_back(a.value.ptr());
        continue;
      }
      PyObject* address = a.kind == 1   ? address_of(args[a.index].tensor, 0)
                          : a.kind == 2 ? address_of(outputs[a.index], a.offset)
                                        : address_of(scratch[a.index], a.offset);
      if (address == nullptr) throw py::error_already_set();
      made.push_back(py::reinterpret_steal<py::object>(address));
      argv.push_back(address);
    }
    PyObject* result = PyObject_Vectorcall(launch.run.ptr(), argv.data(), argv.size(), nullptr);
    if (result == nullptr) throw py::error_already_set();
    Py_DECREF(result);
  }
  return outputs;
}

std::vector<Tensor> tensors_of(const py::object& result) {
  std::vector<Tensor> out;
  if (py::isinstance<py::tuple>(result)) {
    for (const auto& r : py::reinterpret_borrow<py::tuple>(result)) out.push_back(r.cast<Tensor>());
  } else {
    out.push_back(result.cast<Tensor>());
  }
  return out;
}

py::tuple python_args(const std::vector<OpArg>& args) {
  py::tuple out(args.size());
  for (size_t i = 0; i < args.size(); ++i) out[i] = args[i].to_python();
  return out;
}

std::vector<Tensor> run_body(const py::object& body, const std::vector<OpArg>& args) {
  return tensors_of(body(*python_args(args)));
}

// Triton's active driver, as the Launcher asks it (ops/_launcher.py), and the device it launches on now.
py::object active_driver(const Bridge& b) { return b.launcher_module.attr(b.driver).attr(b.active); }

int64_t current_device(const Bridge& b, const py::object& active) {
  return active.attr(b.get_current_device)().cast<int64_t>();
}

}  // namespace

std::vector<Tensor> call_planned(PlanSite site, const py::object& body, const std::vector<OpArg>& args) {
  Bridge* b = bridge;
  if (b == nullptr || b->record.is_none() || py::bool_(b->traced.attr(b->on)) || py::bool_(b->hooks_installed())) {
    return run_body(body, args);
  }
  std::vector<int64_t> key;
  key.reserve(16 * args.size());
  // Each tensor's address read once (data_ptr checks the storage); no tensor's is kNotATensor.
  static const char not_a_tensor = 0;
  const void* const kNotATensor = &not_a_tensor;
  std::vector<const void*> addresses(args.size(), kNotATensor);
  for (size_t i = 0; i < args.size(); ++i) {
    const OpArg& a = args[i];
    if (a.is_tensor) {
      if (a.tensor.defined()) addresses[i] = a.tensor.const_data_ptr();
      tensor_key(key, a.tensor, addresses[i], addresses.data(), i);
    } else if (!scalar_key(key, a.scalar.ptr())) {
      return run_body(body, args);
    }
  }
  // Python runs inside the body, the recording and a launch: another thread may change the table
  // meanwhile, so no reference into it is held across them.
  auto& entries = b->sites[static_cast<int>(site)];
  auto found = std::find_if(entries.begin(), entries.end(), [&key](const Entry& e) { return e.key == key; });
  if (found == entries.end()) {
    if (entries.size() >= kMaxEntries) entries.clear();
    entries.push_back({key, State::kSeen, nullptr, -1, 0});
    return run_body(body, args);
  }
  if (found->state == State::kPlanned) {
    std::shared_ptr<const Plan> plan = found->plan;
    if (plan->launches.empty()) return replay(*plan, args, py::none(), py::none());
    // The driver is asked only for a plan that launches: where none was recorded (the interpreter)
    // there may be no driver.
    int64_t planned_on = found->device;
    py::object active = active_driver(*b);
    if (current_device(*b, active) != planned_on) return run_body(body, args);
    return replay(*plan, args, active, py::int_(planned_on));
  }
  if (found->state == State::kRefused) return run_body(body, args);
  py::tuple recorded = b->record(body, *python_args(args));
  std::shared_ptr<const Plan> plan;
  int64_t device = -1;
  if (!recorded[1].is_none()) {
    plan = plan_from_python(recorded[1]);
    if (!plan->launches.empty()) device = current_device(*b, active_driver(*b));
  }
  found = std::find_if(entries.begin(), entries.end(), [&key](const Entry& e) { return e.key == key; });
  if (found != entries.end()) {
    bool again = recorded[2].cast<bool>() && ++found->attempts < kMaxAttempts;
    found->state = plan ? State::kPlanned : again ? State::kSeen : State::kRefused;
    found->plan = std::move(plan);
    found->device = device;
  }
  return tensors_of(recorded[0]);
}

namespace {

// record None turns plans off (the bodies run on every call) and drops every plan kept.
void set_launch_plans(py::object record, py::object launcher_module, py::object hooks_installed, py::object traced) {
  if (bridge == nullptr) bridge = new Bridge;
  for (auto& site : bridge->sites) site.clear();
  bridge->record = std::move(record);
  bridge->launcher_module = std::move(launcher_module);
  bridge->hooks_installed = std::move(hooks_installed);
  bridge->traced = std::move(traced);
}

// How many signatures of each site are planned, refused or seen once (for tests).
py::dict launch_plan_counts() {
  py::dict out;
  if (bridge == nullptr) return out;
  const char* names[] = {"add_layer_norm_fwd", "attention_fwd", "bias_gelu_fwd", "attention_bwd",
                         "add_layer_norm_bwd", "bias_gelu_bwd", "flash_attention_bwd"};
  for (int i = 0; i < static_cast<int>(PlanSite::kCount); ++i) {
    int64_t counts[3] = {0, 0, 0};
    for (const auto& e : bridge->sites[i]) counts[static_cast<int>(e.state)]++;
    out[names[i]] = py::dict(py::arg("seen") = counts[0], py::arg("refused") = counts[1], py::arg("planned") = counts[2]);
  }
  return out;
}

}  // namespace

bool signature_key(std::vector<int64_t>& key, PyObject* const* args, size_t n, PyObject* parameter_type) {
  for (size_t i = 0; i < n; ++i) {
    PyObject* value = args[i];
    bool parameter = Py_TYPE(value) == reinterpret_cast<PyTypeObject*>(parameter_type);
    if (THPVariable_CheckExact(value) || parameter) {
      const Tensor& t = THPVariable_Unpack(value);
      if (t.layout() != at::kStrided) return false;
      key.insert(key.end(), {parameter ? -11 : -10, static_cast<int64_t>(t.scalar_type()),
                             static_cast<int64_t>(t.device().type()), static_cast<int64_t>(t.device().index()),
                             t.dim()});
      key.insert(key.end(), t.sizes().begin(), t.sizes().end());
      key.insert(key.end(), t.strides().begin(), t.strides().end());
    } else if (THPVariable_Check(value) || !scalar_key(key, value)) {
      return false;
    }
  }
  return true;
}

namespace {

// _validate.checked_once's signature of `args` as bytes (signature_key's). The tuple signature
// costs several us a call in attribute reads and tuple hashing; this one is a buffer. None for an
// argument it does not cover (another Tensor subclass, another type): the caller then builds the
// tuple signature.
py::object check_signature(const py::tuple& args, const py::handle& parameter_type) {
  std::vector<int64_t> key;
  key.reserve(12 * args.size());
  if (!signature_key(key, reinterpret_cast<PyTupleObject*>(args.ptr())->ob_item, args.size(), parameter_type.ptr())) {
    return py::none();
  }
  return py::bytes(reinterpret_cast<const char*>(key.data()), key.size() * sizeof(int64_t));
}

// call_planned from Python, for tests: `site` by index, `args` as the body takes them.
py::tuple call_planned_py(int site, const py::object& body, const py::args& args) {
  TORCH_CHECK(site >= 0 && site < static_cast<int>(PlanSite::kCount), "call_planned: no site ", site);
  std::vector<OpArg> op_args;
  for (const auto& a : args) {
    if (THPVariable_Check(a.ptr())) {
      op_args.emplace_back(a.cast<Tensor>());
    } else {
      op_args.emplace_back(py::reinterpret_borrow<py::object>(a));
    }
  }
  auto out = call_planned(static_cast<PlanSite>(site), body, op_args);
  py::tuple result(out.size());
  for (size_t i = 0; i < out.size(); ++i) result[i] = py::cast(out[i]);
  return result;
}

}  // namespace

void define_launch_plans(py::module_& m) {
  m.def("set_launch_plans", &set_launch_plans);
  m.def("launch_plan_counts", &launch_plan_counts);
  m.def("call_planned", &call_planned_py);
  m.def("check_signature", &check_signature);
}

}  // namespace vit_kernels
