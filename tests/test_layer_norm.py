"""vit_kernels.ops.add_layer_norm and vit_kernels.nn.FusedLayerNorm.

Every output and gradient is held to the numerics rule (vit_kernels.testing):
error against a float64 oracle at most 2x eager PyTorch's in the same dtype.
Kernel outputs are poisoned with NaN before launch, so an unwritten element fails.
"""

import itertools
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from vit_kernels import reference
from vit_kernels.nn import FusedLayerNorm
from vit_kernels.ops import add_layer_norm
from vit_kernels.testing import assert_rule, kernel_device, poisoned_allocations

DEVICE = kernel_device()

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HIDDEN = [192, 384, 768, 1000, 1024, 1280]
# rows as (batch, tokens): 1, 197 and 3*197+5 = 4*149 rows; a batch of 4 gives row_scale
# four different samples to index.
ROW_SHAPES = [(1, 1), (1, 197), (4, 149)]
KEEP_PROB = 0.75


def make_inputs(batch, tokens, hidden, dtype, *, residual, gamma, row_scale, param_dtype=None, residual_dtype=None):
    """Fresh random inputs on DEVICE; never zeros, weights away from 1 and biases away from 0."""
    param_dtype = param_dtype or dtype
    inputs = {
        "x": torch.randn(batch, tokens, hidden, dtype=dtype, device=DEVICE),
        "residual": None,
        "weight": (1 + 0.5 * torch.randn(hidden, device=DEVICE)).to(param_dtype),
        "bias": (0.5 * torch.randn(hidden, device=DEVICE)).to(param_dtype),
        "gamma": None,
        "row_scale": None,
    }
    if residual:
        inputs["residual"] = (2 * torch.randn(batch, tokens, hidden, device=DEVICE) + 0.5).to(residual_dtype or dtype)
    if gamma:
        # Positive and spread over a decade, like trained layer scales. (A normal gamma times a
        # normal x gives a few heavy columns whose bf16 rounding noise, in eager as here, decides
        # the max error alone: the 2x comparison then measures luck, not the kernel.)
        inputs["gamma"] = (0.1 + 0.9 * torch.rand(hidden, device=DEVICE)).to(param_dtype)
    if row_scale:
        keep = torch.rand(batch, device=DEVICE) < KEEP_PROB
        keep[0] = True  # at least one sample carries a gradient
        inputs["row_scale"] = keep.to(dtype) / KEEP_PROB
    return inputs


def run_with_grads(fn, inputs, dy, dh, **kwargs):
    """Run fn(**inputs) -> (y, h_new) on fresh leaf copies; backprop (dy, dh); outputs and grads by name."""
    leaves = {k: (v.detach().clone().requires_grad_(k != "row_scale") if v is not None else None) for k, v in inputs.items()}
    y, h_new = fn(**leaves, **kwargs)
    names = [k for k, v in leaves.items() if v is not None and v.requires_grad]
    grads = torch.autograd.grad([y, h_new], [leaves[k] for k in names], [dy.to(y.dtype), dh.to(h_new.dtype)])
    return {"y": y, "h_new": h_new, **{f"d{k}": g for k, g in zip(names, grads)}}


def call_kernel(**kwargs):
    return add_layer_norm(
        kwargs.pop("x"), kwargs.pop("residual"), kwargs.pop("weight"), kwargs.pop("bias"), kwargs.pop("eps"), **kwargs
    )


def call_reference(**kwargs):
    return reference.add_layer_norm(
        kwargs.pop("x"), kwargs.pop("residual"), kwargs.pop("weight"), kwargs.pop("bias"), kwargs.pop("eps"), **kwargs
    )


def check_against_rule(inputs, *, eps=1e-6, residual_in_fp32=False):
    x = inputs["x"]
    # Upstream gradients in the outputs' dtypes, so the oracle sees the same rounded values.
    dy = torch.randn(x.shape, device=DEVICE).to(x.dtype)
    dh = torch.randn(x.shape, device=DEVICE).to(reference.residual_dtype(x, inputs["residual"], residual_in_fp32))
    with poisoned_allocations():
        got = run_with_grads(call_kernel, inputs, dy, dh, eps=eps, residual_in_fp32=residual_in_fp32)
    eager = run_with_grads(call_reference, inputs, dy, dh, eps=eps, residual_in_fp32=residual_in_fp32)
    as64 = {k: (v.double() if v is not None else None) for k, v in inputs.items()}
    oracle = run_with_grads(call_reference, as64, dy.double(), dh.double(), eps=eps)
    assert got.keys() == eager.keys() == oracle.keys()
    for name in got:
        assert got[name].dtype == eager[name].dtype, name
        assert_rule(name, got[name], oracle[name], eager[name])
    return got


@pytest.mark.parametrize("rows", ROW_SHAPES, ids=lambda r: f"rows{r[0] * r[1]}")
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "residual,gamma,row_scale",
    list(itertools.product([False, True], repeat=3)),
    ids=lambda flag: "yes" if flag else "no",
)
def test_add_layer_norm_matches_rule(seed, residual, gamma, row_scale, dtype, hidden, rows):
    inputs = make_inputs(*rows, hidden, dtype, residual=residual, gamma=gamma, row_scale=row_scale)
    check_against_rule(inputs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_float32_params_and_residual_in_fp32(seed, dtype):
    """autocast's mix: LayerNorm weights and layer scale in float32, activations in bf16/fp16,
    residual stream in float32 (in and out)."""
    inputs = make_inputs(
        2, 50, 384, dtype, residual=True, gamma=True, row_scale=True, param_dtype=torch.float32,
        residual_dtype=torch.float32,
    )
    got = check_against_rule(inputs, residual_in_fp32=True)
    assert got["y"].dtype == dtype and got["h_new"].dtype == torch.float32
    assert got["dx"].dtype == dtype and got["dresidual"].dtype == torch.float32
    assert got["dweight"].dtype == torch.float32


def test_residual_in_fp32_starts_the_stream(seed):
    """No residual yet (first block) but residual_in_fp32: h_new is a float32 copy of x."""
    inputs = make_inputs(2, 17, 192, torch.bfloat16, residual=False, gamma=False, row_scale=False)
    got = check_against_rule(inputs, residual_in_fp32=True)
    assert got["h_new"].dtype == torch.float32
    torch.testing.assert_close(got["h_new"], inputs["x"].float(), rtol=0, atol=0)


@pytest.mark.parametrize("hidden", [50, 8192, 16384])
def test_odd_and_large_hidden(seed, hidden):
    inputs = make_inputs(1, 3, hidden, torch.float16, residual=True, gamma=True, row_scale=False)
    check_against_rule(inputs)


def test_no_affine_and_eps(seed):
    inputs = make_inputs(2, 17, 384, torch.float32, residual=True, gamma=False, row_scale=True)
    inputs["weight"] = None
    inputs["bias"] = None
    got = check_against_rule(inputs, eps=1e-12)  # transformers' ViT eps
    assert set(got) == {"y", "h_new", "dx", "dresidual"}


@pytest.mark.parametrize("eps", [1e-6, 1e-5, 1e-12])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_eps_matters_where_the_variance_is_small(seed, eps, dtype):
    """Rows whose variance is comparable to eps (scaled to sqrt(eps)), where eps changes rstd by
    tens of percent: the kernel must use exactly the eps it is given (a doubled or dropped eps
    fails the rule here, where variance-1 rows cannot show it)."""
    inputs = make_inputs(2, 17, 384, dtype, residual=True, gamma=False, row_scale=False)
    scale = max(eps, 1e-6) ** 0.5
    inputs["x"] = (torch.randn(2, 17, 384, device=DEVICE) * scale).to(dtype)
    inputs["residual"] = (torch.randn(2, 17, 384, device=DEVICE) * scale + 3.0).to(dtype)
    check_against_rule(inputs, eps=eps)
    y_eps = add_layer_norm(inputs["x"], inputs["residual"], inputs["weight"], inputs["bias"], eps)[0]
    y_2eps = add_layer_norm(inputs["x"], inputs["residual"], inputs["weight"], inputs["bias"], 2 * eps)[0]
    if eps >= 1e-6:
        assert not torch.allclose(y_eps.float(), y_2eps.float(), rtol=1e-2, atol=1e-2), "eps had no effect"


def test_strided_rows_and_leading_shapes(seed):
    """Rows with a stride larger than D (a slice of a wider tensor) and 2-D / 4-D inputs."""
    wide = torch.randn(37, 2 * 256, device=DEVICE)
    inputs = make_inputs(1, 37, 256, torch.float32, residual=True, gamma=False, row_scale=False)
    inputs["x"] = wide[:, 64 : 64 + 256].unsqueeze(0)
    check_against_rule(inputs)
    for shape in [(37, 256), (2, 3, 5, 256)]:
        inputs = make_inputs(1, 1, 256, torch.float32, residual=True, gamma=True, row_scale=False)
        inputs["x"] = torch.randn(shape, device=DEVICE)
        inputs["residual"] = torch.randn(shape, device=DEVICE)
        check_against_rule(inputs)


def test_h_new_is_x_when_nothing_is_added(seed):
    x = torch.randn(3, 7, 64, device=DEVICE)
    y, h_new = add_layer_norm(x, None, torch.ones(64, device=DEVICE), None)
    assert h_new is x
    inputs = make_inputs(3, 7, 64, torch.float32, residual=False, gamma=False, row_scale=False)
    check_against_rule(inputs)


def test_only_one_output_used(seed):
    """Gradients when only y, or only h_new, feeds the loss (the other's gradient is absent)."""
    inputs = make_inputs(2, 9, 128, torch.float32, residual=True, gamma=True, row_scale=False)
    for pick in (0, 1):
        leaves = [inputs[k].clone().requires_grad_() for k in ("x", "residual", "weight", "bias", "gamma")]
        out = add_layer_norm(*leaves[:4], gamma=leaves[4])[pick]
        grads = torch.autograd.grad(out.square().sum(), leaves, allow_unused=True)
        leaves_ref = [t.detach().clone().requires_grad_() for t in leaves]
        out_ref = reference.add_layer_norm(*leaves_ref[:4], gamma=leaves_ref[4])[pick]
        grads_ref = torch.autograd.grad(out_ref.square().sum(), leaves_ref, allow_unused=True)
        for g, g_ref in zip(grads, grads_ref):
            if g_ref is None:
                assert g is None or torch.count_nonzero(g) == 0
            else:
                torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


def test_gradients_are_bitwise_reproducible(seed):
    inputs = make_inputs(4, 149, 768, torch.bfloat16, residual=True, gamma=True, row_scale=True)
    dy = torch.randn(inputs["x"].shape, device=DEVICE)
    dh = torch.randn(inputs["x"].shape, device=DEVICE)
    first = run_with_grads(call_kernel, inputs, dy, dh, eps=1e-6)
    second = run_with_grads(call_kernel, inputs, dy, dh, eps=1e-6)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_second_stage_sums_partial_rows_over_several_tiles(seed, param_dtype):
    """The backward's second stage (ops/_partial_sums.py: each gradient's partial rows summed, cast
    to its dtype), shared with bias + GELU's dbias, on more partial rows than one tile holds (a GPU
    has 8 per SM; the interpreter's backward makes 4), with an output absent between two given
    ones and an odd width: against a float64 sum, and the same bits on a second run."""
    from vit_kernels.ops import _partial_sums

    n_partials, n_cols = 300, 40
    partials = torch.randn(2, n_partials, n_cols, device=DEVICE)
    block_p, _, _ = _partial_sums.partial_sums_config(n_cols, _partial_sums.interpreted(
        _partial_sums._partial_row_sums_kernel))
    assert block_p < n_partials  # several tiles, the last one masked

    def second_stage():
        dw, dgamma = (torch.full((n_cols,), float("nan"), dtype=param_dtype, device=DEVICE) for _ in range(2))
        _partial_sums.sum_partial_rows(partials, n_partials, (dw, None, dgamma))
        return dw, dgamma

    first, second = second_stage(), second_stage()
    sums = partials.double().sum(1)
    for got, again, want in zip(first, second, sums):
        assert torch.equal(got, again)
        torch.testing.assert_close(got.double(), want.to(param_dtype).double(), rtol=1e-5 if param_dtype == torch.float32
                                   else 8e-3, atol=1e-4)
    empty = torch.full((n_cols,), float("nan"), dtype=param_dtype, device=DEVICE)
    _partial_sums.sum_partial_rows(partials, 0, (None, empty))  # no partial rows: zeros
    assert torch.count_nonzero(empty) == 0


def test_empty_batch():
    x = torch.randn(0, 197, 384, device=DEVICE, requires_grad=True)
    residual = torch.randn(0, 197, 384, device=DEVICE, requires_grad=True)
    weight = torch.randn(384, device=DEVICE, requires_grad=True)
    y, h_new = add_layer_norm(x, residual, weight, None)
    assert y.shape == h_new.shape == (0, 197, 384)
    (y.sum() + h_new.sum()).backward()
    assert x.grad.shape == x.shape and torch.count_nonzero(weight.grad) == 0


def test_float64_runs_the_reference(seed):
    x, residual = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 5, 32, dtype=torch.float64)
    y, h_new = add_layer_norm(x, residual)
    y_ref, h_ref = reference.add_layer_norm(x, residual)
    assert torch.equal(y, y_ref) and torch.equal(h_new, h_ref)


def test_cpu_without_interpreter_runs_the_reference():
    """docs/design.md's dispatch rule: a CPU tensor with TRITON_INTERPRET unset takes the reference path."""
    code = (
        "import torch, vit_kernels.ops.layer_norm as m\n"
        "from vit_kernels import reference\n"
        "assert not m.runs_kernel(m._add_layer_norm_fwd_kernel, torch.empty(1))\n"
        "x, h, w = torch.randn(3, 40), torch.randn(3, 40), torch.randn(40)\n"
        "y, hn = m.add_layer_norm(x, h, w, gamma=w)\n"
        "yr, hr = reference.add_layer_norm(x, h, w, gamma=w)\n"
        "assert torch.equal(y, yr) and torch.equal(hn, hr)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)


# ---- bad input -----------------------------------------------------------------------------


def _good():
    return dict(
        x=torch.randn(2, 5, 16, device=DEVICE),
        residual=torch.randn(2, 5, 16, device=DEVICE),
        weight=torch.randn(16, device=DEVICE),
        bias=torch.randn(16, device=DEVICE),
    )


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(x=torch.ones(2, 5, 16, dtype=torch.int32)), TypeError, "x must have dtype"),
        (dict(x=[1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
        (dict(residual=torch.ones(2, 5, 16, dtype=torch.int64)), TypeError, "residual must have dtype"),
        (dict(weight=torch.randn(15)), ValueError, r"weight must have shape \(16,\)"),
        (dict(bias=torch.randn(17)), ValueError, r"bias must have shape \(16,\)"),
        (dict(residual=torch.randn(2, 6, 16)), ValueError, "residual must have shape"),
        (dict(gamma=torch.randn(8)), ValueError, "gamma must have shape"),
        (dict(row_scale=torch.ones(3)), ValueError, r"row_scale must have shape \(2,\)"),
        (dict(weight=torch.randn(16, device="meta")), ValueError, "weight is on meta"),
        (dict(residual=torch.randn(2, 5, 16, device="meta")), ValueError, "residual is on meta"),
        (dict(eps=-1.0), ValueError, "eps must be >= 0"),
        (dict(eps="1e-6"), TypeError, "eps must be a real number"),
        (dict(x=torch.randn(2, 0)), ValueError, "hidden size D"),
        (dict(x=torch.tensor(1.0)), ValueError, "at least one dimension"),
    ],
)
def test_bad_input_is_named(change, error, match):
    # Built at collection time on the CPU; moved to the kernel device so only the named fault differs.
    change = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v
              for k, v in change.items()}
    args = _good()
    if "x" in change and isinstance(change["x"], torch.Tensor) and change["x"].shape != (2, 5, 16):
        args.update(residual=None, weight=None, bias=None)
    args.update(change)
    with pytest.raises(error, match=match):
        add_layer_norm(**args)


def test_too_wide_is_refused():
    with pytest.raises(ValueError, match=r"must be in \[1, 16384\]"):
        add_layer_norm(torch.randn(1, 16385))


def test_row_scale_needs_a_batch_dim():
    with pytest.raises(ValueError, match="row_scale needs x with a leading batch dim"):
        add_layer_norm(torch.randn(16), row_scale=torch.ones(1))


# ---- custom ops, compile -----------------------------------------------------------------------


@pytest.mark.inductor
def test_opcheck(seed):
    inputs = make_inputs(2, 9, 96, torch.float32, residual=True, gamma=True, row_scale=True)
    for k in ("x", "residual", "weight", "bias", "gamma"):
        inputs[k].requires_grad_()
    args = (inputs["x"], inputs["residual"], inputs["weight"], inputs["bias"], inputs["gamma"], inputs["row_scale"])
    torch.library.opcheck(torch.ops.vit_kernels.add_layer_norm_fwd.default, args + (1e-6, torch.float32, True))
    torch.library.opcheck(torch.ops.vit_kernels.add_layer_norm_fwd.default, (inputs["x"], None, None, None, None, None, 1e-5, torch.float32, False))
    x, h = inputs["x"].detach(), inputs["residual"].detach()
    stats = torch.stack([torch.randn(18, device=DEVICE), torch.rand(18, device=DEVICE) + 0.5])  # mean, rstd
    torch.library.opcheck(
        torch.ops.vit_kernels.add_layer_norm_bwd.default,
        (torch.randn_like(x), torch.randn_like(x), x, h, inputs["weight"].detach(), inputs["bias"].detach(),
         inputs["gamma"].detach(), inputs["row_scale"], stats, torch.float32),
    )


@pytest.mark.inductor
def test_compile_fullgraph_module(seed):
    norm = FusedLayerNorm(192, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
        norm.bias.normal_(0.0, 0.3)
    gamma = torch.randn(192, device=DEVICE, requires_grad=True)

    def block_step(x, residual, row_scale):
        y, residual = norm(x, residual, gamma=gamma, row_scale=row_scale)
        return norm(y * 2.0 + residual)

    compiled = torch.compile(block_step, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 17, 192, device=DEVICE, requires_grad=True)
    residual = torch.randn(3, 17, 192, device=DEVICE, requires_grad=True)
    row_scale = torch.tensor([0.0, 2.0, 2.0], device=DEVICE)
    out = compiled(x, residual, row_scale)
    grads = torch.autograd.grad(out.sum(), [x, residual, norm.weight, gamma])
    out_eager = block_step(x, residual, row_scale)
    grads_eager = torch.autograd.grad(out_eager.sum(), [x, residual, norm.weight, gamma])
    # Under compile the LayerNorm is Inductor's (the reference, _dispatch.inductor_generates):
    # by the rule against float64, the eager kernels' error as the yardstick.
    norm.double()
    gamma64 = gamma.detach().double().requires_grad_()
    x64, residual64 = (t.detach().double().requires_grad_() for t in (x, residual))

    def block_step64(x, residual, row_scale):
        y, residual = norm(x, residual, gamma=gamma64, row_scale=row_scale)
        return norm(y * 2.0 + residual)

    out64 = block_step64(x64, residual64, row_scale.double())
    grads64 = torch.autograd.grad(out64.sum(), [x64, residual64, norm.weight, gamma64])
    assert_rule("out", out, out64, out_eager)
    for name, g, g64, g_eager in zip(("dx", "dresidual", "dweight", "dgamma"), grads, grads64, grads_eager):
        assert_rule(name, g, g64, g_eager)


@pytest.mark.inductor
@pytest.mark.requires_cuda
def test_compile_inductor_cuda(seed):
    norm = FusedLayerNorm(768, eps=1e-6).to(DEVICE, torch.bfloat16)
    compiled = torch.compile(norm, fullgraph=True)
    x = torch.randn(8, 197, 768, device=DEVICE, dtype=torch.bfloat16)
    h = torch.randn_like(x)
    for got, want in zip(compiled(x, h), norm(x, h)):
        torch.testing.assert_close(got, want)


# ---- the module ----------------------------------------------------------------------------------


def test_module_is_a_layer_norm_with_its_state_dict(seed):
    plain = nn.LayerNorm(384, eps=1e-6)
    with torch.no_grad():
        plain.weight.normal_()
        plain.bias.normal_()
    fused = FusedLayerNorm(384, eps=1e-6)
    fused.load_state_dict(plain.state_dict(), strict=True)
    assert isinstance(fused, nn.LayerNorm)
    assert list(fused.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(fused.state_dict(), strict=True)
    plain, fused = plain.to(DEVICE), fused.to(DEVICE)
    x = torch.randn(2, 197, 384, device=DEVICE)
    y = fused(x)
    assert isinstance(y, torch.Tensor)
    torch.testing.assert_close(y, plain(x), rtol=1e-5, atol=1e-5)


def test_module_residual_forms(seed):
    norm = FusedLayerNorm(64, eps=1e-6).to(DEVICE)
    x, h = torch.randn(2, 5, 64, device=DEVICE), torch.randn(2, 5, 64, device=DEVICE)
    gamma, row_scale = torch.randn(64, device=DEVICE), torch.tensor([0.0, 4.0], device=DEVICE)
    y, h_new = norm(x, h, gamma=gamma, row_scale=row_scale)
    y_ref, h_ref = reference.add_layer_norm(x, h, norm.weight, norm.bias, 1e-6, gamma=gamma, row_scale=row_scale)
    torch.testing.assert_close(h_new, h_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y0, h0 = norm(x, None)  # starting the stream: h_new is x
    assert h0 is x
    torch.testing.assert_close(y0, norm(x))


def test_module_from_layer_norm_shares_parameters():
    plain = nn.LayerNorm(32, eps=1e-12)
    fused = FusedLayerNorm.from_layer_norm(plain, residual_in_fp32=True)
    assert fused.weight is plain.weight and fused.bias is plain.bias
    assert fused.eps == 1e-12 and fused.residual_in_fp32
    assert list(fused.state_dict()) == ["weight", "bias"]
    with pytest.raises(TypeError, match="norm must be an nn.LayerNorm"):
        FusedLayerNorm.from_layer_norm(nn.Linear(3, 3))


def test_module_refuses_multi_dim_normalized_shape():
    with pytest.raises(ValueError, match="last dim only"):
        FusedLayerNorm((4, 8))
