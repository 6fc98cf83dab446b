"""vit_kernels.ops.bias_gelu and vit_kernels.nn.FusedMlp.

Output, dx and dbias are held to the numerics rule against a float64 oracle, with eager
(`(x + b)` rounded to x's dtype, then F.gelu) as the yardstick. Elementwise math, so
bf16 runs through the interpreter too.
"""

import math

import pytest
import torch
from torch import nn

from vit_kernels import reference
from vit_kernels.nn import FusedMlp
from vit_kernels.ops import bias_gelu
from vit_kernels.testing import assert_rule, kernel_device, poisoned_allocations

DEVICE = kernel_device()
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


@pytest.mark.parametrize("approximate", ["none", "tanh", "quick"])
@pytest.mark.parametrize("n", [1000, 3072, 5120])
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
    check_bias_gelu(torch.randn(3, 1, 5, 129, device=DEVICE, dtype=torch.bfloat16), None, "quick")


def test_strided_rows(seed):
    wide = torch.randn(33, 2048, device=DEVICE)
    check_bias_gelu(wide[:, 100:1100], torch.randn(1000, device=DEVICE), "none")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_saturation_and_specials(dtype):
    """Large |x| saturates like eager (no inf/nan from exp overflow); NaN propagates. At the
    infinities y is what eager's formula gives on a GPU, -inf * Phi(-inf) = nan and +inf (CPU
    eager's vectorized erf GELU returns nan for +inf in float32 and bfloat16)."""
    x = torch.tensor([[-1e4, -30.0, -5.0, 0.0, 5.0, 30.0, 1e4, float("nan")]], device=DEVICE).to(dtype)
    tolerance = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {}
    infinities = torch.tensor([-float("inf"), float("inf")], device=DEVICE).to(dtype)
    for approximate in ("none", "tanh", "quick"):
        got, want = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, y_eager = bias_gelu(got, None, approximate), reference.gelu(want, approximate)
        y.sum().backward()
        y_eager.sum().backward()
        torch.testing.assert_close(y, y_eager, equal_nan=True, **tolerance)
        # eager's float32 tanh-form gelu' cancels at x = -5 (-2.0e-6, truth -1.5e-6, ours -1.55e-6)
        grad_tolerance = {"rtol": 1e-6, "atol": 1e-5} if dtype == torch.float32 else {}
        if approximate == "quick" and dtype != torch.float32:
            # eager's 16-bit sigmoid(1.702 * 5) rounds to 1, dropping the slope term: 1.0 for 1.0015
            grad_tolerance = {"rtol": 2 * torch.finfo(dtype).eps, "atol": 1e-5}
        torch.testing.assert_close(got.grad, want.grad, equal_nan=True, **grad_tolerance)
        y = bias_gelu(infinities, None, approximate)
        assert y[0].isnan() and y[1] == float("inf"), y


def _every_finite(dtype):
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    return x[torch.isfinite(x)].to(DEVICE)


def y_and_grad(fn, x):
    """fn(x) and its derivative (the gradient for dy = 1), elementwise."""
    x = x.detach().requires_grad_()
    y = fn(x)
    return y.detach(), torch.autograd.grad(y, x, torch.ones_like(y))[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_every_16bit_input(dtype):
    """16-bit outputs take Phi(z) from a polynomial, not erf (bias_gelu's _normal_cdf_and_pdf).
    Over every finite input of the dtype, y and gelu'(z) (dx for dy = 1) are never further
    from float64 than eager's worst, and y is within half a unit in the last place (plus the
    polynomial's 1e-4) wherever it is a normal number: eager, which computes 1 + erf(z / sqrt(2))
    in float32, loses the tail (z < -5.5) entirely there.

    The oracle takes Phi from erfc, not 1 + erf: F.gelu in float64 and torch.special.ndtr
    cancel in the tail too (relative error 30% at z = -8.25)."""
    x = _every_finite(dtype)
    got = y_and_grad(lambda t: bias_gelu(t, None), x)
    eager = y_and_grad(torch.nn.functional.gelu, x)
    z = x.double()
    cdf = 0.5 * torch.special.erfc(-z / math.sqrt(2))
    oracle = (z * cdf, cdf + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi))
    for name, g, e, o in zip(("y", "gelu'"), got, eager, oracle):
        compared = e.isfinite()  # eager's y overflows at the top of bfloat16's range, ours does not
        error, eager_error = (g.double() - o).abs()[compared], (e.double() - o).abs()[compared]
        assert error.max() <= eager_error.max(), (name, error.max().item(), eager_error.max().item())
    y, y_oracle = got[0].double(), oracle[0]
    normal = (y_oracle.abs() >= torch.finfo(dtype).tiny) & y_oracle.isfinite() & got[0].isfinite()
    relative = ((y - y_oracle).abs() / y_oracle.abs())[normal]
    assert relative.max() <= torch.finfo(dtype).eps / 2 + 1e-4, relative.max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_quick_gelu_every_16bit_input(dtype):
    """quick_gelu, z sigmoid(1.702 z), over every finite input of the dtype against float64: y and
    its derivative (dx for dy = 1) are never further from float64 than eager's worst (transformers'
    and timm's ``x * torch.sigmoid(1.702 * x)``, which rounds three times), and wherever y or the
    derivative is a normal number it is within half a unit in the last place (plus float32's
    rounding of the slope product), the negative tail included: sigmoid' is taken as e r^2, never
    as s (1 - s)."""
    x = _every_finite(dtype)
    got = y_and_grad(lambda t: bias_gelu(t, None, "quick"), x)
    eager = y_and_grad(lambda t: reference.gelu(t, "quick"), x)
    z = x.double()
    s, s_minus = torch.sigmoid(1.702 * z), torch.sigmoid(-1.702 * z)
    oracle = (z * s, s + 1.702 * z * s * s_minus)
    for name, g, e, o in zip(("y", "quick_gelu'"), got, eager, oracle):
        compared = e.isfinite() & o.isfinite()
        error, eager_error = (g.double() - o).abs()[compared], (e.double() - o).abs()[compared]
        assert error.max() <= eager_error.max(), (name, error.max().item(), eager_error.max().item())
        normal = (o.abs() >= torch.finfo(dtype).tiny) & o.isfinite() & g.isfinite()
        relative = ((g.double() - o).abs() / o.abs())[normal]
        assert relative.max() <= torch.finfo(dtype).eps / 2 + 1e-5, (name, relative.max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tanh_form_keeps_the_tail(dtype):
    """The tanh form's y and gelu' stay within half an ulp (+ 2e-5) of float64 down the negative
    tail, where eager's 1 + tanh(u) cancels to 0 (relative error 1 from z ~ -7 in float32).
    gelu' is compared in relative terms away from its root near z = -0.75. The oracle takes
    1 + tanh(u) = 2 sigmoid(2u): float64 F.gelu cancels as well (48% off at z = -7.1)."""
    x = torch.linspace(-12, 12, 20001).to(dtype).to(DEVICE)
    t = x.detach().requires_grad_()
    y = bias_gelu(t, None, "tanh")
    got = (y.detach(), torch.autograd.grad(y, t, torch.ones_like(y))[0])
    z = x.double()
    u = math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)
    s, s_minus = torch.sigmoid(2 * u), torch.sigmoid(-2 * u)
    oracle = (z * s, s + 2 * z * s * s_minus * math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * z * z))
    away_from_root = {"y": z != 0, "gelu'": (z <= -2) | (z >= 0.5)}
    for (name, compared), g, o in zip(away_from_root.items(), got, oracle):
        compared = compared & (o.abs() >= torch.finfo(dtype).tiny)
        relative = ((g.double() - o).abs() / o.abs())[compared]
        assert relative.max() <= torch.finfo(dtype).eps / 2 + 2e-5, (name, relative.max().item())


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


@pytest.mark.inductor
def test_opcheck_and_compile(seed):
    x = torch.randn(9, 96, device=DEVICE, requires_grad=True)
    b = torch.randn(96, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.vit_kernels.bias_gelu_fwd.default, (x, b, "none"))
    torch.library.opcheck(torch.ops.vit_kernels.bias_gelu_fwd.default, (x, None, "tanh"))
    torch.library.opcheck(torch.ops.vit_kernels.bias_gelu_fwd.default, (x, b, "quick"))
    torch.library.opcheck(torch.ops.vit_kernels.bias_gelu_bwd.default, (torch.randn(9, 96, device=DEVICE), x.detach(), b.detach(), "none"))
    compiled = torch.compile(lambda x, b: bias_gelu(x * 2, b) + 1, fullgraph=True, backend="aot_eager")
    out = compiled(x, b)
    grads = torch.autograd.grad(out.sum(), [x, b])
    out_eager = bias_gelu(x * 2, b) + 1
    grads_eager = torch.autograd.grad(out_eager.sum(), [x, b])
    # Under compile bias + GELU is Inductor's (_dispatch.inductor_generates): by the rule.
    x64, b64 = (t.detach().double().requires_grad_() for t in (x, b))
    out64 = bias_gelu(x64 * 2, b64) + 1
    grads64 = torch.autograd.grad(out64.sum(), [x64, b64])
    for name, got, want64, eager in zip(("out", "dx", "db"), (out, *grads), (out64, *grads64), (out_eager, *grads_eager)):
        assert_rule(name, got, want64, eager)


# ---- the module --------------------------------------------------------------------------------


@pytest.mark.parametrize("act_layer", [nn.GELU, lambda: nn.GELU(approximate="tanh"), "quick_gelu"],
                         ids=["erf", "tanh", "quick_gelu"])
def test_module_matches_timm_mlp(seed, act_layer):
    timm_layers = pytest.importorskip("timm.layers")
    if isinstance(act_layer, str):
        act_layer = timm_layers.get_act_layer(act_layer)
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
    assert FusedMlp(8, 16, act_layer=timm_layers.QuickGELU).approximate == "quick"
    with pytest.raises(ValueError, match="GELU only"):
        FusedMlp(8, 16, act_layer=nn.ReLU)


def test_module_without_bias(seed):
    mlp = FusedMlp(32, 64, bias=False).to(DEVICE)
    x = torch.randn(3, 32, device=DEVICE)
    want = mlp.fc2(torch.nn.functional.gelu(mlp.fc1(x)))
    torch.testing.assert_close(mlp(x), want, rtol=1e-5, atol=1e-5)
