# fc1's bias + GELU + fc2: out = gelu(z + b1) @ W2^T + b2, saving only the pre-activation z.
#
# What is fused and why. In a ViT MLP autograd keeps two [M, 4D] tensors per block for the
# backward: the pre-activation (for GELU's derivative) and the GELU output y (fc2 keeps its
# input for its weight gradient). At ViT-B, batch 128, bf16 that is 2 x 155 MB per block;
# y alone is 1.9 GB over 12 blocks, about a fifth of the training step's activations. This
# op keeps z only. Its backward needs y once, for dW2 = dout^T @ y, and the pass that
# computes dz = dY * gelu'(z + b1) reads z anyway: it writes y beside dz, so the price of
# not keeping y is one [M, 4D] write in backward (about 0.05 ms at ViT-B, batch 128, at 3
# TB/s), not a second pass. It lowers the peak memory of a ViT training step by about that
# fifth (benchmarks/results/, the ViT-B/16 train rows' peak GiB).
#
# Forward: the bias_gelu kernel (one read of z, one write of y), then fc2 in cuBLAS; y is
# freed when the op returns. Backward: dY = dout @ W2 (cuBLAS); one bias_gelu backward pass
# reads dY and z and writes dz over dY (in place) and y; dW2 = dout^T @ y and
# dX-of-fc1's-input etc. are cuBLAS GEMMs; db1 comes from the same pass (deterministic
# float32 partial sums), db2 = sum(dout) in float32. Gradients nobody asked for are not
# computed (a frozen fc2 skips y; frozen everything below fc2 skips dz).
#
# Layout: z [..., H] (last dim contiguous after reshaping to rows, else copied), b1 [H] or
# None, W2 [O, H] (nn.Linear's), b2 [O] or None. Not supported: other activations; a
# dropout or a norm between the GELU and fc2 (FusedMlp keeps its unfused path for those).

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from .._dispatch import define_op, inductor_generates, linear_compute_dtype, runs_kernel
from .._validate import check_float_tensor, check_optional_float_tensor, check_same_device, check_shape, checked_once
from ._nodes import CppNode
from ._triton_helpers import as_dtype, as_rows
from .bias_gelu import APPROXIMATIONS, _bias_gelu_fwd_impl, _bias_gelu_fwd_kernel, bias_gelu_backward_into


def _bias_gelu_linear_fwd_impl(x: Tensor, bias: Optional[Tensor], weight: Tensor, linear_bias: Optional[Tensor],
                               approximate: str) -> Tensor:
    return F.linear(_bias_gelu_fwd_impl(x, bias, approximate), weight, linear_bias)


def _bias_gelu_linear_fwd_fake(x, bias, weight, linear_bias, approximate):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _bias_gelu_linear_bwd_impl(dout: Tensor, x: Tensor, bias: Optional[Tensor], weight: Tensor,
                               has_linear_bias: bool, approximate: str, needs_dx: bool,
                               needs_dweight: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dbias, dweight, dlinear_bias); an empty tensor for each one not computed.

    dx and dbias come together (one pass) when needs_dx; dweight when needs_dweight;
    dlinear_bias (float32) when has_linear_bias.
    """
    hidden, out_features = x.shape[-1], weight.shape[0]
    dout2, x2 = as_rows(dout, out_features), as_rows(x, hidden)
    dx = dbias = dweight = dlinear_bias = y2 = None
    if needs_dx:
        y2 = torch.empty(x2.shape, dtype=x.dtype, device=x.device) if needs_dweight else None
        dz2 = dout2 @ weight  # dY, overwritten with dz by the pass below
        dbias = bias_gelu_backward_into(dz2, x2, bias, approximate, dz2, y2)
        dx = dz2.view(x.shape)
    elif needs_dweight:
        y2 = _bias_gelu_fwd_impl(x2, bias, approximate)
    if needs_dweight:
        dweight = as_dtype(dout2.t() @ y2, weight.dtype)
    if has_linear_bias:
        dlinear_bias = dout2.sum(0, dtype=torch.float32)
    # An empty tensor, distinct, for each one not computed (a custom op's outputs may not alias);
    # none where all are, as in a training step.
    empty = x.new_empty
    return (dx if dx is not None else empty(0), dbias if dbias is not None else empty(0),
            dweight if dweight is not None else empty(0), dlinear_bias if dlinear_bias is not None else empty(0))


def _bias_gelu_linear_bwd_fake(dout, x, bias, weight, has_linear_bias, approximate, needs_dx, needs_dweight):
    return (
        x.new_empty(x.shape if needs_dx else (0,)),
        bias.new_empty(bias.shape) if needs_dx and bias is not None else x.new_empty(0),
        weight.new_empty(weight.shape if needs_dweight else (0,)),
        dout.new_empty((weight.shape[0],), dtype=torch.float32) if has_linear_bias else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, bias, weight, linear_bias, approximate = inputs
    ctx.save_for_backward(x, bias, weight)
    ctx.approximate = approximate
    ctx.linear_bias_dtype = linear_bias.dtype if linear_bias is not None else None


def _backward(ctx, dout):
    x, bias, weight = ctx.saved_tensors
    needs_x, needs_bias, needs_weight, needs_linear_bias, _ = ctx.needs_input_grad
    dx, dbias, dweight, dlinear_bias = _bias_gelu_linear_bwd(
        dout, x, bias, weight, needs_linear_bias, ctx.approximate, needs_x or needs_bias, needs_weight)
    return (
        dx if needs_x else None,
        dbias if needs_bias else None,
        dweight if needs_weight else None,
        as_dtype(dlinear_bias, ctx.linear_bias_dtype) if needs_linear_bias else None,
        None,
    )


_bias_gelu_linear_fwd = define_op("bias_gelu_linear_fwd", _bias_gelu_linear_fwd_impl, fake=_bias_gelu_linear_fwd_fake,
                                  setup_context=_setup_context, backward=_backward, kernel=_bias_gelu_fwd_kernel,
                                  node=CppNode("bias_gelu_linear_node"))  # fc2's GEMM: its impl is not planned whole
_bias_gelu_linear_bwd = define_op("bias_gelu_linear_bwd", _bias_gelu_linear_bwd_impl, fake=_bias_gelu_linear_bwd_fake,
                                  kernel=_bias_gelu_fwd_kernel)


@checked_once
def _validate(x, bias, weight, linear_bias, approximate):
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    check_float_tensor("x", x, dtypes=dtypes)
    check_optional_float_tensor("bias", bias, dtypes=dtypes)
    check_float_tensor("weight", weight, dtypes=dtypes)
    check_optional_float_tensor("linear_bias", linear_bias, dtypes=dtypes)
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension, got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must have shape [O, {x.shape[-1]}] (x's last dim is H), got {tuple(weight.shape)}")
    check_shape("bias", bias, (x.shape[-1],))
    check_shape("linear_bias", linear_bias, (weight.shape[0],))
    check_same_device("x", x, bias=bias, weight=weight, linear_bias=linear_bias)


def bias_gelu_linear(x: Tensor, bias: Optional[Tensor], weight: Tensor, linear_bias: Optional[Tensor] = None,
                     approximate: str = "none") -> Tensor:
    """``F.linear(gelu(x + bias), weight, linear_bias)``: an MLP's activation and fc2, keeping
    only x (the bias-free pre-activation) for backward, never the GELU output.

    Args:
        x: ``[..., H]``, float32, float16 or bfloat16: fc1's output without its bias
            (``F.linear(input, fc1.weight)``).
        bias: fc1's bias ``[H]`` (float32 or x's dtype), added in float32 inside the pass, or None.
        weight: fc2's weight ``[O, H]``; linear_bias: fc2's bias ``[O]`` or None.
        approximate: ``"none"`` (exact erf GELU, the default), ``"tanh"`` or ``"quick"``
            (quick_gelu, ``z * sigmoid(1.702 z)``): the forms of `bias_gelu`.

    Returns ``[..., O]`` in the compute dtype: under autocast, weight and linear_bias are cast
    to the autocast dtype (as autocast runs a Linear); otherwise to x's dtype. The backward
    recomputes the GELU output in the pass that computes its gradient (see the header).
    float64, and CPU tensors outside Triton's interpreter, run
    `vit_kernels.reference.bias_gelu_linear`.

    Raises:
        TypeError: non-tensors, integer dtypes.
        ValueError: weight not ``[O, H]``, bias not ``[H]``, linear_bias not ``[O]``, mixed
            devices, unknown ``approximate``, 0-d x.
    """
    _validate(x, bias, weight, linear_bias, approximate)

    dtype = linear_compute_dtype(x)
    x, weight, linear_bias = as_dtype(x, dtype), as_dtype(weight, dtype), as_dtype(linear_bias, dtype)
    if dtype == torch.float64 or not runs_kernel(_bias_gelu_fwd_kernel, x) or inductor_generates("bias_gelu_linear"):
        return reference.bias_gelu_linear(x, bias, weight, linear_bias, approximate)
    return _bias_gelu_linear_fwd(x, bias, weight.contiguous(), linear_bias, approximate)
