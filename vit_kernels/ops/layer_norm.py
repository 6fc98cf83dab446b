# Fused residual add + LayerNorm: the pre-LN residual step of a ViT block.
#
#   h_new = h + row_scale[b] * gamma * x        (h_new = row_scale[b] * gamma * x without h)
#   y     = (h_new - mean(h_new)) * rstd * weight + bias
#
# What is fused and why. Eager PyTorch runs this as up to four kernels: the layer-scale
# multiply, the drop-path multiply, the residual add (read 2, write 1) and the
# LayerNorm (read 1, write 1). Here one pass reads x and h once and writes y and h_new
# once: 4 tensor-sized transfers instead of 5 (7 with layer scale and drop path), and
# no intermediate ever reaches device memory. Drop path enters as a per-sample scale
# (0 or 1/keep_prob) and layer scale as a per-channel one, so DropPath and LayerScale
# modules cost nothing extra. The backward is one pass as well: it takes the gradients
# of both outputs (the residual stream's gradient flows through h_new) and writes dx,
# dh and per-program partial sums of dweight, dbias and dgamma, which a second launch sums.
#
# Design choices.
# - A program owns BLOCK_M whole rows: BLOCK_N = next_power_of_2(D) columns, masked,
#   so a row's statistics need no cross-program communication. Small D gets several
#   rows per program so each program still moves a few KB; large D gets more warps.
# - Statistics in float32, two-pass (mean, then the variance of the centered row,
#   both from registers), so there is no catastrophic cancellation of E[x^2] - E[x]^2.
# - y is the LayerNorm of h_new *after* rounding h_new to its stored dtype: the forward
#   and the backward (which recomputes x_hat from the stored h_new) see one function,
#   and it is the function eager computes.
# - residual_in_fp32 stores h_new in float32 while y is in the activation dtype: the
#   residual stream of a bf16 ViT then accumulates 24 or 32 blocks without bf16
#   rounding at every add.
# - dweight/dbias/dgamma: each backward program accumulates its rows in float32
#   registers and writes one partial row; a second launch (ops/_partial_sums.py, which says
#   why a launch and not aten's sum) sums each parameter's partial rows in a fixed order and
#   stores the gradient in the parameter's dtype. No atomics and no spin locks, so gradients
#   are bitwise reproducible.
# - Row offsets are computed in int64: B*N*D passes 2^31 at ViT-H sizes.
#
# Alone, between CUDA events, the op can be slower than eager although the GPU's time is half
# of eager's: the host takes longer to launch it than the GPU takes to run it. Inside a ViT
# block the GEMMs give the host that time; alone, nothing does. (Measurements:
# benchmarks/results/, the add_layer_norm rows.)
#
# Layout: the last dimension must be contiguous (stride 1); any leading shape and any
# row stride are read in place. Not supported: normalizing over more than the last
# dimension, D > MAX_HIDDEN (one row must fit a program's registers), float64 (the
# public function runs the reference for it), RMSNorm.

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd import forward_ad

from .. import reference
from .._dispatch import define_op, inductor_generates, interpreted, num_programs_for_reduction, runs_kernel
from ._launcher import launcher_for
from ._nodes import CppNode
from ._partial_sums import sum_partial_rows
from ._triton_helpers import LAUNCH_OPTIONS, as_row_pointer, cast_for_store, cdiv, next_power_of_2
from .._validate import (
    check_float_tensor,
    check_number,
    check_optional_float_tensor,
    check_same_device,
    check_shape,
    checked_once,
)

MAX_HIDDEN = 16384


@triton.jit
def _add_layer_norm_fwd_kernel(
    X,
    RESIDUAL,
    W,
    B,
    GAMMA,
    ROW_SCALE,
    Y,
    RESIDUAL_OUT,
    STATS,
    stride_x_row,
    stride_res_row,
    stride_y_row,
    stride_res_out_row,
    n_rows,
    n_cols,
    rows_per_sample,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr,
    STORE_RESIDUAL_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    RNE_BF16_IN_SOFTWARE: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)

    h = tl.load(X + rows64[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_GAMMA:
        gamma = tl.load(GAMMA + cols, mask=col_mask, other=0.0).to(tl.float32)
        h = h * gamma[None, :]
    if HAS_ROW_SCALE:
        scale = tl.load(ROW_SCALE + rows // rows_per_sample, mask=row_mask, other=0.0).to(tl.float32)
        h = h * scale[:, None]
    if HAS_RESIDUAL:
        res = tl.load(RESIDUAL + rows64[:, None] * stride_res_row + cols[None, :], mask=mask, other=0.0)
        h = h + res.to(tl.float32)
    if STORE_RESIDUAL_OUT:
        h_stored = cast_for_store(h, RESIDUAL_OUT.dtype.element_ty, RNE_BF16_IN_SOFTWARE)
        tl.store(RESIDUAL_OUT + rows64[:, None] * stride_res_out_row + cols[None, :], h_stored, mask=mask)
        h = h_stored.to(tl.float32)

    mean = tl.sum(h, axis=1) / n_cols
    centered = tl.where(mask, h - mean[:, None], 0.0)
    var = tl.sum(centered * centered, axis=1) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(STATS + rows64, mean, mask=row_mask)
    tl.store(STATS + n_rows + rows64, rstd, mask=row_mask)

    y = centered * rstd[:, None]
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = y * w[None, :]
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = y + b[None, :]
    tl.store(Y + rows64[:, None] * stride_y_row + cols[None, :], cast_for_store(y, Y.dtype.element_ty, RNE_BF16_IN_SOFTWARE), mask=mask)


@triton.jit
def _add_layer_norm_bwd_kernel(
    X,
    H,
    W,
    GAMMA,
    ROW_SCALE,
    STATS,
    DY,
    DRESIDUAL_OUT,
    DX,
    DRESIDUAL,
    DW_PARTIAL,
    DB_PARTIAL,
    DGAMMA_PARTIAL,
    stride_x_row,
    stride_h_row,
    stride_dy_row,
    stride_dres_out_row,
    stride_dx_row,
    stride_dres_row,
    n_rows,
    n_cols,
    rows_per_sample,
    rows_per_program,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr,
    HAS_DRESIDUAL_OUT: tl.constexpr,
    STORE_DRESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    RNE_BF16_IN_SOFTWARE: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    if HAS_GAMMA:
        gamma = tl.load(GAMMA + cols, mask=col_mask, other=0.0).to(tl.float32)
    # Column sums, folded over the tile's rows every iteration: [BLOCK_N] accumulators keep
    # register pressure flat in BLOCK_M (three [BLOCK_M, BLOCK_N] ones spilled at D = 192).
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dgamma_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)

    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for block_start in range(row_start, row_end, BLOCK_M):
        rows = block_start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)

        h = tl.load(H + rows64[:, None] * stride_h_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(STATS + rows64, mask=row_mask, other=0.0)
        rstd = tl.load(STATS + n_rows + rows64, mask=row_mask, other=0.0)
        x_hat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(DY + rows64[:, None] * stride_dy_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            dw_acc += tl.sum(dy * x_hat, axis=0)
            wdy = dy * w[None, :]
        else:
            wdy = dy
        if HAS_BIAS:
            db_acc += tl.sum(dy, axis=0)
        c1 = tl.sum(x_hat * wdy, axis=1) / n_cols
        c2 = tl.sum(wdy, axis=1) / n_cols
        dh = (wdy - (x_hat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DRESIDUAL_OUT:
            dres_out = tl.load(
                DRESIDUAL_OUT + rows64[:, None] * stride_dres_out_row + cols[None, :], mask=mask, other=0.0
            )
            dh = dh + dres_out.to(tl.float32)
        if STORE_DRESIDUAL:
            tl.store(
                DRESIDUAL + rows64[:, None] * stride_dres_row + cols[None, :],
                cast_for_store(dh, DRESIDUAL.dtype.element_ty, RNE_BF16_IN_SOFTWARE),
                mask=mask,
            )
        dx = dh
        if HAS_ROW_SCALE:
            scale = tl.load(ROW_SCALE + rows // rows_per_sample, mask=row_mask, other=0.0).to(tl.float32)
            dx = dx * scale[:, None]
        if HAS_GAMMA:
            x = tl.load(X + rows64[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dgamma_acc += tl.sum(dx * x, axis=0)
            dx = dx * gamma[None, :]
        tl.store(DX + rows64[:, None] * stride_dx_row + cols[None, :], cast_for_store(dx, DX.dtype.element_ty, RNE_BF16_IN_SOFTWARE), mask=mask)

    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + pid * n_cols + cols, dw_acc, mask=col_mask)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + pid * n_cols + cols, db_acc, mask=col_mask)
    if HAS_GAMMA:
        tl.store(DGAMMA_PARTIAL + pid * n_cols + cols, dgamma_acc, mask=col_mask)


@functools.lru_cache(maxsize=None)
def _block_config(n_cols: int, interpreted_kernel: bool, *, backward: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for rows of n_cols elements.

    GPU forward: about 4K elements per program (two rows at ViT-H's 1280, four at ViT-B's
    768), at most 16 fp32 elements per thread. ptxas reports no spills at D <= 4096 for
    sm_80 and sm_90 (tests/gpu_compile_check.py); D = 16384 spills a little: one row no
    longer fits a program's registers comfortably.
    GPU backward: one row per loop iteration, BLOCK_N / 256 warps (1 to 8). With several
    rows per iteration, the column sums for dweight/dbias cross warps through shared memory
    every iteration: 4 rows x 1024 columns on 16 warps ran the ViT-B backward at a ninth of
    the forward's bandwidth on an H100 (benchmarks/results/moved-from-source-2026-11.md). With
    one row those sums are elementwise adds into registers; the cross-warp work is two row sums.
    Interpreter: its cost is per operation, not per element, so tiles of up to 64K
    elements; the kernel code and its masking are the same.
    """
    block_n = next_power_of_2(n_cols)
    if interpreted_kernel:
        return max(1, min(64, 65536 // block_n)), block_n, 4
    if backward:
        return 1, block_n, min(max(block_n // 256, 1), 8)
    elements_per_thread = 16
    block_m = max(1, min(16, 4096 // block_n))
    num_warps = min(32, max(4, block_m * block_n // (32 * elements_per_thread)))
    return block_m, block_n, num_warps


# Backward programs per SM: each loops over its share of rows one at a time, so it takes
# several resident programs per SM to keep enough loads in flight; the float32 partial
# rows they leave (programs x D, twice) stay a few percent of the tensors' traffic.
_BWD_PROGRAMS_PER_SM = 8


def _add_layer_norm_fwd_impl(
    x: Tensor,
    residual: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    gamma: Optional[Tensor],
    row_scale: Optional[Tensor],
    eps: float,
    residual_dtype: torch.dtype,
    store_residual: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (y, h_new or an empty tensor when not stored, stats): stats is float32 [2, rows], each
    row's mean then each row's rstd, in one allocation (one torch.empty is ~1 us of host time)."""
    n_cols = x.shape[-1]
    x2, x_stride = as_row_pointer(x, n_cols)
    n_rows = x.numel() // n_cols
    device = x.device
    # empty_like: a third of torch.empty's host time (no shape, dtype and device to parse).
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    residual_out = (torch.empty_like(x, dtype=residual_dtype, memory_format=torch.contiguous_format) if store_residual
                    else torch.empty((0,), dtype=residual_dtype, device=device))
    stats = torch.empty((2, n_rows), dtype=torch.float32, device=device)
    if n_rows == 0:
        return y, residual_out, stats
    res2, res_stride = as_row_pointer(residual, n_cols) if residual is not None else (None, 0)
    interpreted_kernel = interpreted(_add_layer_norm_fwd_kernel)
    block_m, block_n, num_warps = _block_config(n_cols, interpreted_kernel)
    launcher_for(_add_layer_norm_fwd_kernel).call(
        (cdiv(n_rows, block_m),),
        x2,
        res2,
        weight,
        bias,
        gamma,
        row_scale,
        y,
        residual_out if store_residual else None,
        stats,
        x_stride,
        res_stride,
        n_cols,
        n_cols if store_residual else 0,
        n_rows,
        n_cols,
        n_rows // row_scale.shape[0] if row_scale is not None else 1,
        eps,
        HAS_RESIDUAL=residual is not None,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        HAS_GAMMA=gamma is not None,
        HAS_ROW_SCALE=row_scale is not None,
        STORE_RESIDUAL_OUT=store_residual,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        RNE_BF16_IN_SOFTWARE=interpreted_kernel,
        num_warps=num_warps,
        **LAUNCH_OPTIONS,
    )
    return y, residual_out, stats


def _add_layer_norm_fwd_fake(x, residual, weight, bias, gamma, row_scale, eps, residual_dtype, store_residual):
    n_rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    residual_out = x.new_empty(x.shape if store_residual else (0,), dtype=residual_dtype)
    return (
        x.new_empty(x.shape),
        residual_out,
        x.new_empty((2, n_rows), dtype=torch.float32),
    )


def _add_layer_norm_bwd_impl(
    dy: Tensor,
    dresidual_out: Optional[Tensor],
    x: Optional[Tensor],
    h: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    gamma: Optional[Tensor],
    row_scale: Optional[Tensor],
    stats: Tensor,
    residual_dtype: Optional[torch.dtype],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dresidual, dweight, dbias, dgamma): dresidual is an empty tensor when not
    computed, and so is the gradient of a parameter not given; each parameter's gradient is in
    its dtype."""
    dx, *rest = add_layer_norm_bwd_grads(dy, dresidual_out, x, h, weight, bias, gamma, row_scale, stats,
                                         residual_dtype)
    rest = iter(rest)
    dresidual = next(rest) if residual_dtype is not None else dy.new_empty((0,))
    return (dx, dresidual, *(next(rest) if param is not None else dy.new_empty((0,), dtype=torch.float32)
                             for param in (weight, bias, gamma)))


def add_layer_norm_bwd_grads(dy, dresidual_out, x, h, weight, bias, gamma, row_scale, stats, residual_dtype) -> tuple:
    """_add_layer_norm_bwd_impl's arguments (the types there). The backward's two launches:
    (dx, dresidual where residual_dtype is given, then the gradient of each of weight, bias and
    gamma that is given, in that order and in its dtype): only what is computed, each its own
    allocation, so that the C++ nodes replay it from its launch plan (ops/_plans.py) with no
    allocation to spare.

    `x` is needed only with gamma (dgamma = sum(dh * row_scale * x)); `h` is the stored
    h_new (x itself when it was not stored). The autograd glue passes residual_dtype None where
    dresidual equals dx.
    """
    n_cols = dy.shape[-1]
    dy2, dy_stride = as_row_pointer(dy, n_cols)
    h2, h_stride = as_row_pointer(h, n_cols)
    n_rows = dy.numel() // n_cols
    device = dy.device
    dx = torch.empty_like(dy, memory_format=torch.contiguous_format)
    store_dresidual = residual_dtype is not None
    dresidual = (torch.empty_like(dy, dtype=residual_dtype, memory_format=torch.contiguous_format) if store_dresidual
                 else None)

    interpreted_kernel = interpreted(_add_layer_norm_bwd_kernel)
    block_m, block_n, num_warps = _block_config(n_cols, interpreted_kernel, backward=True)
    # Whole row blocks per program; the last program may get fewer rows.
    n_row_blocks = max(1, cdiv(n_rows, block_m))
    n_programs = min(num_programs_for_reduction(device, _BWD_PROGRAMS_PER_SM), n_row_blocks)
    rows_per_program = cdiv(n_row_blocks, n_programs) * block_m
    n_programs = cdiv(n_row_blocks * block_m, rows_per_program)

    # The float32 partial rows of every parameter gradient in one buffer, a slab each.
    params = (weight, bias, gamma)
    n_slabs = sum(param is not None for param in params)
    partials = torch.empty((n_slabs, n_programs, n_cols), dtype=torch.float32, device=device)
    rows_of = iter(partials.unbind(0))
    dw_partial, db_partial, dgamma_partial = (next(rows_of) if param is not None else None for param in params)
    if n_rows > 0:
        x2, x_stride = as_row_pointer(x, n_cols) if gamma is not None else (None, 0)
        dres_out2, dres_out_stride = (as_row_pointer(dresidual_out, n_cols) if dresidual_out is not None
                                      else (None, 0))
        launcher_for(_add_layer_norm_bwd_kernel).call(
            (n_programs,),
            x2,
            h2,
            weight,
            gamma,
            row_scale,
            stats,
            dy2,
            dres_out2,
            dx,
            dresidual,
            dw_partial,
            db_partial,
            dgamma_partial,
            x_stride,
            h_stride,
            dy_stride,
            dres_out_stride,
            n_cols,
            n_cols if store_dresidual else 0,
            n_rows,
            n_cols,
            n_rows // row_scale.shape[0] if row_scale is not None else 1,
            rows_per_program,
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            HAS_GAMMA=gamma is not None,
            HAS_ROW_SCALE=row_scale is not None,
            HAS_DRESIDUAL_OUT=dresidual_out is not None,
            STORE_DRESIDUAL=store_dresidual,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            RNE_BF16_IN_SOFTWARE=interpreted_kernel,
            num_warps=num_warps,
            **LAUNCH_OPTIONS,
        )
    dw, db, dgamma = (torch.empty((n_cols,), dtype=param.dtype, device=device) if param is not None else None
                      for param in params)
    # No rows: no partial rows to sum (n_partials 0), so the gradients are zeros.
    sum_partial_rows(partials, n_programs if n_rows > 0 else 0, (dw, db, dgamma))
    grads = [grad for grad in (dw, db, dgamma) if grad is not None]
    return (dx, dresidual, *grads) if store_dresidual else (dx, *grads)


def _add_layer_norm_bwd_fake(dy, dresidual_out, x, h, weight, bias, gamma, row_scale, stats, residual_dtype):
    dresidual = dy.new_empty(dy.shape if residual_dtype is not None else (0,), dtype=residual_dtype or dy.dtype)
    return (dy.new_empty(dy.shape), dresidual,
            *(dy.new_empty(param.shape if param is not None else (0,),
                           dtype=param.dtype if param is not None else torch.float32) for param in (weight, bias, gamma)))


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, gamma, row_scale, eps, residual_dtype, store_residual = inputs
    _, residual_out, stats = output
    ctx.save_for_backward(
        x if gamma is not None else None,
        residual_out if store_residual else x,
        weight,
        bias,
        gamma,
        row_scale,
        stats,
    )
    ctx.has_residual = residual is not None
    ctx.residual_dtype = residual.dtype if residual is not None else None
    ctx.store_residual = store_residual


def _backward(ctx, dy, dresidual_out, _dstats):
    x, h, weight, bias, gamma, row_scale, stats = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros(h.shape, dtype=h.dtype if x is None else x.dtype, device=h.device)
    if not ctx.store_residual:
        # h_new was x itself: its gradient reaches x through autograd, not through here.
        dresidual_out = None
    # dresidual equals dx when nothing scales the branch and the dtypes agree: reuse it.
    separate_dresidual = ctx.has_residual and (
        gamma is not None or row_scale is not None or ctx.residual_dtype != dy.dtype
    )
    dx, dresidual, dweight, dbias, dgamma = _add_layer_norm_bwd(
        dy,
        dresidual_out,
        x,
        h,
        weight,
        bias,
        gamma,
        row_scale,
        stats,
        ctx.residual_dtype if separate_dresidual else None,
    )
    if ctx.has_residual and not separate_dresidual:
        dresidual = dx
    return (
        dx,
        dresidual if ctx.has_residual else None,
        dweight if weight is not None else None,
        dbias if bias is not None else None,
        dgamma if gamma is not None else None,
        None,
        None,
        None,
        None,
    )


_add_layer_norm_fwd = define_op("add_layer_norm_fwd", _add_layer_norm_fwd_impl, fake=_add_layer_norm_fwd_fake,
                                setup_context=_setup_context, backward=_backward, non_differentiable=(2,),
                                kernel=_add_layer_norm_fwd_kernel,
                                node=CppNode("add_layer_norm_node", "add_layer_norm_fwd",
                                             entry="add_layer_norm_call"))
_add_layer_norm_bwd = define_op("add_layer_norm_bwd", _add_layer_norm_bwd_impl, fake=_add_layer_norm_bwd_fake,
                                kernel=_add_layer_norm_bwd_kernel)


@checked_once
def _validate(x, residual, weight, bias, eps, gamma, row_scale):
    check_float_tensor("x", x, dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64))
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the hidden dim D), got a 0-d tensor")
    n_cols = x.shape[-1]
    if n_cols == 0 or n_cols > MAX_HIDDEN:
        raise ValueError(f"x's last dim (the hidden size D) must be in [1, {MAX_HIDDEN}], got {n_cols}")
    for name, t in (("residual", residual), ("weight", weight), ("bias", bias), ("gamma", gamma)):
        check_optional_float_tensor(name, t, dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64))
    check_optional_float_tensor("row_scale", row_scale, dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64))
    check_same_device("x", x, residual=residual, weight=weight, bias=bias, gamma=gamma, row_scale=row_scale)
    check_shape("residual", residual, x.shape)
    check_shape("weight", weight, (n_cols,))
    check_shape("bias", bias, (n_cols,))
    check_shape("gamma", gamma, (n_cols,))
    if row_scale is not None:
        if x.dim() < 2:
            raise ValueError(f"row_scale needs x with a leading batch dim, got x of shape {tuple(x.shape)}")
        check_shape("row_scale", row_scale, (x.shape[0],))
    check_number("eps", eps, minimum=0.0)


def add_layer_norm(
    x: Tensor,
    residual: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-6,
    *,
    gamma: Optional[Tensor] = None,
    row_scale: Optional[Tensor] = None,
    residual_in_fp32: bool = False,
) -> tuple[Tensor, Tensor]:
    """The pre-LN residual step in one pass: returns ``(y, h_new)``.

    ::

        h_new = residual + row_scale[b] * gamma * x     (no residual: row_scale[b] * gamma * x)
        y     = LayerNorm(h_new) * weight + bias         over the last dim, statistics in float32

    Args:
        x: the branch output ``[..., D]``; float32, float16 or bfloat16, last dim
            contiguous after reshaping to rows (otherwise it is copied). 1 <= D <= 16384.
        residual: the residual stream ``h``, same shape as x; any of the three float dtypes.
        weight, bias: LayerNorm affine ``[D]``, float32 or the activation dtype (autocast
            keeps LayerNorm weights in float32 while activations are bf16).
        eps: added to the variance; 1e-6 in timm/torchvision, 1e-12 in transformers' ViT.
        gamma: layer scale ``[D]`` (LayerScale / DeiT-3 / CaiT ``ls1``/``ls2``).
        row_scale: per-sample factor ``[B]`` for x of shape ``[B, ...]``: the drop-path mask
            divided by the keep probability (0 or 1/keep_prob), constant over a sample's tokens.
            It gets no gradient.
        residual_in_fp32: store h_new in float32 even when x is bf16/fp16.

    Returns:
        ``y`` in x's dtype and ``h_new`` in float32 if residual_in_fp32, else residual's
        dtype (x's when there is no residual). When nothing is added or scaled and the
        dtype does not change, h_new *is* x (no copy is written).

    Gradients flow to x, residual, weight, bias and gamma, from both outputs. dweight,
    dbias and dgamma are reduced deterministically (float32 partials per program, then
    a sum): gradients are bitwise reproducible run to run.

    CUDA tensors run the Triton kernels; CPU tensors run them through Triton's
    interpreter when TRITON_INTERPRET=1 was set before import, and the PyTorch
    reference (vit_kernels.reference.add_layer_norm) otherwise. float64 always runs
    the reference. Empty inputs (no rows) return empty outputs.

    Raises:
        TypeError: a non-tensor, or an integer/complex dtype, in any tensor argument;
            eps not a number.
        ValueError: D out of range, shapes that do not match x, row_scale not [B],
            tensors on different devices, eps < 0.
    """
    # At a signature whose call reached the C++ node before, the node straight from C++: all the
    # Python below decides is a function of the signature, and it costs about a third of the call's
    # host time (ops/_nodes.PublicEntry; docs/design.md, "The public entry"). Not while
    # torch.compile traces (it must see the Python below) or under forward-mode AD (which raises).
    if not torch.compiler.is_compiling() and forward_ad._current_level < 0:
        entry = _add_layer_norm_fwd.entry
        if entry is not None:
            outputs = entry.call(x, residual, weight, bias, eps, gamma, row_scale, residual_in_fp32)
            if outputs is not None:
                return outputs
    _validate(x, residual, weight, bias, eps, gamma, row_scale)
    if (x.dtype == torch.float64 or not runs_kernel(_add_layer_norm_fwd_kernel, x)
            or inductor_generates("add_layer_norm")):
        return reference.add_layer_norm(
            x, residual, weight, bias, eps, gamma=gamma, row_scale=row_scale, residual_in_fp32=residual_in_fp32
        )
    residual_dtype = reference.residual_dtype(x, residual, residual_in_fp32)
    store_residual = residual is not None or gamma is not None or row_scale is not None or residual_dtype != x.dtype
    y, residual_out, _ = _add_layer_norm_fwd(
        x, residual, weight, bias, gamma, row_scale, float(eps), residual_dtype, store_residual
    )
    entry = _add_layer_norm_fwd.entry
    if entry is not None:
        entry.remember((x, residual, weight, bias, eps, gamma, row_scale, residual_in_fp32), residual_dtype,
                       store_residual)
    return y, residual_out if store_residual else x
