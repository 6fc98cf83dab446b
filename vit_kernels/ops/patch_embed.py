# Patch embedding: patchify (+ uint8 -> float and mean/std normalization) -> GEMM -> bias,
# position embeddings and the class-token row, written into the final [B, N(+1), D] buffer.
#
# What is fused and why. Eager runs the normalization as its own passes over the image (a
# data loader usually ships float32: 4 bytes a pixel), the conv, a flatten/transpose copy,
# a torch.cat for the class token (a full copy of the tokens) and the position-embedding
# add (another read and write). Here the patchify gather reads the image once in any
# dtype (uint8 too: a quarter of float32's bytes) and in any memory format, normalizes on
# the way, and writes the GEMM operand; the epilogue writes the final buffer once.
#
# The kernels live in the csrc/ extension (C++ CPU implementation in csrc/patch_embed.cpp,
# CUDA in csrc/cuda/patch_embed.cu, shared math in csrc/patch_embed.h); this file holds
# the validation, the fake (meta) kernels, the autograd glue and the eager bypass
# (define_op). The backward recomputes the patches from the images instead of saving them,
# and computes the image gradient only when the images require it (hybrid stems,
# input-gradient methods).
#
# Not supported: non-square patches, overlapping patches (stride != kernel).

from typing import Optional

import torch
from torch import Tensor

from .. import _build_config, _extension, reference
from .._dispatch import define_op
from .._validate import (
    FLOAT_DTYPES,
    check_float_tensor,
    check_optional_float_tensor,
    check_same_device,
    check_shape,
    checked_once,
)

# float64 runs too (both backends are generic over floating types): gradcheck needs it.
PARAM_DTYPES = FLOAT_DTYPES + (torch.float64,)
IMAGE_DTYPES = (torch.uint8,) + PARAM_DTYPES
_ops = {}  # "fwd", "bwd" -> FusedOp, once the extension is loaded


def _fwd_fake(images, weight, bias, cls_token, pos_embed, mean, std):
    dtype = weight.dtype if images.dtype == torch.uint8 else images.dtype
    patch = weight.shape[-1]
    n = (images.shape[2] // patch) * (images.shape[3] // patch)
    prefix = 1 if cls_token is not None else 0
    return images.new_empty((images.shape[0], n + prefix, weight.shape[0]), dtype=dtype)


def _bwd_fake(grad_out, images, weight, mean, std, has_bias, has_cls, pos_rows, images_grad):
    dim = weight.shape[0]
    none = grad_out.new_empty((0,))
    return (
        images.new_empty(images.shape) if images_grad else none,
        weight.new_empty(weight.shape),
        grad_out.new_empty((dim,), dtype=torch.float32) if has_bias else none,
        grad_out.new_empty((1, 1, dim), dtype=torch.float32) if has_cls else none,
        grad_out.new_empty((1, pos_rows, dim), dtype=torch.float32) if pos_rows else none,
    )


def _setup_context(ctx, inputs, output):
    images, weight, bias, cls_token, pos_embed, mean, std = inputs
    ctx.save_for_backward(images, weight, mean, std)
    ctx.param_dtypes = tuple(t.dtype if t is not None else None for t in (bias, cls_token, pos_embed))
    ctx.pos_rows = pos_embed.shape[1] if pos_embed is not None else 0


def _backward(ctx, grad_out):
    if grad_out is None:  # the output's gradient is undefined (define_op does not materialize zeros)
        return (None,) * 7
    images, weight, mean, std = ctx.saved_tensors
    bias_dtype, cls_dtype, pos_dtype = ctx.param_dtypes
    images_grad = ctx.needs_input_grad[0] and images.is_floating_point()
    grads = _ops["bwd"](grad_out.contiguous(), images, weight, mean, std, bias_dtype is not None,
                        cls_dtype is not None, ctx.pos_rows, images_grad)
    d_images, d_weight, d_bias, d_cls, d_pos = grads
    return (
        d_images if images_grad else None,
        d_weight,
        d_bias.to(bias_dtype) if bias_dtype is not None else None,
        d_cls.to(cls_dtype) if cls_dtype is not None else None,
        d_pos.to(pos_dtype) if pos_dtype is not None else None,
        None,
        None,
    )


def load() -> None:
    """Load the csrc/ extension and define its ops (fakes, autograd, eager bypass), once. Called
    by the first patch_embed and by FusedPatchEmbed's constructor, so that the build happens
    outside a torch.compile trace; raises RuntimeError when the extension can be neither
    imported nor compiled."""
    if _ops:
        return
    _extension.load()
    _ops["fwd"] = define_op("patch_embed_fwd", fake=_fwd_fake, setup_context=_setup_context, backward=_backward)
    _ops["bwd"] = define_op("patch_embed_bwd", fake=_bwd_fake)


@checked_once
def _validate(images, weight, bias, cls_token, pos_embed, mean, std):
    check_float_tensor("images", images, dtypes=IMAGE_DTYPES)
    check_float_tensor("weight", weight, dtypes=PARAM_DTYPES)
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"weight must be [D, C, P, P] (the Conv2d layout, square patches), got {tuple(weight.shape)}")
    dim, channels, patch = weight.shape[0], weight.shape[1], weight.shape[2]
    if images.shape[1] != channels:
        raise ValueError(f"images have {images.shape[1]} channels but weight expects {channels}")
    if images.shape[2] % patch or images.shape[3] % patch:
        raise ValueError(f"images of size {tuple(images.shape[2:])} are not divisible by the patch size {patch}")
    for name, t in (("bias", bias), ("cls_token", cls_token), ("pos_embed", pos_embed), ("mean", mean), ("std", std)):
        check_optional_float_tensor(name, t, dtypes=PARAM_DTYPES)
    check_same_device("images", images, weight=weight, bias=bias, cls_token=cls_token, pos_embed=pos_embed,
                      mean=mean, std=std)
    check_shape("bias", bias, (dim,))
    check_shape("cls_token", cls_token, (1, 1, dim))
    n = (images.shape[2] // patch) * (images.shape[3] // patch)
    if pos_embed is not None:
        allowed = [(1, n + 1, dim), (1, n, dim)] if cls_token is not None else [(1, n, dim)]
        if tuple(pos_embed.shape) not in allowed:
            raise ValueError(f"pos_embed must have shape {' or '.join(map(str, allowed))}, got {tuple(pos_embed.shape)}")
    if (mean is None) != (std is None):
        raise ValueError("mean and std must be given together")
    check_shape("mean", mean, (channels,))
    check_shape("std", std, (channels,))


def patch_embed(
    images: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    cls_token: Optional[Tensor] = None,
    pos_embed: Optional[Tensor] = None,
    mean: Optional[Tensor] = None,
    std: Optional[Tensor] = None,
) -> Tensor:
    """ViT patch embedding in one op: returns tokens ``[B, N(+1), D]``, N = HW / P^2.

    Args:
        images: ``[B, C, H, W]``, float32/bfloat16/float16, or uint8 (then scaled by 1/255
            before normalization: mean/std are in [0, 1] units, as torchvision's
            transforms use them). Any memory format (channels_last is read in place).
        weight: ``[D, C, P, P]``, the Conv2d layout (timm, transformers and torchvision
            checkpoints load unchanged); any P >= 1 (P = 1 embeds a CNN feature map).
            The GEMM runs in the images' float dtype (the weight's for uint8 images).
        bias: ``[D]``.
        cls_token: ``[1, 1, D]``: row 0 of the output.
        pos_embed: ``[1, N+1, D]`` (with cls_token: added after the class token is placed),
            or ``[1, N, D]`` (added to the patch tokens only: timm's no_embed_class, or no
            class token).
        mean, std: per-channel ``[C]`` normalization applied while gathering the patches.

    Under autocast the GEMM runs in the autocast dtype, as autocast runs a Conv2d.
    Gradients flow to weight, bias, cls_token, pos_embed, and to float images when they
    require it. CUDA and CPU tensors run the csrc/ extension (compiled on first use if
    it was not built at install); with VIT_KERNELS_SKIP_EXT=1 the PyTorch reference runs,
    as it does for float64 on the GPU (float64 on the CPU runs the C++ path exactly).

    Raises:
        TypeError: non-tensors, integer weights, images neither uint8 nor float.
        ValueError: wrong channel count, H/W not divisible by P, shapes of weight, bias,
            cls_token, pos_embed, mean or std that do not fit, mixed devices.
    """
    _validate(images, weight, bias, cls_token, pos_embed, mean, std)
    if torch.is_autocast_enabled(images.device.type):
        # Custom ops are outside autocast's cast lists: run the GEMM in the autocast dtype,
        # as autocast runs the Conv2d (the cast of float images is the one eager pays too).
        dtype = torch.get_autocast_dtype(images.device.type)
        weight = weight.to(dtype)
        if images.is_floating_point():
            images = images.to(dtype)
    # The CUDA kernels compute in float32: float64 on the GPU takes the reference.
    if _build_config.skip_requested() or (images.is_cuda and weight.dtype == torch.float64):
        return reference.patch_embed(images, weight, bias, cls_token=cls_token, pos_embed=pos_embed, mean=mean, std=std)
    load()
    return _ops["fwd"](images, weight, bias, cls_token, pos_embed, mean, std)
