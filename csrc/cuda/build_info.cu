// Compiled only in CUDA builds of the extension (see vit_kernels/_build_config.py).
#include <cuda_runtime_api.h>
#include <cstdint>

namespace vit_kernels {

int64_t cuda_runtime_version() { return CUDART_VERSION; }

}  // namespace vit_kernels
