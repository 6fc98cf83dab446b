// Patch embedding, shared by the CPU (patch_embed.cpp) and CUDA (cuda/patch_embed.cu) builds.
//
//   tokens[b, n] = normalize(patch(images)[b, n]) @ W^T + bias     (W = weight.view(D, C*P*P))
//   out[b]       = [cls + pos[0] | tokens + pos[1:]]                (pos [1, N+1, D], class token)
//                  [cls          | tokens + pos]                    (pos [1, N, D], timm's no_embed_class)
//                  [tokens + pos]                                   (no class token)
//
// A patch is flattened in (c, ph, pw) order, so weight in the Conv2d layout [D, C, P, P]
// is the linear map of the paper. uint8 images are scaled by 1/255 before the optional
// per-channel (x - mean[c]) / std[c]; float images are normalized as they are. The GEMM
// runs in the activation dtype: the images' float dtype, or the weight's for uint8 images.
//
// Each backend supplies `patchify` (images -> normalized patches [B*N, C*P*P]) and
// `epilogue` (tokens [B, N, D] -> the final [B, N(+1), D] buffer with bias, position
// embeddings and the class token written in one pass); the GEMMs and the reductions of
// the backward are ATen calls (cuBLAS on the GPU).

#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace vit_kernels {

using OptTensor = std::optional<at::Tensor>;

// Float32 for every activation dtype, float64 for float64 (so gradcheck sees exact math).
inline at::ScalarType wide(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

inline at::ScalarType compute_dtype(const at::Tensor& images, const at::Tensor& weight) {
  return images.scalar_type() == at::kByte ? weight.scalar_type() : images.scalar_type();
}

// The pure-ATen patchify, used by the CPU build.
inline at::Tensor patchify_aten(const at::Tensor& images, int64_t patch, const OptTensor& mean,
                                const OptTensor& std, at::ScalarType dtype) {
  const int64_t batch = images.size(0), channels = images.size(1);
  const int64_t grid_h = images.size(2) / patch, grid_w = images.size(3) / patch;
  const at::ScalarType w = wide(dtype);
  at::Tensor x = images.scalar_type() == at::kByte ? images.to(w).mul_(1.0 / 255.0) : images.to(w);
  if (mean.has_value()) x = (x - mean->to(w).view({1, channels, 1, 1})) / std->to(w).view({1, channels, 1, 1});
  return x.view({batch, channels, grid_h, patch, grid_w, patch})
      .permute({0, 2, 4, 1, 3, 5})
      .reshape({batch * grid_h * grid_w, channels * patch * patch})
      .to(dtype);
}

// The pure-ATen epilogue, used by the CPU build.
inline at::Tensor epilogue_aten(const at::Tensor& tokens, const OptTensor& bias, const OptTensor& cls_token,
                                const OptTensor& pos_embed) {
  const int64_t batch = tokens.size(0), n = tokens.size(1), dim = tokens.size(2);
  const int64_t prefix = cls_token.has_value() ? 1 : 0;
  at::Tensor out = at::empty({batch, n + prefix, dim}, tokens.options());
  const at::ScalarType w = wide(tokens.scalar_type());
  at::Tensor body = tokens.to(w);
  if (bias.has_value()) body = body + bias->to(w);
  if (pos_embed.has_value()) {
    const int64_t pos_prefix = pos_embed->size(1) - n;  // 1 when pos holds the class token's row
    body = body + pos_embed->narrow(1, pos_prefix, n).to(w);
  }
  out.narrow(1, prefix, n).copy_(body);
  if (prefix) {
    at::Tensor cls = cls_token->to(w).view({1, 1, dim});
    if (pos_embed.has_value() && pos_embed->size(1) == n + 1) cls = cls + pos_embed->narrow(1, 0, 1).to(w);
    out.narrow(1, 0, 1).copy_(cls.expand({batch, 1, dim}));
  }
  return out;
}

template <typename Patchify, typename Epilogue>
at::Tensor patch_embed_forward(const at::Tensor& images, const at::Tensor& weight, const OptTensor& bias,
                               const OptTensor& cls_token, const OptTensor& pos_embed, const OptTensor& mean,
                               const OptTensor& std, Patchify patchify, Epilogue epilogue) {
  const int64_t patch = weight.size(2), dim = weight.size(0);
  const int64_t batch = images.size(0), n = (images.size(2) / patch) * (images.size(3) / patch);
  const at::ScalarType dtype = compute_dtype(images, weight);
  at::Tensor patches = patchify(images, patch, mean, std, dtype);
  at::Tensor tokens = at::matmul(patches, weight.reshape({dim, -1}).to(dtype).t()).view({batch, n, dim});
  return epilogue(tokens, bias, cls_token, pos_embed);
}

// Gradients (images, weight, bias, cls_token, pos_embed); an empty tensor where not requested.
// bias, cls_token and pos_embed gradients are float32 (float64 for float64 activations); the
// caller casts them to the parameters' dtypes.
template <typename Patchify>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> patch_embed_backward(
    const at::Tensor& grad_out, const at::Tensor& images, const at::Tensor& weight, const OptTensor& mean,
    const OptTensor& std, bool has_bias, bool has_cls, int64_t pos_rows, bool images_grad, Patchify patchify) {
  const int64_t patch = weight.size(2), dim = weight.size(0);
  const int64_t batch = images.size(0), channels = images.size(1);
  const int64_t grid_h = images.size(2) / patch, grid_w = images.size(3) / patch, n = grid_h * grid_w;
  const int64_t prefix = has_cls ? 1 : 0;
  const at::ScalarType dtype = compute_dtype(images, weight);
  at::Tensor grad_tokens = grad_out.narrow(1, prefix, n).reshape({batch * n, dim});

  // Patches are recomputed, not saved: one more read of the images instead of a [B*N, K] tensor kept alive.
  at::Tensor patches = patchify(images, patch, mean, std, dtype);
  at::Tensor grad_weight = at::matmul(grad_tokens.t(), patches).view(weight.sizes()).to(weight.scalar_type());
  const at::Tensor none = at::empty({0}, grad_out.options());
  const at::ScalarType w = wide(grad_out.scalar_type());
  at::Tensor grad_bias = has_bias ? grad_tokens.to(w).sum(0) : none;
  at::Tensor grad_cls = has_cls ? grad_out.narrow(1, 0, 1).to(w).sum(0, /*keepdim=*/true) : none;
  at::Tensor grad_pos = none;
  if (pos_rows > 0) {
    at::Tensor rows = pos_rows == n + prefix ? grad_out : grad_out.narrow(1, prefix, n);
    grad_pos = rows.to(w).sum(0, /*keepdim=*/true);
  }
  at::Tensor grad_images = none;
  if (images_grad) {
    at::Tensor grad_patches = at::matmul(grad_tokens, weight.reshape({dim, -1}).to(grad_tokens.scalar_type()));
    grad_images = grad_patches.to(w)
                      .view({batch, grid_h, grid_w, channels, patch, patch})
                      .permute({0, 3, 1, 4, 2, 5})
                      .reshape({batch, channels, grid_h * patch, grid_w * patch});
    if (mean.has_value()) grad_images = grad_images / std->to(w).view({1, channels, 1, 1});
    grad_images = grad_images.to(images.scalar_type()).contiguous(images.suggest_memory_format());
  }
  return {grad_images, grad_weight, grad_bias, grad_cls, grad_pos};
}

}  // namespace vit_kernels
