# The second stage of a deterministic column reduction: a backward's parameter gradients
# (add + LayerNorm's dweight, dbias and dgamma; bias + GELU's dbias) come from float32 partial
# rows, one per first-stage program, and this kernel sums each gradient's rows in a fixed order
# and stores the sum in the parameter's dtype.
#
# Why a kernel, not `partials.sum(0).to(dtype)`: that is two aten launches per gradient (a
# reduction and a cast), each a dispatcher call and an allocation on the host; this is one
# Triton launch for all of an op's gradients, replayed from the op's launch plan (ops/_plans.py),
# and at a ViT's batch sizes the step is host-bound.
#
# Layout: partials [n_slabs, n_partials, n_cols] float32, contiguous, a slab per gradient; each
# output [n_cols] contiguous, any float dtype. Summing order: each lane of a
# [BLOCK_P, BLOCK_N] accumulator adds its rows in order, then one tree sum over BLOCK_P: the same
# on every run (no atomics), so gradients are bitwise reproducible.

import functools
from typing import Optional, Sequence

import triton
import triton.language as tl
from torch import Tensor

from .._dispatch import interpreted
from ._launcher import launcher_for
from ._triton_helpers import LAUNCH_OPTIONS, cast_for_store, cdiv, next_power_of_2


@triton.jit
def _partial_row_sums_kernel(
    PARTIALS,
    OUT0,
    OUT1,
    OUT2,
    n_partials,
    n_cols,
    SLAB0: tl.constexpr,
    SLAB1: tl.constexpr,
    SLAB2: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    RNE_BF16_IN_SOFTWARE: tl.constexpr,
):
    """A column block of one gradient: the sum of its slab's first n_partials rows. Program axis 1
    picks the slab; SLABk says which slab OUTk takes (-1: OUTk is not given)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    slab = tl.program_id(1)
    base = PARTIALS + slab.to(tl.int64) * n_partials * n_cols
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for start in range(0, n_partials, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        mask = (rows < n_partials)[:, None] & col_mask[None, :]
        acc += tl.load(base + rows.to(tl.int64)[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
    total = tl.sum(acc, axis=0)
    if SLAB0 >= 0:
        if slab == SLAB0:
            tl.store(OUT0 + cols, cast_for_store(total, OUT0.dtype.element_ty, RNE_BF16_IN_SOFTWARE), mask=col_mask)
    if SLAB1 >= 0:
        if slab == SLAB1:
            tl.store(OUT1 + cols, cast_for_store(total, OUT1.dtype.element_ty, RNE_BF16_IN_SOFTWARE), mask=col_mask)
    if SLAB2 >= 0:
        if slab == SLAB2:
            tl.store(OUT2 + cols, cast_for_store(total, OUT2.dtype.element_ty, RNE_BF16_IN_SOFTWARE), mask=col_mask)


@functools.lru_cache(maxsize=None)
def partial_sums_config(n_cols: int, interpreted_kernel: bool) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_N, num_warps). GPU: 32 columns a program, so that a ViT's D gives a few dozen
    programs per gradient, each reading its partial rows 128 at a time (a [128, 32] float32
    accumulator: 32 registers a thread at 4 warps). Interpreter: one program per gradient, 4
    partial rows (num_programs_for_reduction's count there) a tile. Not from the count of partial
    rows: under torch.compile with a symbolic batch it is symbolic, and a constexpr must not be."""
    if interpreted_kernel:
        return 4, next_power_of_2(n_cols), 4
    return 128, min(32, next_power_of_2(n_cols)), 4


def sum_partial_rows(partials: Tensor, n_partials: int, outs: Sequence[Optional[Tensor]]) -> None:
    """outs[k] = the sum of the first n_partials rows of its slab of `partials`, in outs[k]'s dtype,
    for the up to three outs given; the given ones take the slabs in order. n_partials 0 writes
    zeros (a batch without rows)."""
    if len(outs) > 3:
        raise ValueError(f"sum_partial_rows takes at most three outputs, got {len(outs)}")
    given = [out for out in outs if out is not None]
    if not given:
        return
    out0, out1, out2 = (*outs, None, None)[:3]
    slabs, next_slab = [], 0
    for out in (out0, out1, out2):
        slabs.append(next_slab if out is not None else -1)
        next_slab += out is not None
    n_cols = given[0].shape[0]
    interpreted_kernel = interpreted(_partial_row_sums_kernel)
    block_p, block_n, num_warps = partial_sums_config(n_cols, interpreted_kernel)
    launcher_for(_partial_row_sums_kernel).call(
        (cdiv(n_cols, block_n), len(given)),
        partials,
        out0,
        out1,
        out2,
        n_partials,
        n_cols,
        SLAB0=slabs[0],
        SLAB1=slabs[1],
        SLAB2=slabs[2],
        BLOCK_P=block_p,
        BLOCK_N=block_n,
        RNE_BF16_IN_SOFTWARE=interpreted_kernel,
        num_warps=num_warps,
        **LAUNCH_OPTIONS,
    )
