"""vit_kernels.ops.bias_gelu_linear (fc1's bias + GELU + fc2, saving only the pre-activation)
and the FusedMlp path built on it.

Output and every gradient by the numerics rule against float64, eager (the reference in the
same dtype) as the yardstick; the memory promise (no GELU output kept for backward) is
checked on the tensors autograd saves.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vit_kernels import reference
from vit_kernels.nn import FusedMlp
from vit_kernels.ops import bias_gelu_linear
from vit_kernels.testing import assert_rule, kernel_device, poisoned_allocations

DEVICE = kernel_device()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAMES = ["out", "dx", "dbias", "dweight", "dlinear_bias"]


def make_inputs(m, hidden, out_features, dtype, *, param_dtype=None, bias=True, linear_bias=True):
    param_dtype = param_dtype or dtype
    x = (2 * torch.randn(m, hidden, device=DEVICE)).to(dtype)
    b1 = (0.5 * torch.randn(hidden, device=DEVICE)).to(param_dtype) if bias else None
    w2 = (torch.randn(out_features, hidden, device=DEVICE) / hidden ** 0.5).to(param_dtype)
    b2 = (0.5 * torch.randn(out_features, device=DEVICE)).to(param_dtype) if linear_bias else None
    return x, b1, w2, b2


def run(fn, inputs, dout, cast, approximate, wanted=None):
    copies = [cast(t).detach().requires_grad_(wanted is None or i in wanted) if t is not None else None
              for i, t in enumerate(inputs)]
    out = fn(*copies, approximate)
    leaves = [t for t in copies if t is not None and t.requires_grad]
    return [out, *torch.autograd.grad(out, leaves, cast(dout))]


def check(inputs, approximate="none", wanted=None):
    x, _, w2, _ = inputs
    dout = torch.randn(x.shape[0], w2.shape[0], device=DEVICE).to(x.dtype)
    with poisoned_allocations():
        got = run(bias_gelu_linear, inputs, dout, lambda t: t, approximate, wanted)
    eager = run(reference.bias_gelu_linear, inputs, dout, lambda t: t, approximate, wanted)
    oracle = run(reference.bias_gelu_linear, inputs, dout, lambda t: t.double(), approximate, wanted)
    names = ["out"] + [NAMES[1 + i] for i in sorted(wanted if wanted is not None else range(4))
                       if inputs[i] is not None]
    assert len(got) == len(eager) == len(names)
    for name, g, e, o in zip(names, got, eager, oracle):
        assert g.dtype == e.dtype and g.shape == e.shape, name
        assert_rule(name, g, o, e)


@pytest.mark.parametrize("approximate", ["none", "tanh", "quick"])
@pytest.mark.parametrize("m, hidden, out_features", [(1, 1000, 192), (197, 1536, 384), (2 * 197 + 3, 768, 200)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_rule(seed, dtype, m, hidden, out_features, approximate):
    check(make_inputs(m, hidden, out_features, dtype), approximate)


@pytest.mark.parametrize("wanted", [{0}, {1}, {2}, {3}, {2, 3}, {0, 1}], ids=str)
def test_only_the_gradients_asked_for(seed, wanted):
    """Frozen layers (fine-tuning): each subset of gradients is computed alone, by the rule."""
    check(make_inputs(197, 512, 96, torch.float16), wanted=wanted)


def test_without_biases_and_leading_shapes(seed):
    check(make_inputs(57, 300, 64, torch.float32, bias=False, linear_bias=False))
    x, b1, w2, b2 = make_inputs(2 * 17, 256, 48, torch.float32)
    out = bias_gelu_linear(x.view(2, 17, 256), b1, w2, b2)
    torch.testing.assert_close(out.view(34, 48), bias_gelu_linear(x, b1, w2, b2), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_casts_the_linear_like_eager(seed, dtype):
    """Under autocast, float32 parameters with a low-precision pre-activation: fc2 runs in the
    autocast dtype, as autocast runs eager's Linear."""
    x, b1, w2, b2 = make_inputs(197, 768, 192, dtype, param_dtype=torch.float32)
    device_type = DEVICE.type
    with torch.autocast(device_type, dtype=dtype):
        out = bias_gelu_linear(x, b1, w2, b2)
        want = F.linear(reference.bias_gelu(x, b1), w2, b2)
    assert out.dtype == want.dtype == dtype
    oracle = reference.bias_gelu_linear(*(t.double() for t in (x, b1, w2, b2)))
    assert_rule("out", out, oracle, want)


def test_saves_the_pre_activation_only(seed):
    """The point of the op: of the [M, H] tensors, autograd keeps x alone (eager keeps the GELU
    output as well)."""
    x, b1, w2, b2 = make_inputs(64, 1024, 32, torch.float32)
    params = [t.requires_grad_() for t in (b1, w2, b2)]
    x.requires_grad_()

    def saved_activation_bytes(fn):
        saved = []

        def pack(t):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x, *params).sum()
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved
                    if t.shape[-1] == 1024 and t.dim() == 2 and t.shape[0] == 64}
        return sum(storages.values())

    ours = saved_activation_bytes(bias_gelu_linear)
    eager = saved_activation_bytes(reference.bias_gelu_linear)
    assert ours == x.numel() * 4, ours
    assert eager >= 2 * ours


def test_empty_and_reproducible(seed):
    x, b1, w2, b2 = (t.requires_grad_() for t in make_inputs(0, 64, 16, torch.float32))
    bias_gelu_linear(x, b1, w2, b2).sum().backward()
    assert x.grad.shape == x.shape and torch.count_nonzero(b1.grad) == 0 and torch.count_nonzero(w2.grad) == 0
    inputs = [t.requires_grad_() for t in make_inputs(397, 1536, 96, torch.bfloat16)]
    dout = torch.randn(397, 96, device=DEVICE, dtype=torch.bfloat16)
    first = torch.autograd.grad(bias_gelu_linear(*inputs), inputs, dout)
    second = torch.autograd.grad(bias_gelu_linear(*inputs), inputs, dout)
    assert all(torch.equal(a, c) for a, c in zip(first, second))


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"x": torch.ones(3, 4, dtype=torch.int32)}, TypeError, "x must have dtype"),
        ({"bias": torch.randn(5)}, ValueError, r"bias must have shape \(4,\)"),
        ({"weight": torch.randn(6, 5)}, ValueError, r"weight must have shape \[O, 4\]"),
        ({"weight": torch.randn(6)}, ValueError, r"weight must have shape"),
        ({"linear_bias": torch.randn(5)}, ValueError, r"linear_bias must have shape \(6,\)"),
        ({"linear_bias": torch.ones(6, dtype=torch.int64)}, TypeError, "linear_bias must have dtype"),
        ({"weight": torch.randn(6, 4, device="meta")}, ValueError, "weight is on meta"),
        ({"approximate": "sigmoid"}, ValueError, "approximate must be one of"),
        ({"x": torch.tensor(1.0)}, ValueError, "at least one dimension"),
    ],
)
def test_bad_input_is_named(change, error, match):
    args = dict(x=torch.randn(3, 4), bias=torch.randn(4), weight=torch.randn(6, 4), linear_bias=torch.randn(6),
                approximate="none")
    args.update(change)
    with pytest.raises(error, match=match):
        bias_gelu_linear(**args)


@pytest.mark.inductor
def test_opcheck_and_compile(seed):
    x, b1, w2, b2 = (t.requires_grad_() for t in make_inputs(9, 96, 40, torch.float32))
    torch.library.opcheck(torch.ops.vit_kernels.bias_gelu_linear_fwd.default, (x, b1, w2, b2, "none"))
    torch.library.opcheck(torch.ops.vit_kernels.bias_gelu_linear_fwd.default, (x, None, w2, None, "tanh"))
    torch.library.opcheck(torch.ops.vit_kernels.bias_gelu_linear_fwd.default, (x, b1, w2, b2, "quick"))
    dout = torch.randn(9, 40, device=DEVICE)
    for needs_dx, needs_dweight in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(torch.ops.vit_kernels.bias_gelu_linear_bwd.default,
                              (dout, x.detach(), b1.detach(), w2.detach(), True, "none", needs_dx, needs_dweight))
    compiled = torch.compile(lambda *a: bias_gelu_linear(*a) * 2, fullgraph=True, backend="aot_eager")
    out = compiled(x, b1, w2, b2)
    grads = torch.autograd.grad(out.sum(), [x, b1, w2, b2])
    out_eager = bias_gelu_linear(x, b1, w2, b2) * 2
    grads_eager = torch.autograd.grad(out_eager.sum(), [x, b1, w2, b2])
    # Under compile the fused MLP is Inductor's (_dispatch.inductor_generates): by the rule.
    inputs64 = [t.detach().double().requires_grad_() for t in (x, b1, w2, b2)]
    out64 = bias_gelu_linear(*inputs64) * 2
    grads64 = torch.autograd.grad(out64.sum(), inputs64)
    for name, got, want64, eager in zip(("out", "dx", "db1", "dw2", "db2"), (out, *grads), (out64, *grads64),
                                        (out_eager, *grads_eager)):
        assert_rule(name, got, want64, eager)


# ---- FusedMlp on it ------------------------------------------------------------------------------


def _timm_pair(drop=0.0):
    timm_layers = pytest.importorskip("timm.layers")
    theirs = timm_layers.Mlp(192, 768, drop=drop).to(DEVICE)
    ours = FusedMlp.from_timm(timm_layers.Mlp(192, 768, drop=drop).to(DEVICE))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def test_mlp_keeps_one_hidden_activation(seed):
    """FusedMlp in training keeps the pre-activation and not the GELU output: one [tokens, 768]
    tensor for backward where timm's Mlp keeps two."""
    ours, theirs = _timm_pair()
    x = torch.randn(2, 50, 192, device=DEVICE, requires_grad=True)

    def hidden_tensors_saved(module):
        saved = {}

        def pack(t):
            if t.shape[-1] == 768 and t.numel() == 2 * 50 * 768:
                saved[t.untyped_storage().data_ptr()] = t
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x)
        return len(saved)

    assert hidden_tensors_saved(ours) == 1
    assert hidden_tensors_saved(theirs) == 2


@pytest.mark.parametrize("training", [False, True])
def test_mlp_paths_match_timm(seed, training):
    """The fused path, and the unfused one it takes with a dropout after the GELU in training
    (p = 0.5 would make the outputs random: compared with the same dropout mask by seeding)."""
    for drop in (0.0, 0.5):
        ours, theirs = _timm_pair(drop)
        ours.train(training), theirs.train(training)
        assert ours._fc2_follows_gelu_directly() == (not (training and drop > 0))
        x = torch.randn(2, 197, 192, device=DEVICE, requires_grad=True)
        torch.manual_seed(1)
        y = ours(x)
        torch.manual_seed(1)
        y_ref = theirs(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
        params, params_ref = list(ours.parameters()), list(theirs.parameters())
        grads = torch.autograd.grad(y.square().sum(), [x, *params])
        grads_ref = torch.autograd.grad(y_ref.square().sum(), [x, *params_ref])
        for g, g_ref in zip(grads, grads_ref):
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


def test_mlp_hook_on_fc2_still_runs(seed):
    ours, _ = _timm_pair()
    seen = []
    ours.fc2.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    ours(torch.randn(3, 192, device=DEVICE))
    assert seen == [torch.Size([3, 192])]


def test_mlp_with_a_norm_after_the_gelu(seed):
    timm_layers = pytest.importorskip("timm.layers")
    theirs = timm_layers.Mlp(64, 256, norm_layer=nn.LayerNorm).to(DEVICE)
    ours = FusedMlp.from_timm(theirs)
    assert not ours._fc2_follows_gelu_directly()
    x = torch.randn(5, 64, device=DEVICE)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)
