"""Helpers shared by the op files: Triton device functions and host-side layout helpers."""

import triton
import triton.language as tl
from typing import Optional

from torch import Tensor


# Options passed to every launch. enable_fp_fusion: Triton contracts `a * b + c` into one FMA by
# default through 3.9, which warns (UserWarning, at the first compile in a process) that the
# default turns off in 3.10; the kernels were written and measured with it on, and fewer
# roundings only help the numerics rule. Where an FMA is the point, the kernels say tl.fma.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host code. triton.cdiv and triton.next_power_of_2 are constexpr
    functions since triton 3.4: callable on the host, but each call unwraps its arguments
    through Triton's frontend (~2 us), and a launch computes several."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), for host code (see cdiv)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def as_rows(t: Tensor, n_cols: int) -> Tensor:
    """A [rows, n_cols] view of t whose last dim is contiguous (a copy only if no such view exists)."""
    t2 = t.reshape(-1, n_cols)
    return t2 if t2.stride(-1) == 1 or t2.shape[0] == 0 else t2.contiguous()


def as_dtype(t: Optional[Tensor], dtype) -> Optional[Tensor]:
    """``t.to(dtype)`` (None stays None), without the call when t has the dtype already: the call
    returns t itself then, but its argument parsing costs the host a few us, many times a step."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def as_row_pointer(t: Tensor, n_cols: int) -> tuple[Tensor, int]:
    """(tensor, row stride) for a kernel that reads rows of n_cols from a base pointer: t itself
    when contiguous (a view would cost the host ~0.5 us and the kernel reads the same memory),
    else as_rows(t) and its row stride."""
    if t.is_contiguous():
        return t, n_cols
    t2 = as_rows(t, n_cols)
    return t2, t2.stride(0)


@triton.jit
def cast_for_store(x, dtype: tl.constexpr, RNE_BF16_IN_SOFTWARE: tl.constexpr):
    """x (float32) rounded to `dtype` for a store, round-to-nearest-even.

    On the GPU `.to(tl.bfloat16)` already rounds to nearest even. Triton's CPU
    interpreter (seen in 3.9) truncates float32 -> bfloat16 instead, which is a full
    bf16 ulp of error and fails the numerics rule; with RNE_BF16_IN_SOFTWARE (set by
    the launchers for interpreted kernels only) the rounding is done on the bits:
    add 0x7FFF plus the lowest kept bit, clear the low half. NaN is passed through
    (the addition could carry a NaN's payload into the sign bit).
    """
    if RNE_BF16_IN_SOFTWARE and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x != x, x, rounded.to(tl.float32, bitcast=True))
    return x.to(dtype)
