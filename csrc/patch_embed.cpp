// Patch embedding: op schemas and the CPU implementation (see patch_embed.h for the math).
// The CUDA implementation is csrc/cuda/patch_embed.cu; fake kernels and autograd are
// registered from Python in vit_kernels/ops/patch_embed.py.

#include <torch/library.h>

#include "patch_embed.h"

namespace vit_kernels {

at::Tensor patch_embed_fwd_cpu(const at::Tensor& images, const at::Tensor& weight, const OptTensor& bias,
                               const OptTensor& cls_token, const OptTensor& pos_embed, const OptTensor& mean,
                               const OptTensor& std) {
  return patch_embed_forward(images, weight, bias, cls_token, pos_embed, mean, std, patchify_aten, epilogue_aten);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> patch_embed_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& images, const at::Tensor& weight, const OptTensor& mean,
    const OptTensor& std, bool has_bias, bool has_cls, int64_t pos_rows, bool images_grad) {
  return patch_embed_backward(grad_out, images, weight, mean, std, has_bias, has_cls, pos_rows, images_grad,
                              patchify_aten);
}

TORCH_LIBRARY_FRAGMENT(vit_kernels, m) {
  m.def(
      "patch_embed_fwd(Tensor images, Tensor weight, Tensor? bias, Tensor? cls_token, Tensor? pos_embed, "
      "Tensor? mean, Tensor? std) -> Tensor");
  m.def(
      "patch_embed_bwd(Tensor grad_out, Tensor images, Tensor weight, Tensor? mean, Tensor? std, bool has_bias, "
      "bool has_cls, int pos_rows, bool images_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vit_kernels, CPU, m) {
  m.impl("patch_embed_fwd", &patch_embed_fwd_cpu);
  m.impl("patch_embed_bwd", &patch_embed_bwd_cpu);
}

}  // namespace vit_kernels
