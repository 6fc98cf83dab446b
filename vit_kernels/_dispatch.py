"""Where an op runs (DESIGN.md, "Where each op runs").

- CUDA tensors: the Triton kernel or the CUDA extension.
- CPU tensors, when the kernels were decorated under TRITON_INTERPRET=1: the same
  Triton kernel through Triton's interpreter (how CI tests kernels without a GPU).
- CPU tensors otherwise: the pure-PyTorch reference in vit_kernels/reference.py.

The interpreter decision is read off the kernel object itself, not the
environment, because triton.jit picks interpreted or compiled once, when the
kernel's module is imported; the environment may have changed since.
"""

import functools

import torch
from triton.runtime.interpreter import InterpretedFunction


def runs_kernel(kernel, tensor: torch.Tensor) -> bool:
    """True when `kernel` should run for `tensor`'s device, False for the reference path."""
    if tensor.device.type == "cuda":
        return True
    return tensor.device.type == "cpu" and interpreted(kernel)


def num_programs_for_reduction(device: torch.device, per_sm: int = 4) -> int:
    """How many programs share a partial-sum reduction (one float32 partial row each).

    A few waves of the GPU's SMs hides the tail; under the interpreter a handful is
    enough to exercise the two-stage reduction while keeping CPU time low.
    """
    if device.type == "cuda":
        return per_sm * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def interpreted(kernel) -> bool:
    """Whether `kernel` runs through Triton's CPU interpreter (see ops/_triton_helpers.cast_for_store)."""
    return isinstance(kernel, InterpretedFunction)
