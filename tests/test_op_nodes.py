"""The per-op C++ autograd nodes (csrc/op_nodes.cpp) against the Python autograd they replace.

An eager call of add_layer_norm, flash_attention or bias_gelu_linear with a gradient runs as one C++
node where the extension loads (ops/_nodes.CppNode), and without one through its launch plan. A node must save
and compute what its op's `_setup_context` and `_backward` do, with the same roundings: here every
output and gradient of the two is compared bit for bit, over the ops' variants, on fresh inputs.
(The numerics rule itself is held by tests/test_layer_norm.py, tests/test_attention.py and
tests/test_bias_gelu_linear.py, which run the nodes too.)
"""

import importlib
import itertools

import pytest
import torch

from vit_kernels.ops import _nodes, add_layer_norm, bias_gelu_linear, flash_attention
from vit_kernels.ops import attention as attention_ops
from vit_kernels.ops import layer_norm as layer_norm_ops
from vit_kernels.testing import kernel_device

DEVICE = kernel_device()
OP = layer_norm_ops._add_layer_norm_fwd
ATTENTION = attention_ops._flash_attention_fwd
# By module path: the package's `bias_gelu_linear` is the function of that name.
MLP = importlib.import_module("vit_kernels.ops.bias_gelu_linear")._bias_gelu_linear_fwd
OPS = (OP, ATTENTION, MLP)


@pytest.fixture
def node():
    """The ops' C++ nodes attached; skips where the extension cannot be loaded."""
    if _nodes.extension() is None:
        pytest.skip(f"no C++ extension: {_nodes.unavailable()}")
    for op in OPS:
        op.attach()
        assert op.apply is not op.function.apply
    yield
    for op in OPS:
        op.attach()


def _inputs(dtype, residual, gamma, row_scale, affine, residual_dtype=None):
    batch, tokens, hidden = 3, 7, 48
    x = torch.randn(batch, tokens, hidden, dtype=dtype, device=DEVICE)
    inputs = {
        "x": x,
        "residual": (torch.randn(batch, tokens, hidden, device=DEVICE) + 0.5).to(residual_dtype or dtype) if residual else None,
        "weight": (1 + 0.5 * torch.randn(hidden, device=DEVICE)) if affine else None,
        "bias": 0.5 * torch.randn(hidden, device=DEVICE) if affine else None,
        "gamma": (0.1 + torch.rand(hidden, device=DEVICE)).to(dtype) if gamma else None,
        "row_scale": (torch.tensor([0.0, 2.0, 1.0], device=DEVICE)).to(dtype) if row_scale else None,
    }
    return inputs


def _run(inputs, grads, frozen=(), **kwargs):
    """(outputs, gradients by name) of add_layer_norm on fresh leaves; `grads` (dy, dh) may hold None."""
    leaves = {name: (t.detach().clone().requires_grad_(name != "row_scale" and name not in frozen)
                     if t is not None else None) for name, t in inputs.items()}
    y, h = add_layer_norm(**leaves, **kwargs)
    outputs = [o for o, g in zip((y, h), grads) if g is not None]
    torch.autograd.backward(outputs, [g for g in grads if g is not None])
    return (y.detach(), h.detach()), {name: t.grad for name, t in leaves.items() if t is not None}


def _python_autograd(monkeypatch):
    for op in OPS:
        monkeypatch.setattr(op, "apply", op.function.apply)
        monkeypatch.setattr(op, "run", op.impl)
        monkeypatch.setattr(op, "entry", None)  # else a remembered public call would still take the node


VARIANTS = list(itertools.product([torch.float32, torch.bfloat16], [False, True], [False, True], [False, True]))


@pytest.mark.parametrize("dtype,residual,gamma,row_scale", VARIANTS)
def test_the_node_equals_the_python_autograd(node, monkeypatch, dtype, residual, gamma, row_scale):
    inputs = _inputs(dtype, residual, gamma, row_scale, affine=True)
    grads = (torch.randn_like(inputs["x"]), torch.randn_like(inputs["x"]))
    got = _run(inputs, grads)
    _python_autograd(monkeypatch)
    want = _run(inputs, grads)
    _assert_equal(got, want)


@pytest.mark.parametrize("case", ["residual_in_fp32", "fp32_residual", "no_affine", "frozen", "dy_only", "dh_only",
                                  "strided"])
def test_the_node_equals_the_python_autograd_in_its_corners(node, monkeypatch, case):
    kwargs, frozen = {}, ()
    inputs = _inputs(torch.bfloat16, residual=True, gamma=case != "no_affine", row_scale=False,
                     affine=case != "no_affine", residual_dtype=torch.float32 if case == "fp32_residual" else None)
    if case == "residual_in_fp32":
        kwargs["residual_in_fp32"] = True
    if case == "frozen":
        frozen = ("weight", "residual")
    if case == "strided":  # rows read in place at a row stride
        inputs["x"] = torch.randn(3, 7, 96, dtype=torch.bfloat16, device=DEVICE)[..., :48]
    x = inputs["x"]
    dy = torch.randn(x.shape, dtype=x.dtype, device=DEVICE)
    dh = torch.randn(x.shape, dtype=torch.float32 if case in ("residual_in_fp32", "fp32_residual") else x.dtype,
                     device=DEVICE)
    grads = (None if case == "dh_only" else dy, None if case == "dy_only" else dh)
    got = _run(inputs, grads, frozen, **kwargs)
    _python_autograd(monkeypatch)
    want = _run(inputs, grads, frozen, **kwargs)
    _assert_equal(got, want)
    if frozen:
        assert set(got[1]) == set(want[1])


def test_h_new_is_x_itself_when_nothing_is_added(node):
    """No residual, no scale, no cast: h_new is x (the node's second output is an empty tensor)."""
    inputs = _inputs(torch.float32, residual=False, gamma=False, row_scale=False, affine=True)
    x = inputs["x"].requires_grad_()
    y, h = add_layer_norm(x, None, inputs["weight"], inputs["bias"])
    assert h is x and y.grad_fn is not None


def test_a_double_backward_raises(node):
    inputs = _inputs(torch.float32, residual=True, gamma=False, row_scale=False, affine=True)
    x, residual = (inputs[n].requires_grad_() for n in ("x", "residual"))
    y, _ = add_layer_norm(x, residual, inputs["weight"], inputs["bias"])
    (dx,) = torch.autograd.grad(y, x, torch.randn_like(y), create_graph=True)
    assert dx.requires_grad  # never a constant: a gradient penalty would silently lose its term
    with pytest.raises(RuntimeError, match="once differentiable"):
        dx.sum().backward()


def test_stats_get_no_gradient_and_saved_tensor_hooks_see_the_saves(node):
    inputs = _inputs(torch.float32, residual=True, gamma=True, row_scale=False, affine=True)
    leaves = {n: t.requires_grad_() for n, t in inputs.items() if t is not None}
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        y, h, stats = OP(leaves["x"], leaves["residual"], leaves["weight"], leaves["bias"], leaves["gamma"], None,
                         1e-6, torch.float32, True)
    assert not stats.requires_grad and y.requires_grad and h.requires_grad
    assert len(packed) == 6  # x (with gamma), h_new, weight, bias, gamma, stats
    torch.autograd.backward((y, h), (torch.randn_like(y), torch.randn_like(h)))


def test_without_the_extension_the_python_autograd_runs(monkeypatch):
    monkeypatch.setattr(_nodes, "_loaded", "no extension here")
    OP.attach()
    try:
        assert OP.apply == OP.function.apply and OP.run is OP.impl and OP.entry is None
        inputs = _inputs(torch.float32, residual=True, gamma=False, row_scale=False, affine=True)
        x = inputs["x"].requires_grad_()
        y, _ = add_layer_norm(x, inputs["residual"], inputs["weight"], inputs["bias"])
        assert type(y.grad_fn).__name__.startswith("Eager_add_layer_norm_fwd")
    finally:
        monkeypatch.undo()
        OP.attach()


def _public_args(inputs, eps=1e-6, residual_in_fp32=False):
    """add_layer_norm's eight arguments in the order its PublicEntry takes them."""
    return (inputs["x"], inputs["residual"], inputs["weight"], inputs["bias"], eps, inputs["gamma"],
            inputs["row_scale"], residual_in_fp32)


@pytest.fixture
def python_runs(monkeypatch):
    """A list that gets an entry each time add_layer_norm's Python (its check) runs."""
    runs = []
    validate = layer_norm_ops._validate

    def counted(*args):
        runs.append(args)
        validate(*args)

    monkeypatch.setattr(layer_norm_ops, "_validate", counted)
    return runs


@pytest.mark.parametrize("dtype,residual,gamma,row_scale", VARIANTS)
@pytest.mark.parametrize("case", ["grad", "residual_in_fp32", "no_grad"])
def test_a_remembered_public_call_skips_the_python_and_equals_it(node, monkeypatch, python_runs, dtype, residual,
                                                                 gamma, row_scale, case):
    """add_layer_norm's PublicEntry (ops/_nodes.py, csrc/op_nodes.cpp): a signature's first call runs
    the Python and remembers the call; a later one goes to the node from C++, without the Python, and
    its outputs and gradients are bit-equal to the Python's, h_new x itself where nothing is added."""
    inputs = _inputs(dtype, residual, gamma, row_scale, affine=True)
    kwargs = {"residual_in_fp32": True} if case == "residual_in_fp32" else {}
    grads = (torch.randn(3, 7, 48, dtype=dtype, device=DEVICE),
             torch.randn(3, 7, 48, dtype=torch.float32 if case == "residual_in_fp32" else
                         (inputs["residual"] if residual else inputs["x"]).dtype, device=DEVICE))
    if case == "no_grad":
        with torch.no_grad():
            add_layer_norm(**inputs, **kwargs)
            runs = len(python_runs)
            got = add_layer_norm(**inputs, **kwargs)
            assert len(python_runs) == runs and not got[0].requires_grad
            monkeypatch.setattr(OP, "entry", None)
            want = add_layer_norm(**inputs, **kwargs)
            assert len(python_runs) == runs + 1
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and torch.equal(a, b)
        if not (residual or gamma or row_scale):
            assert got[1] is inputs["x"]
        return
    _run(inputs, grads, **kwargs)
    runs = len(python_runs)
    assert OP.entry.call(*_public_args(inputs, **kwargs)) is not None
    got = _run(inputs, grads, **kwargs)
    assert len(python_runs) == runs  # the node, from C++
    _python_autograd(monkeypatch)
    want = _run(inputs, grads, **kwargs)
    assert len(python_runs) == runs + 1
    _assert_equal(got, want)


def test_what_the_public_entry_leaves_to_the_python(node, python_runs):
    """Where the signature cannot tell that the Python would reach the node, the entry returns None and
    the Python runs: an unseen signature (a bad argument there still raises), eps not a float, a Tensor
    subclass, a Python dispatch mode, forward-mode AD, a functorch transform."""
    from torch.autograd import forward_ad
    from torch.utils._python_dispatch import TorchDispatchMode

    inputs = _inputs(torch.float32, residual=True, gamma=False, row_scale=False, affine=True)
    args = _public_args(inputs)
    add_layer_norm(*args[:5])
    assert OP.entry.call(*args) is not None
    with pytest.raises(ValueError, match="weight must have shape"):
        add_layer_norm(inputs["x"], inputs["residual"], inputs["weight"][:-1], inputs["bias"])
    with pytest.raises(TypeError, match="bias must have dtype"):
        add_layer_norm(inputs["x"], inputs["residual"], inputs["weight"], inputs["bias"].int())
    assert OP.entry.call(*_public_args(inputs, eps=0)) is None  # the Python hands the body float(eps)
    want = add_layer_norm(*args[:4], 0.0)
    got = add_layer_norm(*args[:4], 0)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

    class Subclass(torch.Tensor):
        pass

    assert OP.entry.call(inputs["x"].as_subclass(Subclass), *args[1:]) is None

    class Recording(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Recording() as mode:
        assert OP.entry.call(*args) is None
        add_layer_norm(*args[:5])
    assert "vit_kernels.add_layer_norm_fwd.default" in mode.ops, mode.ops

    with forward_ad.dual_level():
        dual = forward_ad.make_dual(inputs["x"], torch.randn_like(inputs["x"]))
        with pytest.raises(NotImplementedError, match="forward-mode"):
            add_layer_norm(dual, *args[1:5])

    seen = []

    def probe(x):
        # What the entry reads: functorch's dispatch key is on inside any transform.
        seen.append((torch._C._dispatch_tls_is_dispatch_key_included(
            torch._C.DispatchKey.FuncTorchDynamicLayerFrontMode), OP.entry.call(x, *args[1:])))
        return x.sum()

    torch.func.grad(probe)(inputs["x"])
    assert seen == [(True, None)]
    calls = len(python_runs)
    add_layer_norm(*args[:5])
    assert len(python_runs) == calls  # all of it left the signature remembered


def test_the_public_entry_forgets_past_its_bound(node, python_runs):
    """Its table holds 64 signatures; the 65th clears it, and the calls it held run the Python again
    (and are remembered again), each still right."""
    weight, bias = torch.randn(80, device=DEVICE), torch.randn(80, device=DEVICE)

    def call(hidden):
        x = torch.randn(1, hidden, device=DEVICE)
        y, h = add_layer_norm(x, None, weight[:hidden], bias[:hidden])
        torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (hidden,), weight[:hidden], bias[:hidden],
                                                                     1e-6), rtol=1e-5, atol=1e-5)
        assert h is x

    with torch.no_grad():
        for hidden in range(1, 66):
            call(hidden)
        runs = len(python_runs)
        call(65)
        assert len(python_runs) == runs  # remembered since the table was cleared
        call(1)
        assert len(python_runs) == runs + 1  # forgotten with the others
        call(1)
        assert len(python_runs) == runs + 1


@pytest.mark.inductor
def test_torch_compile_traces_the_python_of_a_remembered_call(node):
    """Dynamo sees the public function's Python (is_compiling() first), so a remembered signature
    compiles as any other: to the reference, which Inductor generates (_dispatch.inductor_generates)."""
    inputs = _inputs(torch.float32, residual=True, gamma=False, row_scale=False, affine=True)
    args = _public_args(inputs)[:5]
    add_layer_norm(*args)
    assert OP.entry.call(*_public_args(inputs)) is not None
    called = set()

    def record(graph_module, example_inputs):
        called.update(str(n.target) for n in graph_module.graph.nodes if n.op == "call_function")
        return graph_module

    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: add_layer_norm(*a), backend=record, fullgraph=True)
    got = compiled(*args)
    assert not any("vit_kernels" in target for target in called), called
    want = add_layer_norm(*args)
    torch.testing.assert_close(got, want)


def _assert_equal(got, want, output_names=("y", "h_new")):
    """(outputs, gradients by name) bit-equal, dtypes included."""
    for name, a, b in zip(output_names, got[0], want[0], strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name
    assert set(got[1]) == set(want[1])
    for name in want[1]:
        a, b = got[1][name], want[1][name]
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b), name


@pytest.mark.parametrize("dtype,dropout_p,deterministic,frozen", [
    (torch.float32, 0.0, True, ""), (torch.bfloat16, 0.0, False, ""), (torch.float16, 0.2, True, ""),
    (torch.bfloat16, 0.2, False, "k"), (torch.float32, 0.0, False, "qv"),
])
def test_the_attention_node_equals_the_python_autograd(node, monkeypatch, dtype, dropout_p, deterministic, frozen):
    """Dropout masks are drawn from torch's generator, seeded alike for both runs."""
    q, k, v = (torch.randn(2, 9, 2, 16, dtype=dtype, device=DEVICE) for _ in range(3))
    dout = torch.randn_like(q)

    def run():
        leaves = [t.detach().clone().requires_grad_(name not in frozen) for name, t in zip("qkv", (q, k, v))]
        torch.manual_seed(7)
        out = flash_attention(*leaves, dropout_p=dropout_p, deterministic=deterministic)
        out.backward(dout)
        return out.detach(), [t.grad for t in leaves]

    got = run()
    _python_autograd(monkeypatch)
    want = run()
    assert torch.equal(got[0], want[0])
    for name, a, b in zip("qkv", got[1], want[1]):
        assert (a is None) == (b is None)
        if a is None:
            continue
        assert a.dtype == b.dtype and a.stride() == b.stride()
        if name == "q" and not deterministic and DEVICE.type == "cuda":
            torch.testing.assert_close(a, b)  # float32 atomics add in the order the GPU schedules
        else:
            assert torch.equal(a, b), name


def test_the_attention_node_raises_on_a_double_backward(node):
    q, k, v = (torch.randn(1, 5, 2, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    out = flash_attention(q, k, v)
    assert out.grad_fn.name() == "vit_kernels::FlashAttentionBackward"
    (dq,) = torch.autograd.grad(out, q, torch.randn_like(out), create_graph=True)
    assert dq.requires_grad
    with pytest.raises(RuntimeError, match="once differentiable"):
        dq.sum().backward()


@pytest.mark.parametrize("dtype,bias,linear_bias,approximate,frozen,autocast", [
    (torch.float32, True, True, "none", "", False), (torch.bfloat16, True, False, "tanh", "", False),
    (torch.float32, False, True, "quick", "", False), (torch.float32, True, True, "none", "x,bias", False),
    (torch.float32, True, True, "none", "weight", False), (torch.float32, True, True, "tanh", "linear_bias", False),
    (torch.float32, True, True, "none", "x", False), (torch.float32, True, True, "none", "", True),
])
def test_the_mlp_node_equals_the_python_autograd(node, monkeypatch, dtype, bias, linear_bias, approximate, frozen,
                                                  autocast):
    """Frozen x and bias: the node's backward has no dz pass, only fc2's weight gradient (the GELU
    output recomputed by the forward's pass). Under bf16 autocast fc2's weight and bias are cast."""
    inputs = {"x": torch.randn(3, 5, 96, dtype=dtype, device=DEVICE),
              "bias": torch.randn(96, device=DEVICE) if bias else None,
              "weight": torch.randn(40, 96, device=DEVICE).to(dtype) * 0.1,
              "linear_bias": torch.randn(40, device=DEVICE).to(dtype) if linear_bias else None}
    dout = torch.randn(3, 5, 40, dtype=torch.bfloat16 if autocast else dtype, device=DEVICE)

    def run():
        leaves = {name: (t.detach().clone().requires_grad_(name not in frozen.split(",")) if t is not None else None)
                  for name, t in inputs.items()}
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
            out = bias_gelu_linear(leaves["x"], leaves["bias"], leaves["weight"], leaves["linear_bias"], approximate)
        out.backward(dout)
        return (out.detach(),), {name: t.grad for name, t in leaves.items() if t is not None}

    got = run()
    _python_autograd(monkeypatch)
    want = run()
    _assert_equal(got, want, ("out",))


@pytest.mark.parametrize("autocast", [False, True])
def test_without_a_gradient_the_mlp_runs_its_node_function(node, monkeypatch, autocast):
    """Its body is not planned whole (fc2's GEMM is aten work): without a gradient the node's
    function runs it (bias + GELU from its plan, then the GEMM), equal to the Python impl, call
    after call (the plan is recorded at the second and replayed from the third)."""
    assert MLP.run is _nodes.extension().bias_gelu_linear_node
    x, weight = torch.randn(3, 5, 96, device=DEVICE), torch.randn(40, 96, device=DEVICE) * 0.1
    bias, linear_bias = torch.randn(96, device=DEVICE), torch.randn(40, device=DEVICE)
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
        got = [bias_gelu_linear(x, bias, weight, linear_bias, "tanh") for _ in range(3)]
        _python_autograd(monkeypatch)
        want = bias_gelu_linear(x, bias, weight, linear_bias, "tanh")
    for out in got:
        assert out.dtype == want.dtype and torch.equal(out, want)


def test_the_mlp_node_raises_on_a_double_backward(node):
    x = torch.randn(4, 32, device=DEVICE, requires_grad=True)
    weight = torch.randn(8, 32, device=DEVICE, requires_grad=True)
    out = bias_gelu_linear(x, torch.randn(32, device=DEVICE), weight)
    assert out.grad_fn.name() == "vit_kernels::BiasGeluLinearBackward"
    (dx,) = torch.autograd.grad(out, x, torch.randn_like(out), create_graph=True)
    assert dx.requires_grad
    with pytest.raises(RuntimeError, match="once differentiable"):
        dx.sum().backward()


def _call(op):
    """(output, leaves) of one op's node on fresh leaves; `fn(*leaves)` calls it again."""
    if op == "add_layer_norm":
        leaves = [torch.randn(2, 5, 32, device=DEVICE, requires_grad=True) for _ in range(2)] + [
            torch.randn(32, device=DEVICE, requires_grad=True) for _ in range(2)]
        fn = lambda *t: add_layer_norm(*t)[0]  # noqa: E731
    elif op == "flash_attention":
        leaves = [torch.randn(1, 5, 2, 16, device=DEVICE, requires_grad=True) for _ in range(3)]
        fn = flash_attention
    else:
        leaves = [torch.randn(4, 32, device=DEVICE, requires_grad=True), torch.randn(32, device=DEVICE),
                  torch.randn(8, 32, device=DEVICE, requires_grad=True)]
        fn = bias_gelu_linear
    return fn, leaves


NODE_NAMES = {"add_layer_norm": "vit_kernels::AddLayerNormBackward",
              "flash_attention": "vit_kernels::FlashAttentionBackward",
              "bias_gelu_linear": "vit_kernels::BiasGeluLinearBackward"}


@pytest.mark.parametrize("op", list(NODE_NAMES))
def test_a_node_frees_its_saves_after_backward_unless_retained(node, op):
    fn, leaves = _call(op)
    out = fn(*leaves)
    assert out.grad_fn.name() == NODE_NAMES[op]
    dout = torch.randn_like(out)
    out.backward(dout, retain_graph=True)
    first = [t.grad.clone() for t in leaves if t.requires_grad]
    out.backward(dout)  # retained: the same gradients again
    for a, t in zip(first, [t for t in leaves if t.requires_grad]):
        assert torch.equal(t.grad, 2 * a)
    with pytest.raises(RuntimeError, match="second time"):
        out.backward(dout)


@pytest.mark.parametrize("op", list(NODE_NAMES))
def test_a_node_refuses_functorch_transforms_and_fires_creation_hooks(node, op):
    """torch.func.grad would hand a C++ node unwrapped tensors: it raises, as a C++
    torch::autograd::Function does. torch.autograd.graph.node_creation_hook (newer torch) sees the node."""
    fn, leaves = _call(op)
    with pytest.raises(RuntimeError, match="functorch"):
        torch.func.grad(lambda first, *rest: fn(first, *rest).sum())(*leaves)
    if not hasattr(torch.autograd.graph, "node_creation_hook"):
        pytest.skip("this torch has no node_creation_hook")
    names = []
    with torch.autograd.graph.node_creation_hook(lambda n: names.append(n.name())):
        fn(*leaves)
    assert NODE_NAMES[op] in names
