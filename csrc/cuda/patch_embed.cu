// Patch embedding, CUDA implementation (see ../patch_embed.h for the math and the layout).
//
// Forward: a patchify kernel gathers each P x P patch of every channel into one row of the
// GEMM operand, converting uint8/fp16/bf16/fp32 to the activation dtype and applying the
// per-channel normalization on the way (a uint8 loader ships a quarter of the bytes);
// the image is addressed through its strides, so channels_last input is read without a
// copy. The GEMM is ATen's (cuBLAS). An epilogue kernel writes the final [B, N(+1), D]
// buffer in one pass: bias and position embeddings added, the class token row filled,
// no torch.cat and no separate add.
// Only c10 CUDA headers are included (ATen/cuda/CUDAContext.h pulls in cuSPARSE/cuBLAS headers
// that a minimal toolkit may lack). The gather moves 16-byte vectors where the patch width,
// strides and alignment allow (patchify_vector_width), element by element otherwise.
// Not done yet: writing the GEMM straight into the final buffer (the epilogue reads the
// GEMM's [B*N, D] result once); it waits for a GPU measurement of what it would save.

#include <c10/cuda/CUDAStream.h>
#include <cstdint>
#include <type_traits>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include "../patch_embed.h"

namespace vit_kernels {
namespace {

constexpr int kThreads = 256;

int64_t blocks_for(int64_t total) {
  const int64_t max_blocks = 65535LL * 32;
  return std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, max_blocks));
}

// VEC consecutive elements of one type, aligned to their size, for one vector load or store.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Aligned {
  T v[VEC];
};

// Each thread converts VEC consecutive elements of one patch row (same channel and patch
// row, consecutive columns): with VEC > 1 one vector load of the image and one vector store
// of the operand (16 bytes for the wider of the two types). The launcher picks the largest
// VEC that the patch width, the strides and both pointers' alignment allow; VEC = 1 (e.g.
// channels_last, where a patch row is strided) reads element by element.
template <typename in_t, typename out_t, int VEC>
__global__ void patchify_kernel(const in_t* __restrict__ images, out_t* __restrict__ patches,
                                const float* __restrict__ mean, const float* __restrict__ inv_std, int64_t stride_b,
                                int64_t stride_c, int64_t stride_h, int64_t stride_w, int64_t patch, int64_t grid_w,
                                int64_t patches_per_image, int64_t row_len, int64_t total_vecs, float scale) {
  for (int64_t vec = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; vec < total_vecs;
       vec += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = vec * VEC;
    const int64_t row = i / row_len, k = i % row_len;
    const int64_t b = row / patches_per_image, p = row % patches_per_image;
    const int64_t gy = p / grid_w, gx = p % grid_w;
    const int64_t c = k / (patch * patch), r = k % (patch * patch);
    const int64_t y = gy * patch + r / patch, x = gx * patch + r % patch;
    const in_t* src = images + b * stride_b + c * stride_c + y * stride_h + x * stride_w;
    Aligned<in_t, VEC> in;
    if constexpr (VEC == 1) {
      in.v[0] = *src;
    } else {
      in = *reinterpret_cast<const Aligned<in_t, VEC>*>(src);
    }
    const float m = mean != nullptr ? mean[c] : 0.0f;
    const float s = mean != nullptr ? inv_std[c] : 1.0f;
    Aligned<out_t, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float v = static_cast<float>(in.v[j]) * scale;
      if (mean != nullptr) v = (v - m) * s;
      out.v[j] = static_cast<out_t>(v);
    }
    *reinterpret_cast<Aligned<out_t, VEC>*>(patches + i) = out;
  }
}

template <typename t>
__global__ void epilogue_kernel(const t* __restrict__ tokens, t* __restrict__ out, const float* __restrict__ bias,
                                const float* __restrict__ cls, const float* __restrict__ pos, int64_t n, int64_t dim,
                                int64_t prefix, int64_t pos_prefix, int64_t total) {
  const int64_t rows = n + prefix;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / (rows * dim), r = (i / dim) % rows, d = i % dim;
    float v;
    if (r < prefix) {
      v = cls[d] + (pos != nullptr && pos_prefix == 1 ? pos[d] : 0.0f);
    } else {
      const int64_t token = r - prefix;
      v = static_cast<float>(tokens[(b * n + token) * dim + d]);
      if (bias != nullptr) v += bias[d];
      if (pos != nullptr) v += pos[(pos_prefix + token) * dim + d];
    }
    out[i] = static_cast<t>(v);
  }
}

const float* float_ptr_or_null(const OptTensor& t, at::Tensor& holder) {
  if (!t.has_value()) return nullptr;
  holder = t->to(at::kFloat).contiguous();
  return holder.data_ptr<float>();
}

// The widest vector (elements per thread) this launch allows: 16 bytes of the wider type,
// halved until the patch width, the row length, the image strides and both pointers fit.
int patchify_vector_width(const at::Tensor& images, const at::Tensor& patches, int64_t patch) {
  const int64_t in_size = images.element_size(), out_size = patches.element_size();
  int vec = static_cast<int>(16 / std::max(in_size, out_size));
  auto fits = [&](int v) {
    const auto in_addr = reinterpret_cast<uintptr_t>(images.data_ptr());
    const auto out_addr = reinterpret_cast<uintptr_t>(patches.data_ptr());
    return images.stride(3) == 1 && patch % v == 0 && patches.size(1) % v == 0 && images.stride(2) % v == 0 &&
           images.stride(1) % v == 0 && images.stride(0) % v == 0 && in_addr % (v * in_size) == 0 &&
           out_addr % (v * out_size) == 0;
  };
  while (vec > 1 && !fits(vec)) vec /= 2;
  return vec;
}

template <typename out_t>
void launch_patchify(const at::Tensor& images, at::Tensor& patches, const float* mean, const float* inv_std,
                     int64_t patch, float scale) {
  const int64_t grid_h = images.size(2) / patch, grid_w = images.size(3) / patch;
  const int vec = patchify_vector_width(images, patches, patch);
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](auto* in) {
    using in_t = std::remove_const_t<std::remove_pointer_t<decltype(in)>>;
    auto run = [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      const int64_t total_vecs = patches.numel() / VEC;
      patchify_kernel<in_t, out_t, VEC><<<blocks_for(total_vecs), kThreads, 0, stream>>>(
          in, patches.data_ptr<out_t>(), mean, inv_std, images.stride(0), images.stride(1), images.stride(2),
          images.stride(3), patch, grid_w, grid_h * grid_w, patches.size(1), total_vecs, scale);
    };
    switch (vec) {
      case 16: run(std::integral_constant<int, 16>{}); break;
      case 8: run(std::integral_constant<int, 8>{}); break;
      case 4: run(std::integral_constant<int, 4>{}); break;
      case 2: run(std::integral_constant<int, 2>{}); break;
      default: run(std::integral_constant<int, 1>{}); break;
    }
  };
  switch (images.scalar_type()) {
    case at::kByte: launch(images.data_ptr<uint8_t>()); break;
    case at::kFloat: launch(images.data_ptr<float>()); break;
    case at::kDouble: launch(images.data_ptr<double>()); break;
    case at::kHalf: launch(images.data_ptr<at::Half>()); break;
    case at::kBFloat16: launch(images.data_ptr<at::BFloat16>()); break;
    default: TORCH_CHECK(false, "patch_embed: images must be uint8 or a float dtype, got ",
                         images.scalar_type());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor patchify_cuda(const at::Tensor& images, int64_t patch, const OptTensor& mean, const OptTensor& std,
                         at::ScalarType dtype) {
  const int64_t batch = images.size(0), channels = images.size(1);
  const int64_t n = (images.size(2) / patch) * (images.size(3) / patch);
  at::Tensor patches = at::empty({batch * n, channels * patch * patch}, images.options().dtype(dtype));
  if (patches.numel() == 0) return patches;
  at::Tensor mean_f, inv_std_f;
  const float* mean_ptr = nullptr;
  const float* inv_std_ptr = nullptr;
  if (mean.has_value()) {
    mean_f = mean->to(at::kFloat).contiguous();
    inv_std_f = std->to(at::kFloat).reciprocal().contiguous();
    mean_ptr = mean_f.data_ptr<float>();
    inv_std_ptr = inv_std_f.data_ptr<float>();
  }
  const float scale = images.scalar_type() == at::kByte ? 1.0f / 255.0f : 1.0f;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "patchify_cuda", [&] {
    launch_patchify<scalar_t>(images, patches, mean_ptr, inv_std_ptr, patch, scale);
  });
  return patches;
}

at::Tensor epilogue_cuda(const at::Tensor& tokens, const OptTensor& bias, const OptTensor& cls_token,
                         const OptTensor& pos_embed) {
  const int64_t batch = tokens.size(0), n = tokens.size(1), dim = tokens.size(2);
  const int64_t prefix = cls_token.has_value() ? 1 : 0;
  at::Tensor out = at::empty({batch, n + prefix, dim}, tokens.options());
  if (out.numel() == 0) return out;
  at::Tensor bias_f, cls_f, pos_f;
  const float* bias_ptr = float_ptr_or_null(bias, bias_f);
  const float* cls_ptr = float_ptr_or_null(cls_token, cls_f);
  const float* pos_ptr = float_ptr_or_null(pos_embed, pos_f);
  const int64_t pos_prefix = pos_embed.has_value() ? pos_embed->size(1) - n : 0;
  at::Tensor tokens_c = tokens.contiguous();
  const int64_t total = out.numel();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "epilogue_cuda", [&] {
    epilogue_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        tokens_c.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), bias_ptr, cls_ptr, pos_ptr, n, dim, prefix,
        pos_prefix, total);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor patch_embed_fwd_cuda(const at::Tensor& images, const at::Tensor& weight, const OptTensor& bias,
                                const OptTensor& cls_token, const OptTensor& pos_embed, const OptTensor& mean,
                                const OptTensor& std) {
  return patch_embed_forward(images, weight, bias, cls_token, pos_embed, mean, std, patchify_cuda, epilogue_cuda);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> patch_embed_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& images, const at::Tensor& weight, const OptTensor& mean,
    const OptTensor& std, bool has_bias, bool has_cls, int64_t pos_rows, bool images_grad) {
  return patch_embed_backward(grad_out, images, weight, mean, std, has_bias, has_cls, pos_rows, images_grad,
                              patchify_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(vit_kernels, CUDA, m) {
  m.impl("patch_embed_fwd", &patch_embed_fwd_cuda);
  m.impl("patch_embed_bwd", &patch_embed_bwd_cuda);
}

}  // namespace vit_kernels
