"""Triton launches without a GPU, for measuring the host's cost of a call and for testing what
reaches Triton's launcher: shared by scripts/host_overhead.py and tests/launch_path_check.py.

`stub_out_kernels()` makes every op take its kernel path for CPU tensors with every launch a
no-op; `stub_out_kernels(triton_launch=True)` keeps Triton's own Python launch path
(JITFunction.run: argument binding and specialization, the kernel-cache key and lookup, the
grid; the autotuner's config lookup) and fakes only what needs a GPU (fake_gpu_launches).
Both change Triton and the op modules for the rest of the process: for scripts and
subprocesses, never for an import that a user makes. Run without TRITON_INTERPRET.
"""

import importlib
import os

from triton.runtime.jit import JITFunction

OP_MODULES = ("attention", "bias_gelu", "bias_gelu_linear", "layer_norm")
# Modules outside ops/ that ask runs_kernel (the one-node block step asks for its ops).
CALLER_MODULES = ("vit_kernels.nn.block_step",)


def stub_out_kernels(triton_launch: bool = False):
    """Every op's kernel path taken for CPU tensors. By default every Triton launch is a no-op
    and each attention launch gets one config (the autotuner would time configs on a GPU);
    with `triton_launch`, Triton's launch path runs up to the C launcher (fake_gpu_launches)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: interpreted kernels cannot be stubbed out")
    for name in (*(f"vit_kernels.ops.{op}" for op in OP_MODULES), *CALLER_MODULES):
        importlib.import_module(name).runs_kernel = _runs_kernel_for_any_device
    if triton_launch:
        fake_gpu_launches()
        return
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: None
    attention = importlib.import_module("vit_kernels.ops.attention")
    all_configs = attention.launch_configs
    attention.launch_configs = lambda *args, **kwargs: all_configs(*args, **kwargs)[:1]


def _runs_kernel_for_any_device(kernel, tensor) -> bool:
    """_dispatch.runs_kernel answering True for a CPU tensor too, at the host cost of its answer
    for a CUDA tensor (one attribute read): the harness times the path a GPU call takes."""
    return tensor.is_cuda or True


class _DriverWithoutGpu:
    """The three questions JITFunction.run and its binder ask the driver, answered for an sm_90 device."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


class KernelStandIn:
    """What JITFunction.run touches of a compiled kernel after its cache lookup; `launches`, when
    a list, records each C-launcher call as (kernel name, grid, the kernel's arguments)."""

    packed_metadata = ()
    launches = None

    def __init__(self, name: str):
        self.function = name  # the handle the C launcher gets: here the kernel's name

    def launch_metadata(self, grid, stream, *args):
        return None  # what Triton's returns when no launch hook is installed

    def run(self, grid_0, grid_1, grid_2, stream, function, metadata, launch_metadata, enter_hook, exit_hook, *args):
        """The C launcher (argument packing and cuLaunchKernel): not counted, only recorded."""
        if KernelStandIn.launches is not None:
            KernelStandIn.launches.append((function, (grid_0, grid_1, grid_2), args))


def fake_gpu_launches():
    """Triton's launch path up to the C launcher, without a GPU: the driver answers for an sm_90
    device, a first launch caches a stand-in instead of compiling, and the autotuner times every
    config as equal (so it keeps the first), then launches through the same path."""
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner

    driver.set_active(_DriverWithoutGpu())

    def cache_stand_in(self, key, signature, device, constexprs, options, attrs, warmup):
        stand_in = self.device_caches[device][0][key] = KernelStandIn(self.fn.__name__)
        return stand_in

    JITFunction._do_compile = cache_stand_in
    Autotuner._bench = lambda self, *args, config, **meta: [1.0, 1.0, 1.0]
