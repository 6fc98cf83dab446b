# fc1 + bias + GELU: y = gelu(x @ W^T + b), a Triton GEMM with the bias and GELU in its
# epilogue, forward and backward.
#
# What is fused and why. fc1's output [M, 4D] is the largest activation of a ViT block.
# cuBLAS + `bias_gelu` writes the GEMM result, reads it back and writes y: two writes and
# one read of [M, 4D]. Here the GEMM's fp32 accumulator goes through bias + GELU in
# registers and y is written once; when autograd needs it, the bias-free pre-activation z
# is written beside y (what `bias_gelu` saves too), so training writes two [M, 4D] tensors
# and reads none, inference writes one.
#
# Backward: dz = dy * gelu'(z + b) with the bias gradient in the same pass (the tested
# `bias_gelu` backward kernel: one read of dy and z, one write of dz, deterministic
# two-stage dbias), then dX = dz @ W and dW = dz^T @ x in cuBLAS. The alternative the
# issue names, gelu' inside the dX GEMM's prologue, saves the dz write and read but
# computes gelu' twice (dW needs dz too) and cannot use cuBLAS for dX; it is not written
# until a GPU measurement says it pays.
#
# Dispatch (backend="auto"): cuBLAS + `bias_gelu` on CUDA at every shape, because that is
# what measured faster. H100 80GB, torch 2.11, triton 3.6, bf16, 2026-11-22 (main job,
# benchmarks/results/nvidia-h100-2026-11-22.md), ms per call:
#
#   shape (M, K -> N)              Triton GEMM+epilogue   cuBLAS+bias_gelu   eager F.linear+F.gelu
#   ViT-B (50432, 768 -> 3072)     0.712 fwd / 2.163 f+b  0.581 / 1.740      0.580 / 1.644
#   ViT-L (25216, 1024 -> 4096)    0.560 / 1.616          0.449 / 1.342      0.441 / 1.286
#   ViT-H (16448, 1280 -> 5120)    0.544 / 1.659          0.428 / 1.375      0.429 / 1.324
#
# The Triton GEMM runs at 42-50% of the measured 793 TFLOP/s bf16 matmul rate; cuBLAS's nvjet
# GEMM alone at about 87% (0.34 ms at ViT-B, torch.profiler): the [M, 4D] write and read the
# epilogue saves (about 0.1 ms at ViT-B, 3 TB/s) is less than the GEMM time it loses. cuBLAS + bias_gelu itself is no faster than
# eager, whose F.linear already adds the bias in cuBLAS's epilogue: one bias_gelu pass
# (0.25 ms at ViT-B, 83% of the copy bandwidth) against eager's GELU pass (0.22 ms). So
# _TRITON_GEMM_WINS stays empty; a Triton GEMM on Hopper would need wgmma-level tiles
# (128 x 256, warp-specialized, TMA) to beat nvjet, and those spill with this epilogue
# (see the configs below). Under the interpreter (CPU, TRITON_INTERPRET=1) auto runs the
# Triton GEMM, so CI tests it (bf16 excepted: the interpreter's bf16 tl.dot is wrong); on
# CPU otherwise, and for float64, the reference runs.
#
# Design choices.
# - Tiles grouped along M (GROUP_M rows of tiles share W's column tiles in L2), fp32
#   accumulation, K masked (no divisibility requirement on M, N or K).
# - Five configs for Hopper and Ampere (each one compiles), autotuned on CUDA keyed on
#   (M bucket, N, K, dtype); configs whose operand ring exceeds 100 KiB of shared memory
#   are pruned before timing (float32 operands take twice the bytes). All of them compile
#   for sm_80 and sm_90 without register spills (tests/gpu_compile_check.py, in CI).
# - float32 operands run the dot in IEEE float32, not tf32: tf32 would fail the numerics
#   rule against eager float32 (PyTorch keeps matmuls in full float32 by default).
# - The epilogue computes GELU on the fp32 accumulator plus the fp32 bias: one rounding
#   at the store, where eager rounds the GEMM result first.
#
# Layout: x [..., K] (rows may be strided, last dim contiguous), weight [N, K] (nn.Linear's),
# bias [N] or None. Not supported: other activations.

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .. import reference
from .._dispatch import FusedOp, cuda_properties, interpreted, linear_compute_dtype, op_or_impl, runs_kernel
from .._validate import check_float_tensor, check_optional_float_tensor, check_same_device, check_shape
from ._triton_helpers import LAUNCH_OPTIONS, as_rows, cast_for_store, cdiv, next_power_of_2
from .bias_gelu import APPROXIMATIONS, _gelu, bias_gelu, bias_gelu_bwd_impl, bias_gelu_bwd_op

BACKENDS = ("auto", "triton", "cublas")
# (compute capability major, dtype) -> predicate on (M, N, K) where the Triton GEMM measured
# faster than cuBLAS + bias_gelu. Empty: on an H100 it measured 0.76-0.81x (see the header).
_TRITON_GEMM_WINS: dict = {}


@triton.jit
def _linear_bias_gelu_fwd_kernel(
    X, W, BIAS, Y, Z,
    stride_x_row, stride_w_row, stride_y_row, stride_z_row,
    M, N, K, M_BUCKET,
    HAS_BIAS: tl.constexpr, SAVE_PRE: tl.constexpr, TANH: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    RNE_BF16_IN_SOFTWARE: tl.constexpr,
):
    pid = tl.program_id(0)
    n_tiles_m = tl.cdiv(M, BLOCK_M)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * n_tiles_n
    group = pid // tiles_per_group
    first_m = group * GROUP_M
    group_rows = min(n_tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % tiles_per_group) % group_rows
    tile_n = (pid % tiles_per_group) // group_rows

    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    # int32 offsets (the launcher keeps every tensor under 2^31 elements): 64-bit offset
    # tensors would double the registers the operand pointers take.
    x_ptrs = X + rows[:, None] * stride_x_row + ks[None, :]
    w_ptrs = W + cols[None, :] * stride_w_row + ks[:, None]  # a [BLOCK_K, BLOCK_N] view of W^T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    mask = row_ok[:, None] & col_ok[None, :]
    if SAVE_PRE:
        z_ptrs = Z + rows[:, None] * stride_z_row + cols[None, :]
        tl.store(z_ptrs, cast_for_store(acc, Z.dtype.element_ty, RNE_BF16_IN_SOFTWARE), mask=mask)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    # libdevice's erf even for 16-bit outputs (bias_gelu's POLY_CDF): the epilogue runs once per
    # output tile of a tensor-core-bound GEMM, where its instruction count does not show.
    y = _gelu(acc, TANH, False)
    y_ptrs = Y + rows[:, None] * stride_y_row + cols[None, :]
    tl.store(y_ptrs, cast_for_store(y, Y.dtype.element_ty, RNE_BF16_IN_SOFTWARE), mask=mask)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for Hopper and Ampere. The Triton matmul
# tutorial's 128x256 and 256x128 tiles are left out: with the GELU epilogue on their
# accumulators ptxas spills (200-570 bytes per thread on sm_90 and sm_80,
# tests/gpu_compile_check.py); every config here compiles without spills for both.
_CONFIGS = [
    (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 128, 32, 4, 4),
    (64, 64, 32, 4, 4),
]
# The operand ring's budget: room for the epilogue, and float32 operands (twice the bytes)
# keep only the small tiles, which is also where their IEEE dots stop spilling.
_SHARED_MEMORY_BYTES = 100 * 1024


def _prune(configs, named_args, **kwargs):
    itemsize = named_args["X"].element_size()
    fits = [c for c in configs
            if c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * itemsize
            <= _SHARED_MEMORY_BYTES]
    return fits or configs[-1:]


_linear_bias_gelu_fwd_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
             for bm, bn, bk, w, s in _CONFIGS],
    key=["M_BUCKET", "N", "K", "SAVE_PRE"],
    prune_configs_by={"early_config_prune": _prune},
)(_linear_bias_gelu_fwd_kernel)


def _linear_bias_gelu_fwd_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], approximate: str,
                          save_pre: bool) -> tuple[Tensor, Tensor]:
    """Returns (y, z): z = x @ W^T (bias-free, for backward) when save_pre, else an empty tensor."""
    n, k = weight.shape
    out_shape = (*x.shape[:-1], n)
    y = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    z = torch.empty(out_shape if save_pre else (0,), dtype=x.dtype, device=x.device)
    x2 = as_rows(x, k)
    m = x2.shape[0]
    if m == 0 or n == 0:
        return y, z
    if k == 0:  # an empty sum: z = 0
        y.copy_(reference.bias_gelu(torch.zeros(out_shape, dtype=x.dtype, device=x.device), bias, approximate))
        if save_pre:
            z.zero_()
        return y, z
    _launch(x2, weight, bias, y.view(-1, n), z.view(-1, n) if save_pre else None, approximate,
            config=_INTERPRETER_CONFIG if interpreted(_linear_bias_gelu_fwd_kernel) else None)
    return y, z


# One modest tile under the interpreter: its cost is per operation, and autotuning needs a GPU.
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4)


def _launch(x2: Tensor, weight: Tensor, bias: Optional[Tensor], y2: Tensor, z2: Optional[Tensor], approximate: str,
            config: Optional[triton.Config] = None) -> None:
    """y2 = gelu(x2 @ weight^T + bias) (and z2 = x2 @ weight^T when given): autotuned, or with `config`."""
    (m, k), n = x2.shape, weight.shape[0]
    args = (x2, weight, bias, y2, y2 if z2 is None else z2,  # an unused pointer when not saving
            x2.stride(0), weight.stride(0), y2.stride(0), y2.stride(0) if z2 is None else z2.stride(0),
            m, n, k, next_power_of_2(m))
    kwargs = dict(HAS_BIAS=bias is not None, SAVE_PRE=z2 is not None, TANH=approximate == "tanh",
                  DOT_PRECISION="ieee" if x2.dtype == torch.float32 else "tf32",
                  RNE_BF16_IN_SOFTWARE=interpreted(_linear_bias_gelu_fwd_kernel))
    if config is None:
        grid = lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _linear_bias_gelu_fwd_tuned[grid](*args, **kwargs, **LAUNCH_OPTIONS)
        return
    grid = (cdiv(m, config.kwargs["BLOCK_M"]) * cdiv(n, config.kwargs["BLOCK_N"]),)
    _linear_bias_gelu_fwd_kernel[grid](*args, **kwargs, **config.kwargs, num_warps=config.num_warps,
                                       num_stages=config.num_stages, **LAUNCH_OPTIONS)


def autotune_configs(x: Tensor) -> list:
    """The configs the autotuner would time for x's dtype (after the shared-memory prune)."""
    return _prune(_linear_bias_gelu_fwd_tuned.configs, {"X": x})


_linear_bias_gelu_fwd_op = torch.library.custom_op(
    "vit_kernels::linear_bias_gelu_fwd", _linear_bias_gelu_fwd_impl, mutates_args=())


@_linear_bias_gelu_fwd_op.register_fake
def _(x, weight, bias, approximate, save_pre):
    out_shape = (*x.shape[:-1], weight.shape[0])
    return x.new_empty(out_shape), x.new_empty(out_shape if save_pre else (0,))


def _setup_context(ctx, inputs, output):
    x, weight, bias, approximate, save_pre = inputs
    _, z = output
    ctx.save_for_backward(x, weight, bias, z)
    ctx.approximate = approximate


def _backward(ctx, dy, dz_unused):
    x, weight, bias, z = ctx.saved_tensors
    # dz = dy * gelu'(z + b), dbias in the same pass (deterministic partial sums).
    dz, dbias = op_or_impl(bias_gelu_bwd_op, bias_gelu_bwd_impl)(dy, z, bias, ctx.approximate)
    dz2, x2 = dz.reshape(-1, dz.shape[-1]), x.reshape(-1, x.shape[-1])
    dx = (dz2 @ weight).view(x.shape) if ctx.needs_input_grad[0] else None
    dweight = (dz2.t() @ x2).to(weight.dtype) if ctx.needs_input_grad[1] else None
    dbias = dbias if bias is not None and ctx.needs_input_grad[2] else None
    return dx, dweight, dbias, None, None


_linear_bias_gelu_fwd = FusedOp(_linear_bias_gelu_fwd_op, _linear_bias_gelu_fwd_impl, setup_context=_setup_context,
                                 backward=_backward, non_differentiable=(1,))


def _triton_gemm_wins(x: Tensor, m: int, n: int, k: int) -> bool:
    if x.device.type != "cuda":
        # The interpreter: run the kernel so that it is tested, except in bf16, whose tl.dot
        # the interpreter computes wrongly (triton 3.7-3.9).
        return x.dtype != torch.bfloat16
    rule = _TRITON_GEMM_WINS.get((cuda_properties(x.device).major, x.dtype))
    return bool(rule and rule(m, n, k))


def linear_bias_gelu(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, approximate: str = "none",
                     *, backend: str = "auto") -> Tensor:
    """``gelu(x @ weight^T + bias)``: fc1 and its activation, forward and backward.

    Args:
        x: ``[..., K]``, float32, float16 or bfloat16.
        weight: ``[N, K]`` (nn.Linear's layout), float32 or x's dtype.
        bias: ``[N]``, float32 or x's dtype, or None.
        approximate: ``"none"`` (exact erf GELU, the default) or ``"tanh"``.
        backend: ``"auto"`` (per-shape dispatch, see the header comment: cuBLAS + `bias_gelu`
            on CUDA, which measured faster at every ViT shape on an H100), ``"triton"`` (the fused GEMM) or
            ``"cublas"`` (``bias_gelu(F.linear(x, weight), bias)``). Tensors of 2^31 elements
            or more always take cuBLAS (the kernel indexes in int32).

    Under autocast, x and weight are cast to the autocast dtype (as autocast runs a
    Linear) and the bias is added in float32; otherwise weight is cast to x's dtype.
    Returns ``[..., N]`` in the compute dtype. The Triton GEMM runs its dots in IEEE
    float32 for float32 inputs (not tf32). float64, and CPU tensors outside Triton's
    interpreter, run `vit_kernels.reference.linear_bias_gelu`.

    Raises:
        TypeError: non-tensors, integer dtypes.
        ValueError: weight not 2-D or not ``[N, K]`` for x's K, bias not ``[N]``, mixed
            devices, unknown ``approximate`` or ``backend``, 0-d x.
    """
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    check_float_tensor("x", x, dtypes=dtypes)
    check_float_tensor("weight", weight, dtypes=dtypes)
    check_optional_float_tensor("bias", bias, dtypes=dtypes)
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension, got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must have shape [N, {x.shape[-1]}] (x's last dim is K), got {tuple(weight.shape)}")
    check_shape("bias", bias, (weight.shape[0],))
    check_same_device("x", x, weight=weight, bias=bias)

    dtype = linear_compute_dtype(x)
    x, weight = x.to(dtype), weight.to(dtype)
    if x.dtype == torch.float64 or not runs_kernel(_linear_bias_gelu_fwd_kernel, x):
        return reference.linear_bias_gelu(x, weight, bias, approximate)
    rows, (n, k) = x.numel() // max(x.shape[-1], 1), weight.shape
    # The kernel's offsets are int32; a tensor of 2^31 elements or more takes cuBLAS.
    fits_int32 = max(rows * k, rows * n, n * k) < 2**31
    use_triton = fits_int32 and (backend == "triton" or (backend == "auto" and _triton_gemm_wins(x, rows, n, k)))
    if not use_triton:
        return bias_gelu(F.linear(x, weight), bias, approximate)
    if x.stride(-1) != 1:
        x = x.contiguous()
    save_pre = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    y, _ = _linear_bias_gelu_fwd(x, weight.contiguous(), bias, approximate, save_pre)
    return y
