# Fused bias + GELU: y = gelu(x + bias) over the last dim, forward and backward.
#
# What is fused and why. In a ViT MLP the fc1 output [M, 4D] is the largest activation
# of the block. Eager adds the bias inside the GEMM, then GELU reads it and writes it
# again; its backward reads dy and the pre-activation and writes dx, and the bias
# gradient is a separate column reduction over dx. Here the forward reads x once and
# writes y once, and the backward reads dy and x once, writes dx once and reduces the
# bias gradient in the same pass. Only the pre-activation x (the bias-free GEMM output)
# is saved for backward; x + bias is recomputed, so no second [M, 4D] tensor is kept.
#
# Design choices.
# - Three forms, chosen by a constexpr: exact erf GELU (timm, transformers and torchvision
#   ViTs), the tanh form (SigLIP) and quick_gelu, z sigmoid(1.702 z) (OpenAI's CLIP
#   checkpoints); math in float32, one rounding at the store.
# - For bfloat16 and float16 outputs Phi(z) comes from a branch-free polynomial in
#   1 / (1 + 0.35 |z| / sqrt(2)) times exp(-z^2 / 2), not from libdevice's erf
#   (_normal_cdf_and_pdf): the kernels are elementwise, so on a GPU they are bound by memory
#   or by instruction issue, whichever is nearer, and with erf the forward was the second
#   (at 4 bytes an element, an H100's copy bandwidth leaves about 44 lane-instructions per
#   element of its issue rate). The polynomial takes about a fifth of the forward's and the
#   backward's SASS away; tests/test_gpu_compile.py holds the forward to <= 85% of erf's (the
#   counts: benchmarks/results/moved-from-source-2026-11.md).
#   Accuracy: the rounded y and gelu' have eager's worst error over every finite input of
#   both dtypes, and y keeps its relative precision in the tail, which eager's 1 + erf loses.
# - The tanh form takes (1 + tanh u) / 2 and 1 - tanh^2 u from e = exp(-2|u|) and 1 / (1 + e)
#   (_gelu_and_grad), and quick_gelu its sigmoid(1.702 z) and sigmoid' the same way: exact at
#   both saturations, no cancellation in the negative tail, and available on every backend,
#   the interpreter included (tl.math.tanh is not). The product e r is formed once and used by
#   both: written out twice, one ptxas build spilled the backward (ViT-B's 3072 columns) on
#   sm_90; so did taking e r^2 first (8 bytes, triton 3.8).
# - dbias: each backward program owns a group of rows of one column block, adds its
#   tiles elementwise into a float32 [BLOCK_M, BLOCK_N] accumulator, sums its rows once
#   at the end and writes one float32 partial row; a second launch (ops/_partial_sums.py)
#   sums them in a fixed order into bias's dtype. No atomics: bitwise reproducible.
#
# Layout: x [..., N] with the last dim contiguous (rows may be strided); bias [N] in
# float32 or x's dtype (autocast keeps parameters in float32), or None.
# Not supported: float64 (runs the reference), other activations.

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference
from .._dispatch import define_op, inductor_generates, interpreted, num_programs_for_reduction, runs_kernel
from .._validate import check_float_tensor, check_optional_float_tensor, check_same_device, check_shape, checked_once
from ._launcher import launcher_for
from ._partial_sums import sum_partial_rows
from ._triton_helpers import LAUNCH_OPTIONS, as_row_pointer, as_rows, cast_for_store, cdiv, next_power_of_2

APPROXIMATIONS = ("none", "tanh", "quick")  # the kernels' FORM is the index
# The kernels spell their constants as literals: the GPU compiler rejects plain float
# globals (tests/gpu_compile_check.py caught it) and the interpreter mishandles
# tl.constexpr globals on the left of a product. 0.7071067811865476 = sqrt(1/2),
# 0.3989422804014327 = 1/sqrt(2 pi), 0.7978845608028654 = sqrt(2/pi), 0.044715 = the tanh
# form's cubic coefficient, 1.702 = quick_gelu's slope, -0.7213475204444817 = -log2(e) / 2, 0.2474873661994934 =
# 0.35 / sqrt(2).


@triton.jit
def _normal_cdf_and_pdf(z, POLY_CDF: tl.constexpr):
    """Phi(z) and phi(z) of the standard normal, in float32.

    POLY_CDF (16-bit outputs, see the header): with a = |z| / sqrt(2), erfc(a) = exp(-a^2) t Q(t),
    where t = 1 / (1 + 0.35 a) maps a >= 0 onto (0, 1] and Q is a degree-7 polynomial fitted
    for relative error (8e-7), so the far tail keeps its digits; Phi(z) = erfc(a) / 2 for z < 0
    and 1 - erfc(a) / 2 otherwise. One reciprocal, one exp2 shared with phi, seven FMAs, no
    branch (libdevice's erff selects between two polynomials per element). Evaluated in
    float32 the exp of -a^2 loses relative precision as a grows (2e-5 at |z| = 14), far below
    a bfloat16 or float16 rounding. Float32 outputs keep libdevice's erf, as eager.
    """
    e = tl.exp2(z * z * -0.7213475204444817)
    if POLY_CDF:
        t = 1.0 / (1.0 + 0.2474873661994934 * tl.abs(z))
        # Horner's rule in explicit FMAs: Triton announces fusing `a * b + c` off by default from 3.10.
        q = tl.fma(t, -0.042552556842565536, 0.10060451924800873)
        q = tl.fma(q, t, -0.0072747026570141315)
        q = tl.fma(q, t, 0.08147178590297699)
        q = tl.fma(q, t, 0.07733618468046188)
        q = tl.fma(q, t, 0.09295466542243958)
        q = tl.fma(q, t, 0.0987265557050705)
        q = tl.fma(q, t, 0.09873314201831818)
        half_erfc = e * t * q
        cdf = tl.where(z >= 0, 1.0 - half_erfc, half_erfc)
    else:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
    return cdf, e * 0.3989422804014327


@triton.jit
def _gelu_and_grad(z, FORM: tl.constexpr, POLY_CDF: tl.constexpr):
    """(gelu(z), gelu'(z)) of the FORM (0: erf, 1: tanh, 2: quick) with their common work done
    once; what a caller does not use, the compiler removes."""
    if FORM == 1:
        # With e = exp(-2|u|) in (0, 1] and r = 1 / (1 + e): (1 + tanh u) / 2 is r for u >= 0 and
        # e r below, and 1 - tanh^2 u = 4 e r^2. No exp overflows and nothing cancels, so the
        # negative tail keeps its relative precision; 1 - tanh^2 computed from tanh is 0 in
        # float32 at z = -5, where gelu' is -1.5e-6 (eager's gives -2.0e-6).
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        e = tl.exp(-2.0 * tl.abs(u))
        r = 1.0 / (1.0 + e)
        e_r = e * r
        half_one_plus_tanh = tl.where(u >= 0, r, e_r)
        du_dz = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        return z * half_one_plus_tanh, half_one_plus_tanh + 2.0 * z * e_r * r * du_dz
    if FORM == 2:
        # quick_gelu (OpenAI's CLIP), z sigmoid(a) with a = 1.702 z, the same way: with
        # e = exp(-|a|) and r = 1 / (1 + e), sigmoid(a) is r for a >= 0 and e r below, and
        # sigmoid'(a) = e r^2 on both sides. z e_r r comes first: 1.702 z overflows to inf at
        # the top of bfloat16's range, where e is 0.
        a = 1.702 * z
        e = tl.exp(-tl.abs(a))
        r = 1.0 / (1.0 + e)
        e_r = e * r
        sigmoid = tl.where(a >= 0, r, e_r)
        return z * sigmoid, sigmoid + z * e_r * r * 1.702
    cdf, pdf = _normal_cdf_and_pdf(z, POLY_CDF)
    return z * cdf, cdf + z * pdf


@triton.jit
def _gelu(z, FORM: tl.constexpr, POLY_CDF: tl.constexpr):
    y, _ = _gelu_and_grad(z, FORM, POLY_CDF)
    return y


@triton.jit
def _bias_gelu_fwd_kernel(
    X,
    BIAS,
    Y,
    stride_x_row,
    stride_y_row,
    n_rows,
    n_cols,
    HAS_BIAS: tl.constexpr,
    FORM: tl.constexpr,
    POLY_CDF: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    RNE_BF16_IN_SOFTWARE: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    rows64 = rows[:, None].to(tl.int64)
    z = tl.load(X + rows64 * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z = z + tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    y = _gelu(z, FORM, POLY_CDF)
    tl.store(Y + rows64 * stride_y_row + cols[None, :], cast_for_store(y, Y.dtype.element_ty, RNE_BF16_IN_SOFTWARE), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    DY,
    X,
    BIAS,
    DX,
    Y,
    DBIAS_PARTIAL,
    stride_dy_row,
    stride_x_row,
    stride_dx_row,
    stride_y_row,
    n_rows,
    n_cols,
    rows_per_program,
    HAS_BIAS: tl.constexpr,
    STORE_Y: tl.constexpr,
    FORM: tl.constexpr,
    POLY_CDF: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    RNE_BF16_IN_SOFTWARE: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    if HAS_BIAS:
        bias = tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)
    # Row sums wait until the loop ends: a tl.sum over each [BLOCK_M, BLOCK_N] tile would
    # cross warps through shared memory every iteration (what made the add_layer_norm
    # backward 5.9x slower, see its _block_config); elementwise adds stay in registers.
    dbias = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for block_start in range(row_start, row_end, BLOCK_M):
        rows = block_start + tl.arange(0, BLOCK_M)
        mask = (rows < row_end)[:, None] & col_mask[None, :]
        rows64 = rows[:, None].to(tl.int64)
        z = tl.load(X + rows64 * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z = z + bias[None, :]
        dy = tl.load(DY + rows64 * stride_dy_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y, grad = _gelu_and_grad(z, FORM, POLY_CDF)
        dz = tl.where(mask, dy * grad, 0.0)
        tl.store(DX + rows64 * stride_dx_row + cols[None, :], cast_for_store(dz, DX.dtype.element_ty, RNE_BF16_IN_SOFTWARE), mask=mask)
        if STORE_Y:
            tl.store(Y + rows64 * stride_y_row + cols[None, :], cast_for_store(y, Y.dtype.element_ty, RNE_BF16_IN_SOFTWARE), mask=mask)
        dbias += dz
    if HAS_BIAS:
        tl.store(DBIAS_PARTIAL + pid * n_cols + cols, tl.sum(dbias, axis=0), mask=col_mask)


def _poly_cdf(out_dtype: torch.dtype) -> bool:
    """Whether the kernels take Phi from the polynomial (_normal_cdf_and_pdf): for 16-bit outputs."""
    return out_dtype in (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _block_config(n_cols: int, interpreted_kernel: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): 4K-element tiles, at most 1024 columns wide, on the GPU;
    up to 64K elements under the interpreter, whose cost is per operation."""
    block_n = min(next_power_of_2(n_cols), 1024)
    if interpreted_kernel:
        return max(1, min(64, 65536 // block_n)), block_n, 4
    return max(1, 4096 // block_n), block_n, 8


def _bias_gelu_fwd_impl(x: Tensor, bias: Optional[Tensor], approximate: str) -> Tensor:
    n_cols = x.shape[-1]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n_rows = x.numel() // n_cols if n_cols else 0
    if n_rows == 0:
        return y
    x2, x_stride = as_row_pointer(x, n_cols)
    interpreted_kernel = interpreted(_bias_gelu_fwd_kernel)
    block_m, block_n, num_warps = _block_config(n_cols, interpreted_kernel)
    grid = (cdiv(n_rows, block_m), cdiv(n_cols, block_n))
    launcher_for(_bias_gelu_fwd_kernel).call(
        grid,
        x2, bias, y, x_stride, n_cols, n_rows, n_cols,
        HAS_BIAS=bias is not None, FORM=APPROXIMATIONS.index(approximate), POLY_CDF=_poly_cdf(y.dtype), BLOCK_M=block_m,
        BLOCK_N=block_n, RNE_BF16_IN_SOFTWARE=interpreted_kernel, num_warps=num_warps,
        **LAUNCH_OPTIONS,
    )
    return y


def bias_gelu_backward_into(dy2: Tensor, x2: Tensor, bias: Optional[Tensor], approximate: str, dx2: Tensor,
                            y2: Optional[Tensor] = None) -> Optional[Tensor]:
    """One backward pass over rows: dx2 = dy2 * gelu'(x2 + bias), y2 = gelu(x2 + bias) when
    given (the forward's output, recomputed for a caller that did not keep it); returns dbias
    in bias's dtype, or None without a bias. dx2 may be dy2 itself: each element is read before
    it is written, by the same program."""
    dbias = bias_gelu_backward_dbias(dy2, x2, bias, approximate, dx2, y2)
    return dbias if bias is not None else None


def bias_gelu_backward_dbias(dy2: Tensor, x2: Tensor, bias: Optional[Tensor], approximate: str, dx2: Tensor,
                             y2: Optional[Tensor] = None) -> Tensor:
    """bias_gelu_backward_into's launches, returning dbias in bias's dtype (an empty tensor without
    a bias): the pass writes float32 partial sums [groups, H], a second launch sums them
    (ops/_partial_sums.py). The C++ nodes replay this from its launch plan (ops/_plans.py)."""
    n_rows, n_cols = x2.shape
    interpreted_kernel = interpreted(_bias_gelu_bwd_kernel)
    block_m, block_n, num_warps = _block_config(n_cols, interpreted_kernel)
    n_row_blocks = max(1, cdiv(n_rows, block_m))
    n_col_blocks = cdiv(n_cols, block_n)
    # Enough row groups for a few waves of programs over all column blocks.
    n_groups = min(n_row_blocks, max(1, num_programs_for_reduction(x2.device) // n_col_blocks))
    rows_per_program = cdiv(n_row_blocks, n_groups) * block_m
    n_groups = cdiv(n_row_blocks * block_m, rows_per_program)
    partial = torch.empty((n_groups, n_cols), dtype=torch.float32, device=x2.device) if bias is not None else None
    if n_rows > 0:
        launcher_for(_bias_gelu_bwd_kernel).call(
            (n_groups, n_col_blocks),
            dy2, x2, bias, dx2, y2, partial, dy2.stride(0), x2.stride(0), dx2.stride(0),
            y2.stride(0) if y2 is not None else 0, n_rows, n_cols, rows_per_program,
            HAS_BIAS=bias is not None, STORE_Y=y2 is not None, FORM=APPROXIMATIONS.index(approximate),
            POLY_CDF=_poly_cdf(dx2.dtype), BLOCK_M=block_m,
            BLOCK_N=block_n, RNE_BF16_IN_SOFTWARE=interpreted_kernel, num_warps=num_warps,
            **LAUNCH_OPTIONS,
        )
    if bias is None:
        return torch.empty((0,), dtype=torch.float32, device=x2.device)
    dbias = torch.empty((n_cols,), dtype=bias.dtype, device=x2.device)
    # No rows: no partial rows to sum (n_partials 0), so dbias is zeros.
    sum_partial_rows(partial, n_groups if n_rows > 0 else 0, (dbias,))
    return dbias


def bias_gelu_bwd_impl(dy: Tensor, x: Tensor, bias: Optional[Tensor], approximate: str) -> tuple[Tensor, Tensor]:
    """Returns (dx, dbias); dbias is an empty tensor when there is no bias."""
    n_cols = x.shape[-1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dbias = bias_gelu_backward_into(as_rows(dy, n_cols), as_rows(x, n_cols), bias, approximate, dx.view(-1, n_cols))
    return dx, (dbias if bias is not None else x.new_empty(0))


def _bias_gelu_fwd_fake(x, bias, approximate):
    return x.new_empty(x.shape)


def _bias_gelu_bwd_fake(dy, x, bias, approximate):
    return x.new_empty(x.shape), (bias.new_empty(bias.shape) if bias is not None else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate = approximate


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    dx, dbias = bias_gelu_bwd(dy, x, bias, ctx.approximate)
    return dx, (dbias if bias is not None else None), None


_bias_gelu_fwd = define_op("bias_gelu_fwd", _bias_gelu_fwd_impl, fake=_bias_gelu_fwd_fake,
                           setup_context=_setup_context, backward=_backward, kernel=_bias_gelu_fwd_kernel)
bias_gelu_bwd = define_op("bias_gelu_bwd", bias_gelu_bwd_impl, fake=_bias_gelu_bwd_fake, kernel=_bias_gelu_bwd_kernel)


@checked_once
def _validate(x, bias, approximate):
    check_float_tensor("x", x, dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64))
    check_optional_float_tensor("bias", bias, dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64))
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension, got a 0-d tensor")
    check_shape("bias", bias, (x.shape[-1],))
    check_same_device("x", x, bias=bias)


def bias_gelu(x: Tensor, bias: Optional[Tensor] = None, approximate: str = "none") -> Tensor:
    """``gelu(x + bias)`` over the last dim in one pass, forward and backward.

    Args:
        x: ``[..., N]``, float32, float16 or bfloat16 (the bias-free output of fc1).
        bias: ``[N]`` in float32 or x's dtype, or None.
        approximate: ``"none"`` (exact erf GELU, the default, as in timm, transformers and
            torchvision ViTs), ``"tanh"`` (SigLIP) or ``"quick"`` (quick_gelu,
            ``z * sigmoid(1.702 z)``, OpenAI's CLIP).

    Returns y in x's dtype. Backward gives dx and dbias; dbias is reduced in two
    deterministic stages (bitwise reproducible). Only x is saved for backward.

    Runs the Triton kernel on CUDA (and on CPU under TRITON_INTERPRET=1), else
    `vit_kernels.reference.bias_gelu`, as does float64.

    Raises:
        TypeError: non-tensors, integer dtypes.
        ValueError: bias not ``[N]``, mixed devices, unknown ``approximate``, 0-d x.
    """
    _validate(x, bias, approximate)
    if x.dtype == torch.float64 or not runs_kernel(_bias_gelu_fwd_kernel, x) or inductor_generates("bias_gelu"):
        return reference.bias_gelu(x, bias, approximate)
    return _bias_gelu_fwd(x, bias, approximate)
