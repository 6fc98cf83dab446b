"""The two ways a fused op is called (vit_kernels/_dispatch.py, FusedOp): an eager call runs
the op's implementation under a plain autograd.Function (or alone without gradients);
whatever traces (torch.compile, export, make_fx, fake tensors) sees the registered custom
op. Both must compute the same bits, and each must really be the path taken."""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from vit_kernels import _dispatch
from vit_kernels.ops import add_layer_norm, bias_gelu, bias_gelu_linear, flash_attention
from vit_kernels.testing import kernel_device


def _layer_norm_case(device):
    x, residual = (torch.randn(2, 7, 96, device=device, requires_grad=True) for _ in range(2))
    weight, bias = (torch.randn(96, device=device, requires_grad=True) for _ in range(2))

    def public(*inputs):
        return add_layer_norm(*inputs)

    def custom_op(*inputs):
        y, h, _ = torch.ops.vit_kernels.add_layer_norm_fwd(*inputs, None, None, 1e-6, torch.float32, True)
        return y, h

    return (x, residual, weight, bias), public, custom_op, ("add_layer_norm_fwd", "add_layer_norm_bwd")


def _attention_case(device):
    q, k, v = (torch.randn(2, 17, 2, 32, device=device, requires_grad=True) for _ in range(3))

    def public(*inputs):
        return (flash_attention(*inputs),)

    def custom_op(*inputs):
        return (torch.ops.vit_kernels.flash_attention_fwd(*inputs, 32 ** -0.5, 0.0, None, True)[0],)

    return (q, k, v), public, custom_op, ("flash_attention_fwd", "flash_attention_bwd")


def _bias_gelu_case(device):
    x = torch.randn(5, 3, 100, device=device, requires_grad=True)
    bias = torch.randn(100, device=device, requires_grad=True)

    def public(*inputs):
        return (bias_gelu(*inputs),)

    def custom_op(*inputs):
        return (torch.ops.vit_kernels.bias_gelu_fwd(*inputs, "none"),)

    return (x, bias), public, custom_op, ("bias_gelu_fwd", "bias_gelu_bwd")


def _bias_gelu_linear_case(device):
    x = torch.randn(9, 128, device=device, requires_grad=True)
    bias = torch.randn(128, device=device, requires_grad=True)
    weight = torch.randn(40, 128, device=device, requires_grad=True)
    linear_bias = torch.randn(40, device=device, requires_grad=True)

    def public(*inputs):
        return (bias_gelu_linear(*inputs),)

    def custom_op(*inputs):
        return (torch.ops.vit_kernels.bias_gelu_linear_fwd(*inputs, "none"),)

    return (x, bias, weight, linear_bias), public, custom_op, ("bias_gelu_linear_fwd", "bias_gelu_linear_bwd")


CASES = {
    "add_layer_norm": _layer_norm_case,
    "flash_attention": _attention_case,
    "bias_gelu": _bias_gelu_case,
    "bias_gelu_linear": _bias_gelu_linear_case,
}


def _outputs_and_grads(fn, inputs, douts=None):
    outputs = fn(*inputs)
    if douts is None:
        douts = [torch.randn_like(o) for o in outputs]
    grads = torch.autograd.grad(outputs, inputs, douts)
    return outputs, grads, douts


@pytest.mark.parametrize("op", list(CASES))
def test_eager_path_is_taken_and_matches_the_custom_op_bitwise(seed, op):
    inputs, public, custom_op, _ = CASES[op](kernel_device())
    outputs, grads, douts = _outputs_and_grads(public, inputs)
    # The eager autograd.Function or C++ node (ops/_nodes.py), not the custom op's generated one,
    # made the outputs.
    grad_fn = outputs[0].grad_fn
    assert (type(grad_fn).__name__.startswith("Eager")
            or grad_fn.name().startswith("vit_kernels::")), grad_fn.name()
    op_outputs, op_grads, _ = _outputs_and_grads(custom_op, inputs, douts)
    assert not type(op_outputs[0].grad_fn).__name__.startswith("Eager")
    for got, want in zip(outputs + grads, op_outputs + op_grads):
        assert torch.equal(got, want)


@pytest.mark.parametrize("op", list(CASES))
def test_forward_mode_ad_is_refused_not_silently_dropped(seed, op):
    """A kernel returns no tangent: a dual input must raise, with gradients on or off, never
    give a jvp of zero. A plain input inside a dual level runs as usual."""
    import torch.autograd.forward_ad as fwAD

    inputs, public, _, _ = CASES[op](kernel_device())
    plain = [t.detach() for t in inputs]
    with fwAD.dual_level():
        dual = [fwAD.make_dual(plain[0], torch.randn_like(plain[0])), *plain[1:]]
        for grad in (False, True):
            with torch.set_grad_enabled(grad), pytest.raises(NotImplementedError, match="forward-mode"):
                public(*dual)
        public(*plain)


@pytest.mark.parametrize("op", list(CASES))
def test_without_gradients_the_implementation_runs_alone(seed, op):
    inputs, public, _, _ = CASES[op](kernel_device())
    with torch.no_grad():
        outputs = public(*inputs)
    assert all(o.grad_fn is None for o in outputs)
    for got, want in zip(outputs, public(*inputs)):
        assert torch.equal(got, want.detach())


@pytest.mark.parametrize("op", list(CASES))
def test_tracing_sees_the_custom_ops(seed, op):
    """make_fx (a Python dispatch mode, as AOTAutograd and export use) records the forward and
    backward custom ops, not the Triton launches inside them."""
    inputs, public, _, (fwd_name, bwd_name) = CASES[op](kernel_device())

    def forward_and_backward(*inputs):
        outputs = public(*inputs)
        return torch.autograd.grad(outputs, inputs, [torch.ones_like(o) for o in outputs])

    graph = make_fx(forward_and_backward)(*inputs)
    called = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert f"vit_kernels.{fwd_name}.default" in called, called
    assert f"vit_kernels.{bwd_name}.default" in called, called


@pytest.mark.inductor
@pytest.mark.parametrize("op", list(CASES))
def test_torch_compile_graph_holds_the_custom_op(seed, op):
    """Dynamo must record the custom op, not trace into the eager autograd.Function and its
    Triton launches; except for the ops Inductor generates faster (_dispatch.inductor_generates),
    whose reference it records (inputs needing gradients, as here)."""
    inputs, public, _, (fwd_name, _) = CASES[op](kernel_device())
    called = set()

    def record(graph_module, example_inputs):
        called.update(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module

    torch._dynamo.reset()
    torch.compile(public, backend=record, fullgraph=True)(*inputs)
    ours = any(f"vit_kernels.{fwd_name}" in target for target in called)
    assert ours == (op not in _dispatch._INDUCTOR_GENERATES), called


@pytest.mark.parametrize("op", list(CASES))
def test_double_backward_fails_loudly(seed, op):
    """No op has a second derivative: differentiating a gradient must raise, as it does
    through the custom ops, never treat the gradient as a constant (a gradient penalty
    would silently lose its term)."""
    inputs, public, _, _ = CASES[op](kernel_device())
    outputs = public(*inputs)
    grads = torch.autograd.grad(outputs, inputs, [torch.randn_like(o) for o in outputs], create_graph=True)
    assert grads[0].requires_grad
    with pytest.raises(RuntimeError, match="no autograd formula|once differentiable"):
        grads[0].square().sum().backward()


def test_sanitize_script_runs_every_kernel():
    """scripts/sanitize_kernels.py is what gpu_check.sh's sanitize stage runs under
    compute-sanitizer: on the CPU (the interpreter, each attention kind's first config) it must
    run every op forward and backward, so that a lease does not spend its minutes on a broken
    script."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "sanitize_kernels.py"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, str(script), "--attention-configs", "first"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "36 forward + backward calls ran" in out.stdout, out.stdout


@pytest.mark.parametrize("triton_launch", [False, True], ids=["stubbed", "triton_launch_path"])
def test_host_overhead_script_runs_both_ways(triton_launch):
    """--triton-launch keeps Triton's Python launch path (its driver, compile and C launcher
    faked): it must run every op and ViT mode too, and say which Triton it measured."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "host_overhead.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    flags = ["--triton-launch"] if triton_launch else []
    out = subprocess.run([sys.executable, str(script), "--reps", "70", *flags], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert ("launch path kept" in out.stdout) is triton_launch, out.stdout
    for row in ("add_layer_norm", "flash_attention", "bias_gelu", "train step", "inference", "transformers swapped"):
        assert row in out.stdout, out.stdout


def test_every_autotuned_attention_kernel_takes_its_tuning_key():
    """ops/_tuning.launch reads the autotune key's values by parameter name: each tuned kernel
    must have every name of attention.TUNING_KEY as a parameter."""
    from vit_kernels.ops import attention

    for kernel in (attention._attn_fwd_kernel, attention._attn_bwd_dq_kernel, attention._attn_bwd_dkdv_kernel):
        params = inspect.signature(kernel.fn).parameters
        assert set(attention.TUNING_KEY) <= set(params), (kernel.fn.__name__, attention.TUNING_KEY)


def _old_patch_lang_tensor(tensor, scope):
    # The line as Triton 3.6's interpreter has it (runtime/interpreter.py, _patch_lang_tensor).
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))


def test_interpreter_index_mended_where_its_int_of_a_1d_array_fails(monkeypatch):
    """Triton 3.6's interpreter indexes with int() of a one-element 1-D array, which NumPy 2.4
    refuses: _compat swaps in the squeezed form where (and only where) that line is found."""
    import numpy as np
    from triton.runtime import interpreter

    from vit_kernels import _compat

    assert not _compat.mend_interpreter_index(), "the installed Triton's interpreter needed no mending"
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", _old_patch_lang_tensor)
    assert _compat.mend_interpreter_index()
    assert interpreter._patch_lang_tensor is not _old_patch_lang_tensor

    class Scope:
        def set_attr(self, obj, name, value):
            setattr(obj, name, value)

    class Tensor:
        def __init__(self, data):
            self.handle = type("Handle", (), {"data": data})()

    interpreter._patch_lang_tensor(Tensor, Scope())
    assert list(range(Tensor(np.array([3], dtype=np.int32)))) == [0, 1, 2]
    assert not _compat.mend_interpreter_index(), "mended once: the line is gone"


@pytest.mark.parametrize("signature", ["tuple", "bytes"])
def test_checks_run_once_per_signature_and_every_time_they_fail(monkeypatch, signature):
    """_validate.checked_once: a passed signature (types, shapes, strides, dtypes, devices, other
    values with their types) is not checked again; a failing one is, every call; so is every call
    while something traces, and one whose arguments have no hashable signature. With the tuple
    signature, and with the extension's bytes signature (csrc/launch_plan.cpp) in front of it."""
    from vit_kernels import _validate
    from vit_kernels.ops import _nodes

    if signature == "bytes":
        if _nodes.extension() is None:
            pytest.skip(f"no C++ extension: {_nodes.unavailable()}")
        monkeypatch.setattr(_validate.FAST_SIGNATURE, "function", _nodes.extension().check_signature)
    else:
        monkeypatch.setattr(_validate.FAST_SIGNATURE, "function", None)

    calls = []

    @_validate.checked_once
    def check(x, scale):
        calls.append(scale)
        if not isinstance(scale, float):
            raise TypeError("scale must be a float")

    x = torch.randn(2, 3)
    check(x, 1.0)
    check(x, 1.0)
    check(torch.randn(2, 3), 1.0)  # another tensor, same signature
    assert len(calls) == 1
    for other in (x.t(), x.double(), torch.randn(3, 2)):  # strides, dtype, shape
        check(other, 1.0)
    assert len(calls) == 4
    for _ in range(2):
        with pytest.raises(TypeError):
            check(x, True)  # True == 1.0 and hashes alike: the type keeps it apart
    assert len(calls) == 6
    with pytest.raises(TypeError):
        check(x, [1.0])  # unhashable: checked, and refused
    monkeypatch.setattr(_validate, "tracing", lambda: True)
    check(x, 1.0)
    assert len(calls) == 8


def test_runs_kernel_by_device():
    """runs_kernel reads the device flags: a CUDA tensor always runs the kernel, a CPU tensor only
    through the interpreter, any other device (meta here) never."""
    from vit_kernels.ops import layer_norm

    kernel = layer_norm._add_layer_norm_fwd_kernel
    assert _dispatch.runs_kernel(kernel, torch.empty(1)) == _dispatch.interpreted(kernel)
    assert not _dispatch.runs_kernel(kernel, torch.empty(1, device="meta"))
    fake_cuda = type("FakeCuda", (), {"is_cuda": True, "is_cpu": False})()
    assert _dispatch.runs_kernel(kernel, fake_cuda)
