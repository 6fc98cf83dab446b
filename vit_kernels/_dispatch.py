"""Where an op runs (docs/design.md, "Where each op runs").

- CUDA tensors: the Triton kernel or the CUDA extension.
- CPU tensors, when the kernels were decorated under TRITON_INTERPRET=1: the same
  Triton kernel through Triton's interpreter (how CI tests kernels without a GPU).
- CPU tensors otherwise: the pure-PyTorch reference in vit_kernels/reference.py.

And how an op is defined (define_op below, the one way) and called: through its registered
op while something traces (torch.compile, torch.export, a Python dispatch mode such as
FakeTensorMode), and directly otherwise (FusedOp).

The interpreter decision is read off the kernel object itself, not the
environment, because triton.jit picks interpreted or compiled once, when the
kernel's module is imported; the environment may have changed since.
"""

import contextlib
import functools
import threading
from typing import Callable, Optional, Sequence

import torch
from torch.autograd import forward_ad
from triton.runtime.interpreter import InterpretedFunction

from . import _compat  # noqa: F401  (mends the interpreter before any kernel runs)


def runs_kernel(kernel, tensor: torch.Tensor) -> bool:
    """True when `kernel` should run for `tensor`'s device, False for the reference path.

    `is_cuda`, not `device.type`: this runs for every op call (three times per block step), and
    making the torch.device costs five times the flag's read."""
    if tensor.is_cuda:
        return True
    return tensor.is_cpu and interpreted(kernel)


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


# Under torch.compile, the ops whose kernels Inductor generates faster run their reference instead,
# which Inductor fuses with its neighbours (docs/design.md, "Under torch.compile"; measured on an
# H100, benchmarks/results/nvidia-h100-2026-11-22.md): add + LayerNorm (Inductor's forward 1.15x
# ours at ViT-B, fwd+bwd even) and bias + GELU (fwd+bwd 1.37x ours at ViT-B, the op alone, wall time), with the fused MLP
# built on it; attention's forward alone (SDPA, cuDNN there, 1.17x ours). Attention that needs a
# gradient (ours 1.24x SDPA fwd+bwd) and patch embedding (ours 2.4x Inductor's) stay ours.
_INDUCTOR_GENERATES = frozenset({"add_layer_norm", "bias_gelu", "bias_gelu_linear"})


def inductor_generates(op: str, *inputs) -> bool:
    """Whether `op`, called on `inputs`, should run as its reference because torch.compile is
    tracing it and Inductor's kernels beat ours (the table above)."""
    if not torch.compiler.is_compiling():
        return False
    if op == "flash_attention":
        return not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs))
    return op in _INDUCTOR_GENERATES


class _TracedLaunches(threading.local):
    on = False


TRACED_LAUNCHES = _TracedLaunches()  # read by ops/_launcher.py on every launch


@contextlib.contextmanager
def traced_launches():
    """Triton launches inside go through torch.library.wrap_triton (ops/_launcher.py): a
    triton_op's implementation while torch.compile traces it."""
    previous, TRACED_LAUNCHES.on = TRACED_LAUNCHES.on, True
    try:
        yield
    finally:
        TRACED_LAUNCHES.on = previous


class FusedOp:
    """One registered op of vit_kernels, called the cheapest way that is still correct (made
    by `define_op`).

    The registered op (`op`) is what torch.compile, torch.export, FakeTensorMode and opcheck
    see. In eager mode the dispatcher and the registered autograd cost about as much host time
    as everything else in a call (scripts/host_overhead.py measures both ways;
    benchmarks/results/ holds the numbers), and a ViT step at a small batch is host-bound. So
    an eager call runs `impl`, the function the op was made from, directly: under a plain
    autograd.Function with the same `setup_context` and `backward` when an input needs a
    gradient, alone otherwise; for an op defined with a C++ node (ops/_nodes.CppNode), that node
    and `impl` replayed from its launch plan instead, once the extension loads.

    An op without a backward (the backward ops themselves) goes through `op` while gradients
    are on, which inside a backward means create_graph=True: the op, which has no autograd,
    then makes a double backward fail loudly instead of silently treating the gradient as a
    constant.
    """

    def __init__(self, op, impl: Callable, function=None, setup_context: Optional[Callable] = None,
                 backward: Optional[Callable] = None, node=None):
        self.op, self.impl, self.function = op, impl, function
        # For callers that run several ops under one autograd node (nn/block_step.py).
        self.setup_context, self.backward = setup_context, backward
        # What an eager call runs: with a gradient, the op as one autograd node; without, `impl`.
        # With `node` (ops/_nodes.CppNode), the extension's C++ node and `impl` through its launch
        # plan, looked up at the first call (importing vit_kernels asks for no extension).
        self.node = node
        self.apply = self._attach_then_apply if node is not None else function.apply if function else None
        self.run = self._attach_then_run if node is not None else impl
        # The op's public function in C++ (ops/_nodes.PublicEntry), once attached, where the node has one.
        self.entry = None

    def __call__(self, *inputs):
        if tracing():
            return self.op(*inputs)
        if forward_ad._current_level >= 0:  # inside forward_ad.dual_level() (torch.func.jvp makes its own)
            refuse_dual_tensors(self.op, inputs)
        if self.function is None:
            return self.op(*inputs) if torch.is_grad_enabled() else self.impl(*inputs)
        if torch.is_grad_enabled():
            for t in inputs:  # a loop, not any(generator): this runs for every op call
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    return self.apply(*inputs)
        return self.run(*inputs)

    def attach(self) -> None:
        """Looks up the C++ node again (tests do, after changing what the extension gets)."""
        apply, run, self.entry = self.node.resolve(self.impl)
        self.apply = apply or self.function.apply
        self.run = run or self.impl

    def _attach_then_apply(self, *inputs):
        self.attach()
        return self.apply(*inputs)

    def _attach_then_run(self, *inputs):
        self.attach()
        return self.run(*inputs)


def refuse_dual_tensors(op, inputs) -> None:
    """NotImplementedError where an input carries a forward-mode tangent: no op has a forward-mode
    derivative, and a kernel (or the registered op, whose autograd has none either) would return
    outputs without tangents, a jvp silently zero."""
    for t in inputs:
        if isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None:
            raise NotImplementedError(
                f"{op}: vit_kernels' fused ops have no forward-mode derivative (forward_ad, torch.func.jvp); "
                "run the model without swap_modules, or on the CPU without TRITON_INTERPRET (the "
                "reference path), for forward-mode AD")


def define_op(name: str, impl: Optional[Callable] = None, *, fake: Callable, backward: Optional[Callable] = None,
              setup_context: Optional[Callable] = None, non_differentiable: Sequence[int] = (),
              kernel=None, node=None) -> FusedOp:
    """Register `vit_kernels::<name>` and return it as a FusedOp: the one way every op is defined.

    - `impl` given: a Python custom op made from it, no mutated inputs. With `kernel` (a Triton
      kernel `impl` launches) compiled, not interpreted, it is a `torch.library.triton_op`:
      torch.compile traces `impl`, its launches recorded through wrap_triton
      (traced_launches), and Inductor launches the kernels from its own wrapper
      and captures them in its CUDA graphs. Otherwise (the interpreter, whose kernels run only on
      real tensors) a torch.library.custom_op, opaque to the compiler.
      `impl` None: the op the csrc/ extension defines with TORCH_LIBRARY (load it first); its
      eager bypass calls the op below the autograd dispatch key.
    - `fake(*inputs)`: the outputs' shapes and dtypes, for tracing.
    - `backward(ctx, *grad_outputs)` with `setup_context(ctx, inputs, output)`: its autograd,
      registered on the op and run by the eager bypass alike. Outputs at the positions in
      `non_differentiable` get no gradient; gradients of unused outputs reach `backward` as None
      (not materialized zeros). An op without `backward` is a backward op: see FusedOp.
    - `node` (ops/_nodes.CppNode): the same autograd as one C++ node, which an eager call takes
      where the extension loads; it must compute what `setup_context` and `backward` do, bit for
      bit (tests/test_op_nodes.py).
    """
    qualname = f"vit_kernels::{name}"
    if impl is None:
        op = getattr(torch.ops.vit_kernels, name)

        def impl(*inputs):
            with torch._C._AutoDispatchBelowAutograd():
                return op(*inputs)

        impl.__name__ = name
    elif kernel is not None and not interpreted(kernel):
        op = torch.library.triton_op(qualname, _with_traced_launches(impl), mutates_args=())
    else:
        op = torch.library.custom_op(qualname, impl, mutates_args=())
    torch.library.register_fake(qualname, fake)  # in place of triton_op's (impl traced): cheaper
    if backward is None:
        return FusedOp(op, impl)
    torch.library.register_autograd(qualname, backward, setup_context=setup_context)

    def forward(ctx, *inputs):
        output = impl(*inputs)
        setup_context(ctx, inputs, output)
        ctx.set_materialize_grads(False)
        if non_differentiable:
            ctx.mark_non_differentiable(*(output[i] for i in non_differentiable))
        return output

    function = type("Eager_" + name, (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(backward),
    })
    return FusedOp(op, impl, function, setup_context, backward, node)


@functools.lru_cache(maxsize=None)
def inductor_keeps_launch_options() -> bool:
    """Whether this torch's Inductor compiles a traced Triton launch with the launch's backend
    options (`enable_fp_fusion=...`; pytorch/pytorch#187028). Read off its source, not by
    importing it: importing Inductor costs seconds, and this is asked at import."""
    import os

    path = os.path.join(os.path.dirname(torch.__file__), "_inductor", "runtime", "triton_helpers.py")
    try:
        with open(path, encoding="utf-8") as source:
            return "def try_filter_backend_options_for_target" in source.read()
    except OSError:
        return False


def _with_traced_launches(impl: Callable) -> Callable:
    """`impl` with its launches recorded through wrap_triton: what a triton_op runs while traced
    (and, through the dispatcher, eagerly, where wrap_triton hands back the kernel itself)."""
    @functools.wraps(impl)
    def traced_impl(*inputs):
        if not tracing():  # called eagerly through the dispatcher (opcheck, create_graph): launch directly
            return impl(*inputs)
        with traced_launches():
            return impl(*inputs)

    return traced_impl
