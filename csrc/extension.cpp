// The vit_kernels operator library: TORCH_LIBRARY definitions and CPU kernels.
//
// Ops are defined here in C++ (pytorch/extension-cpp's layout): the schema and the
// CPU implementation live in csrc/*.cpp, the CUDA implementation in csrc/cuda/*.cu,
// and fake (meta) kernels plus autograd are registered from Python in
// vit_kernels/ops/. Loading this library (import of vit_kernels._C, or the
// first-use JIT build in vit_kernels/_extension.py) makes them appear under
// torch.ops.vit_kernels.

#include <pybind11/pybind11.h>
#include <torch/library.h>

namespace vit_kernels {
void define_block_step(pybind11::module_& m);  // csrc/block_step.cpp
}

// The Python module (vit_kernels._C, or the JIT build's vit_kernels_C): importing it runs the
// static TORCH_LIBRARY registrations, whose ops are reached through torch.ops; its functions
// are the one-node block step's C++ host path (nn/block_step.py).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { vit_kernels::define_block_step(m); }

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
