# Flash attention over packed sequences of different lengths (NaViT-style packing, SigLIP2's
# NaFlex, Qwen2-VL's vision encoder): q, k, v [total_tokens, H, d] with int32 cumulative
# lengths, flash-attn's `flash_attn_varlen_func` convention, attention only inside each sequence.
#
# What is fused and why. Padding a batch of mixed-size images to its largest one spends the
# attention's quadratic work on pad tokens and needs a mask the flash kernels do not take; here
# the same kernels as ops/attention.py (VARLEN: grid axis 2 is the sequence, each program reads
# its sequence's start and length on the device) run on the packed tokens as they are.
#
# No host sync. flash-attn needs max_seqlen as a host int, and callers read it with .item().
# Here the grid has one slot per block of every sequence whatever their lengths
# (cdiv(total_tokens, BLOCK) + num_seqs slots, each program finding its sequence on the device:
# ops/attention_kernels.py, VARLEN), so max_seqlen only picks the autotuner's length bucket and
# any value gives the same result. So the op traces under torch.compile(fullgraph=True) and
# captures in a CUDA graph.
#
# Checks. Types, dtypes, shapes and devices are checked on every call (host metadata). The
# values of cu_seqlens (starting at 0, non-decreasing, ending at the token count) need them on
# the host: a tensor built by `cu_seqlens(lengths)` was checked there; any other is read once
# (one host sync the first time this tensor object is seen, not again for the other layers of
# the step or the backward) in eager mode, and not at all under tracing or CUDA-graph capture,
# where the kernels clamp every sequence into [0, total_tokens] so no value reaches memory
# outside the tensors.
#
# Layout of the saved log-sum-exp: [H, total_tokens] float32 (base 2). Dropout: sequence b
# draws its mask as a batch of one would with seed + b (attention_dropout_mask reproduces it).

from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary

from .. import reference
from .._dispatch import define_op, inductor_keeps_launch_options, runs_kernel, tracing
from .._validate import check_float_tensor, check_same_device
from ._launcher import launcher_for
from ._triton_helpers import LAUNCH_OPTIONS, cdiv
from .attention import (HEAD_DIMS, HEAD_DIMS_TEXT, LOG2E, _NO_FP_FUSION, _arch_major,
                        _common_constexprs, _launch, _n_bucket, _peel_tail, _seed_on, _tails,
                        check_attention_options, draw_seed, head_dim_blocks, launch_configs, strides_aligned)
from .attention_kernels import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _attn_bwd_preprocess_kernel, _attn_fwd_kernel

__all__ = ["cu_seqlens", "flash_attention_key_padded", "flash_attention_varlen"]

# cu_seqlens tensors whose values were checked: (their version, token count, number of
# sequences, longest sequence): built by cu_seqlens() or read once in eager mode.
_CHECKED = WeakTensorKeyDictionary()


def cu_seqlens(lengths: Sequence[int], device=None) -> Tensor:
    """The int32 cumulative lengths ``[0, l0, l0 + l1, ...]`` of packed sequences, on `device`.

    Built from host integers (a data loader knows its images' sizes), so flash_attention_varlen
    needs no host read to check it and sizes its grid from the longest length. Raises
    ValueError for a negative length, TypeError for a non-integer.
    """
    lengths = list(lengths)
    for i, n in enumerate(lengths):
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"lengths[{i}] must be an int, got {type(n).__name__}")
        if n < 0:
            raise ValueError(f"lengths[{i}] must be >= 0, got {n}")
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    if offsets[-1] >= 2**31:
        raise ValueError(f"the total length {offsets[-1]} does not fit int32")
    t = torch.tensor(offsets, dtype=torch.int32)
    if device is not None and torch.device(device).type == "cuda":
        # From pinned memory without blocking: a pageable copy would wait for the GPU's queue.
        t = t.pin_memory().to(device, non_blocking=True)
    elif device is not None:
        t = t.to(device)
    _CHECKED[t] = (t._version, offsets[-1], len(lengths), max(lengths, default=0))
    return t


def _check_cu_seqlens_meta(name: str, cu: Tensor, q: Tensor) -> None:
    if not isinstance(cu, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (flash-attn's convention), got {str(cu.dtype).replace('torch.', '')}")
    if cu.dim() != 1 or cu.shape[0] < 2:
        raise ValueError(f"{name} must be 1-D with at least 2 entries [0, ..., total_tokens], got shape {tuple(cu.shape)}")
    if cu.device != q.device:
        raise ValueError(f"{name} is on {cu.device} but q is on {q.device}; all tensors must be on one device")


def _checked_lengths(name: str, cu: Tensor, total: int) -> Optional[tuple]:
    """(number of sequences, longest) of a cu_seqlens whose values are known good, reading them
    (one host sync) if they were never checked; None where reading is not allowed (tracing,
    CUDA-graph capture). Raises ValueError for bad values."""
    if tracing() or (cu.is_cuda and torch.cuda.is_current_stream_capturing()):
        return None
    known = _CHECKED.get(cu)
    if known is not None and known[0] == cu._version:
        if known[1] != total:
            raise ValueError(f"{name}'s last entry must be the token count ({total}), got {known[1]}")
        return known[2:]
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    lengths = [b - a for a, b in zip(values, values[1:])]
    if min(lengths) < 0:
        i = min(range(len(lengths)), key=lengths.__getitem__)
        raise ValueError(f"{name} must be non-decreasing, got {values[i]} then {values[i + 1]} at entries {i}, {i + 1}")
    if values[-1] != total:
        raise ValueError(f"{name}'s last entry must be the token count ({total}), got {values[-1]}")
    _CHECKED[cu] = (cu._version, total, len(lengths), max(lengths))
    return len(lengths), max(lengths)


def _grid_len(max_seqlen: int, total: int, n_seqs: int) -> int:
    """The sequence length the tuning key is bucketed by: max_seqlen where known (> 0), else the mean."""
    if max_seqlen > 0:
        return min(max_seqlen, total)
    return max(1, cdiv(total, max(n_seqs, 1)))


def _slots(total: int, block: int, n_seqs: int) -> int:
    """Grid axis 0 under VARLEN: every block of every sequence has a slot (attention_kernels._varlen_slot)."""
    return cdiv(total, block) + n_seqs


def _strides(t: Tensor) -> tuple:
    """A [T, H, d] tensor's strides as the kernels' (batch, token, head): batch 0 (VARLEN offsets rows)."""
    return 0, t.stride(0), t.stride(1)


def _varlen_constexprs(q: Tensor, kernel, strides_are_aligned: int) -> dict:
    return {**_common_constexprs(q, kernel, strides_are_aligned), "VARLEN": True}


def _flash_attention_varlen_fwd_impl(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
    softmax_scale: float, dropout_p: float, seed: Optional[Tensor], deterministic: bool,
) -> tuple[Tensor, Tensor]:
    """Returns (out [T_q, H, d] contiguous, lse [H, T_q] float32, base 2). max_seqlen_q/k: the
    tuning bucket's hint (0: none), nothing else."""
    total_q, n_heads, head_dim = q.shape
    total_k = k.shape[0]
    n_seqs = cu_seqlens_q.shape[0] - 1
    out = torch.empty((total_q, n_heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((n_heads, total_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    len_q, len_k = _grid_len(max_seqlen_q, total_q, n_seqs), _grid_len(max_seqlen_k, total_k, n_seqs)
    arch_major = _arch_major(q.device)
    peel = _peel_tail(arch_major, dropout_p)
    sq, sk, sv, so = _strides(q), _strides(k), _strides(v), _strides(out)
    _launch(
        _attn_fwd_kernel,
        launch_configs("fwd", head_dim, q.dtype, _attn_fwd_kernel, dropout=dropout_p > 0, arch_major=arch_major),
        lambda meta: (_slots(total_q, meta["BLOCK_M"], n_seqs), n_heads, 1),
        (q, k, v, out, lse, *sq, *sk, *sv, *so, n_heads, total_q, total_k,
         softmax_scale * LOG2E, dropout_p, _seed_on(seed, dropout_p, q.device), cu_seqlens_q, cu_seqlens_k, n_seqs,
         _n_bucket(len_q, len_k)),
        dict(HAS_DROPOUT=dropout_p > 0, **_tails(peel),
             **_varlen_constexprs(q, _attn_fwd_kernel, strides_aligned(sq, sk, sv, so))),
        options=_NO_FP_FUSION,
    )
    return out, lse


def _flash_attention_varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                     dropout_p, seed, deterministic):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


def _flash_attention_varlen_bwd_impl(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, dropout_p: float,
    seed: Optional[Tensor], deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv), each [T, H, d] contiguous in q's dtype."""
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    total_q, n_heads, head_dim = q.shape
    total_k = k.shape[0]
    n_seqs = cu_seqlens_q.shape[0] - 1
    if dk.numel() == 0:
        return dq, dk, dv
    if dq.numel() == 0 or total_k == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    len_q, len_k = _grid_len(max_seqlen_q, total_q, n_seqs), _grid_len(max_seqlen_k, total_k, n_seqs)
    sq, sk, sv, so = _strides(q), _strides(k), _strides(v), _strides(out)
    sdo, sdq, sdk = _strides(dout), _strides(dq), _strides(dk)
    constexprs = _varlen_constexprs(q, _attn_bwd_dkdv_kernel, strides_aligned(sq, sk, sv, so, sdo, sdq, sdk))
    delta = torch.empty_like(lse)  # [H, T_q] float32; every row of every sequence is written
    scalars = (n_heads, total_q, total_k, softmax_scale, softmax_scale * LOG2E, dropout_p,
               _seed_on(seed, dropout_p, q.device), cu_seqlens_q, cu_seqlens_k, n_seqs, _n_bucket(len_q, len_k))
    tails = _tails(_peel_tail(_arch_major(q.device), dropout_p))
    # The atomic-dQ dK/dV kernel spills on sm_90 with every tile tried at a head dim in two column
    # blocks (VARLEN's prologue on top): there the deterministic backward runs, same result.
    if deterministic or head_dim_blocks(head_dim)[1] > 0:
        _launch(
            _attn_bwd_dq_kernel, launch_configs("dq", head_dim, q.dtype, _attn_bwd_dq_kernel, dropout=dropout_p > 0,
                                                varlen=True),
            lambda meta: (_slots(total_q, meta["BLOCK_M"], n_seqs), n_heads, 1),
            (q, k, v, out, dout, lse, delta, dq, *sq, *sk, *sv, *so, *sdo, *sdq, *scalars),
            dict(HAS_DROPOUT=dropout_p > 0, **tails, **constexprs),
        )
        dq_accum = None
    else:
        pre_block = 32
        launcher_for(_attn_bwd_preprocess_kernel).call(
            (_slots(total_q, pre_block, n_seqs), n_heads, 1),
            out, dout, delta, *so, *sdo, n_heads, total_q, cu_seqlens_q, n_seqs,
            HEAD_DIM=head_dim, BLOCK_DA=constexprs["BLOCK_DA"], BLOCK_DB=constexprs["BLOCK_DB"], BLOCK_M=pre_block,
            VARLEN=True, STRIDES_ALIGNED=constexprs["STRIDES_ALIGNED"], **LAUNCH_OPTIONS,
        )
        dq_accum = torch.zeros((total_q, n_heads, head_dim), dtype=torch.float32, device=q.device)
    _launch(
        _attn_bwd_dkdv_kernel,
        launch_configs("dkdv", head_dim, q.dtype, _attn_bwd_dkdv_kernel, atomic_dq=dq_accum is not None,
                       dropout=dropout_p > 0, varlen=True),
        lambda meta: (_slots(total_k, meta["BLOCK_N"], n_seqs), n_heads, 1),
        (q, k, v, dout, lse, delta, dk, dv, dq_accum, *sq, *sk, *sv, *sdo, *sdk, *scalars),
        dict(HAS_DROPOUT=dropout_p > 0, ATOMIC_DQ=dq_accum is not None, **tails, **constexprs),
    )
    if dq_accum is not None:
        dq.copy_(dq_accum)
    return dq, dk, dv


def _flash_attention_varlen_bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                     softmax_scale, dropout_p, seed, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, dropout_p, seed, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seed)
    ctx.args = (max_seqlen_q, max_seqlen_k, softmax_scale, dropout_p)
    ctx.deterministic = deterministic


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seed = ctx.saved_tensors
    max_seqlen_q, max_seqlen_k, softmax_scale, dropout_p = ctx.args
    dq, dk, dv = _flash_attention_varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                             max_seqlen_k, softmax_scale, dropout_p, seed, ctx.deterministic)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_flash_attention_varlen_fwd = define_op(
    "flash_attention_varlen_fwd", _flash_attention_varlen_fwd_impl, fake=_flash_attention_varlen_fwd_fake,
    setup_context=_setup_context, backward=_backward, non_differentiable=(1,),
    kernel=_attn_fwd_kernel if inductor_keeps_launch_options() else None)
_flash_attention_varlen_bwd = define_op(
    "flash_attention_varlen_bwd", _flash_attention_varlen_bwd_impl, fake=_flash_attention_varlen_bwd_fake,
    kernel=_attn_bwd_dkdv_kernel)


def _check_max_seqlen(name: str, value) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, dropout_p) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, t, dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64))
        if t.dim() != 3:
            raise ValueError(f"{name} must be [total_tokens, H, d] (3-D), got shape {tuple(t.shape)}")
        if t.stride(-1) != 1 and t.numel() > 0:
            raise ValueError(f"{name}'s last dim (head dim) must be contiguous (stride 1), got stride {t.stride(-1)}")
    check_same_device("q", q, k=k, v=v)
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [T_kv, H, d], got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[1:] != k.shape[1:]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in heads and head dim ([T, H, d])")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head dim (q, k and v's last dim) must be {HEAD_DIMS_TEXT}, got {q.shape[-1]}")
    _check_cu_seqlens_meta("cu_seqlens_q", cu_seqlens_q, q)
    _check_cu_seqlens_meta("cu_seqlens_k", cu_seqlens_k, q)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have one entry per sequence boundary each, got "
                         f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}")
    check_attention_options(softmax_scale, dropout_p)


def flash_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    *,
    softmax_scale: Optional[float] = None,
    dropout_p: float = 0.0,
    deterministic: bool = True,
) -> Tensor:
    """Attention inside each of several packed sequences; returns ``[T_q, H, d]`` contiguous.

    flash-attn's ``flash_attn_varlen_func`` convention: sequence i is rows
    ``cu_seqlens_q[i]:cu_seqlens_q[i + 1]`` of q and ``cu_seqlens_k[i]:cu_seqlens_k[i + 1]`` of
    k and v, and attends to nothing else (non-causal).

    Args:
        q: ``[T_q, H, d]``; k, v: ``[T_kv, H, d]``, last stride 1 (views of a packed
            ``[T, 3, H, d]`` qkv are read in place). float16, bfloat16 or float32, one dtype;
            d a multiple of 8 from 8 to 128.
        cu_seqlens_q, cu_seqlens_k: int32 ``[num_seqs + 1]`` on q's device, starting at 0,
            non-decreasing, ending at T_q (T_kv). `cu_seqlens(lengths)` builds them.
        max_seqlen_q, max_seqlen_k: the longest sequence, a hint for the autotuner only (any value
            gives the same result; unlike flash-attn, never needed: no host read of a length).
        softmax_scale, dropout_p, deterministic: as flash_attention (deterministic=False runs the
            deterministic backward at the head dims held as two column blocks, all but 8, 16, 32, 64
            and 128, where its atomic kernel spills). Sequence i's dropout mask is
            ``attention_dropout_mask(seed + i, 1, H, n_q_i, n_kv_i, ...)``.

    A query sequence whose key sequence is empty gets output 0. CUDA tensors run the Triton
    kernels; CPU tensors the interpreter (TRITON_INTERPRET=1) or the reference, as does float64.

    Raises:
        TypeError: non-tensors, q/k/v dtypes differing or not floating, cu_seqlens not int32,
            max_seqlen not an int.
        ValueError: shapes that disagree, unsupported head dim, cu_seqlens not 1-D, of
            different lengths, on another device, not starting at 0, decreasing, or not ending at
            the token count (values are checked where they can be read: see the module header),
            dropout_p outside [0, 1), softmax_scale <= 0.
    """
    _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, dropout_p)
    hint_q, hint_k = _check_max_seqlen("max_seqlen_q", max_seqlen_q), _check_max_seqlen("max_seqlen_k", max_seqlen_k)
    known_q = _checked_lengths("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    known_k = _checked_lengths("cu_seqlens_k", cu_seqlens_k, k.shape[0])
    hint_q = hint_q or (known_q[1] if known_q else 0)
    hint_k = hint_k or (known_k[1] if known_k else 0)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if q.dtype == torch.float64 or not runs_kernel(_attn_fwd_kernel, q):
        return reference.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, dropout_p=dropout_p)
    seed = draw_seed(q.device) if dropout_p > 0 else None
    out, _ = _flash_attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, hint_q, hint_k, scale, float(dropout_p),
                                         seed, deterministic)
    return out


def key_padded_layout(key_valid: Tensor, n_q: int) -> tuple:
    """(order, cu_seqlens_q, cu_seqlens_k) that run a key-padded batch as packed sequences, built
    on the device: `order` puts every batch's valid keys first, batch after batch (a stable sort),
    so sequence b is all n_q queries of batch b and its valid keys; one last sequence holds no
    query and the masked keys, so that both offset tensors end at their token counts."""
    batch, n_k = key_valid.shape
    device = key_valid.device
    order = torch.argsort((~key_valid).reshape(-1).to(torch.int8), stable=True)
    ends = torch.cumsum(key_valid.sum(1, dtype=torch.int32), 0, dtype=torch.int32)
    zero, total = torch.zeros(1, dtype=torch.int32, device=device), torch.full((1,), batch * n_k, dtype=torch.int32,
                                                                               device=device)
    cu_k = torch.cat([zero, ends, total])
    cu_q = torch.clamp(torch.arange(batch + 2, dtype=torch.int32, device=device), max=batch) * n_q
    return order, cu_q, cu_k


def flash_attention_key_padded(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor, *,
                               softmax_scale: Optional[float] = None, dropout_p: float = 0.0,
                               deterministic: bool = True) -> Tensor:
    """Attention of ``[B, N, H, d]`` q over the keys of k, v ``[B, M, H, d]`` where ``key_valid``
    ``[B, M]`` (bool) is True: what eager attention with a key padding mask (SigLIP2's NaFlex,
    any padded batch) computes, every query row, padded or not, attending to its batch's valid
    keys; returns ``[B, N, H, d]``.

    Runs as `flash_attention_varlen` over the valid keys, gathered to the front on the device
    (`key_padded_layout`): no work on masked keys beyond the gather, and no host sync, so it traces
    under torch.compile(fullgraph=True) and captures in a CUDA graph. A batch with no valid key
    gets output 0. Dropout: batch b draws its mask as `flash_attention_varlen`'s sequence b.

    Raises:
        TypeError: as flash_attention_varlen; key_valid not a bool tensor.
        ValueError: q, k, v not 4-D or disagreeing in batch, heads or head dim; key_valid not ``[B, M]``
            or on another device; as flash_attention_varlen otherwise.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, t, dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64))
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, N, H, d] (4-D), got shape {tuple(t.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must be [B, N, H, d], "
                         "[B, M, H, d], [B, M, H, d]")
    if not isinstance(key_valid, Tensor) or key_valid.dtype != torch.bool:
        raise TypeError(f"key_valid must be a bool tensor, got "
                        f"{key_valid.dtype if isinstance(key_valid, Tensor) else type(key_valid).__name__}")
    if tuple(key_valid.shape) != tuple(k.shape[:2]):
        raise ValueError(f"key_valid must have shape {tuple(k.shape[:2])} ([B, M]), got {tuple(key_valid.shape)}")
    check_same_device("q", q, k=k, v=v, key_valid=key_valid)
    batch, n_q, heads, head_dim = q.shape
    n_k = k.shape[1]
    order, cu_q, cu_k = key_padded_layout(key_valid, n_q)
    q_packed = q.reshape(batch * n_q, heads, head_dim)
    k_packed = k.reshape(batch * n_k, heads, head_dim).index_select(0, order)
    v_packed = v.reshape(batch * n_k, heads, head_dim).index_select(0, order)
    _validate(q_packed, k_packed, v_packed, cu_q, cu_k, softmax_scale, dropout_p)
    scale = head_dim ** -0.5 if softmax_scale is None else float(softmax_scale)
    if q.dtype == torch.float64 or not runs_kernel(_attn_fwd_kernel, q):
        if dropout_p == 0:
            return reference.attention_key_padded(q, k, v, key_valid, scale)
        out = reference.attention_varlen(q_packed, k_packed, v_packed, cu_q, cu_k, scale, dropout_p=dropout_p)
        return out.view(batch, n_q, heads, head_dim)
    seed = draw_seed(q.device) if dropout_p > 0 else None
    out, _ = _flash_attention_varlen_fwd(q_packed, k_packed, v_packed, cu_q, cu_k, n_q, n_k, scale,
                                         float(dropout_p), seed, deterministic)
    return out.view(batch, n_q, heads, head_dim)
