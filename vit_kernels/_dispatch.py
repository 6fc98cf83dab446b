"""Where an op runs (DESIGN.md, "Where each op runs").

- CUDA tensors: the Triton kernel or the CUDA extension.
- CPU tensors, when the kernels were decorated under TRITON_INTERPRET=1: the same
  Triton kernel through Triton's interpreter (how CI tests kernels without a GPU).
- CPU tensors otherwise: the pure-PyTorch reference in vit_kernels/reference.py.

And how a kernel path is called: through its registered custom op while something traces
(torch.compile, torch.export, a Python dispatch mode such as FakeTensorMode), and
directly otherwise (FusedOp below).

The interpreter decision is read off the kernel object itself, not the
environment, because triton.jit picks interpreted or compiled once, when the
kernel's module is imported; the environment may have changed since.
"""

import functools
import inspect
from typing import Callable, Sequence

import torch
from triton.runtime import interpreter
from triton.runtime.interpreter import InterpretedFunction


def _mend_interpreter_index() -> bool:
    """Triton 3.6's interpreter turns a scalar tensor into a Python int (a loop bound, a range
    step) with `int(data)` of a one-element 1-D array, which NumPy 2.4 refuses ("only
    0-dimensional arrays can be converted to Python scalars"), so every kernel with a runtime
    loop bound failed under TRITON_INTERPRET beside the newest NumPy. Triton 3.8 squeezes the
    array first; this does the same where the interpreter has the old line (found in its
    source), and only there. Returns whether it mended."""
    patch_lang_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    try:
        buggy = "lambda self: int(self.handle.data))" in inspect.getsource(patch_lang_tensor)
    except (OSError, TypeError):
        return False
    if not buggy:
        return False

    def patch_lang_tensor_with_squeezed_index(tensor, scope):
        patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor_with_squeezed_index
    return True


_mend_interpreter_index()


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
        return per_sm * cuda_properties(device).multi_processor_count
    return 4


def cuda_properties(device: torch.device):
    """torch.cuda.get_device_properties, cached per device: launchers ask on every call."""
    return _cuda_properties(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_properties(index: int):
    return torch.cuda.get_device_properties(index)


def linear_compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a Linear on x computes in: autocast's when autocast is on for x's device
    (float64 excepted, as autocast leaves it alone), else x's. Custom ops are outside
    autocast's cast lists, so an op that runs a GEMM casts its operands to this itself."""
    if x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def interpreted(kernel) -> bool:
    """Whether `kernel` runs through Triton's CPU interpreter (see ops/_triton_helpers.cast_for_store)."""
    return isinstance(kernel, InterpretedFunction)


def tracing() -> bool:
    """True while torch.compile or torch.export traces, or under a Python dispatch mode
    (FakeTensorMode, make_fx, FlopCounterMode): they must see a fused op as the one
    registered custom op, with its fake implementation, not as the Triton launches inside.

    `is_compiling()` comes first: dynamo folds it to True and never reaches the C call.
    """
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


def op_or_impl(op, impl: Callable) -> Callable:
    """For a backward: `op` (a custom op) while tracing, else `impl`, the function it was made from.

    Also `op` when gradients are on, which inside a backward means create_graph=True: the
    custom op, which has no autograd of its own, then makes a double backward fail loudly
    instead of silently treating the gradient as a constant.
    """
    return op if tracing() or torch.is_grad_enabled() else impl


class FusedOp:
    """A custom op's forward, called the cheapest way that is still correct.

    The custom op (torch.library.custom_op, with `backward` registered on it) is what
    torch.compile, export and opcheck see. In eager mode the same `impl`, `setup_context`
    and `backward` run under a plain autograd.Function, or `impl` alone when no input needs
    a gradient. The custom op's dispatch and generated autograd cost about as much host time
    as everything else in a call: `scripts/host_overhead.py` (kernel launches stubbed out, a
    2-core CPU, 2026-11-22) measured add_layer_norm forward + backward at 153-161 us through
    the custom op and 86-89 us this way (eager's add + LayerNorm: 40 us), flash_attention
    133-138 -> 63-64 us, bias_gelu 84-86 -> 44-46 us. A ViT step at a small batch is
    host-bound (README, "Measured results"), so this is step time.

    Outputs at the positions in `non_differentiable` get no gradient. Gradients of unused
    outputs reach `backward` as None (not materialized zeros), so backward must accept None.
    `backward` calls its backward op through `op_or_impl`; a double backward fails there as it
    does through the custom op.
    """

    def __init__(self, op, impl: Callable, *, setup_context: Callable, backward: Callable,
                 non_differentiable: Sequence[int] = ()):
        op.register_autograd(backward, setup_context=setup_context)
        self.op, self.impl = op, impl

        def forward(ctx, *inputs):
            output = impl(*inputs)
            setup_context(ctx, inputs, output)
            ctx.set_materialize_grads(False)
            if non_differentiable:
                ctx.mark_non_differentiable(*(output[i] for i in non_differentiable))
            return output

        self.function = type("Eager" + impl.__name__, (torch.autograd.Function,), {
            "forward": staticmethod(forward),
            "backward": staticmethod(backward),
        })

    def __call__(self, *inputs):
        if tracing():
            return self.op(*inputs)
        if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
            return self.function.apply(*inputs)
        return self.impl(*inputs)
