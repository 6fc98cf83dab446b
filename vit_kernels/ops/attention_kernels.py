# Flash attention's Triton kernels: the forward, the backward's dQ and dK/dV kernels (and the
# preprocess for delta on the atomic-dQ path), and the dropout-mask kernel for tests. The host
# module, ops/attention.py, launches them; their tiles are in ops/attention_configs.py.
#
# - Softmax statistics in float32, in base 2: the scale is folded into log2(e) * scale once, so
#   the inner loop uses exp2. The log-sum-exp (base 2) is saved for backward.
# - Head dims 32, 64, 80, 96, 128: d is padded to the next power of two inside the kernel
#   (BLOCK_D) with masked loads, so ViT-H/14's d = 80 needs no copy. Any N: both sequence dims
#   are masked, no divisibility asserts (197, 257, 577, 1, 17).
# - float32 inputs run their dots in full IEEE float32 precision, not tf32 (DOT_PRECISION):
#   tf32 would be 10x less accurate than eager float32 attention and fail the numerics rule.
# - Inner loops, all three kernels: with PEEL_TAIL (Hopper without dropout) each runs its whole
#   blocks (KV blocks in the forward and dQ kernels, Q blocks in dK/dV) unmasked and peels off
#   the partial last one: no select on the scores, unmasked loads. When that partial block holds
#   at most NARROW_TAIL (16) rows or columns it runs as a 16-wide tile: ViT lengths are a
#   multiple of 16 plus the class token (197 = 3 x 64 + 5, 257 = 4 x 64 + 1), so a full-width
#   tail computes 59 or 63 masked columns for nothing, a fifth of the KV work at ViT-B with
#   64-wide blocks. Each kernel does the same for the last block its grid splits (Q blocks in
#   the forward and dQ kernels, KV blocks in dK/dV): at most 16 rows run as a 16-row copy of
#   the body. Peeling spills registers on sm_80 at d >= 80 and with dropout (ptxas, through
#   tests/gpu_compile_check.py), so Ampere and dropout keep one masked loop.
# - Dropout on the probabilities from Philox (tl.rand) keyed by a seed and the element's
#   (batch*head, row, col) index: the backward regenerates the forward's mask, nothing of size
#   N^2 is stored. The seed is a device tensor loaded by the kernel (_load_seed), never a host
#   int: no host read of it, and a CUDA-graph replay draws a new one.
# - Backward: one kernel per KV block for dK, dV, which computes its tile transposed
#   (S^T = K Q^T) so that no register tile is transposed and every dot runs on wgmma; dQ either
#   from a kernel per Q block launched before it (every element written by one program, so
#   gradients are bitwise reproducible; it also writes delta = rowsum(dO * O), which the dK/dV
#   kernel needs) or, with ATOMIC_DQ, accumulated with float32 atomics inside the dK/dV kernel
#   after the preprocess kernel for delta.
# - Grid (query or key blocks, heads, batch): blocks of one head run next to each other (they
#   share K/V in L2) and B*H is not bound by CUDA's 65535 limit on grid.y.
# - Every autotuned kernel takes `n_bucket` (a power of two of max(N_q, N_kv)), unused in its
#   body: it is the autotune key's sequence-length part.

import triton
import triton.language as tl

from ._triton_helpers import cast_for_store


@triton.jit
def _load_seed(SEED, HAS_DROPOUT: tl.constexpr):
    """The dropout seed, read from device memory where torch's generator drew it: a CUDA-graph
    replay then draws a new one, where a seed passed as a host int would be frozen into the
    graph. 0 without dropout (SEED is None then)."""
    if HAS_DROPOUT:
        return tl.load(SEED)
    else:
        return 0


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
    propagates NaN. Its cost: one FMNMX per score element, 5-7% of a loop iteration's SASS in
    the dQ and dK/dV kernels."""
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
    SEED,
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
    seed = _load_seed(SEED, HAS_DROPOUT)
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
    SEED,
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
    seed = _load_seed(SEED, HAS_DROPOUT)
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
    SEED,
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
    seed = _load_seed(SEED, HAS_DROPOUT)
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


@triton.jit
def _dropout_mask_kernel(MASK, n_q, n_kv, dropout_p, SEED, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh = tl.program_id(2)
    seed = tl.load(SEED)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(seed, pid_bh, rows[:, None], cols[None, :], n_q, n_kv, dropout_p)
    ptrs = MASK + (pid_bh * n_q + rows[:, None]) * n_kv + cols[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(rows < n_q)[:, None] & (cols < n_kv)[None, :])
