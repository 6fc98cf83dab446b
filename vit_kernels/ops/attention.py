# Flash attention for ViTs: softmax(q k^T * scale) v in one Triton kernel, forward and backward.
#
# What is fused and why. Eager attention writes the [B, H, N, N] score matrix, reads it
# for the softmax, writes the probabilities and reads them again for the product with v:
# at ViT-L/16 @ 384 (N = 577) that is 4 passes over 21 MB per head-batch of 64, against
# 2 MB of q, k, v and out. Here each program keeps one BLOCK_M x BLOCK_N tile of scores
# in registers, with an online softmax (running max and sum), so the score matrix never
# reaches memory: O(N) extra memory (the log-sum-exp per row), N = 16384 runs where
# eager attention runs out of memory.
#
# Layout. q, k, v are [B, N, H, d] with any strides whose last one is 1: in particular
# the three views qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2] of the packed [B, N, 3, H, d]
# output of a ViT's qkv Linear, read in place (no permute, no copy). The output is
# written [B, N, H, d] contiguous, so `.reshape(B, N, H * d)` for the proj Linear is free.
# k/v may have another N than q (cross-attention, attention pooling). Non-causal only.
#
# Three files: the kernels (ops/attention_kernels.py, with their design), their tiles as data
# (ops/attention_configs.py), and this host module: the launches, the custom ops, autograd
# and the public functions.
#
# - Backward: two launches by default (dQ, then dK/dV), bitwise reproducible; with
#   deterministic=False three (a preprocess for delta, then dK/dV with dQ by float32 atomics
#   into a zeroed buffer, then its copy to q's dtype). Deterministic is the default because it
#   costs nothing: the atomic path is the slower (benchmarks/results/; the main job's
#   vit_kernels_atomic_dq rows price it).
# - Measurements against SDPA are in benchmarks/results/ and README, "Measured results".
#
# Head dims: every multiple of 8 from 8 to 128, held as two power-of-two column blocks where one
# would pad more (head_dim_blocks; ops/attention_kernels.py's header). Packed sequences of
# different lengths: ops/attention_varlen.py, on the same kernels.
#
# Not supported: causal or additive masks (the module falls back to the reference when
# a mask is given), other head dims, float64 (runs the reference).

import functools
import itertools
import math
import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from .._dispatch import (cuda_properties, define_op, inductor_generates, inductor_keeps_launch_options, interpreted,
                         runs_kernel)
from .._validate import check_float_tensor, check_number, check_same_device, checked_once
from . import _tuning
from ._launcher import launcher_for
from ._nodes import CppNode
from ._triton_helpers import LAUNCH_OPTIONS, cdiv, next_power_of_2
from .attention_configs import KERNEL_KINDS, as_configs, tiles_for
from .attention_kernels import (
    _attn_bwd_dkdv_kernel,
    _attn_bwd_dq_kernel,
    _attn_bwd_preprocess_kernel,
    _attn_fwd_kernel,
    _dropout_mask_kernel,
)

HEAD_DIMS = tuple(range(8, 129, 8))
HEAD_DIMS_TEXT = "a multiple of 8 from 8 to 128"
LOG2E = 1.4426950408889634
# The autotune key of every tuned attention kernel (with the tensors' dtypes).
TUNING_KEY = ("n_bucket", "HEAD_DIM", "HAS_DROPOUT")
__all__ = ["HEAD_DIMS", "HEAD_DIMS_TEXT", "KERNEL_KINDS", "attention_dropout_mask", "attention_probs", "draw_seed",
           "flash_attention", "flash_attention_qkvpacked", "head_dim_blocks", "launch_configs"]


def launch_configs(kind: str, head_dim: int, dtype: torch.dtype, kernel, *, atomic_dq: bool = False,
                   dropout: bool = False, arch_major: int = 9, varlen: bool = False) -> tuple:
    """The triton.Configs a launch of `kind` (one of KERNEL_KINDS) chooses among for `kernel`:
    one (run as is) or several (tuned); see ops/attention_configs.py."""
    return _launch_configs(kind, head_dim, dtype, interpreted(kernel), atomic_dq, dropout, arch_major, varlen)


# Asked at every launch: uncached, tiles_for builds tuples and as_configs hashes each frozen Tile
# in Python, about 1.5 us a launch together.
@functools.lru_cache(maxsize=None)
def _launch_configs(kind: str, head_dim: int, dtype: torch.dtype, interpreted_kernel: bool, atomic_dq: bool,
                    dropout: bool, arch_major: int, varlen: bool) -> tuple:
    tiles = tiles_for(kind, head_dim, dtype, interpreted=interpreted_kernel, atomic_dq=atomic_dq, dropout=dropout,
                      arch_major=arch_major, split_head=head_dim_blocks(head_dim)[1] > 0, varlen=varlen)
    return as_configs(tiles)


def _launch(kernel, configs: tuple, grid_for, args: tuple, kwargs: dict, options: dict = LAUNCH_OPTIONS) -> None:
    # args[0] is q: every tensor of an attention launch has q's dtype or a fixed one (float32
    # statistics and dQ accumulator, int32 sequence offsets, int64 seed), so q's decides them all.
    _tuning.launch(kernel, configs, grid_for, args, kwargs, key=TUNING_KEY, options=options, dtypes=(args[0].dtype,))


# The forward compiles without FMA contraction (PyTorch builds FlashAttention with UNFUSE_FMA
# for the same reason, pytorch/pytorch#121558). Contracted, the exponent of an unmasked block
# becomes fma(s, c, -round(max(s) * c)): at the row max that is the product's rounding error,
# up to ulp / 2, and exp2 overflows to inf once |s * c| passes 2^31. The backward keeps
# contraction: its exponent is clamped at 0 anyway (_probs_and_dscores), which costs one
# instruction per score element either way.
_NO_FP_FUSION = {**LAUNCH_OPTIONS, "enable_fp_fusion": False}


def _arch_major(device: torch.device) -> int:
    """The GPU's compute capability major (8 Ampere, 9 Hopper), which picks configs and
    switches; 9 under the interpreter (tests/gpu_compile_check.py sets each in turn)."""
    return cuda_properties(device).major if device.type == "cuda" else 9


def _peel_tail(arch_major: int, dropout_p: float) -> bool:
    """PEEL_TAIL of all three kernels: on Hopper without dropout. Peeling the partial last block
    off the loop spills registers on sm_80 at d >= 80 (192-1136 bytes) and with dropout
    (ptxas, tests/gpu_compile_check.py). scripts/gpu_diag.py switches times both ways."""
    return arch_major >= 9 and dropout_p == 0


def _tails(peel: bool) -> dict:
    return dict(PEEL_TAIL=peel, NARROW_TAIL=_narrow_tail() if peel else 0)


def _narrow_tail() -> int:
    """The width of the forward's last KV tile when the partial block fits in it (with PEEL_TAIL):
    16, the narrowest dot operand. gpu_diag.py switches times it against 0 (no narrow tile)."""
    return 16


def _n_bucket(n_q: int, n_kv: int) -> int:
    return min(next_power_of_2(max(n_q, n_kv)), 16384)


@functools.lru_cache(maxsize=None)  # asked at every launch
def head_dim_blocks(head_dim: int) -> tuple[int, int]:
    """The kernels' two column blocks for a head dim (ops/attention_kernels.py's header): (BLOCK_DA,
    BLOCK_DB), powers of two of at least 16 (a dot operand's minimum; BLOCK_DB 0 for none): the
    first d's largest power of two, the second covering the rest from the row's end, overlapping
    the first by what one padded block would pad: 72 -> (64, 16), 96 -> (64, 32), 104 -> (64, 64)."""
    if head_dim <= 16:
        return 16, 0
    block_a = 1 << (head_dim.bit_length() - 1)
    rest = head_dim - block_a
    return (block_a, 0) if rest == 0 else (block_a, max(16, next_power_of_2(rest)))


@functools.lru_cache(maxsize=None)  # asked at every launch
def head_blocks_overlap(head_dim: int) -> bool:
    """Whether the head dim's two column blocks overlap (24, 40, 56, 72, 88, 104-120): where two
    64-wide blocks do (104-120) the kernels hold the most registers, and two tiles spill there
    (the atomic-dQ dK/dV's; varlen's dK/dV with dropout: attention_configs)."""
    block_a, block_b = head_dim_blocks(head_dim)
    return block_b > 0 and block_a + block_b > head_dim


def _common_constexprs(q: Tensor, kernel, strides_are_aligned: int) -> dict:
    head_dim = q.shape[-1]
    block_a, block_b = head_dim_blocks(head_dim)
    return dict(
        HEAD_DIM=head_dim,
        BLOCK_DA=block_a,
        BLOCK_DB=block_b,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        RNE_BF16_IN_SOFTWARE=interpreted(kernel),
        VARLEN=False,
        STRIDES_ALIGNED=strides_are_aligned,
    )


def strides_aligned(*strides: tuple) -> int:
    """The kernels' STRIDES_ALIGNED for a launch, from each tensor's (batch, row, head) strides: 0
    unless every stride is a multiple of 8 elements, which the kernels then promise the compiler
    (ops/attention_kernels.py's header); 16 where every row stride is a multiple of 16 too (Triton
    marks those itself), else 8 (the kernels promise the row strides as well: _row_stride). Every
    contiguous tensor and packed-qkv view is aligned, since d is a multiple of 8; its rows are a
    multiple of 16 but at an odd head count with d an odd multiple of 8."""
    every = math.gcd(*itertools.chain.from_iterable(strides))
    if every % 8:
        return 0
    if every % 16 == 0:  # every stride, rows among them (d = 64, 128): no second gcd
        return 16
    return 16 if math.gcd(*map(_ROW, strides)) % 16 == 0 else 8


_ROW = operator.itemgetter(1)


def _seed_on(seed: Optional[Tensor], dropout_p: float, device: torch.device) -> Optional[Tensor]:
    """The int64 seed tensor the kernels load, on their device; None without dropout."""
    if dropout_p == 0:
        return None
    if seed is None:
        raise ValueError("seed is required when dropout_p > 0")
    return seed.to(device=device, dtype=torch.int64)


def _strides(t: Tensor) -> tuple:
    return t.stride()[:3]


def _flash_attention_fwd_impl(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    softmax_scale: float,
    dropout_p: float,
    seed: Optional[Tensor],
    deterministic: bool,
) -> tuple[Tensor, Tensor]:
    """Returns (out [B, N_q, H, d] contiguous, lse [B, H, N_q] float32, base 2).

    `seed` is an int64 scalar tensor on q's device (drawn by the caller, so torch.compile and
    CUDA graphs keep the draw instead of freezing a constant), needed when dropout_p > 0. `deterministic` is
    only carried to the backward.
    """
    batch, n_q, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    out = torch.empty((batch, n_q, n_heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, n_heads, n_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    arch_major = _arch_major(q.device)
    peel = _peel_tail(arch_major, dropout_p)
    sq, sk, sv, so = _strides(q), _strides(k), _strides(v), _strides(out)
    _launch(
        _attn_fwd_kernel,
        launch_configs("fwd", head_dim, q.dtype, _attn_fwd_kernel, dropout=dropout_p > 0, arch_major=arch_major),
        lambda meta: (cdiv(n_q, meta["BLOCK_M"]), n_heads, batch),
        (q, k, v, out, lse, *sq, *sk, *sv, *so,
         n_heads, n_q, n_kv, softmax_scale * LOG2E, dropout_p, _seed_on(seed, dropout_p, q.device), None, None, 0,
         _n_bucket(n_q, n_kv)),
        dict(HAS_DROPOUT=dropout_p > 0, **_tails(peel),
             **_common_constexprs(q, _attn_fwd_kernel, strides_aligned(sq, sk, sv, so))),
        options=_NO_FP_FUSION,
    )
    return out, lse


def _flash_attention_fwd_fake(q, k, v, softmax_scale, dropout_p, seed, deterministic):
    batch, n_q, n_heads, head_dim = q.shape
    return q.new_empty((batch, n_q, n_heads, head_dim)), q.new_empty((batch, n_heads, n_q), dtype=torch.float32)


def _flash_attention_bwd_impl(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    softmax_scale: float,
    dropout_p: float,
    seed: Optional[Tensor],
    deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv), each [B, N, H, d] contiguous in q's dtype."""
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    flash_attention_bwd_into(dq, dk, dv, dout, q, k, v, out, lse, softmax_scale, dropout_p, seed, deterministic)
    return dq, dk, dv


def flash_attention_bwd_into(dq: Tensor, dk: Tensor, dv: Tensor, dout: Tensor, q: Tensor, k: Tensor, v: Tensor,
                             out: Tensor, lse: Tensor, softmax_scale: float, dropout_p: float, seed: Optional[Tensor],
                             deterministic: bool) -> None:
    """The backward written into given dq, dk, dv: [B, N, H, d] in q's dtype, last stride 1, dk and
    dv with the same strides; e.g. the views of one packed [B, N, 3, H, d] qkv gradient, which a
    caller that owns the qkv Linear's backward takes as is (no torch.stack of three copies)."""
    batch, n_q, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    if dq.numel() == 0:
        return
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    sq, sk, sv, so = _strides(q), _strides(k), _strides(v), _strides(out)
    sdo, sdq, sdk = _strides(dout), _strides(dq), _strides(dk)
    if sdk != _strides(dv):  # the dK/dV kernel takes one set for both
        raise ValueError(f"dk and dv must have the same strides, got {dk.stride()} and {dv.stride()}")
    constexprs = _common_constexprs(q, _attn_bwd_dkdv_kernel, strides_aligned(sq, sk, sv, so, sdo, sdq, sdk))
    delta = torch.empty_like(lse)  # [B, H, N_q] float32
    scalars = (n_heads, n_q, n_kv, softmax_scale, softmax_scale * LOG2E, dropout_p, _seed_on(seed, dropout_p, q.device),
               None, None, 0, _n_bucket(n_q, n_kv))
    tails = _tails(_peel_tail(_arch_major(q.device), dropout_p))
    # The atomic-dQ dK/dV kernel's tile spilled on sm_90 where two 64-wide column blocks overlap
    # (104-120: 24 bytes peeled): there the deterministic backward runs, the same result.
    atomic_dq = not deterministic and not (head_dim > 96 and head_blocks_overlap(head_dim))
    if not atomic_dq:  # dQ first: its kernel writes delta, which the dK/dV kernel reads
        _launch(
            _attn_bwd_dq_kernel, launch_configs("dq", head_dim, q.dtype, _attn_bwd_dq_kernel, dropout=dropout_p > 0),
            lambda meta: (cdiv(n_q, meta["BLOCK_M"]), n_heads, batch),
            (q, k, v, out, dout, lse, delta, dq,
             *sq, *sk, *sv, *so, *sdo, *sdq, *scalars),
            dict(HAS_DROPOUT=dropout_p > 0, **tails, **constexprs),
        )
        dq_accum = None
    else:
        pre_block = 32
        launcher_for(_attn_bwd_preprocess_kernel).call(
            (cdiv(n_q, pre_block), n_heads, batch),
            out, dout, delta, *so, *sdo, n_heads, n_q, None, 0,
            HEAD_DIM=head_dim, BLOCK_DA=constexprs["BLOCK_DA"], BLOCK_DB=constexprs["BLOCK_DB"], BLOCK_M=pre_block,
            VARLEN=False, STRIDES_ALIGNED=constexprs["STRIDES_ALIGNED"], **LAUNCH_OPTIONS,
        )
        # With atomics, dQ accumulates in float32 [B, N_q, H, d] contiguous, zeroed first.
        dq_accum = torch.zeros((batch, n_q, n_heads, head_dim), dtype=torch.float32, device=q.device)
    _launch(
        _attn_bwd_dkdv_kernel,
        launch_configs("dkdv", head_dim, q.dtype, _attn_bwd_dkdv_kernel, atomic_dq=atomic_dq,
                       dropout=dropout_p > 0),
        lambda meta: (cdiv(n_kv, meta["BLOCK_N"]), n_heads, batch),
        (q, k, v, dout, lse, delta, dk, dv, dq_accum,
         *sq, *sk, *sv, *sdo, *sdk, *scalars),
        dict(HAS_DROPOUT=dropout_p > 0, ATOMIC_DQ=atomic_dq, **tails, **constexprs),
    )
    if atomic_dq:
        dq.copy_(dq_accum)


def flash_attention_bwd_packed(d_attn: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                      softmax_scale: float, dropout_p: float, seed: Optional[Tensor],
                               deterministic: bool) -> Tensor:
    """Attention's backward written straight into one packed qkv gradient, [B, N, 3 * H * d]: the
    one-node block step's (csrc/block_step.cpp calls it with its attention context's saved tensors
    and attributes, and owns the qkv Linear's backward)."""
    batch, n_tokens, n_heads, head_dim = q.shape
    d_qkv = torch.empty((batch, n_tokens, 3, n_heads, head_dim), dtype=q.dtype, device=q.device)
    flash_attention_bwd_into(*d_qkv.unbind(2), d_attn.view(q.shape), q, k, v, out, lse, softmax_scale, dropout_p,
                             seed, deterministic)
    return d_qkv.view(batch, n_tokens, 3 * n_heads * head_dim)


def _flash_attention_bwd_fake(dout, q, k, v, out, lse, softmax_scale, dropout_p, seed, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, softmax_scale, dropout_p, seed, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, seed)
    ctx.softmax_scale = softmax_scale
    ctx.dropout_p = dropout_p
    ctx.deterministic = deterministic


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, seed = ctx.saved_tensors
    dq, dk, dv = _flash_attention_bwd(
        dout, q, k, v, out, lse, ctx.softmax_scale, ctx.dropout_p, seed, ctx.deterministic
    )
    return dq, dk, dv, None, None, None, None


# The forward is traced into (a triton_op) only by an Inductor that compiles it with its launch
# options, enable_fp_fusion=False above; an older one would contract its exponents.
_flash_attention_fwd = define_op("flash_attention_fwd", _flash_attention_fwd_impl, fake=_flash_attention_fwd_fake,
                                 setup_context=_setup_context, backward=_backward, non_differentiable=(1,),
                                 kernel=_attn_fwd_kernel if inductor_keeps_launch_options() else None,
                                 node=CppNode("flash_attention_node", "attention_fwd"))
_flash_attention_bwd = define_op("flash_attention_bwd", _flash_attention_bwd_impl, fake=_flash_attention_bwd_fake,
                                 kernel=_attn_bwd_dkdv_kernel)


def attention_dropout_mask(seed: Tensor, batch: int, n_heads: int, n_q: int, n_kv: int, dropout_p: float,
                           device) -> Tensor:
    """The keep mask ``[B, H, N_q, N_kv]`` (bool) that flash_attention draws for `seed`.

    For tests and for debugging a training run: with it, `reference.attention` reproduces
    a dropped-out forward and backward exactly.
    """
    mask = torch.empty((batch, n_heads, n_q, n_kv), dtype=torch.int8, device=device)
    grid = (cdiv(n_q, 32), cdiv(n_kv, 32), batch * n_heads)
    launcher_for(_dropout_mask_kernel).call(grid, mask, n_q, n_kv, dropout_p, seed.to(device=device, dtype=torch.int64),
                                            BLOCK_M=32, BLOCK_N=32, **LAUNCH_OPTIONS)
    return mask.bool()


def draw_seed(device: torch.device) -> Tensor:
    """A dropout seed drawn on `device` by torch's generator for it (torch.manual_seed governs it):
    no host read, and under CUDA-graph capture the draw is part of the graph, so every replay
    draws a new seed."""
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64, device=device)


@checked_once
def _validate(q, k, v, softmax_scale, dropout_p):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, t, dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64))
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, N, H, d] (4-D), got shape {tuple(t.shape)}")
        if t.stride(-1) != 1 and t.numel() > 0:
            raise ValueError(f"{name}'s last dim (head dim) must be contiguous (stride 1), got stride {t.stride(-1)}")
    check_same_device("q", q, k=k, v=v)
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, N_kv, H, d], got {tuple(k.shape)} and {tuple(v.shape)}")
    if (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, heads and head dim ([B, N, H, d])"
        )
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head dim (q, k and v's last dim) must be {HEAD_DIMS_TEXT}, got {q.shape[-1]}")
    if k.shape[1] == 0 and q.shape[1] > 0 and q.shape[0] > 0:
        raise ValueError("k and v must have at least one token (N_kv >= 1): softmax over nothing is undefined")
    check_attention_options(softmax_scale, dropout_p)


def check_attention_options(softmax_scale, dropout_p) -> None:
    """softmax_scale None or > 0, dropout_p in [0, 1): every attention entry point's options."""
    if softmax_scale is not None:
        check_number("softmax_scale", softmax_scale)
        if not softmax_scale > 0:
            raise ValueError(f"softmax_scale must be > 0, got {softmax_scale}")
    check_number("dropout_p", dropout_p, minimum=0.0)
    if not dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    softmax_scale: Optional[float] = None,
    dropout_p: float = 0.0,
    deterministic: bool = True,
) -> Tensor:
    """softmax(q k^T * softmax_scale) v without materializing the scores; returns ``[B, N_q, H, d]`` contiguous.

    Args:
        q: ``[B, N_q, H, d]``; k, v: ``[B, N_kv, H, d]``. Any strides with the last one 1, so
            the views of a packed ``qkv [B, N, 3, H, d]`` are read in place. float16, bfloat16
            or float32 (float32 runs its dots in full IEEE precision, not tf32); all three the
            same dtype. d a multiple of 8 from 8 to 128; any N >= 1.
        softmax_scale: default ``d ** -0.5``.
        dropout_p: dropout on the attention probabilities (training); the mask comes from a
            Philox seed drawn from torch's default generator and is regenerated in backward.
        deterministic: dQ without atomics (bitwise reproducible gradients; the default).
            False accumulates dQ with float32 atomics inside the dK/dV pass, except at head dims
            104-120 (two overlapping 64-wide column blocks), where that kernel spills registers
            and the deterministic backward runs instead.

    CUDA tensors run the Triton kernels; CPU tensors run them through Triton's interpreter
    when TRITON_INTERPRET=1 was set before import, else `vit_kernels.reference.attention`
    (as does float64). Empty batches return empty outputs.

    Raises:
        TypeError: non-tensors, integer dtypes, q/k/v dtypes differing.
        ValueError: not 4-D, last stride not 1, shapes that disagree (k and v N differing),
            unsupported head dim, N_kv = 0, mixed devices, dropout_p outside [0, 1),
            softmax_scale <= 0.
    """
    _validate(q, k, v, softmax_scale, dropout_p)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if q.dtype == torch.float64 or not runs_kernel(_attn_fwd_kernel, q):
        mask = None
        if dropout_p > 0:
            mask = torch.rand(q.shape[0], q.shape[2], q.shape[1], k.shape[1], device=q.device) >= dropout_p
        return reference.attention(q, k, v, scale, mask, dropout_p)
    if inductor_generates("flash_attention", q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              dropout_p=dropout_p, scale=scale).transpose(1, 2)
    seed = draw_seed(q.device) if dropout_p > 0 else None
    out, _ = _flash_attention_fwd(q, k, v, scale, float(dropout_p), seed, deterministic)
    return out


def flash_attention_qkvpacked(
    qkv: Tensor,
    *,
    softmax_scale: Optional[float] = None,
    dropout_p: float = 0.0,
    deterministic: bool = True,
) -> Tensor:
    """flash_attention on the packed ``qkv [B, N, 3, H, d]`` of a ViT's qkv Linear (reshaped), read in place."""
    if isinstance(qkv, Tensor) and (qkv.dim() != 5 or qkv.shape[2] != 3):
        raise ValueError(f"qkv must be [B, N, 3, H, d], got shape {tuple(qkv.shape)}")
    check_float_tensor("qkv", qkv, dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64))
    if qkv.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"qkv's head dim (its last dim) must be {HEAD_DIMS_TEXT}, got {qkv.shape[-1]}")
    q, k, v = qkv.unbind(2)
    return flash_attention(q, k, v, softmax_scale=softmax_scale, dropout_p=dropout_p, deterministic=deterministic)


def attention_probs(q: Tensor, k: Tensor, *, softmax_scale: Optional[float] = None) -> Tensor:
    """The attention probabilities ``[B, H, N_q, N_kv]`` (float32), for visualization.

    An unfused reference path (it materializes the N x N matrix on purpose): the ViT
    paper's attention maps, attention rollout and mean attention distance need them.
    Same input rules as flash_attention.
    """
    _validate(q, k, k, softmax_scale, 0.0)
    return reference.attention_probs(q, k, softmax_scale)
