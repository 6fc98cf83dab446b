// The vit_kernels operator library: TORCH_LIBRARY definitions and CPU kernels.
//
// Ops are defined here in C++ (pytorch/extension-cpp's layout): the schema and the
// CPU implementation live in csrc/*.cpp, the CUDA implementation in csrc/cuda/*.cu,
// and fake (meta) kernels plus autograd are registered from Python in
// vit_kernels/ops/. Loading this library (import of vit_kernels._C, or the
// first-use JIT build in vit_kernels/_extension.py) makes them appear under
// torch.ops.vit_kernels.

#include <Python.h>
#include <torch/library.h>

extern "C" {
// An empty Python module so `import vit_kernels._C` loads the shared object and
// runs its static TORCH_LIBRARY registrations; the ops are reached through
// torch.ops, not through this module.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace vit_kernels {

#ifdef VIT_KERNELS_WITH_CUDA
int64_t cuda_runtime_version();  // csrc/cuda/build_info.cu
#else
int64_t cuda_runtime_version() { return 0; }
#endif

// The CUDA runtime version the CUDA sources were compiled against (e.g. 13000),
// or 0 when the extension was built without them. Lets `vit_kernels.bench` and the
// tests tell a CPU-only build from a CUDA build without a GPU present.
int64_t extension_cuda_version() { return cuda_runtime_version(); }

TORCH_LIBRARY(vit_kernels, m) {
  m.def("extension_cuda_version() -> int", &extension_cuda_version);
}

}  // namespace vit_kernels
