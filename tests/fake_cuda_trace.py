"""Trace each Triton op forward and backward on fake CUDA tensors, as torch.compile's AOTAutograd
does, and print which Triton kernels the graphs call (JSON). Run without TRITON_INTERPRET on a
machine without a GPU: the kernels are compiled JITFunctions, never launched, so the ops are
triton_ops (tests/test_compile.py runs this in a subprocess).

`python tests/fake_cuda_trace.py [--dynamic]`: with --dynamic, the batch dim is symbolic.
"""

import importlib
import json
import logging
import os
import sys
import types

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
from functorch.compile import make_boxed_func  # noqa: E402
from torch._dynamo.source import ConstantSource  # noqa: E402
from torch._functorch.aot_autograd import aot_function  # noqa: E402
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.fx.experimental.symbolic_shapes import ShapeEnv  # noqa: E402

from vit_kernels import _dispatch  # noqa: E402

# No device to ask: an H100's counts. Without a CUDA driver, wrap_triton's mutation analysis
# cannot compile the kernels and assumes every argument is written (it warns; silenced).
_dispatch._cuda_properties = lambda index: types.SimpleNamespace(multi_processor_count=132, major=9, minor=0)
logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.ERROR)

attention, bias_gelu, bias_gelu_linear, layer_norm = (  # the modules, which ops/ shadows with the functions
    importlib.import_module(f"vit_kernels.ops.{name}") for name in ("attention", "bias_gelu", "bias_gelu_linear",
                                                                    "layer_norm"))


def _calls(graph_module) -> list:
    """Each Triton kernel the graph calls, by name; an opaque vit_kernels op as 'op:<name>'."""
    calls = []
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        if "triton_kernel_wrapper" in str(node.target):
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            while hasattr(kernel, "fn"):  # an Autotuner
                kernel = kernel.fn
            calls.append(kernel.__name__)
        elif "vit_kernels" in str(node.target):
            calls.append(f"op:{node.target}")
    return calls


class _Context:
    """The part of an autograd ctx that the ops' setup_context and backward use."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def _forward_and_backward(fused, n_grads, arguments):
    """fn(*tensors): the op on `arguments` with their tensors replaced by `tensors`, then its
    registered backward with ones for the first n_grads outputs."""
    def fn(*tensors):
        given = iter(tensors)
        inputs = tuple(next(given) if isinstance(a, torch.Tensor) else a for a in arguments)
        output = fused.op(*inputs)
        ctx = _Context()
        ctx.needs_input_grad = tuple(isinstance(a, torch.Tensor) for a in inputs)
        fused.setup_context(ctx, inputs, output)
        outputs = output if isinstance(output, tuple) else (output,)
        grads = [torch.ones_like(o) if i < n_grads else None for i, o in enumerate(outputs)]
        return output, fused.backward(ctx, *grads)
    return fn


def main(dynamic: bool) -> dict:
    env = ShapeEnv()
    results = {}
    with FakeTensorMode(shape_env=env):
        batch = env.create_symintnode(env.create_symbol(2, source=ConstantSource("batch")), hint=2) if dynamic else 2

        def t(*shape, dtype=torch.bfloat16):
            return torch.randn(*shape, dtype=dtype, device="cuda")

        w = t(192, dtype=torch.float32)
        cases = {
            "add_layer_norm": (layer_norm._add_layer_norm_fwd, 2,
                               (t(batch, 197, 192), t(batch, 197, 192), w, w, None, None, 1e-6, torch.bfloat16, True)),
            "bias_gelu": (bias_gelu._bias_gelu_fwd, 1, (t(batch, 197, 768), t(768), "none")),
            "bias_gelu_linear": (bias_gelu_linear._bias_gelu_linear_fwd, 1,
                                 (t(batch, 197, 768), t(768), t(192, 768), t(192), "tanh")),
            "flash_attention": (attention._flash_attention_fwd, 1,
                                (t(batch, 197, 3, 64), t(batch, 197, 3, 64), t(batch, 197, 3, 64), 0.125, 0.0, None, True)),
            "flash_attention_dropout": (attention._flash_attention_fwd, 1,
                                        (t(batch, 197, 3, 64), t(batch, 197, 3, 64), t(batch, 197, 3, 64), 0.125, 0.1,
                                         torch.zeros((), dtype=torch.int64, device="cuda"), False)),
        }
        for name, (fused, n_grads, inputs) in cases.items():
            graphs = []

            def record(graph_module, _):
                graphs.append(graph_module)
                return make_boxed_func(graph_module.forward)

            tensors = [a for a in inputs if isinstance(a, torch.Tensor)]
            aot_function(_forward_and_backward(fused, n_grads, inputs), fw_compiler=record)(*tensors)
            results[name] = _calls(graphs[0])
    return results


if __name__ == "__main__":
    print(json.dumps(main("--dynamic" in sys.argv)))
