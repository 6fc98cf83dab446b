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
# Design choices.
# - Head dims 32, 64, 80, 96, 128: d is padded to the next power of two inside the
#   kernel (BLOCK_D) with masked loads, so ViT-H/14's d = 80 needs no copy.
# - Any N: both sequence dims are masked, no divisibility asserts (197, 257, 577, 1, 17).
# - Softmax statistics in float32, in base 2: the scale is folded into log2(e) * scale
#   once, so the inner loop uses exp2. The log-sum-exp (base 2) is saved for backward.
# - float32 inputs run their dots in full IEEE float32 precision, not tf32: tf32 would be
#   10x less accurate than eager float32 attention and fail the numerics rule.
# - Inner loops, all three kernels: on Hopper without dropout each runs its whole blocks (KV
#   blocks in the forward and dQ kernels, Q blocks in dK/dV) unmasked and peels off the
#   partial last one (PEEL_TAIL): no select on the scores, unmasked loads. When that partial
#   block holds at most 16 rows or columns it runs as a 16-wide tile (NARROW_TAIL): ViT
#   lengths are a multiple of 16 plus the class token (197 = 3 x 64 + 5, 257 = 4 x 64 + 1),
#   so a full-width tail computes 59 or 63 masked columns for nothing, a fifth of the KV work
#   at ViT-B with 64-wide blocks (256 -> 208 columns a row). Each kernel does the same for
#   the last block its grid splits (a program of its own: Q blocks in the forward and dQ
#   kernels, KV blocks in dK/dV): at most 16 rows run as a 16-row copy of the body (mma.sync,
#   below wgmma's 64 rows), so with 64-row blocks a ViT-B head computes 208 rows, not 256. Peeling spills on sm_80 at d >= 80 (192-1136 bytes) and with dropout, so
#   Ampere and dropout keep one masked loop. Static SASS per loop iteration (sm_90, triton 3.9), masked -> whole block: forward
#   (128 x 64 tile, 8 warps) d = 64 414 -> 347, d = 128 481 -> 429; dQ (128 x 32) d = 64
#   257 -> 204, d = 128 294 -> 258; dK/dV (32 x 128) d = 64 293 -> 235, d = 128 333 -> 299.
#   The forward compiles without FMA contraction (why: _NO_FP_FUSION). None of this is timed
#   on a GPU yet: scripts/gpu_diag.py switches times the three loop forms, fwd and bwd.
# - Dropout on the probabilities from Philox (tl.rand) keyed by a seed and the element's
#   (batch*head, row, col) index: the backward regenerates the forward's mask, nothing
#   of size N^2 is stored.
# - Backward: one kernel per KV block for dK, dV, which computes its tile transposed
#   (S^T = K Q^T) so that no register tile is transposed and every dot runs on wgmma (the
#   kernel's docstring); dQ either from a kernel per Q block launched before it (default:
#   every element written by one program, so gradients are bitwise reproducible; it also
#   writes delta = rowsum(dO * O), which the dK/dV kernel needs) or, with
#   deterministic=False, accumulated with float32 atomics inside the dK/dV kernel after a
#   preprocess kernel for delta. Two launches per backward by default, not three (the
#   ViT-B training step measured host-bound: README, "Measured results"); this came after
#   the 2026-11-23 run below and is not measured yet.
# - Grid (query or key blocks, heads, batch): blocks of one head run next to each other
#   (they share K/V in L2) and B*H is not bound by CUDA's 65535 limit on grid.y.
# - Block sizes: a few configs per kernel for Hopper and Ampere, each checked spill-free by
#   ptxas for sm_80/sm_90 at its head dims, autotuned on the device keyed on an N bucket
#   (a power of two), the head dim, dropout and the dtype (launch_configs, below).
#
# Measured (H100 80GB, torch 2.11, triton 3.6, bf16, 2026-11-23; packed qkv in, [B, N, H*d]
# out; benchmarks/results/nvidia-h100-2026-11-23.md). ms, CUDA events (/ CUDA-graph replay):
#
#   shape (B, N, H, d)          fwd ours        fwd SDPA (cuDNN)  fwd+bwd ours    fwd+bwd SDPA
#   ViT-B (256, 197, 12, 64)    0.192 / 0.195   0.163             1.007 / 0.985   1.247
#   ViT-L@384 (64, 577, 16, 64) 0.333           0.281             1.591           1.619
#   ViT-H/14 (64, 257, 16, 80)  0.215 / 0.196   0.157             1.343 / 0.820   0.873
#   (4, 4096, 16, 128)          1.279 (430 TFLOP/s)  0.812 (677)  5.730           3.785
#
# The forward runs at 0.84x SDPA's (cuDNN's Hopper kernel: TMA, warp specialization) at
# ViT shapes and 0.63x at N = 4096; ours runs its dots on wgmma (the compiled TTGIR) but
# loads with cp.async and has no warp specialization. The backward: on 2026-11-22, with a
# 32-row Q block, both kernels' score dots and every dQ dot ran on mma.sync (read from the
# compiled kernels), and fwd+bwd measured 1.19x SDPA at ViT-B, 0.68x at ViT-L@384 and 0.30x
# at (4, 4096, 16, 128). With the dK/dV tile transposed and separate dK/dV and dQ configs
# (every dot of the deterministic path on wgmma: tests/test_gpu_compile.py) the same run's
# ratios became 1.24x, 1.02x and 0.66x; at ViT-H/14 the GPU's time beats SDPA's (0.820 vs
# 0.873 ms) but the host's launch cost does not. Forced one at a time at (128, 197, 12, 64),
# bf16, the dK/dV configs span 0.70-0.86 ms of fwd+bwd and the dQ configs 0.63-0.95 ms
# (scripts/gpu_diag.py attention): the autotuner's choice matters.
# Deterministic dQ is the default because it costs nothing: the atomic-dQ path measured
# 1.3-3.8x slower for the whole fwd+bwd (1.87 vs 1.01 ms at ViT-B), its single fixed
# config (an autotuner's reruns would accumulate dQ) and float32 atomics losing to a
# second, autotuned kernel.
#
# Not supported: causal or additive masks (the module falls back to the reference when
# a mask is given), head dims outside {32, 64, 80, 96, 128}, float64 (runs the reference).

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference
from .._dispatch import FusedOp, cuda_properties, interpreted, op_or_impl, runs_kernel
from .._validate import check_float_tensor, check_number, check_same_device
from ._triton_helpers import LAUNCH_OPTIONS, cast_for_store, cdiv, next_power_of_2

HEAD_DIMS = (32, 64, 80, 96, 128)
LOG2E = 1.4426950408889634


@triton.jit
def _dropout_keep(seed, pid_bh, rows, cols, n_q, n_kv, dropout_p):
    """The keep mask of one tile: one Philox draw per (batch*head, row, col). `rows` and `cols`
    come broadcastable ([M, 1] and [1, N], or transposed for a [N, M] tile): the same element
    draws the same number whichever way round its tile is."""
    return tl.rand(seed, (pid_bh * n_q + rows) * n_kv + cols) >= dropout_p


@triton.jit
def _probs_and_dscores(
    scores, dp, lse, delta, rows, cols, valid, dropout_p, seed, pid_bh, n_q, n_kv, HAS_DROPOUT: tl.constexpr,
    MASK: tl.constexpr,
):
    """One tile of the backward, in whichever orientation the caller computed it: P recomputed
    from the base-2 scores and the saved log-sum-exp, the forward's dropout mask applied to P
    and to dP; returns (P after dropout, dS = P * (dP - delta)). `lse`, `delta`, `rows` and
    `cols` come broadcastable to the tile. With MASK, P is zeroed outside `valid`; without, the
    caller's tile has no column past the sequence (rows past it only reach unstored outputs).

    The exponent is clamped at 0 (P <= 1 holds exactly for the forward's scores): the scores
    recomputed here, by a dot in another orientation or order, differ from the forward's by
    their rounding, and at a row max of scaled scores past ~2^30 (measured under the
    interpreter) that difference alone overflows exp2 to inf, and dS to NaN. FMA contraction of `scores * c - lse` adds the
    product's rounding error to that difference (_NO_FP_FUSION); the clamp covers both, and
    propagates NaN. Static SASS cost (sm_90, triton 3.9): one FMNMX per score element, +16
    instructions per loop iteration (5-7%) in the dQ and dK/dV kernels at d = 64 and 128."""
    exponent = tl.minimum(scores - lse, 0.0, propagate_nan=tl.PropagateNan.ALL)
    p = tl.exp2(exponent)
    if MASK:
        p = tl.where(valid, p, 0.0)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, pid_bh, rows, cols, n_q, n_kv, dropout_p)
        p_dropped = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    else:
        p_dropped = p
    return p_dropped, p * (dp - delta)


@triton.jit
def _attn_fwd_kv_block(
    q, k_base, v_base, stride_kn, stride_vn, start_n, n_kv, offs_n, offs_d, d_mask, m_i, l_i, acc,
    qk_scale_log2, dropout_p, seed, pid_bh, rows, n_q,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, MASK_KV: tl.constexpr,
):
    """One KV block of the online softmax: returns the running max, sum and output updated.

    The scores are scaled before the max and the exponent subtracts from the rounded scores,
    so the max element's exp2 argument is exactly 0. Computed as one FMA on the raw dot, as
    FlashAttention-2 does (and LLVM contracts to, unless the launch turns fusion off:
    _NO_FP_FUSION), the max element's exponent is the rounding error of its product, up to
    ulp / 2: exp2 overflows once |s * c| passes 2^31, where eager's softmax of finite bf16
    scores is still finite."""
    cols = start_n + offs_n
    kv_offsets = cols[:, None].to(tl.int64)
    kv_mask = d_mask[None, :]
    if MASK_KV:
        kv_mask = kv_mask & (cols < n_kv)[:, None]
    k = tl.load(k_base + kv_offsets * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
    if MASK_KV:
        scores = tl.where((cols < n_kv)[None, :], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if HAS_DROPOUT:
        p = tl.where(_dropout_keep(seed, pid_bh, rows[:, None], cols[None, :], n_q, n_kv, dropout_p), p, 0.0)
    v = tl.load(v_base + kv_offsets * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attn_fwd_rows(
    q_base, k_base, v_base, o_base, lse_base, stride_qn, stride_kn, stride_vn, stride_on, row_start, n_q, n_kv,
    qk_scale_log2, dropout_p, seed, pid_bh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, PEEL_TAIL: tl.constexpr, NARROW_TAIL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    RNE_BF16_IN_SOFTWARE: tl.constexpr,
):
    """The forward for ROWS query rows from row_start of one (batch, head): out and the base-2
    log-sum-exp stored. The *_base pointers are already offset to that batch and head."""
    rows = row_start + tl.arange(0, ROWS)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = rows < n_q
    d_mask = offs_d < HEAD_DIM

    q_ptrs = q_base + rows[:, None].to(tl.int64) * stride_qn + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((ROWS,), dtype=tl.float32)
    acc = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
    if PEEL_TAIL:
        # Every KV block but a partial last one without the column mask: no select on the scores
        # and unmasked K/V rows. The partial block, when it holds at most NARROW_TAIL columns, runs
        # as a tile that narrow: ViT lengths are a multiple of 16 plus the class token (197 =
        # 3 x 64 + 5, 257 = 4 x 64 + 1, 577 = 9 x 64 + 1), and a full-width tail computes 59 or 63
        # masked columns for nothing (a fifth of all KV work at ViT-B).
        n_full = (n_kv // BLOCK_N) * BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            m_i, l_i, acc = _attn_fwd_kv_block(
                q, k_base, v_base, stride_kn, stride_vn, start_n, n_kv, offs_n, offs_d, d_mask, m_i, l_i, acc,
                qk_scale_log2, dropout_p, seed, pid_bh, rows, n_q, HAS_DROPOUT, DOT_PRECISION, False,
            )
        # (A tile's shape is fixed at compile time: the narrow and the full-width tail are two calls.)
        if NARROW_TAIL > 0 and n_full < n_kv and n_kv - n_full <= NARROW_TAIL:
            m_i, l_i, acc = _attn_fwd_kv_block(
                q, k_base, v_base, stride_kn, stride_vn, n_full, n_kv, tl.arange(0, NARROW_TAIL), offs_d, d_mask,
                m_i, l_i, acc, qk_scale_log2, dropout_p, seed, pid_bh, rows, n_q, HAS_DROPOUT, DOT_PRECISION, True,
            )
        elif n_full < n_kv:
            m_i, l_i, acc = _attn_fwd_kv_block(
                q, k_base, v_base, stride_kn, stride_vn, n_full, n_kv, offs_n, offs_d, d_mask, m_i, l_i, acc,
                qk_scale_log2, dropout_p, seed, pid_bh, rows, n_q, HAS_DROPOUT, DOT_PRECISION, True,
            )
    else:
        for start_n in range(0, n_kv, BLOCK_N):
            m_i, l_i, acc = _attn_fwd_kv_block(
                q, k_base, v_base, stride_kn, stride_vn, start_n, n_kv, offs_n, offs_d, d_mask, m_i, l_i, acc,
                qk_scale_log2, dropout_p, seed, pid_bh, rows, n_q, HAS_DROPOUT, DOT_PRECISION, True,
            )

    acc = acc / l_i[:, None]
    if HAS_DROPOUT:
        acc = acc / (1.0 - dropout_p)
    o_ptrs = o_base + rows[:, None].to(tl.int64) * stride_on + offs_d[None, :]
    tl.store(o_ptrs, cast_for_store(acc, o_base.dtype.element_ty, RNE_BF16_IN_SOFTWARE),
             mask=row_mask[:, None] & d_mask[None, :])
    tl.store(lse_base + rows, m_i + tl.log2(l_i), mask=row_mask)


@triton.jit
def _attn_fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_ob,
    stride_on,
    stride_oh,
    n_heads,
    n_q,
    n_kv,
    qk_scale_log2,
    dropout_p,
    seed,
    n_bucket,  # unused in the body: the autotune key (a power of two of max(N_q, N_kv))
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PEEL_TAIL: tl.constexpr,
    NARROW_TAIL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    RNE_BF16_IN_SOFTWARE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    pid_bh = b * n_heads + h
    row_start = pid_m * BLOCK_M
    args = (Q + b * stride_qb + h * stride_qh, K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh,
            O + b * stride_ob + h * stride_oh, LSE + pid_bh * n_q, stride_qn, stride_kn, stride_vn, stride_on,
            row_start, n_q, n_kv, qk_scale_log2, dropout_p, seed, pid_bh)
    # The last Q block, when it holds at most NARROW_TAIL rows (5 of 197 with 64-row blocks), runs
    # as a tile that narrow: its program otherwise costs as much as a full one. Shapes are fixed at
    # compile time, so the narrow block is a second copy of the body.
    if NARROW_TAIL > 0 and n_q - row_start <= NARROW_TAIL:
        _attn_fwd_rows(*args, HEAD_DIM, BLOCK_D, NARROW_TAIL, BLOCK_N, HAS_DROPOUT, PEEL_TAIL, NARROW_TAIL,
                       DOT_PRECISION, RNE_BF16_IN_SOFTWARE)
    else:
        _attn_fwd_rows(*args, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, HAS_DROPOUT, PEEL_TAIL, NARROW_TAIL,
                       DOT_PRECISION, RNE_BF16_IN_SOFTWARE)


@triton.jit
def _store_delta(o_base, stride_on, do, delta_base, rows, offs_d, mask, n_q):
    """delta = rowsum(dO * O) in float32 for `rows` of one (batch, head), stored for the dK/dV
    kernel and returned. `do` is the caller's loaded dO tile; O is read here, once per row."""
    o = tl.load(o_base + rows[:, None].to(tl.int64) * stride_on + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_base + rows, delta, mask=rows < n_q)
    return delta


@triton.jit
def _attn_bwd_preprocess_kernel(
    O,
    DO,
    DELTA,
    stride_ob,
    stride_on,
    stride_oh,
    stride_dob,
    stride_don,
    stride_doh,
    n_heads,
    n_q,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    pid_bh = b * n_heads + h
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < n_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows64 = rows[:, None].to(tl.int64)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows64 * stride_don + offs_d[None, :], mask=mask, other=0.0)
    _store_delta(O + b * stride_ob + h * stride_oh, stride_on, do, DELTA + pid_bh * n_q, rows, offs_d, mask, n_q)


@triton.jit
def _load_row_pair(a_base, stride_a, b_base, stride_b, rows, n_rows, offs_d, d_mask, MASK_ROWS: tl.constexpr):
    """Two [rows, BLOCK_D] tiles at the same rows of one (batch, head), q and dO or K and V:
    returns them, their load mask (rows past n_rows masked only with MASK_ROWS) and the rows
    as an int64 column for the caller's own pointers."""
    mask = d_mask[None, :]
    if MASK_ROWS:
        mask = mask & (rows < n_rows)[:, None]
    rows64 = rows[:, None].to(tl.int64)
    a = tl.load(a_base + rows64 * stride_a + offs_d[None, :], mask=mask, other=0.0)
    b = tl.load(b_base + rows64 * stride_b + offs_d[None, :], mask=mask, other=0.0)
    return a, b, mask, rows64


@triton.jit
def _attn_bwd_dkdv_q_block(
    k, v, dk, dv, q_base, do_base, lse_base, delta_base, stride_qn, stride_don, start_m, n_q, offs_m, offs_d, d_mask,
    cols, col_mask, DQ_ACCUM, b, h, n_heads, softmax_scale, qk_scale_log2, dropout_p, seed, pid_bh, n_kv,
    HEAD_DIM: tl.constexpr, HAS_DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr,
    MASK_Q: tl.constexpr,
):
    """One Q block of the dK/dV kernel (its docstring): returns dK, dV updated; with ATOMIC_DQ
    adds this block's share of dQ. Without MASK_Q every row of the block is in the sequence."""
    rows = start_m + offs_m
    row_mask = rows < n_q
    q, do, q_mask, rows64 = _load_row_pair(q_base, stride_qn, do_base, stride_don, rows, n_q, offs_d, d_mask, MASK_Q)
    if MASK_Q:
        lse = tl.load(lse_base + rows, mask=row_mask, other=0.0)
        delta = tl.load(delta_base + rows, mask=row_mask, other=0.0)
    else:
        lse = tl.load(lse_base + rows)
        delta = tl.load(delta_base + rows)

    scores_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale_log2
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    p_dropped_t, ds_t = _probs_and_dscores(
        scores_t, dp_t, lse[None, :], delta[None, :], rows[None, :], cols[:, None],
        col_mask[:, None] & row_mask[None, :], dropout_p, seed, pid_bh, n_q, n_kv, HAS_DROPOUT, MASK_Q,
    )
    dv += tl.dot(p_dropped_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    if ATOMIC_DQ:
        dq = tl.dot(tl.trans(ds_t).to(k.dtype), k, input_precision=DOT_PRECISION) * softmax_scale
        dq_ptrs = DQ_ACCUM + ((b * n_q + rows64) * n_heads + h) * HEAD_DIM + offs_d[None, :]
        tl.atomic_add(dq_ptrs, dq, mask=q_mask)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_cols(
    q_base, k_base, v_base, do_base, lse_base, delta_base, DK, DV, DQ_ACCUM, stride_qn, stride_kn, stride_vn,
    stride_don, stride_dkb, stride_dkh, stride_dkn, col_start, b, h, n_heads, n_q, n_kv, softmax_scale, qk_scale_log2,
    dropout_p, seed, pid_bh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, COLS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr, PEEL_TAIL: tl.constexpr, NARROW_TAIL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, RNE_BF16_IN_SOFTWARE: tl.constexpr,
):
    """dK and dV for COLS key rows from col_start of one (batch, head); the *_base pointers are
    already offset to that batch and head. DK, DV and DQ_ACCUM are not: offset pointers to
    them would stay live in registers through the loop (on sm_80 at d = 80 that spilled)."""
    cols = col_start + tl.arange(0, COLS)
    offs_d = tl.arange(0, BLOCK_D)
    col_mask = cols < n_kv
    d_mask = offs_d < HEAD_DIM
    k, v, kv_mask, cols64 = _load_row_pair(k_base, stride_kn, v_base, stride_vn, cols, n_kv, offs_d, d_mask, True)

    dk = tl.zeros((COLS, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((COLS, BLOCK_D), dtype=tl.float32)
    offs_m = tl.arange(0, BLOCK_M)
    # Peeled (see the forward): whole Q blocks without row masks, then the partial last block,
    # NARROW_TAIL rows wide when it fits.
    n_full = 0
    if PEEL_TAIL:
        n_full = (n_q // BLOCK_M) * BLOCK_M
    for start_m in range(0, n_full, BLOCK_M):
        dk, dv = _attn_bwd_dkdv_q_block(
            k, v, dk, dv, q_base, do_base, lse_base, delta_base, stride_qn, stride_don, start_m, n_q, offs_m, offs_d,
            d_mask, cols, col_mask, DQ_ACCUM, b, h, n_heads, softmax_scale, qk_scale_log2, dropout_p, seed, pid_bh,
            n_kv, HEAD_DIM, HAS_DROPOUT, ATOMIC_DQ, DOT_PRECISION, False,
        )
    if NARROW_TAIL > 0 and n_full < n_q and n_q - n_full <= NARROW_TAIL:
        dk, dv = _attn_bwd_dkdv_q_block(
            k, v, dk, dv, q_base, do_base, lse_base, delta_base, stride_qn, stride_don, n_full, n_q,
            tl.arange(0, NARROW_TAIL), offs_d, d_mask, cols, col_mask, DQ_ACCUM, b, h, n_heads, softmax_scale,
            qk_scale_log2, dropout_p, seed, pid_bh, n_kv, HEAD_DIM, HAS_DROPOUT, ATOMIC_DQ, DOT_PRECISION, True,
        )
    else:
        for start_m in range(n_full, n_q, BLOCK_M):
            dk, dv = _attn_bwd_dkdv_q_block(
                k, v, dk, dv, q_base, do_base, lse_base, delta_base, stride_qn, stride_don, start_m, n_q, offs_m,
                offs_d, d_mask, cols, col_mask, DQ_ACCUM, b, h, n_heads, softmax_scale, qk_scale_log2, dropout_p,
                seed, pid_bh, n_kv, HEAD_DIM, HAS_DROPOUT, ATOMIC_DQ, DOT_PRECISION, True,
            )

    dk = dk * softmax_scale
    out_offsets = b * stride_dkb + h * stride_dkh + cols64 * stride_dkn + offs_d[None, :]
    tl.store(DK + out_offsets, cast_for_store(dk, DK.dtype.element_ty, RNE_BF16_IN_SOFTWARE), mask=kv_mask)
    tl.store(DV + out_offsets, cast_for_store(dv, DV.dtype.element_ty, RNE_BF16_IN_SOFTWARE), mask=kv_mask)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    DQ_ACCUM,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_dob,
    stride_don,
    stride_doh,
    stride_dkb,
    stride_dkn,
    stride_dkh,
    n_heads,
    n_q,
    n_kv,
    softmax_scale,
    qk_scale_log2,
    dropout_p,
    seed,
    n_bucket,  # unused in the body: the autotune key (a power of two of max(N_q, N_kv))
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
    PEEL_TAIL: tl.constexpr,
    NARROW_TAIL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    RNE_BF16_IN_SOFTWARE: tl.constexpr,
):
    """dK, dV for one KV block, looping over all Q blocks; with ATOMIC_DQ also dQ's share of this
    block, added with float32 atomics into DQ_ACCUM ([B, N_q, H, d] contiguous). DK and DV share strides.

    The tile is computed transposed, S^T = K Q^T [BLOCK_N, BLOCK_M], so that P^T and dS^T come
    out of their dots already in the orientation dV += P^T dO and dK += dS^T Q consume them:
    no computed tile is transposed in registers, and every dot has the KV block as its M
    dimension, so BLOCK_N = 64 or 128 runs them all on Hopper's wgmma while BLOCK_M, the Q
    step, stays small. (The [M, N] formulation, read from its sm_90 TTGIR: with BLOCK_M = 32
    the score and dP dots ran on mma.sync, and at 32 x 32 every dot did.)
    """
    pid_n = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    pid_bh = b * n_heads + h
    col_start = pid_n * BLOCK_N
    args = (Q + b * stride_qb + h * stride_qh, K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh,
            DO + b * stride_dob + h * stride_doh, LSE + pid_bh * n_q, DELTA + pid_bh * n_q,
            DK, DV, DQ_ACCUM, stride_qn, stride_kn, stride_vn, stride_don, stride_dkb, stride_dkh, stride_dkn, col_start,
            b, h, n_heads, n_q, n_kv, softmax_scale, qk_scale_log2, dropout_p, seed, pid_bh)
    # A last KV block of at most NARROW_TAIL columns runs as a copy of the body that narrow (the
    # forward's kernel says why; its dots then run on mma.sync).
    if NARROW_TAIL > 0 and n_kv - col_start <= NARROW_TAIL:
        _attn_bwd_dkdv_cols(*args, HEAD_DIM, BLOCK_D, BLOCK_M, NARROW_TAIL, HAS_DROPOUT, ATOMIC_DQ, PEEL_TAIL,
                            NARROW_TAIL, DOT_PRECISION, RNE_BF16_IN_SOFTWARE)
    else:
        _attn_bwd_dkdv_cols(*args, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, HAS_DROPOUT, ATOMIC_DQ, PEEL_TAIL,
                            NARROW_TAIL, DOT_PRECISION, RNE_BF16_IN_SOFTWARE)


@triton.jit
def _attn_bwd_dq_kv_block(
    q, do, lse, delta, dq, k_base, v_base, stride_kn, stride_vn, start_n, n_kv, offs_n, offs_d, d_mask, rows, row_mask,
    qk_scale_log2, dropout_p, seed, pid_bh, n_q,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, MASK_KV: tl.constexpr,
):
    """One KV block of the dQ kernel: returns dQ updated. Without MASK_KV every column of the
    block is in the sequence."""
    cols = start_n + offs_n
    col_mask = cols < n_kv
    k, v, _, _ = _load_row_pair(k_base, stride_kn, v_base, stride_vn, cols, n_kv, offs_d, d_mask, MASK_KV)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    _, ds = _probs_and_dscores(
        scores, dp, lse[:, None], delta[:, None], rows[:, None], cols[None, :],
        row_mask[:, None] & col_mask[None, :], dropout_p, seed, pid_bh, n_q, n_kv, HAS_DROPOUT, MASK_KV,
    )
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)


@triton.jit
def _attn_bwd_dq_rows(
    q_base, k_base, v_base, o_base, do_base, lse_base, delta_base, dq_base, stride_qn, stride_kn, stride_vn, stride_on,
    stride_don, stride_dqn, row_start, n_q, n_kv, softmax_scale, qk_scale_log2, dropout_p, seed, pid_bh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, PEEL_TAIL: tl.constexpr, NARROW_TAIL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    RNE_BF16_IN_SOFTWARE: tl.constexpr,
):
    """dQ and delta for ROWS query rows from row_start of one (batch, head); the *_base pointers
    are already offset to that batch and head."""
    rows = row_start + tl.arange(0, ROWS)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = rows < n_q
    d_mask = offs_d < HEAD_DIM
    q, do, q_mask, rows64 = _load_row_pair(q_base, stride_qn, do_base, stride_don, rows, n_q, offs_d, d_mask, True)
    delta = _store_delta(o_base, stride_on, do, delta_base, rows, offs_d, q_mask, n_q)
    lse = tl.load(lse_base + rows, mask=row_mask, other=0.0)

    dq = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
    # Peeled (see the forward): whole KV blocks without column masks, then the partial last
    # block, NARROW_TAIL columns wide when it fits.
    n_full = 0
    if PEEL_TAIL:
        n_full = (n_kv // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq = _attn_bwd_dq_kv_block(
            q, do, lse, delta, dq, k_base, v_base, stride_kn, stride_vn, start_n, n_kv, offs_n, offs_d, d_mask, rows,
            row_mask, qk_scale_log2, dropout_p, seed, pid_bh, n_q, HAS_DROPOUT, DOT_PRECISION, False,
        )
    if NARROW_TAIL > 0 and n_full < n_kv and n_kv - n_full <= NARROW_TAIL:
        dq = _attn_bwd_dq_kv_block(
            q, do, lse, delta, dq, k_base, v_base, stride_kn, stride_vn, n_full, n_kv, tl.arange(0, NARROW_TAIL),
            offs_d, d_mask, rows, row_mask, qk_scale_log2, dropout_p, seed, pid_bh, n_q, HAS_DROPOUT, DOT_PRECISION,
            True,
        )
    else:
        for start_n in range(n_full, n_kv, BLOCK_N):
            dq = _attn_bwd_dq_kv_block(
                q, do, lse, delta, dq, k_base, v_base, stride_kn, stride_vn, start_n, n_kv, offs_n, offs_d, d_mask,
                rows, row_mask, qk_scale_log2, dropout_p, seed, pid_bh, n_q, HAS_DROPOUT, DOT_PRECISION, True,
            )

    dq = dq * softmax_scale
    dq_ptrs = dq_base + rows64 * stride_dqn + offs_d[None, :]
    tl.store(dq_ptrs, cast_for_store(dq, dq_base.dtype.element_ty, RNE_BF16_IN_SOFTWARE), mask=q_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q,
    K,
    V,
    O,
    DO,
    LSE,
    DELTA,
    DQ,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_ob,
    stride_on,
    stride_oh,
    stride_dob,
    stride_don,
    stride_doh,
    stride_dqb,
    stride_dqn,
    stride_dqh,
    n_heads,
    n_q,
    n_kv,
    softmax_scale,
    qk_scale_log2,
    dropout_p,
    seed,
    n_bucket,  # unused in the body: the autotune key (a power of two of max(N_q, N_kv))
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PEEL_TAIL: tl.constexpr,
    NARROW_TAIL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    RNE_BF16_IN_SOFTWARE: tl.constexpr,
):
    """dQ for one Q block, looping over all KV blocks: one writer per element, so deterministic.

    It also writes delta = rowsum(dO * O) for its rows, which the dK/dV kernel launched after
    it reads: the preprocess kernel's job, done where dO is loaded anyway (one launch and one
    read of dO fewer; only O is read in addition, once per row)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    pid_bh = b * n_heads + h
    row_start = pid_m * BLOCK_M
    args = (Q + b * stride_qb + h * stride_qh, K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh,
            O + b * stride_ob + h * stride_oh, DO + b * stride_dob + h * stride_doh, LSE + pid_bh * n_q,
            DELTA + pid_bh * n_q, DQ + b * stride_dqb + h * stride_dqh, stride_qn, stride_kn, stride_vn, stride_on,
            stride_don, stride_dqn, row_start, n_q, n_kv, softmax_scale, qk_scale_log2, dropout_p, seed, pid_bh)
    # A last Q block of at most NARROW_TAIL rows runs as a copy of the body that narrow (the forward's
    # kernel says why).
    if NARROW_TAIL > 0 and n_q - row_start <= NARROW_TAIL:
        _attn_bwd_dq_rows(*args, HEAD_DIM, BLOCK_D, NARROW_TAIL, BLOCK_N, HAS_DROPOUT, PEEL_TAIL, NARROW_TAIL,
                          DOT_PRECISION, RNE_BF16_IN_SOFTWARE)
    else:
        _attn_bwd_dq_rows(*args, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, HAS_DROPOUT, PEEL_TAIL, NARROW_TAIL,
                          DOT_PRECISION, RNE_BF16_IN_SOFTWARE)


# Launch configurations (BLOCK_M, BLOCK_N, num_warps, num_stages) for fp16/bf16 on Hopper and
# Ampere, autotuned on the device at first use per (N bucket, head dim, dropout, dtype). Each
# compiles without register spills for sm_90 (and sm_80, but where noted) at the head dims and
# dropout setting it is listed for (ptxas, through tests/gpu_compile_check.py), with each of
# triton 3.6 (the device image's), 3.8 (what torch 2.14 pins) and 3.9: their ptxas builds
# allocate registers differently, and a config that fits one can spill under another.
#
# The block that is the M dimension of a kernel's dots (BLOCK_M in the forward and the dQ
# kernel, BLOCK_N in the dK/dV kernel) is 16 rows per warp, 64 per warpgroup: Hopper's wgmma
# runs 64-row tiles per warpgroup, so a smaller one falls back to mma.sync (every backward dot
# did, at BLOCK_M = 32, before the dK/dV kernel was transposed), and the one config seen to
# compile wrong on an H100 (dK at d = 128, triton 3.6) had 64 rows on 8 warps. The other
# block is the loop's step: 64 only at d <= 64 without dropout, where it stays spill-free.
#
# Forward: seen spilling and so left out, 128 x 128 for d >= 64, and at d = 32 with dropout
# (triton 3.8: 160 bytes on sm_90, 104-112 on sm_80 with 3.6 and 3.8); Ampere skips the 64-wide
# step at d >= 80 with dropout (36-52 bytes).
# dK/dV at d > 64 (BLOCK_D = 128): the 4-warp tile runs unpipelined (num_stages 1). Two stages
# spilled on sm_90 with triton 3.6 / 3.8 (d = 80 and 96: 88 / 56 bytes, with dropout 80 / 40;
# d = 128: 24 / 24, with dropout 64 / 40); one stage compiles spill-free with 3.6, 3.8 and 3.9
# on both targets. On an H100 (triton 3.6, 2026-11-23, d = 128) the two-stage tile ran
# fwd+bwd in 0.912 ms against the 8-warp tile's 0.979; the one-stage tile is not timed yet
# (the autotuner picks per shape).
_FWD_CONFIGS = [(128, 64, 8, 3), (128, 32, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2)]
_FWD_CONFIGS_D32 = [(128, 128, 8, 2)]
_DKDV_CONFIGS = [(32, 128, 8, 2), (32, 64, 4, 2)]
_DKDV_CONFIGS_WIDE_HEAD = [(32, 128, 8, 2), (32, 64, 4, 1)]
_DKDV_CONFIGS_WIDE_STEP = [(64, 128, 8, 2), (64, 64, 4, 2)]
_DQ_CONFIGS = [(128, 32, 8, 2), (64, 32, 4, 2)]
_DQ_CONFIGS_WIDE_STEP = [(128, 64, 8, 2), (64, 64, 4, 2)]
# One config where timing is impossible or pointless: the interpreter (64 x 64 tiles, so
# N = 197 and 257 still cross several tile boundaries), float32 (dots without tensor cores,
# on small tiles), and the dK/dV kernel with atomic dQ (an autotuner's repeated runs would
# accumulate dQ several times; at d > 64 a 16-row Q step on 128 KV rows, spill-free with triton
# 3.6, 3.8 and 3.9, where 32 Q rows spilled with dropout and 64 KV rows on 4 warps spilled 96-160
# bytes on sm_90 with 3.6 and 3.8).
_INTERPRETER_CONFIG = (64, 64, 4, 1)
_FLOAT32_FWD_CONFIG = (64, 32, 4, 1)
_FLOAT32_BWD_CONFIG = (32, 32, 4, 1)
_ATOMIC_BWD_CONFIG = (32, 128, 8, 2)
_ATOMIC_BWD_CONFIG_WIDE_HEAD = (16, 128, 8, 2)
KERNEL_KINDS = ("fwd", "dkdv", "dq")


def _as_config(entry: tuple) -> triton.Config:
    block_m, block_n, num_warps, num_stages = entry
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


def launch_configs(kind: str, head_dim: int, dtype: torch.dtype, kernel, *, atomic_dq: bool = False,
                   dropout: bool = False, arch_major: int = 9) -> tuple:
    """The configs a launch of `kind` (one of KERNEL_KINDS) chooses among: one (run as is) or
    several (autotuned). The same tuple object for the same configs (cached): `_launch` keys
    its autotuners on it."""
    wide_step = head_dim <= 64 and not dropout
    if interpreted(kernel):
        entries = [_INTERPRETER_CONFIG]
    elif dtype == torch.float32:
        entries = [_FLOAT32_FWD_CONFIG if kind == "fwd" else _FLOAT32_BWD_CONFIG]
    elif kind == "fwd":
        entries = _FWD_CONFIGS + (_FWD_CONFIGS_D32 if head_dim <= 32 and not dropout else [])
        if arch_major < 9 and head_dim >= 80 and dropout:
            entries = [entry for entry in entries if entry[1] <= 32]
    elif kind == "dkdv":
        if atomic_dq:
            entries = [_ATOMIC_BWD_CONFIG if head_dim <= 64 else _ATOMIC_BWD_CONFIG_WIDE_HEAD]
        else:
            entries = ((_DKDV_CONFIGS if head_dim <= 64 else _DKDV_CONFIGS_WIDE_HEAD)
                       + (_DKDV_CONFIGS_WIDE_STEP if wide_step else []))
    elif kind == "dq":
        entries = _DQ_CONFIGS + (_DQ_CONFIGS_WIDE_STEP if wide_step else [])
    else:
        raise ValueError(f"kind must be one of {KERNEL_KINDS}, got {kind!r}")
    return _as_configs(tuple(entries))


@functools.lru_cache(maxsize=None)
def _as_configs(entries: tuple) -> tuple:
    return tuple(_as_config(entry) for entry in entries)


_AUTOTUNERS = {}  # (kernel, id(config list)) -> (the config list, its triton.autotune wrapper)
_CHOSEN = {}  # (kernel, id(config list), the autotune key) -> the config its autotuner chose


def _launch(kernel, configs: list, grid_for, args: tuple, kwargs: dict, options: dict = LAUNCH_OPTIONS) -> None:
    """Run `kernel` with the single config, or with the one an autotuner chose among several.

    The autotuner (built once per kernel and config list) runs only at the first launch of each
    key: the N bucket (`args` ends with it; tests/test_dispatch.py holds each kernel to that), the
    head dim, dropout, and every tensor argument's dtype, the key triton.autotune forms itself.
    Later launches with that key go straight to the kernel with the chosen config's arguments,
    exactly as the autotuner passes them (so Triton finds the same compiled kernel):
    Autotuner.run rebuilds its key from every argument on each call, about 40% of what Triton's
    launch path costs the host (scripts/host_overhead.py --triton-launch, 2-core CPU, triton
    3.8: flash_attention's forward 31-32 -> 24 us, forward + backward 141-144 -> 105 us), and a
    ViT training step is host-bound.
    """
    if len(configs) == 1:
        config = configs[0]
        kernel[grid_for(config.kwargs)](*args, **kwargs, **config.kwargs, num_warps=config.num_warps,
                                        num_stages=config.num_stages, **options)
        return
    # Keyed on the config list's identity (launch_configs returns cached tuples); the entry
    # holds the list, so its id cannot be reused by another while the entry exists.
    tuned = (kernel, id(configs), args[-1], kwargs["HEAD_DIM"], kwargs["HAS_DROPOUT"],
             *(arg.dtype for arg in args if isinstance(arg, Tensor)))
    chosen = _CHOSEN.get(tuned)
    if chosen is not None:
        kernel[grid_for](*args, **kwargs, **options, **chosen.all_kwargs())
        return
    entry = _AUTOTUNERS.get(tuned[:2])
    if entry is None:
        entry = _AUTOTUNERS[tuned[:2]] = (configs, triton.autotune(configs=list(configs),
                                                                   key=["n_bucket", "HEAD_DIM", "HAS_DROPOUT"])(kernel))
    entry[1][grid_for](*args, **kwargs, **options)
    _CHOSEN[tuned] = entry[1].best_config  # the config Autotuner.run launched (None: ask it again)


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
    """The forward's PEEL_TAIL: on Hopper without dropout. Peeling the partial last KV block
    off the loop spills registers on sm_80 at d >= 80 (192-1136 bytes) and with dropout
    (ptxas, tests/gpu_compile_check.py). scripts/gpu_diag.py switches times both ways."""
    return arch_major >= 9 and dropout_p == 0


def _narrow_tail() -> int:
    """The width of the forward's last KV tile when the partial block fits in it (with PEEL_TAIL):
    16, the narrowest dot operand. gpu_diag.py switches times it against 0 (no narrow tile)."""
    return 16


def _n_bucket(n_q: int, n_kv: int) -> int:
    return min(next_power_of_2(max(n_q, n_kv)), 16384)


def _common_constexprs(q: Tensor, kernel) -> dict:
    head_dim = q.shape[-1]
    return dict(
        HEAD_DIM=head_dim,
        BLOCK_D=next_power_of_2(head_dim),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        RNE_BF16_IN_SOFTWARE=interpreted(kernel),
    )


def _seed_value(seed: Optional[Tensor], dropout_p: float) -> int:
    if dropout_p == 0:
        return 0
    if seed is None:
        raise ValueError("seed is required when dropout_p > 0")
    return int(seed.item())


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

    `seed` is a CPU int64 scalar tensor (drawn by the caller, so torch.compile traces the
    draw instead of freezing a constant), needed when dropout_p > 0. `deterministic` is
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
    _launch(
        _attn_fwd_kernel,
        launch_configs("fwd", head_dim, q.dtype, _attn_fwd_kernel, dropout=dropout_p > 0, arch_major=arch_major),
        lambda meta: (cdiv(n_q, meta["BLOCK_M"]), n_heads, batch),
        (q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
         n_heads, n_q, n_kv, softmax_scale * LOG2E, dropout_p, _seed_value(seed, dropout_p), _n_bucket(n_q, n_kv)),
        dict(HAS_DROPOUT=dropout_p > 0, PEEL_TAIL=peel, NARROW_TAIL=_narrow_tail() if peel else 0,
             **_common_constexprs(q, _attn_fwd_kernel)),
        options=_NO_FP_FUSION,
    )
    return out, lse


_flash_attention_fwd_op = torch.library.custom_op(
    "vit_kernels::flash_attention_fwd", _flash_attention_fwd_impl, mutates_args=())


@_flash_attention_fwd_op.register_fake
def _(q, k, v, softmax_scale, dropout_p, seed, deterministic):
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
    batch, n_q, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    dq = torch.empty((batch, n_q, n_heads, head_dim), dtype=q.dtype, device=q.device)
    dk = torch.empty((batch, n_kv, n_heads, head_dim), dtype=q.dtype, device=q.device)
    dv = torch.empty((batch, n_kv, n_heads, head_dim), dtype=q.dtype, device=q.device)
    if dq.numel() == 0:
        return dq, dk, dv
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    constexprs = _common_constexprs(q, _attn_bwd_dkdv_kernel)
    delta = torch.empty((batch, n_heads, n_q), dtype=torch.float32, device=q.device)
    scalars = (n_heads, n_q, n_kv, softmax_scale, softmax_scale * LOG2E, dropout_p, _seed_value(seed, dropout_p),
               _n_bucket(n_q, n_kv))
    peel = _peel_tail(_arch_major(q.device), dropout_p)
    tails = dict(PEEL_TAIL=peel, NARROW_TAIL=_narrow_tail() if peel else 0)
    if deterministic:  # dQ first: its kernel writes delta, which the dK/dV kernel reads
        _launch(
            _attn_bwd_dq_kernel, launch_configs("dq", head_dim, q.dtype, _attn_bwd_dq_kernel, dropout=dropout_p > 0),
            lambda meta: (cdiv(n_q, meta["BLOCK_M"]), n_heads, batch),
            (q, k, v, out, dout, lse, delta, dq,
             *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(dout), *_strides(dq), *scalars),
            dict(HAS_DROPOUT=dropout_p > 0, **tails, **constexprs),
        )
        dq_accum = None
    else:
        pre_block = 32
        _attn_bwd_preprocess_kernel[(cdiv(n_q, pre_block), n_heads, batch)](
            out, dout, delta, *_strides(out), *_strides(dout), n_heads, n_q,
            HEAD_DIM=head_dim, BLOCK_D=constexprs["BLOCK_D"], BLOCK_M=pre_block, **LAUNCH_OPTIONS,
        )
        # With atomics, dQ accumulates in float32 [B, N_q, H, d] contiguous, zeroed first.
        dq_accum = torch.zeros((batch, n_q, n_heads, head_dim), dtype=torch.float32, device=q.device)
    _launch(
        _attn_bwd_dkdv_kernel,
        launch_configs("dkdv", head_dim, q.dtype, _attn_bwd_dkdv_kernel, atomic_dq=not deterministic,
                       dropout=dropout_p > 0),
        lambda meta: (cdiv(n_kv, meta["BLOCK_N"]), n_heads, batch),
        (q, k, v, dout, lse, delta, dk, dv, dq_accum,
         *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dk), *scalars),
        dict(HAS_DROPOUT=dropout_p > 0, ATOMIC_DQ=not deterministic, **tails, **constexprs),
    )
    if not deterministic:
        dq.copy_(dq_accum)
    return dq, dk, dv


_flash_attention_bwd_op = torch.library.custom_op(
    "vit_kernels::flash_attention_bwd", _flash_attention_bwd_impl, mutates_args=())


@_flash_attention_bwd_op.register_fake
def _(dout, q, k, v, out, lse, softmax_scale, dropout_p, seed, deterministic):
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
    dq, dk, dv = op_or_impl(_flash_attention_bwd_op, _flash_attention_bwd_impl)(
        dout, q, k, v, out, lse, ctx.softmax_scale, ctx.dropout_p, seed, ctx.deterministic
    )
    return dq, dk, dv, None, None, None, None


_flash_attention_fwd = FusedOp(_flash_attention_fwd_op, _flash_attention_fwd_impl, setup_context=_setup_context,
                               backward=_backward, non_differentiable=(1,))


@triton.jit
def _dropout_mask_kernel(MASK, n_q, n_kv, dropout_p, seed, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(seed, pid_bh, rows[:, None], cols[None, :], n_q, n_kv, dropout_p)
    ptrs = MASK + (pid_bh * n_q + rows[:, None]) * n_kv + cols[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(rows < n_q)[:, None] & (cols < n_kv)[None, :])


def attention_dropout_mask(seed: Tensor, batch: int, n_heads: int, n_q: int, n_kv: int, dropout_p: float,
                           device) -> Tensor:
    """The keep mask ``[B, H, N_q, N_kv]`` (bool) that flash_attention draws for `seed`.

    For tests and for debugging a training run: with it, `reference.attention` reproduces
    a dropped-out forward and backward exactly.
    """
    mask = torch.empty((batch, n_heads, n_q, n_kv), dtype=torch.int8, device=device)
    grid = (cdiv(n_q, 32), cdiv(n_kv, 32), batch * n_heads)
    _dropout_mask_kernel[grid](mask, n_q, n_kv, dropout_p, _seed_value(seed, dropout_p), BLOCK_M=32, BLOCK_N=32,
                               **LAUNCH_OPTIONS)
    return mask.bool()


def draw_seed() -> Tensor:
    """A dropout seed from torch's default CPU generator (so torch.manual_seed governs it)."""
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64)


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
        raise ValueError(f"head dim must be one of {HEAD_DIMS}, got {q.shape[-1]}")
    if k.shape[1] == 0 and q.shape[1] > 0 and q.shape[0] > 0:
        raise ValueError("k and v must have at least one token (N_kv >= 1): softmax over nothing is undefined")
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
            same dtype. d in {32, 64, 80, 96, 128}; any N >= 1.
        softmax_scale: default ``d ** -0.5``.
        dropout_p: dropout on the attention probabilities (training); the mask comes from a
            Philox seed drawn from torch's default generator and is regenerated in backward.
        deterministic: dQ without atomics (bitwise reproducible gradients; the default).
            False accumulates dQ with float32 atomics inside the dK/dV pass.

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
    seed = draw_seed() if dropout_p > 0 else None
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
