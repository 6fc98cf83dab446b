"""vit_kernels.ops.bias_gelu and vit_kernels.nn.FusedMlp.

Output, dx and dbias are held to the numerics rule against a float64 oracle, with eager
(`(x + b)` rounded to x's dtype, then F.gelu) as the yardstick. Elementwise math, so
bf16 runs through the interpreter too.
"""

import pytest
import torch
from torch import nn

from vit_kernels import reference
from vit_kernels.nn import FusedMlp
from vit_kernels.ops import bias_gelu
from vit_kernels.testing import assert_rule, kernel_device, poisoned_allocations

DEVICE = kernel_device()
# The tanh form computes tanh(u) as 1 - 2 / (exp(2u) + 1); for large u numpy (the
# interpreter) warns that exp overflowed to inf, which is the intended saturation.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check_bias_gelu(x, bias, approximate):
    dy = torch.randn(x.shape, device=DEVICE).to(x.dtype)
    leaves = [x] + ([bias] if bias is not None else [])

    def run(fn, cast):
        copies = [cast(t).detach().requires_grad_() for t in leaves]
        y = fn(copies[0], copies[1] if bias is not None else None, approximate)
        return [y, *torch.autograd.grad(y, copies, cast(dy))]

    with poisoned_allocations():
        got = run(bias_gelu, lambda t: t)
    eager = run(reference.bias_gelu, lambda t: t)
    oracle = run(reference.bias_gelu, lambda t: t.double())
    for name, g, e, o in zip(["y", "dx", "dbias"], got, eager, oracle):
        assert g.dtype == e.dtype, name
        assert_rule(name, g, o, e)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("n", [1000, 1536, 3072, 4096, 5120])
@pytest.mark.parametrize("m", [1, 197, 2 * 197 + 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_rule(seed, dtype, m, n, approximate):
    x = (2 * torch.randn(m, n, device=DEVICE)).to(dtype)
    bias = (0.5 * torch.randn(n, device=DEVICE)).to(dtype)
    check_bias_gelu(x, bias, approximate)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_float32_bias_under_autocast_dtypes(seed, dtype):
    x = torch.randn(2, 197, 1536, device=DEVICE).to(dtype)
    check_bias_gelu(x, torch.randn(1536, device=DEVICE), "none")


def test_no_bias_and_leading_shapes(seed):
    check_bias_gelu(torch.randn(2, 3, 17, 300, device=DEVICE), None, "none")
    check_bias_gelu(torch.randn(5, 7, device=DEVICE), torch.randn(7, device=DEVICE), "tanh")


def test_strided_rows(seed):
    wide = torch.randn(33, 2048, device=DEVICE)
    check_bias_gelu(wide[:, 100:1100], torch.randn(1000, device=DEVICE), "none")


def test_saturation_and_specials():
    """Large |x| saturates like eager (no inf/nan from exp overflow); NaN propagates."""
    x = torch.tensor([[-1e4, -30.0, -5.0, 0.0, 5.0, 30.0, 1e4, float("nan")]], device=DEVICE)
    for approximate in ("none", "tanh"):
        y = bias_gelu(x, None, approximate)
        want = torch.nn.functional.gelu(x, approximate=approximate)
        torch.testing.assert_close(y, want, equal_nan=True, rtol=1e-6, atol=1e-6)


def test_empty_and_reproducible(seed):
    x = torch.randn(0, 64, device=DEVICE, requires_grad=True)
    b = torch.randn(64, device=DEVICE, requires_grad=True)
    bias_gelu(x, b).sum().backward()
    assert x.grad.shape == x.shape and torch.count_nonzero(b.grad) == 0
    x = torch.randn(397, 1536, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(1536, device=DEVICE, requires_grad=True)
    dy = torch.randn_like(x)
    first = torch.autograd.grad(bias_gelu(x, b), [x, b], dy)
    second = torch.autograd.grad(bias_gelu(x, b), [x, b], dy)
    assert all(torch.equal(a, c) for a, c in zip(first, second))


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((torch.ones(3, 4, dtype=torch.int32), None), TypeError, "x must have dtype"),
        ((torch.randn(3, 4), torch.randn(5)), ValueError, r"bias must have shape \(4,\)"),
        ((torch.randn(3, 4), torch.ones(4, dtype=torch.int64)), TypeError, "bias must have dtype"),
        ((torch.randn(3, 4), torch.randn(4, device="meta")), ValueError, "bias is on meta"),
        ((torch.randn(3, 4), None, "sigmoid"), ValueError, "approximate must be one of"),
        ((torch.tensor(1.0), None), ValueError, "at least one dimension"),
    ],
)
def test_bad_input_is_named(args, error, match):
    with pytest.raises(error, match=match):
        bias_gelu(*args)


def test_opcheck_and_compile(seed):
    x = torch.randn(9, 96, device=DEVICE, requires_grad=True)
    b = torch.randn(96, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.vit_kernels.bias_gelu_fwd.default, (x, b, "none"))
    torch.library.opcheck(torch.ops.vit_kernels.bias_gelu_fwd.default, (x, None, "tanh"))
    torch.library.opcheck(torch.ops.vit_kernels.bias_gelu_bwd.default, (torch.randn(9, 96, device=DEVICE), x.detach(), b.detach(), "none"))
    compiled = torch.compile(lambda x, b: bias_gelu(x * 2, b) + 1, fullgraph=True, backend="aot_eager")
    out = compiled(x, b)
    grads = torch.autograd.grad(out.sum(), [x, b])
    out_eager = bias_gelu(x * 2, b) + 1
    grads_eager = torch.autograd.grad(out_eager.sum(), [x, b])
    torch.testing.assert_close(out, out_eager, rtol=0, atol=0)
    for g, ge in zip(grads, grads_eager):
        torch.testing.assert_close(g, ge, rtol=0, atol=0)


# ---- the module --------------------------------------------------------------------------------


@pytest.mark.parametrize("act_layer", [nn.GELU, lambda: nn.GELU(approximate="tanh")])
def test_module_matches_timm_mlp(seed, act_layer):
    timm_layers = pytest.importorskip("timm.layers")
    theirs = timm_layers.Mlp(192, 768, act_layer=act_layer).to(DEVICE)
    ours = FusedMlp(192, 768, act_layer=act_layer).to(DEVICE)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 197, 192, device=DEVICE, requires_grad=True)
    y, y_ref = ours(x), theirs(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    g = torch.autograd.grad(y.sum(), [x, ours.fc1.bias, ours.fc1.weight])
    g_ref = torch.autograd.grad(y_ref.sum(), [x, theirs.fc1.bias, theirs.fc1.weight])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_module_accepts_timm_gelus_and_refuses_others():
    timm_layers = pytest.importorskip("timm.layers")
    assert FusedMlp(8, 16, act_layer=timm_layers.GELU).approximate == "none"
    assert FusedMlp(8, 16, act_layer=timm_layers.GELUTanh).approximate == "tanh"
    with pytest.raises(ValueError, match="GELU only"):
        FusedMlp(8, 16, act_layer=nn.ReLU)


def test_module_without_bias(seed):
    mlp = FusedMlp(32, 64, bias=False).to(DEVICE)
    x = torch.randn(3, 32, device=DEVICE)
    want = mlp.fc2(torch.nn.functional.gelu(mlp.fc1(x)))
    torch.testing.assert_close(mlp(x), want, rtol=1e-5, atol=1e-5)
