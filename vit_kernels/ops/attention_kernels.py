# Flash attention's Triton kernels: the forward, the backward's dQ and dK/dV kernels (and the
# preprocess for delta on the atomic-dQ path), and the dropout-mask kernel for tests. The host
# module, ops/attention.py, launches them; their tiles are in ops/attention_configs.py.
#
# - Softmax statistics in float32, in base 2: the scale is folded into log2(e) * scale once, so
#   the inner loop uses exp2. The log-sum-exp (base 2) is saved for backward.
# - Head dims: every multiple of 8 from 8 to 128, without a copy. A tile's width must be a power
#   of two, so the head dim is held as two column blocks, BLOCK_DA (a power of two) and BLOCK_DB
#   (a power of two, or 0 for none), each dot over d run as two chained dots and each product
#   with V or K as two: 72 = 64 + 16, 80 = 64 + 16, 88 and 96 = 64 + 32, 40 and 48 = 32 + 16.
#   Padding to the next power of two instead would spend 44% of the dot work at d = 72 and 37%
#   at 80 (ViT-H/14) on zeros. The host (attention.head_dim_blocks) splits only where that
#   saves work over one padded block; what is left padded costs at most a quarter (24 as 32,
#   104 as 128), except d = 8, run as 16: 16 is the narrowest dot operand.
# - Aligned offsets (STRIDES_ALIGNED): Triton marks an integer argument divisible by 16 when it is
#   and says nothing otherwise. Where d is an odd multiple of 8 (24, 40, 56, 72, 88, 104, 120) the
#   head stride (d, in a packed qkv or a contiguous [B, N, H, d]) is not, so the compiler could not
#   prove any (batch, head) offset 16-byte aligned and loaded and stored every tile element by
#   element: at those dims twice the SASS instructions, registers at ptxas's limit, and d = 88's
#   dK/dV spilling with every tile (sm_90, tests/gpu_compile_check.py). The host checks that every
#   batch, row and head stride of a launch is a multiple of 8 elements (attention.strides_aligned:
#   so for every contiguous tensor and packed-qkv view, d being one) and the kernels then promise it:
#   on each (batch, head) offset (_head_offset's tl.multiple_of) and, where a row stride is not a
#   multiple of 16 either (an odd head count: STRIDES_ALIGNED 8 rather than 16), on each row stride
#   (_row_stride rewrites it as (stride // 8) * 8: a tl.multiple_of on an argument is not kept,
#   neither a kernel's nor, once inlined, a jit function's). The tiles then load as 16-byte vectors
#   at every head count. STRIDES_ALIGNED 0, no promise, where a stride is not a multiple of 8.
# - Any N: both sequence dims are masked, no divisibility asserts (197, 257, 577, 1, 17).
# - VARLEN: packed sequences of different lengths, [total_tokens, H, d] with cumulative lengths
#   (flash-attn's varlen convention). Grid axis 0 holds cdiv(total_tokens, BLOCK) + n_seqs
#   slots, each program finds its sequence and block by a binary search over CU_SEQLENS
#   (_varlen_slot) and reads the sequence's start and length on the device (clamped into
#   [0, total_tokens], so no value of them reaches memory outside the tensors): no length is
#   read on the host, at most one slot per sequence idles, and the body is the batched one
#   (a loop over a sequence's blocks inside the program spilled on sm_80 and sm_90). The
#   log-sum-exp (and delta) are [H, total_tokens]. A query sequence whose key sequence is
#   empty attends to nothing: its output is 0.
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
#   the body. So at N = 197 with 64-row blocks the work is 3 x 64 + 16 = 208 rows by 208
#   columns per head: 11% on padding, against 41% padded to 256. Peeling spills registers on
#   sm_80 at d >= 80 and with dropout (ptxas, through tests/gpu_compile_check.py), so Ampere
#   and dropout keep one masked loop.
# - Dropout on the probabilities from Philox (tl.rand) keyed by a seed and the element's
#   (batch*head, row, col) index: the backward regenerates the forward's mask, nothing of size
#   N^2 is stored. The seed is a device tensor loaded by the kernel (_load_seed), never a host
#   int: no host read of it, and a CUDA-graph replay draws a new one. Under VARLEN sequence b
#   draws with seed + b and (head, row, col) within its sequence, as a batch of one would.
# - Backward: one kernel per KV block for dK, dV, which computes its tile transposed
#   (S^T = K Q^T) so that no register tile is transposed and every dot runs on wgmma; dQ either
#   from a kernel per Q block launched before it (every element written by one program, so
#   gradients are bitwise reproducible; it also writes delta = rowsum(dO * O), which the dK/dV
#   kernel needs) or, with ATOMIC_DQ, accumulated with float32 atomics inside the dK/dV kernel
#   after the preprocess kernel for delta.
# - Grid (query or key blocks, heads, batch or sequence): blocks of one head run next to each
#   other (they share K/V in L2) and B*H is not bound by CUDA's 65535 limit on grid.y.
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
def _head_offset(b, stride_b, start, stride_n, h, stride_h, STRIDES_ALIGNED: tl.constexpr):
    """The element offset of (batch b, row start, head h), promised to the compiler to be a multiple
    of 8 where the host found every stride to be (STRIDES_ALIGNED; the header says why). The
    promise is made here, on the sum this function computes: made on an argument of a jit
    function it is lost when the function is inlined."""
    offset = b * stride_b + start * stride_n + h * stride_h
    if STRIDES_ALIGNED:
        offset = tl.multiple_of(offset, 8)
    return offset


@triton.jit
def _row_stride(stride, STRIDES_ALIGNED: tl.constexpr):
    """A row stride, rewritten where the host found it a multiple of 8 (STRIDES_ALIGNED 8) so that the
    compiler sees that it is: (stride // 8) * 8 is the same value, and a product with 8 is known
    divisible by 8. Triton marks an int argument only when it is divisible by 16, which a row stride
    is not at an odd head count with d an odd multiple of 8 ([B, N, 3, 72]: 216), and every tile was
    then loaded element by element (d = 72's dK/dV spilled there); tl.multiple_of on the argument
    is not kept (the header). STRIDES_ALIGNED is 16 where every row stride is a multiple of 16:
    Triton marks those itself, and the stride is left as it comes."""
    if STRIDES_ALIGNED == 8:
        stride = (stride // 8) * 8
    return stride


@triton.jit
def _varlen_slot(CU_SEQLENS, n_seqs, n_total, slot, BLOCK: tl.constexpr):
    """(sequence, block within it) of grid slot `slot` under VARLEN: sequence i owns the slots
    [g_i, g_i+1), g_i = cdiv(cu[i], BLOCK) + i, at least as many as its blocks (the one slot
    more it may get idles), so cdiv(total, BLOCK) + n_seqs slots cover every block of every
    sequence without a host read of any length. Found by binary search over cu_seqlens."""
    lo = n_seqs * 0
    hi = n_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        start = tl.minimum(tl.maximum(tl.load(CU_SEQLENS + mid), 0), n_total)
        take = (start + BLOCK - 1) // BLOCK + mid <= slot
        lo = tl.where(take, mid, lo)
        hi = tl.where(take, hi, mid - 1)
    start = tl.minimum(tl.maximum(tl.load(CU_SEQLENS + lo), 0), n_total)
    return lo.to(tl.int64), slot - ((start + BLOCK - 1) // BLOCK + lo)


@triton.jit
def _varlen_sequence(CU_SEQLENS, b, n_total):
    """(start, length) of packed sequence b, clamped into [0, n_total]."""
    start = tl.minimum(tl.maximum(tl.load(CU_SEQLENS + b), 0), n_total)
    end = tl.minimum(tl.maximum(tl.load(CU_SEQLENS + b + 1), start), n_total)
    return start.to(tl.int64), end - start


@triton.jit
def _load_head(base, rows64, stride, row_mask, HEAD_DIM: tl.constexpr, BLOCK_DA: tl.constexpr,
               BLOCK_DB: tl.constexpr, MASK_ROWS: tl.constexpr):
    """The [rows, d] tile at `rows64` (an int64 column) of one (batch, head), as its two column
    blocks: columns [0, BLOCK_DA) and the last BLOCK_DB, [d - BLOCK_DB, d) (a [1, 1] placeholder
    when BLOCK_DB is 0), which overlap where BLOCK_DA + BLOCK_DB > d. Both lie inside the row, so
    no column is masked (but at d = 8, read as 16 with zeros): a column mask the compiler cannot
    prove true kept ptxas at its register limit through the loops, and spilling, at every head
    dim that was not a sum of whole blocks. Rows past the sequence are masked with MASK_ROWS."""
    offs_a = tl.arange(0, BLOCK_DA)
    ptrs_a = base + rows64 * stride + offs_a[None, :]
    if HEAD_DIM < BLOCK_DA:
        if MASK_ROWS:
            a = tl.load(ptrs_a, mask=row_mask[:, None] & (offs_a < HEAD_DIM)[None, :], other=0.0)
        else:
            a = tl.load(ptrs_a, mask=(offs_a < HEAD_DIM)[None, :], other=0.0)
    elif MASK_ROWS:
        a = tl.load(ptrs_a, mask=row_mask[:, None], other=0.0)
    else:
        a = tl.load(ptrs_a)
    if BLOCK_DB > 0:
        ptrs_b = base + rows64 * stride + (HEAD_DIM - BLOCK_DB + tl.arange(0, BLOCK_DB))[None, :]
        if MASK_ROWS:
            b = tl.load(ptrs_b, mask=row_mask[:, None], other=0.0)
        else:
            b = tl.load(ptrs_b)
    else:
        b = tl.zeros((1, 1), dtype=a.dtype)
    return a, b


@triton.jit
def _beyond_overlap(BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, HEAD_DIM: tl.constexpr):
    """[1, BLOCK_DB]: True at the second block's columns the first does not hold."""
    return (tl.arange(0, BLOCK_DB) >= BLOCK_DA + BLOCK_DB - HEAD_DIM)[None, :]


@triton.jit
def _without_overlap(xb, HEAD_DIM: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr):
    """The second block with the columns the first also holds zeroed, for one operand of each
    dot over d, so that no column counts twice. Applied where that operand is loaded once."""
    if BLOCK_DB > 0 and BLOCK_DA + BLOCK_DB > HEAD_DIM:
        return tl.where(_beyond_overlap(BLOCK_DA, BLOCK_DB, HEAD_DIM), xb, 0.0)
    else:
        return xb


@triton.jit
def _store_head(base, rows64, stride, row_mask, xa, xb, HEAD_DIM: tl.constexpr, BLOCK_DA: tl.constexpr,
                BLOCK_DB: tl.constexpr, RNE_BF16_IN_SOFTWARE: tl.constexpr):
    """Stores a float32 [rows, d] tile in _load_head's two blocks, rounded to base's dtype: the
    second block's overlapping columns are left to the first."""
    offs_a = tl.arange(0, BLOCK_DA)
    mask_a = row_mask[:, None]
    if HEAD_DIM < BLOCK_DA:
        mask_a = mask_a & (offs_a < HEAD_DIM)[None, :]
    tl.store(base + rows64 * stride + offs_a[None, :],
             cast_for_store(xa, base.dtype.element_ty, RNE_BF16_IN_SOFTWARE), mask=mask_a)
    if BLOCK_DB > 0:
        mask_b = row_mask[:, None]
        if BLOCK_DA + BLOCK_DB > HEAD_DIM:
            mask_b = mask_b & _beyond_overlap(BLOCK_DA, BLOCK_DB, HEAD_DIM)
        tl.store(base + rows64 * stride + (HEAD_DIM - BLOCK_DB + tl.arange(0, BLOCK_DB))[None, :],
                 cast_for_store(xb, base.dtype.element_ty, RNE_BF16_IN_SOFTWARE), mask=mask_b)


@triton.jit
def _dot_over_head(xa, xb, ya, yb, BLOCK_DB: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """x y^T over the head dim, [rows_x, rows_y] float32: one dot per column block, chained."""
    s = tl.dot(xa, tl.trans(ya), input_precision=DOT_PRECISION)
    if BLOCK_DB > 0:
        s = tl.dot(xb, tl.trans(yb), s, input_precision=DOT_PRECISION)
    return s


@triton.jit
def _zeros_head(ROWS: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr):
    """Two float32 accumulators in _load_head's layout."""
    if BLOCK_DB > 0:
        b = tl.zeros((ROWS, BLOCK_DB), dtype=tl.float32)
    else:
        b = tl.zeros((1, 1), dtype=tl.float32)
    return tl.zeros((ROWS, BLOCK_DA), dtype=tl.float32), b


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
    qa, qb, k_base, v_base, stride_kn, stride_vn, start_n, n_kv, offs_n, m_i, l_i, acc_a, acc_b,
    qk_scale_log2, dropout_p, seed, pid_bh, rows, n_q,
    HEAD_DIM: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr,
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
    kv_rows = cols[:, None].to(tl.int64)
    col_mask = cols < n_kv
    ka, kb = _load_head(k_base, kv_rows, stride_kn, col_mask, HEAD_DIM, BLOCK_DA, BLOCK_DB, MASK_KV)
    scores = _dot_over_head(qa, qb, ka, kb, BLOCK_DB, DOT_PRECISION) * qk_scale_log2
    if MASK_KV:
        scores = tl.where(col_mask[None, :], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if HAS_DROPOUT:
        p = tl.where(_dropout_keep(seed, pid_bh, rows[:, None], cols[None, :], n_q, n_kv, dropout_p), p, 0.0)
    va, vb = _load_head(v_base, kv_rows, stride_vn, col_mask, HEAD_DIM, BLOCK_DA, BLOCK_DB, MASK_KV)
    p = p.to(va.dtype)
    acc_a = acc_a * alpha[:, None] + tl.dot(p, va, input_precision=DOT_PRECISION)
    if BLOCK_DB > 0:
        acc_b = acc_b * alpha[:, None] + tl.dot(p, vb, input_precision=DOT_PRECISION)
    return m_new, l_i, acc_a, acc_b


@triton.jit
def _attn_fwd_rows(
    q_base, k_base, v_base, o_base, lse_base, stride_qn, stride_kn, stride_vn, stride_on, row_start, n_q, n_kv,
    qk_scale_log2, dropout_p, seed, pid_bh,
    HEAD_DIM: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_DROPOUT: tl.constexpr, PEEL_TAIL: tl.constexpr, NARROW_TAIL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, RNE_BF16_IN_SOFTWARE: tl.constexpr, VARLEN: tl.constexpr,
):
    """The forward for ROWS query rows from row_start of one (batch, head): out and the base-2
    log-sum-exp stored. The *_base pointers are already offset to that batch and head."""
    rows = row_start + tl.arange(0, ROWS)
    offs_n = tl.arange(0, BLOCK_N)
    row_mask = rows < n_q
    rows64 = rows[:, None].to(tl.int64)
    qa, qb = _load_head(q_base, rows64, stride_qn, row_mask, HEAD_DIM, BLOCK_DA, BLOCK_DB, True)
    qb = _without_overlap(qb, HEAD_DIM, BLOCK_DA, BLOCK_DB)

    m_i = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((ROWS,), dtype=tl.float32)
    acc_a, acc_b = _zeros_head(ROWS, BLOCK_DA, BLOCK_DB)
    if PEEL_TAIL:
        # Every KV block but a partial last one without the column mask: no select on the scores
        # and unmasked K/V rows. The partial block, when it holds at most NARROW_TAIL columns, runs
        # as a tile that narrow: ViT lengths are a multiple of 16 plus the class token (197 =
        # 3 x 64 + 5, 257 = 4 x 64 + 1, 577 = 9 x 64 + 1), and a full-width tail computes 59 or 63
        # masked columns for nothing (a fifth of all KV work at ViT-B).
        n_full = (n_kv // BLOCK_N) * BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            m_i, l_i, acc_a, acc_b = _attn_fwd_kv_block(
                qa, qb, k_base, v_base, stride_kn, stride_vn, start_n, n_kv, offs_n, m_i, l_i, acc_a, acc_b,
                qk_scale_log2, dropout_p, seed, pid_bh, rows, n_q, HEAD_DIM, BLOCK_DA, BLOCK_DB, HAS_DROPOUT,
                DOT_PRECISION, False,
            )
        # (A tile's shape is fixed at compile time: the narrow and the full-width tail are two calls.)
        if NARROW_TAIL > 0 and n_full < n_kv and n_kv - n_full <= NARROW_TAIL:
            m_i, l_i, acc_a, acc_b = _attn_fwd_kv_block(
                qa, qb, k_base, v_base, stride_kn, stride_vn, n_full, n_kv, tl.arange(0, NARROW_TAIL), m_i, l_i,
                acc_a, acc_b, qk_scale_log2, dropout_p, seed, pid_bh, rows, n_q, HEAD_DIM, BLOCK_DA, BLOCK_DB,
                HAS_DROPOUT, DOT_PRECISION, True,
            )
        elif n_full < n_kv:
            m_i, l_i, acc_a, acc_b = _attn_fwd_kv_block(
                qa, qb, k_base, v_base, stride_kn, stride_vn, n_full, n_kv, offs_n, m_i, l_i, acc_a, acc_b,
                qk_scale_log2, dropout_p, seed, pid_bh, rows, n_q, HEAD_DIM, BLOCK_DA, BLOCK_DB, HAS_DROPOUT,
                DOT_PRECISION, True,
            )
    else:
        for start_n in range(0, n_kv, BLOCK_N):
            m_i, l_i, acc_a, acc_b = _attn_fwd_kv_block(
                qa, qb, k_base, v_base, stride_kn, stride_vn, start_n, n_kv, offs_n, m_i, l_i, acc_a, acc_b,
                qk_scale_log2, dropout_p, seed, pid_bh, rows, n_q, HEAD_DIM, BLOCK_DA, BLOCK_DB, HAS_DROPOUT,
                DOT_PRECISION, True,
            )

    if VARLEN:  # a row with no keys (an empty key sequence) has l_i = 0: output 0, not 0 / 0
        l_i = tl.where(l_i > 0.0, l_i, 1.0)
    acc_a = acc_a / l_i[:, None]
    if BLOCK_DB > 0:
        acc_b = acc_b / l_i[:, None]
    if HAS_DROPOUT:
        acc_a = acc_a / (1.0 - dropout_p)
        if BLOCK_DB > 0:
            acc_b = acc_b / (1.0 - dropout_p)
    _store_head(o_base, rows64, stride_on, row_mask, acc_a, acc_b, HEAD_DIM, BLOCK_DA, BLOCK_DB, RNE_BF16_IN_SOFTWARE)
    tl.store(lse_base + rows, m_i + tl.log2(l_i), mask=row_mask)


@triton.jit
def _attn_fwd_q_block(
    q_base, k_base, v_base, o_base, lse_base, stride_qn, stride_kn, stride_vn, stride_on, row_start, n_q, n_kv,
    qk_scale_log2, dropout_p, seed, pid_bh,
    HEAD_DIM: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_DROPOUT: tl.constexpr, PEEL_TAIL: tl.constexpr, NARROW_TAIL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, RNE_BF16_IN_SOFTWARE: tl.constexpr, VARLEN: tl.constexpr,
):
    """The Q block at row_start. The last Q block, when it holds at most NARROW_TAIL rows (5 of
    197 with 64-row blocks), runs as a tile that narrow: its program otherwise costs as much as a
    full one. Shapes are fixed at compile time, so the narrow block is a second copy of the body."""
    args = (q_base, k_base, v_base, o_base, lse_base, stride_qn, stride_kn, stride_vn, stride_on, row_start, n_q,
            n_kv, qk_scale_log2, dropout_p, seed, pid_bh)
    if NARROW_TAIL > 0 and n_q - row_start <= NARROW_TAIL:
        _attn_fwd_rows(*args, HEAD_DIM, BLOCK_DA, BLOCK_DB, NARROW_TAIL, BLOCK_N, HAS_DROPOUT, PEEL_TAIL, NARROW_TAIL,
                       DOT_PRECISION, RNE_BF16_IN_SOFTWARE, VARLEN)
    else:
        _attn_fwd_rows(*args, HEAD_DIM, BLOCK_DA, BLOCK_DB, BLOCK_M, BLOCK_N, HAS_DROPOUT, PEEL_TAIL, NARROW_TAIL,
                       DOT_PRECISION, RNE_BF16_IN_SOFTWARE, VARLEN)


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
    CU_SEQLENS_Q,
    CU_SEQLENS_K,
    n_seqs,
    n_bucket,  # unused in the body: the autotune key (a power of two of max(N_q, N_kv))
    HEAD_DIM: tl.constexpr,
    BLOCK_DA: tl.constexpr,
    BLOCK_DB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PEEL_TAIL: tl.constexpr,
    NARROW_TAIL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    RNE_BF16_IN_SOFTWARE: tl.constexpr,
    VARLEN: tl.constexpr,
    STRIDES_ALIGNED: tl.constexpr,
):
    """The forward of one Q block of one (batch, head); under VARLEN of the Q block of grid slot
    program_id(0) (_varlen_slot; n_q, n_kv are then the token totals, the batch strides 0)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    seed = _load_seed(SEED, HAS_DROPOUT)
    row_start = pid_m * BLOCK_M
    if VARLEN:
        b, block = _varlen_slot(CU_SEQLENS_Q, n_seqs, n_q, pid_m, BLOCK_M)
        row_start = block * BLOCK_M
        q_start, n_q_seq = _varlen_sequence(CU_SEQLENS_Q, b, n_q)
        kv_start, n_kv_seq = _varlen_sequence(CU_SEQLENS_K, b, n_kv)
        pid_bh = h
        seed = seed + b
        lse_base = LSE + h * n_q + q_start
    else:
        q_start = 0
        kv_start = 0
        n_q_seq = n_q
        n_kv_seq = n_kv
        pid_bh = b * n_heads + h
        lse_base = LSE + pid_bh * n_q
    stride_qn = _row_stride(stride_qn, STRIDES_ALIGNED)
    stride_kn = _row_stride(stride_kn, STRIDES_ALIGNED)
    stride_vn = _row_stride(stride_vn, STRIDES_ALIGNED)
    stride_on = _row_stride(stride_on, STRIDES_ALIGNED)
    args = (Q + _head_offset(b, stride_qb, q_start, stride_qn, h, stride_qh, STRIDES_ALIGNED),
            K + _head_offset(b, stride_kb, kv_start, stride_kn, h, stride_kh, STRIDES_ALIGNED),
            V + _head_offset(b, stride_vb, kv_start, stride_vn, h, stride_vh, STRIDES_ALIGNED),
            O + _head_offset(b, stride_ob, q_start, stride_on, h, stride_oh, STRIDES_ALIGNED), lse_base,
            stride_qn, stride_kn, stride_vn, stride_on)
    scalars = (n_q_seq, n_kv_seq, qk_scale_log2, dropout_p, seed, pid_bh)
    if VARLEN:
        if row_start >= 0 and row_start < n_q_seq:
            _attn_fwd_q_block(*args, row_start, *scalars,
                HEAD_DIM, BLOCK_DA, BLOCK_DB, BLOCK_M, BLOCK_N, HAS_DROPOUT, PEEL_TAIL, NARROW_TAIL, DOT_PRECISION,
                RNE_BF16_IN_SOFTWARE, VARLEN)
    else:
        _attn_fwd_q_block(*args, row_start, *scalars,
            HEAD_DIM, BLOCK_DA, BLOCK_DB, BLOCK_M, BLOCK_N, HAS_DROPOUT, PEEL_TAIL, NARROW_TAIL, DOT_PRECISION,
            RNE_BF16_IN_SOFTWARE, VARLEN)


@triton.jit
def _store_delta(o_base, stride_on, doa, dob, delta_base, rows, rows64, row_mask,
                 HEAD_DIM: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr):
    """delta = rowsum(dO * O) in float32 for `rows` of one (batch, head), stored for the dK/dV
    kernel and returned. (doa, dob) is the caller's loaded dO tile, dob _without_overlap; O is
    read here, once per row."""
    oa, ob = _load_head(o_base, rows64, stride_on, row_mask, HEAD_DIM, BLOCK_DA, BLOCK_DB, True)
    delta = tl.sum(oa.to(tl.float32) * doa.to(tl.float32), axis=1)
    if BLOCK_DB > 0:
        delta += tl.sum(ob.to(tl.float32) * dob.to(tl.float32), axis=1)
    tl.store(delta_base + rows, delta, mask=row_mask)
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
    CU_SEQLENS_Q,
    n_seqs,
    HEAD_DIM: tl.constexpr,
    BLOCK_DA: tl.constexpr,
    BLOCK_DB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    VARLEN: tl.constexpr,
    STRIDES_ALIGNED: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    row_start = pid_m * BLOCK_M
    if VARLEN:
        b, block = _varlen_slot(CU_SEQLENS_Q, n_seqs, n_q, pid_m, BLOCK_M)
        row_start = block * BLOCK_M
        q_start, n_q_seq = _varlen_sequence(CU_SEQLENS_Q, b, n_q)
        delta_base = DELTA + h * n_q + q_start
    else:
        q_start = 0
        n_q_seq = n_q
        delta_base = DELTA + (b * n_heads + h) * n_q
    stride_on = _row_stride(stride_on, STRIDES_ALIGNED)
    stride_don = _row_stride(stride_don, STRIDES_ALIGNED)
    o_base = O + _head_offset(b, stride_ob, q_start, stride_on, h, stride_oh, STRIDES_ALIGNED)
    do_base = DO + _head_offset(b, stride_dob, q_start, stride_don, h, stride_doh, STRIDES_ALIGNED)
    if row_start >= 0 and row_start < n_q_seq:
        rows = row_start + tl.arange(0, BLOCK_M)
        row_mask = rows < n_q_seq
        rows64 = rows[:, None].to(tl.int64)
        doa, dob = _load_head(do_base, rows64, stride_don, row_mask, HEAD_DIM, BLOCK_DA, BLOCK_DB, True)
        dob = _without_overlap(dob, HEAD_DIM, BLOCK_DA, BLOCK_DB)
        _store_delta(o_base, stride_on, doa, dob, delta_base, rows, rows64, row_mask, HEAD_DIM, BLOCK_DA, BLOCK_DB)


@triton.jit
def _attn_bwd_dkdv_q_block(
    ka, kb, va, vb, dka, dkb, dva, dvb, q_base, do_base, lse_base, delta_base, stride_qn, stride_don, start_m, n_q,
    offs_m, cols, col_mask, DQ_ACCUM, dq_accum_offset, stride_dq_accum, softmax_scale, qk_scale_log2, dropout_p, seed, pid_bh,
    n_kv, HEAD_DIM: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr, MASK_Q: tl.constexpr,
):
    """One Q block of the dK/dV kernel (its docstring): returns dK, dV updated; with ATOMIC_DQ
    adds this block's share of dQ. Without MASK_Q every row of the block is in the sequence."""
    rows = start_m + offs_m
    row_mask = rows < n_q
    rows64 = rows[:, None].to(tl.int64)
    qa, qb = _load_head(q_base, rows64, stride_qn, row_mask, HEAD_DIM, BLOCK_DA, BLOCK_DB, MASK_Q)
    doa, dob = _load_head(do_base, rows64, stride_don, row_mask, HEAD_DIM, BLOCK_DA, BLOCK_DB, MASK_Q)
    if MASK_Q:
        lse = tl.load(lse_base + rows, mask=row_mask, other=0.0)
        delta = tl.load(delta_base + rows, mask=row_mask, other=0.0)
    else:
        lse = tl.load(lse_base + rows)
        delta = tl.load(delta_base + rows)

    scores_t = _dot_over_head(ka, kb, qa, qb, BLOCK_DB, DOT_PRECISION) * qk_scale_log2
    dp_t = _dot_over_head(va, vb, doa, dob, BLOCK_DB, DOT_PRECISION)
    p_dropped_t, ds_t = _probs_and_dscores(
        scores_t, dp_t, lse[None, :], delta[None, :], rows[None, :], cols[:, None],
        col_mask[:, None] & row_mask[None, :], dropout_p, seed, pid_bh, n_q, n_kv, HAS_DROPOUT, MASK_Q,
    )
    p_dropped_t = p_dropped_t.to(doa.dtype)
    ds_t = ds_t.to(qa.dtype)
    dva += tl.dot(p_dropped_t, doa, input_precision=DOT_PRECISION)
    dka += tl.dot(ds_t, qa, input_precision=DOT_PRECISION)
    if BLOCK_DB > 0:
        dvb += tl.dot(p_dropped_t, dob, input_precision=DOT_PRECISION)
        dkb += tl.dot(ds_t, qb, input_precision=DOT_PRECISION)
    if ATOMIC_DQ:
        ds = tl.trans(ds_t)
        offs_a = tl.arange(0, BLOCK_DA)
        dq_ptrs = DQ_ACCUM + dq_accum_offset + rows64 * stride_dq_accum
        mask_a = row_mask[:, None]
        if HEAD_DIM < BLOCK_DA:
            mask_a = mask_a & (offs_a < HEAD_DIM)[None, :]
        tl.atomic_add(dq_ptrs + offs_a[None, :], tl.dot(ds, ka, input_precision=DOT_PRECISION) * softmax_scale,
                      mask=mask_a)
        if BLOCK_DB > 0:  # kb's overlap is zeroed: its columns there are the first block's
            offs_b = HEAD_DIM - BLOCK_DB + tl.arange(0, BLOCK_DB)
            tl.atomic_add(dq_ptrs + offs_b[None, :], tl.dot(ds, kb, input_precision=DOT_PRECISION) * softmax_scale,
                          mask=row_mask[:, None] & _beyond_overlap(BLOCK_DA, BLOCK_DB, HEAD_DIM))
    return dka, dkb, dva, dvb


@triton.jit
def _attn_bwd_dkdv_cols(
    q_base, k_base, v_base, do_base, lse_base, delta_base, dk_base, dv_base, DQ_ACCUM, dq_accum_offset, stride_qn,
    stride_kn, stride_vn, stride_don, stride_dkn, stride_dq_accum, col_start, n_q, n_kv, softmax_scale, qk_scale_log2,
    dropout_p, seed, pid_bh,
    HEAD_DIM: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, BLOCK_M: tl.constexpr,
    COLS: tl.constexpr, HAS_DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr, PEEL_TAIL: tl.constexpr,
    NARROW_TAIL: tl.constexpr, DOT_PRECISION: tl.constexpr, RNE_BF16_IN_SOFTWARE: tl.constexpr,
):
    """dK and dV for COLS key rows from col_start of one (batch, head); every *_base pointer is
    already offset to that batch (or sequence) and head."""
    cols = col_start + tl.arange(0, COLS)
    col_mask = cols < n_kv
    cols64 = cols[:, None].to(tl.int64)
    ka, kb = _load_head(k_base, cols64, stride_kn, col_mask, HEAD_DIM, BLOCK_DA, BLOCK_DB, True)
    va, vb = _load_head(v_base, cols64, stride_vn, col_mask, HEAD_DIM, BLOCK_DA, BLOCK_DB, True)
    kb = _without_overlap(kb, HEAD_DIM, BLOCK_DA, BLOCK_DB)
    vb = _without_overlap(vb, HEAD_DIM, BLOCK_DA, BLOCK_DB)

    dka, dkb = _zeros_head(COLS, BLOCK_DA, BLOCK_DB)
    dva, dvb = _zeros_head(COLS, BLOCK_DA, BLOCK_DB)
    offs_m = tl.arange(0, BLOCK_M)
    # Peeled (see the forward): whole Q blocks without row masks, then the partial last block,
    # NARROW_TAIL rows wide when it fits.
    n_full = 0
    if PEEL_TAIL:
        n_full = (n_q // BLOCK_M) * BLOCK_M
    for start_m in range(0, n_full, BLOCK_M):
        dka, dkb, dva, dvb = _attn_bwd_dkdv_q_block(
            ka, kb, va, vb, dka, dkb, dva, dvb, q_base, do_base, lse_base, delta_base, stride_qn, stride_don, start_m,
            n_q, offs_m, cols, col_mask, DQ_ACCUM, dq_accum_offset, stride_dq_accum, softmax_scale, qk_scale_log2, dropout_p,
            seed, pid_bh, n_kv, HEAD_DIM, BLOCK_DA, BLOCK_DB, HAS_DROPOUT, ATOMIC_DQ, DOT_PRECISION, False,
        )
    if NARROW_TAIL > 0 and n_full < n_q and n_q - n_full <= NARROW_TAIL:
        dka, dkb, dva, dvb = _attn_bwd_dkdv_q_block(
            ka, kb, va, vb, dka, dkb, dva, dvb, q_base, do_base, lse_base, delta_base, stride_qn, stride_don, n_full,
            n_q, tl.arange(0, NARROW_TAIL), cols, col_mask, DQ_ACCUM, dq_accum_offset, stride_dq_accum, softmax_scale,
            qk_scale_log2, dropout_p, seed, pid_bh, n_kv, HEAD_DIM, BLOCK_DA, BLOCK_DB, HAS_DROPOUT, ATOMIC_DQ,
            DOT_PRECISION, True,
        )
    else:
        for start_m in range(n_full, n_q, BLOCK_M):
            dka, dkb, dva, dvb = _attn_bwd_dkdv_q_block(
                ka, kb, va, vb, dka, dkb, dva, dvb, q_base, do_base, lse_base, delta_base, stride_qn, stride_don,
                start_m, n_q, offs_m, cols, col_mask, DQ_ACCUM, dq_accum_offset, stride_dq_accum, softmax_scale, qk_scale_log2,
                dropout_p, seed, pid_bh, n_kv, HEAD_DIM, BLOCK_DA, BLOCK_DB, HAS_DROPOUT, ATOMIC_DQ, DOT_PRECISION,
                True,
            )

    dka = dka * softmax_scale
    if BLOCK_DB > 0:
        dkb = dkb * softmax_scale
    _store_head(dk_base, cols64, stride_dkn, col_mask, dka, dkb, HEAD_DIM, BLOCK_DA, BLOCK_DB, RNE_BF16_IN_SOFTWARE)
    _store_head(dv_base, cols64, stride_dkn, col_mask, dva, dvb, HEAD_DIM, BLOCK_DA, BLOCK_DB, RNE_BF16_IN_SOFTWARE)


@triton.jit
def _attn_bwd_dkdv_kv_block(
    q_base, k_base, v_base, do_base, lse_base, delta_base, dk_base, dv_base, DQ_ACCUM, dq_accum_offset, stride_qn,
    stride_kn, stride_vn, stride_don, stride_dkn, stride_dq_accum, col_start, n_q, n_kv, softmax_scale, qk_scale_log2,
    dropout_p, seed, pid_bh,
    HEAD_DIM: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr, PEEL_TAIL: tl.constexpr,
    NARROW_TAIL: tl.constexpr, DOT_PRECISION: tl.constexpr, RNE_BF16_IN_SOFTWARE: tl.constexpr,
):
    """The KV block at col_start. A last KV block of at most NARROW_TAIL columns runs as a copy of
    the body that narrow (the forward's kernel says why; its dots then run on mma.sync)."""
    args = (q_base, k_base, v_base, do_base, lse_base, delta_base, dk_base, dv_base, DQ_ACCUM, dq_accum_offset, stride_qn,
            stride_kn, stride_vn, stride_don, stride_dkn, stride_dq_accum, col_start, n_q, n_kv, softmax_scale,
            qk_scale_log2, dropout_p, seed, pid_bh)
    if NARROW_TAIL > 0 and n_kv - col_start <= NARROW_TAIL:
        _attn_bwd_dkdv_cols(*args, HEAD_DIM, BLOCK_DA, BLOCK_DB, BLOCK_M, NARROW_TAIL, HAS_DROPOUT, ATOMIC_DQ,
                            PEEL_TAIL, NARROW_TAIL, DOT_PRECISION, RNE_BF16_IN_SOFTWARE)
    else:
        _attn_bwd_dkdv_cols(*args, HEAD_DIM, BLOCK_DA, BLOCK_DB, BLOCK_M, BLOCK_N, HAS_DROPOUT, ATOMIC_DQ,
                            PEEL_TAIL, NARROW_TAIL, DOT_PRECISION, RNE_BF16_IN_SOFTWARE)


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
    CU_SEQLENS_Q,
    CU_SEQLENS_K,
    n_seqs,
    n_bucket,  # unused in the body: the autotune key (a power of two of max(N_q, N_kv))
    HEAD_DIM: tl.constexpr,
    BLOCK_DA: tl.constexpr,
    BLOCK_DB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
    PEEL_TAIL: tl.constexpr,
    NARROW_TAIL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    RNE_BF16_IN_SOFTWARE: tl.constexpr,
    VARLEN: tl.constexpr,
    STRIDES_ALIGNED: tl.constexpr,
):
    """dK, dV for one KV block, looping over all Q blocks; with ATOMIC_DQ also dQ's share of this
    block, added with float32 atomics into DQ_ACCUM ([B, N_q, H, d] contiguous, [T, H, d] under
    VARLEN). DK and DV share strides. Under VARLEN, the KV block of grid slot program_id(0)
    (_varlen_slot).

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
    seed = _load_seed(SEED, HAS_DROPOUT)
    col_start = pid_n * BLOCK_N
    if VARLEN:
        b, block = _varlen_slot(CU_SEQLENS_K, n_seqs, n_kv, pid_n, BLOCK_N)
        col_start = block * BLOCK_N
        q_start, n_q_seq = _varlen_sequence(CU_SEQLENS_Q, b, n_q)
        kv_start, n_kv_seq = _varlen_sequence(CU_SEQLENS_K, b, n_kv)
        pid_bh = h
        seed = seed + b
        lse_offset = h * n_q + q_start
    else:
        q_start = 0
        kv_start = 0
        n_q_seq = n_q
        n_kv_seq = n_kv
        pid_bh = b * n_heads + h
        lse_offset = pid_bh * n_q
    # DQ_ACCUM is [B * N_q, H, d] (or [T, H, d]) contiguous: this program's rows start at row
    # b * N_q (or q_start), head h. (A None pointer cannot be offset, so the offset travels apart.)
    if VARLEN:
        dq_accum_offset = (q_start * n_heads + h) * HEAD_DIM
    else:
        dq_accum_offset = (b * n_q * n_heads + h) * HEAD_DIM
    stride_qn = _row_stride(stride_qn, STRIDES_ALIGNED)
    stride_kn = _row_stride(stride_kn, STRIDES_ALIGNED)
    stride_vn = _row_stride(stride_vn, STRIDES_ALIGNED)
    stride_don = _row_stride(stride_don, STRIDES_ALIGNED)
    stride_dkn = _row_stride(stride_dkn, STRIDES_ALIGNED)
    args = (Q + _head_offset(b, stride_qb, q_start, stride_qn, h, stride_qh, STRIDES_ALIGNED),
            K + _head_offset(b, stride_kb, kv_start, stride_kn, h, stride_kh, STRIDES_ALIGNED),
            V + _head_offset(b, stride_vb, kv_start, stride_vn, h, stride_vh, STRIDES_ALIGNED),
            DO + _head_offset(b, stride_dob, q_start, stride_don, h, stride_doh, STRIDES_ALIGNED),
            LSE + lse_offset, DELTA + lse_offset,
            DK + _head_offset(b, stride_dkb, kv_start, stride_dkn, h, stride_dkh, STRIDES_ALIGNED),
            DV + _head_offset(b, stride_dkb, kv_start, stride_dkn, h, stride_dkh, STRIDES_ALIGNED),
            DQ_ACCUM, dq_accum_offset, stride_qn, stride_kn, stride_vn, stride_don, stride_dkn, n_heads * HEAD_DIM)
    scalars = (n_q_seq, n_kv_seq, softmax_scale, qk_scale_log2, dropout_p, seed, pid_bh)
    if VARLEN:
        if col_start >= 0 and col_start < n_kv_seq:
            _attn_bwd_dkdv_kv_block(*args, col_start, *scalars,
                HEAD_DIM, BLOCK_DA, BLOCK_DB, BLOCK_M, BLOCK_N, HAS_DROPOUT, ATOMIC_DQ, PEEL_TAIL, NARROW_TAIL,
                DOT_PRECISION, RNE_BF16_IN_SOFTWARE)
    else:
        _attn_bwd_dkdv_kv_block(*args, col_start, *scalars,
            HEAD_DIM, BLOCK_DA, BLOCK_DB, BLOCK_M, BLOCK_N, HAS_DROPOUT, ATOMIC_DQ, PEEL_TAIL, NARROW_TAIL,
            DOT_PRECISION, RNE_BF16_IN_SOFTWARE)


@triton.jit
def _attn_bwd_dq_kv_block(
    qa, qb, doa, dob, lse, delta, dqa, dqb, k_base, v_base, stride_kn, stride_vn, start_n, n_kv, offs_n, rows,
    row_mask, qk_scale_log2, dropout_p, seed, pid_bh, n_q,
    HEAD_DIM: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, MASK_KV: tl.constexpr,
):
    """One KV block of the dQ kernel: returns dQ updated. Without MASK_KV every column of the
    block is in the sequence."""
    cols = start_n + offs_n
    col_mask = cols < n_kv
    cols64 = cols[:, None].to(tl.int64)
    ka, kb = _load_head(k_base, cols64, stride_kn, col_mask, HEAD_DIM, BLOCK_DA, BLOCK_DB, MASK_KV)
    va, vb = _load_head(v_base, cols64, stride_vn, col_mask, HEAD_DIM, BLOCK_DA, BLOCK_DB, MASK_KV)
    scores = _dot_over_head(qa, qb, ka, kb, BLOCK_DB, DOT_PRECISION) * qk_scale_log2
    dp = _dot_over_head(doa, dob, va, vb, BLOCK_DB, DOT_PRECISION)
    _, ds = _probs_and_dscores(
        scores, dp, lse[:, None], delta[:, None], rows[:, None], cols[None, :],
        row_mask[:, None] & col_mask[None, :], dropout_p, seed, pid_bh, n_q, n_kv, HAS_DROPOUT, MASK_KV,
    )
    ds = ds.to(ka.dtype)
    dqa += tl.dot(ds, ka, input_precision=DOT_PRECISION)
    if BLOCK_DB > 0:
        dqb += tl.dot(ds, kb, input_precision=DOT_PRECISION)
    return dqa, dqb


@triton.jit
def _attn_bwd_dq_rows(
    q_base, k_base, v_base, o_base, do_base, lse_base, delta_base, dq_base, stride_qn, stride_kn, stride_vn, stride_on,
    stride_don, stride_dqn, row_start, n_q, n_kv, softmax_scale, qk_scale_log2, dropout_p, seed, pid_bh,
    HEAD_DIM: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_DROPOUT: tl.constexpr, PEEL_TAIL: tl.constexpr, NARROW_TAIL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, RNE_BF16_IN_SOFTWARE: tl.constexpr,
):
    """dQ and delta for ROWS query rows from row_start of one (batch, head); the *_base pointers
    are already offset to that batch (or sequence) and head."""
    rows = row_start + tl.arange(0, ROWS)
    offs_n = tl.arange(0, BLOCK_N)
    row_mask = rows < n_q
    rows64 = rows[:, None].to(tl.int64)
    qa, qb = _load_head(q_base, rows64, stride_qn, row_mask, HEAD_DIM, BLOCK_DA, BLOCK_DB, True)
    doa, dob = _load_head(do_base, rows64, stride_don, row_mask, HEAD_DIM, BLOCK_DA, BLOCK_DB, True)
    qb = _without_overlap(qb, HEAD_DIM, BLOCK_DA, BLOCK_DB)
    dob = _without_overlap(dob, HEAD_DIM, BLOCK_DA, BLOCK_DB)
    delta = _store_delta(o_base, stride_on, doa, dob, delta_base, rows, rows64, row_mask, HEAD_DIM, BLOCK_DA,
                         BLOCK_DB)
    lse = tl.load(lse_base + rows, mask=row_mask, other=0.0)

    dqa, dqb = _zeros_head(ROWS, BLOCK_DA, BLOCK_DB)
    # Peeled (see the forward): whole KV blocks without column masks, then the partial last
    # block, NARROW_TAIL columns wide when it fits.
    n_full = 0
    if PEEL_TAIL:
        n_full = (n_kv // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dqa, dqb = _attn_bwd_dq_kv_block(
            qa, qb, doa, dob, lse, delta, dqa, dqb, k_base, v_base, stride_kn, stride_vn, start_n, n_kv, offs_n, rows,
            row_mask, qk_scale_log2, dropout_p, seed, pid_bh, n_q, HEAD_DIM, BLOCK_DA, BLOCK_DB, HAS_DROPOUT,
            DOT_PRECISION, False,
        )
    if NARROW_TAIL > 0 and n_full < n_kv and n_kv - n_full <= NARROW_TAIL:
        dqa, dqb = _attn_bwd_dq_kv_block(
            qa, qb, doa, dob, lse, delta, dqa, dqb, k_base, v_base, stride_kn, stride_vn, n_full, n_kv,
            tl.arange(0, NARROW_TAIL), rows, row_mask, qk_scale_log2, dropout_p, seed, pid_bh, n_q, HEAD_DIM,
            BLOCK_DA, BLOCK_DB, HAS_DROPOUT, DOT_PRECISION, True,
        )
    else:
        for start_n in range(n_full, n_kv, BLOCK_N):
            dqa, dqb = _attn_bwd_dq_kv_block(
                qa, qb, doa, dob, lse, delta, dqa, dqb, k_base, v_base, stride_kn, stride_vn, start_n, n_kv, offs_n,
                rows, row_mask, qk_scale_log2, dropout_p, seed, pid_bh, n_q, HEAD_DIM, BLOCK_DA, BLOCK_DB,
                HAS_DROPOUT, DOT_PRECISION, True,
            )

    dqa = dqa * softmax_scale
    if BLOCK_DB > 0:
        dqb = dqb * softmax_scale
    _store_head(dq_base, rows64, stride_dqn, row_mask, dqa, dqb, HEAD_DIM, BLOCK_DA, BLOCK_DB, RNE_BF16_IN_SOFTWARE)


@triton.jit
def _attn_bwd_dq_q_block(
    q_base, k_base, v_base, o_base, do_base, lse_base, delta_base, dq_base, stride_qn, stride_kn, stride_vn, stride_on,
    stride_don, stride_dqn, row_start, n_q, n_kv, softmax_scale, qk_scale_log2, dropout_p, seed, pid_bh,
    HEAD_DIM: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_DROPOUT: tl.constexpr, PEEL_TAIL: tl.constexpr, NARROW_TAIL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, RNE_BF16_IN_SOFTWARE: tl.constexpr,
):
    """The Q block at row_start; a last one of at most NARROW_TAIL rows runs as a copy of the body
    that narrow (the forward's _attn_fwd_q_block says why)."""
    args = (q_base, k_base, v_base, o_base, do_base, lse_base, delta_base, dq_base, stride_qn, stride_kn, stride_vn,
            stride_on, stride_don, stride_dqn, row_start, n_q, n_kv, softmax_scale, qk_scale_log2, dropout_p, seed,
            pid_bh)
    if NARROW_TAIL > 0 and n_q - row_start <= NARROW_TAIL:
        _attn_bwd_dq_rows(*args, HEAD_DIM, BLOCK_DA, BLOCK_DB, NARROW_TAIL, BLOCK_N, HAS_DROPOUT, PEEL_TAIL,
                          NARROW_TAIL, DOT_PRECISION, RNE_BF16_IN_SOFTWARE)
    else:
        _attn_bwd_dq_rows(*args, HEAD_DIM, BLOCK_DA, BLOCK_DB, BLOCK_M, BLOCK_N, HAS_DROPOUT, PEEL_TAIL,
                          NARROW_TAIL, DOT_PRECISION, RNE_BF16_IN_SOFTWARE)


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
    CU_SEQLENS_Q,
    CU_SEQLENS_K,
    n_seqs,
    n_bucket,  # unused in the body: the autotune key (a power of two of max(N_q, N_kv))
    HEAD_DIM: tl.constexpr,
    BLOCK_DA: tl.constexpr,
    BLOCK_DB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PEEL_TAIL: tl.constexpr,
    NARROW_TAIL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    RNE_BF16_IN_SOFTWARE: tl.constexpr,
    VARLEN: tl.constexpr,
    STRIDES_ALIGNED: tl.constexpr,
):
    """dQ for one Q block, looping over all KV blocks: one writer per element, so deterministic.
    Under VARLEN, the Q block of grid slot program_id(0) (_varlen_slot).

    It also writes delta = rowsum(dO * O) for its rows, which the dK/dV kernel launched after
    it reads: the preprocess kernel's job, done where dO is loaded anyway (one launch and one
    read of dO fewer; only O is read in addition, once per row)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    seed = _load_seed(SEED, HAS_DROPOUT)
    row_start = pid_m * BLOCK_M
    if VARLEN:
        b, block = _varlen_slot(CU_SEQLENS_Q, n_seqs, n_q, pid_m, BLOCK_M)
        row_start = block * BLOCK_M
        q_start, n_q_seq = _varlen_sequence(CU_SEQLENS_Q, b, n_q)
        kv_start, n_kv_seq = _varlen_sequence(CU_SEQLENS_K, b, n_kv)
        pid_bh = h
        seed = seed + b
        lse_offset = h * n_q + q_start
    else:
        q_start = 0
        kv_start = 0
        n_q_seq = n_q
        n_kv_seq = n_kv
        pid_bh = b * n_heads + h
        lse_offset = pid_bh * n_q
    stride_qn = _row_stride(stride_qn, STRIDES_ALIGNED)
    stride_kn = _row_stride(stride_kn, STRIDES_ALIGNED)
    stride_vn = _row_stride(stride_vn, STRIDES_ALIGNED)
    stride_on = _row_stride(stride_on, STRIDES_ALIGNED)
    stride_don = _row_stride(stride_don, STRIDES_ALIGNED)
    stride_dqn = _row_stride(stride_dqn, STRIDES_ALIGNED)
    args = (Q + _head_offset(b, stride_qb, q_start, stride_qn, h, stride_qh, STRIDES_ALIGNED),
            K + _head_offset(b, stride_kb, kv_start, stride_kn, h, stride_kh, STRIDES_ALIGNED),
            V + _head_offset(b, stride_vb, kv_start, stride_vn, h, stride_vh, STRIDES_ALIGNED),
            O + _head_offset(b, stride_ob, q_start, stride_on, h, stride_oh, STRIDES_ALIGNED),
            DO + _head_offset(b, stride_dob, q_start, stride_don, h, stride_doh, STRIDES_ALIGNED),
            LSE + lse_offset, DELTA + lse_offset,
            DQ + _head_offset(b, stride_dqb, q_start, stride_dqn, h, stride_dqh, STRIDES_ALIGNED),
            stride_qn, stride_kn, stride_vn, stride_on, stride_don, stride_dqn)
    scalars = (n_q_seq, n_kv_seq, softmax_scale, qk_scale_log2, dropout_p, seed, pid_bh)
    if VARLEN:
        if row_start >= 0 and row_start < n_q_seq:
            _attn_bwd_dq_q_block(*args, row_start, *scalars,
                HEAD_DIM, BLOCK_DA, BLOCK_DB, BLOCK_M, BLOCK_N, HAS_DROPOUT, PEEL_TAIL, NARROW_TAIL, DOT_PRECISION,
                RNE_BF16_IN_SOFTWARE)
    else:
        _attn_bwd_dq_q_block(*args, row_start, *scalars,
            HEAD_DIM, BLOCK_DA, BLOCK_DB, BLOCK_M, BLOCK_N, HAS_DROPOUT, PEEL_TAIL, NARROW_TAIL, DOT_PRECISION,
            RNE_BF16_IN_SOFTWARE)


@triton.jit
def _dropout_mask_kernel(MASK, n_q, n_kv, dropout_p, SEED, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh = tl.program_id(2)
    seed = tl.load(SEED)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(seed, pid_bh, rows[:, None], cols[None, :], n_q, n_kv, dropout_p)
    ptrs = MASK + (pid_bh * n_q + rows[:, None]) * n_kv + cols[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(rows < n_q)[:, None] & (cols < n_kv)[None, :])
