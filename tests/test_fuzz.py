"""Property-based fuzzing of every public op (hypothesis): random shapes inside the supported
range, strides the op accepts, every dtype, each optional input present or not; forward and every
gradient against the float64 reference by the numerics rule, kernel allocations poisoned first.
And the bad-input side: each argument given the wrong dtype, device, rank, size or type must get a
TypeError or ValueError that names it.

CI runs a bounded number of examples per op under the interpreter (each draws its own torch seed,
so a failure shrinks and replays); `VIT_KERNELS_FUZZ_EXAMPLES=200 pytest tests/test_fuzz.py` runs
more, with a fresh random search each run instead of the derandomized one. A failure found here is
fixed and added to REGRESSIONS (its draws, replayed).
"""

import os
from dataclasses import dataclass
from typing import Callable
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vit_kernels import reference
from vit_kernels.ops import add_layer_norm, attention, bias_gelu, bias_gelu_linear, flash_attention, patch_embed
from vit_kernels.testing import RULE_FLOOR, assert_rule, kernel_device, poisoned_allocations

DEVICE = kernel_device()
ON_GPU = DEVICE.type == "cuda"
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The interpreter's bf16 tl.dot is wrong (docs/design.md): attention fuzzes bf16 on the GPU only.
ATTENTION_DTYPES = FLOAT_DTYPES if ON_GPU else [torch.float32, torch.float16]
# Lengths a ViT has (1, 50, 197, 257) and lengths at block edges (every tile is 16, 32, 64 or 128 wide) +-1.
LENGTHS = [1, 2, 15, 16, 17, 50, 63, 64, 65, 127, 128, 129, 197]
EXTRA = int(os.environ.get("VIT_KERNELS_FUZZ_EXAMPLES", "0"))


def fuzz_settings(examples: int):
    return settings(max_examples=EXTRA or examples, deadline=None, database=None, derandomize=not EXTRA,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@dataclass
class Call:
    """One fuzzed call: `leaves` are the tensors drawn (gradients are taken for `differentiable`),
    `build(leaves)` the op's keyword arguments made from them (views, packed layouts)."""

    leaves: dict
    differentiable: tuple
    build: Callable


def _run(fn, call: Call, upstream, as_dtype=None):
    leaves = {name: (t.detach().to(as_dtype) if as_dtype is not None and t.is_floating_point() else t.detach().clone())
              for name, t in call.leaves.items()}
    for name in call.differentiable:
        leaves[name].requires_grad_()
    outputs = fn(**call.build(leaves))
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    if upstream is None:  # the first run draws the upstream gradients, rounded to the outputs' dtypes
        upstream = [torch.randn(o.shape, device=o.device).to(o.dtype) for o in outputs]
    grads = torch.autograd.grad(outputs, [leaves[n] for n in call.differentiable], [u.to(o.dtype) for u, o in
                                zip(upstream, outputs)], allow_unused=True) if call.differentiable else ()
    return outputs, dict(zip(call.differentiable, grads)), upstream


def fuzz_floor(dtype: torch.dtype) -> float:
    """The rule's relative floor here: half an ulp of `dtype` (at the output's magnitude; the
    default 1e-5 for float32). The fuzzing draws outputs of a few elements, where eager's max
    error is a lucky draw anywhere below half an ulp, and twice that is no bound on a kernel that
    rounds once more (an ulp). A bug is orders of magnitude past either."""
    return max(RULE_FLOOR, torch.finfo(dtype).eps / 2)


def check_call(ours, eager, call: Call):
    """Every output and gradient of `ours` by the rule: eager in the same dtypes, eager in float64."""
    with poisoned_allocations():
        outputs, grads, upstream = _run(ours, call, None)
    eager_outputs, eager_grads, _ = _run(eager, call, upstream)
    oracle_outputs, oracle_grads, _ = _run(eager, call, upstream, torch.float64)
    for i, (got, want, base) in enumerate(zip(outputs, oracle_outputs, eager_outputs)):
        assert_rule(f"output {i}", got, want, base, floor=fuzz_floor(got.dtype))
    for name in call.differentiable:
        got, want, base = grads[name], oracle_grads[name], eager_grads[name]
        assert (got is None) == (base is None), f"d{name}: ours {got is None}, eager {base is None}"
        if got is not None:
            assert_rule(f"d{name}", got, want, base, floor=fuzz_floor(got.dtype))


def _draw_seed(data):
    torch.manual_seed(data.draw(st.integers(0, 2**31 - 1), label="torch seed"))


def _rows(data, label):
    """A leading shape of rows: a batch (1 or odd) and a ViT length or a block edge."""
    return data.draw(st.sampled_from([1, 2, 3]), label=f"{label} batch"), data.draw(st.sampled_from(LENGTHS),
                                                                                      label=f"{label} tokens")


def _row_strided(t, pad: int):
    """t [..., D] read as a view into a wider buffer [..., D + pad] (a row stride the op takes in place)."""
    wide = torch.randn(*t.shape[:-1], t.shape[-1] + pad, device=t.device).to(t.dtype)
    wide[..., : t.shape[-1]] = t
    return wide[..., : t.shape[-1]]


# ---- add_layer_norm -----------------------------------------------------------------------------


def fuzz_add_layer_norm(data):
    _draw_seed(data)
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), label="dtype")
    batch, tokens = _rows(data, "x")
    hidden = data.draw(st.sampled_from([8, 24, 64, 192, 200, 384, 768, 1000, 1024]), label="hidden")
    param_dtype = data.draw(st.sampled_from([torch.float32, dtype]), label="param dtype")
    given_inputs = {name: data.draw(st.booleans(), label=name)
                    for name in ("residual", "weight", "bias", "gamma", "row_scale")}
    residual_dtype = data.draw(st.sampled_from([dtype, torch.float32]), label="residual dtype")
    residual_in_fp32 = data.draw(st.booleans(), label="residual_in_fp32")
    eps = data.draw(st.sampled_from([1e-6, 1e-5, 1e-12, 0.1]), label="eps")
    strided = data.draw(st.sampled_from(["contiguous", "x row-strided", "residual row-strided"]), label="layout")

    leaves = {"x": torch.randn(batch, tokens, hidden, device=DEVICE).to(dtype)}
    if given_inputs["residual"]:
        leaves["residual"] = (2 * torch.randn(batch, tokens, hidden, device=DEVICE) + 0.5).to(residual_dtype)
    if given_inputs["weight"]:
        leaves["weight"] = (1 + 0.5 * torch.randn(hidden, device=DEVICE)).to(param_dtype)
    if given_inputs["bias"]:
        leaves["bias"] = (0.5 * torch.randn(hidden, device=DEVICE)).to(param_dtype)
    if given_inputs["gamma"]:
        leaves["gamma"] = (0.1 + 0.9 * torch.rand(hidden, device=DEVICE)).to(param_dtype)
    if given_inputs["row_scale"]:
        keep = torch.rand(batch, device=DEVICE) < 0.75
        keep[0] = True
        leaves["row_scale"] = keep.to(dtype) / 0.75

    def build(t):
        kwargs = dict(t)
        if strided == "x row-strided":
            kwargs["x"] = _row_strided(t["x"], 8)
        if strided == "residual row-strided" and "residual" in t:
            kwargs["residual"] = _row_strided(t["residual"], 16)
        return kwargs

    def ours(x, residual=None, weight=None, bias=None, gamma=None, row_scale=None):
        return add_layer_norm(x, residual, weight, bias, eps, gamma=gamma, row_scale=row_scale,
                              residual_in_fp32=residual_in_fp32)

    def eager(x, residual=None, weight=None, bias=None, gamma=None, row_scale=None):
        return reference.add_layer_norm(x, residual, weight, bias, eps, gamma=gamma, row_scale=row_scale,
                                        residual_in_fp32=residual_in_fp32)

    differentiable = tuple(name for name in leaves if name != "row_scale")
    check_call(ours, eager, Call(leaves, differentiable, build))


def test_regression_fp16_rows_that_drop_path_zeroes_with_a_tiny_eps():
    """Shrunk from a fuzzing failure: fp16, no residual, a drop-path row_scale of 0 for a sample and
    eps 1e-12. Those rows have variance 0, rstd 1e6, which eager's fp16 backward overflows to NaN
    (inf x 0) where the exact gradient is finite. The kernel keeps it finite; the rule takes eager's
    error where eager is finite and holds ours to every element (testing.check_rule)."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, device=DEVICE).half()
    row_scale = torch.tensor([1 / 0.75, 0.0], device=DEVICE).half()

    def ours(x):
        return add_layer_norm(x, None, None, None, 1e-12, row_scale=row_scale)

    def eager(x):
        return reference.add_layer_norm(x, None, None, None, 1e-12, row_scale=row_scale)

    _, eager_grads, _ = _run(eager, Call({"x": x}, ("x",), dict), [torch.ones(2, 1, 8, device=DEVICE).half()] * 2)
    assert not bool(torch.isfinite(eager_grads["x"]).all())  # the case stays the one it was shrunk to
    check_call(ours, eager, Call({"x": x}, ("x",), dict))


def test_the_rule_holds_ours_finite_where_eager_overflows():
    from vit_kernels.testing import check_rule

    oracle = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    eager = torch.tensor([1.001, float("nan"), 3.0])
    assert check_rule("t", torch.tensor([1.0, 2.0, 3.001]), oracle, eager).ok
    assert not check_rule("t", torch.tensor([1.0, 2.1, 3.0]), oracle, eager).ok
    assert not check_rule("t", torch.tensor([1.0, float("inf"), 3.0]), oracle, eager).ok
    assert not check_rule("t", torch.tensor([1.0, float("nan"), 3.0]), oracle, eager).ok


# ---- flash_attention ----------------------------------------------------------------------------


def fuzz_flash_attention(data):
    _draw_seed(data)
    dtype = data.draw(st.sampled_from(ATTENTION_DTYPES), label="dtype")
    batch = data.draw(st.sampled_from([1, 2, 3]), label="batch")
    heads = data.draw(st.sampled_from([1, 2, 3]), label="heads")
    head_dim = data.draw(st.sampled_from(attention.HEAD_DIMS), label="head dim")
    n_q = data.draw(st.sampled_from(LENGTHS), label="N_q")
    layout = data.draw(st.sampled_from(["packed qkv", "separate", "cross"]), label="layout")
    n_kv = data.draw(st.sampled_from(LENGTHS), label="N_kv") if layout == "cross" else n_q
    scale = data.draw(st.sampled_from([None, 0.05, 0.3]), label="softmax_scale")
    # Not dropout with a single key: there eager's softmax backward cancels exactly (dq = 0) while
    # FlashAttention's, ours included, takes delta from the stored, rounded output and leaves
    # dq at rounding size (an ulp of |dO| |v|), which no multiple of eager's exact 0 bounds.
    dropout_p = data.draw(st.sampled_from([0.0, 0.0, 0.2] if n_kv > 1 else [0.0]), label="dropout_p")
    deterministic = data.draw(st.booleans(), label="deterministic")
    seed = torch.tensor(data.draw(st.integers(0, 2**31 - 2), label="dropout seed"), device=DEVICE)

    if layout == "packed qkv":
        leaves = {"qkv": torch.randn(batch, n_q, 3, heads, head_dim, device=DEVICE).to(dtype)}
        # The packed entry point, or its q, k, v views passed apart: both read the packed tensor in place.
        entry = data.draw(st.sampled_from(["flash_attention_qkvpacked", "flash_attention"]), label="entry")

        def build(t):
            q, k, v = t["qkv"].unbind(2)
            return dict(q=q, k=k, v=v, qkv=t["qkv"] if entry == "flash_attention_qkvpacked" else None)
    else:
        leaves = {"q": torch.randn(batch, n_q, heads, head_dim, device=DEVICE).to(dtype),
                  "k": torch.randn(batch, n_kv, heads, head_dim, device=DEVICE).to(dtype),
                  "v": torch.randn(batch, n_kv, heads, head_dim, device=DEVICE).to(dtype)}

        def build(t):
            return dict(t)

    mask = attention.attention_dropout_mask(seed, batch, heads, n_q, n_kv, dropout_p, DEVICE) if dropout_p else None

    def ours(q, k, v, qkv=None):
        with mock.patch.object(attention, "draw_seed", lambda device: seed):
            if qkv is not None:
                return attention.flash_attention_qkvpacked(qkv, softmax_scale=scale, dropout_p=dropout_p,
                                                           deterministic=deterministic)
            return flash_attention(q, k, v, softmax_scale=scale, dropout_p=dropout_p, deterministic=deterministic)

    def eager(q, k, v, qkv=None):
        return reference.attention(q, k, v, scale, mask, dropout_p)

    check_call(ours, eager, Call(leaves, tuple(leaves), build))


# ---- bias_gelu and bias_gelu_linear -------------------------------------------------------------


def _bias_gelu_inputs(data, hidden_sizes):
    _draw_seed(data)
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), label="dtype")
    batch, tokens = _rows(data, "x")
    hidden = data.draw(st.sampled_from(hidden_sizes), label="hidden")
    leaves = {"x": torch.randn(batch, tokens, hidden, device=DEVICE).to(dtype)}
    if data.draw(st.booleans(), label="bias"):
        bias_dtype = data.draw(st.sampled_from([torch.float32, dtype]), label="bias dtype")
        leaves["bias"] = (0.5 * torch.randn(hidden, device=DEVICE)).to(bias_dtype)
    approximate = data.draw(st.sampled_from(["none", "tanh", "quick"]), label="approximate")
    row_strided = data.draw(st.booleans(), label="x row-strided")
    return dtype, hidden, leaves, approximate, row_strided


def fuzz_bias_gelu(data):
    _, _, leaves, approximate, row_strided = _bias_gelu_inputs(data, [8, 64, 200, 768, 1000, 1536, 3072])

    def build(t):
        return dict(t, x=_row_strided(t["x"], 8) if row_strided else t["x"])

    check_call(lambda x, bias=None: bias_gelu(x, bias, approximate),
               lambda x, bias=None: reference.bias_gelu(x, bias, approximate),
               Call(leaves, tuple(leaves), build))


def fuzz_bias_gelu_linear(data):
    # At least 64 columns: dbias is a max over its columns of sums over the rows, and over a
    # handful of columns eager's error is a lucky draw (seen: 8 columns, 2.07x eager's).
    dtype, hidden, leaves, approximate, row_strided = _bias_gelu_inputs(data, [64, 200, 768])
    out_features = data.draw(st.sampled_from([8, 24, 64, 192]), label="out features")
    leaves["weight"] = (torch.randn(out_features, hidden, device=DEVICE) * hidden**-0.5).to(dtype)
    if data.draw(st.booleans(), label="linear_bias"):
        leaves["linear_bias"] = (0.5 * torch.randn(out_features, device=DEVICE)).to(dtype)

    def build(t):
        return dict(t, x=_row_strided(t["x"], 8) if row_strided else t["x"])

    def ours(x, weight, bias=None, linear_bias=None):
        return bias_gelu_linear(x, bias, weight, linear_bias, approximate)

    def eager(x, weight, bias=None, linear_bias=None):
        return reference.bias_gelu_linear(x, bias, weight, linear_bias, approximate)

    check_call(ours, eager, Call(leaves, tuple(leaves), build))


# ---- patch_embed --------------------------------------------------------------------------------


def fuzz_patch_embed(data):
    _draw_seed(data)
    image_dtype = data.draw(st.sampled_from([torch.uint8, *FLOAT_DTYPES]), label="image dtype")
    batch = data.draw(st.sampled_from([1, 2, 3]), label="batch")
    channels = data.draw(st.sampled_from([1, 3, 4]), label="channels")
    patch = data.draw(st.sampled_from([1, 2, 14, 16]), label="patch")
    grid = (data.draw(st.sampled_from([1, 2, 3]), label="rows"), data.draw(st.sampled_from([1, 2, 3]), label="cols"))
    dim = data.draw(st.sampled_from([8, 24, 64, 192]), label="dim")
    layout = data.draw(st.sampled_from(["nchw", "channels_last", "offset view"]), label="layout")
    float_images = image_dtype != torch.uint8
    weight_dtype = image_dtype if float_images else torch.float32
    height, width = grid[0] * patch, grid[1] * patch
    if float_images:
        images = torch.randn(batch, channels, height, width, device=DEVICE).to(image_dtype)
    else:
        images = torch.randint(0, 256, (batch, channels, height, width), dtype=torch.uint8, device=DEVICE)
    leaves = {"images": images,
              "weight": (torch.randn(dim, channels, patch, patch, device=DEVICE) * (channels * patch**2) ** -0.5)
              .to(weight_dtype)}
    if data.draw(st.booleans(), label="bias"):
        leaves["bias"] = (0.5 * torch.randn(dim, device=DEVICE)).to(weight_dtype)
    cls = data.draw(st.booleans(), label="cls_token")
    if cls:
        leaves["cls_token"] = torch.randn(1, 1, dim, device=DEVICE).to(weight_dtype)
    pos = data.draw(st.sampled_from(["none", "N", "N+1"] if cls else ["none", "N"]), label="pos_embed")
    if pos != "none":
        n = grid[0] * grid[1] + (pos == "N+1")
        leaves["pos_embed"] = torch.randn(1, n, dim, device=DEVICE).to(weight_dtype)
    if data.draw(st.booleans(), label="mean/std"):
        leaves["mean"] = torch.rand(channels, device=DEVICE) * 0.5
        leaves["std"] = 0.2 + torch.rand(channels, device=DEVICE)

    def build(t):
        kwargs = dict(t)
        if layout == "channels_last":
            kwargs["images"] = t["images"].contiguous(memory_format=torch.channels_last)
        elif layout == "offset view":
            kwargs["images"] = torch.cat([t["images"][:1], t["images"]])[1:]
        return kwargs

    def ours(images, weight, bias=None, **kwargs):
        return patch_embed(images, weight, bias, **kwargs)

    def eager(images, weight, bias=None, **kwargs):
        return reference.patch_embed(images, weight, bias, **kwargs)

    differentiable = tuple(name for name in leaves if name not in ("mean", "std") and (name != "images" or float_images))
    check_call(ours, eager, Call(leaves, differentiable, build))


# ---- the fuzzing tests, and their shrunk failures replayed -----------------------------------


def _fuzzing_test(fuzz, examples: int):
    """The hypothesis test of one op's fuzz function, with its bounded example count."""
    @fuzz_settings(examples)
    @given(st.data())
    def test(data):
        fuzz(data)

    test.__name__ = fuzz.__name__.replace("fuzz_", "test_")
    return test


test_add_layer_norm = _fuzzing_test(fuzz_add_layer_norm, 12)
test_flash_attention = _fuzzing_test(fuzz_flash_attention, 8)
test_bias_gelu = _fuzzing_test(fuzz_bias_gelu, 12)
test_bias_gelu_linear = _fuzzing_test(fuzz_bias_gelu_linear, 8)
test_patch_embed = _fuzzing_test(fuzz_patch_embed, 12)


class Replay:
    """Stands in for hypothesis's `data`: each draw returns the value recorded under its label."""

    def __init__(self, values: dict):
        self.values = values

    def draw(self, strategy, label):
        return self.values[label]


# Failures the fuzzing found, as hypothesis printed them (its "Draw n (label): value" lines), each
# replayed for good. Each of these failed by a hair (2.0-2.2x eager's error) on outputs of a
# few elements, where eager's max error is a lucky draw below half an ulp: fixed by the fuzzing's
# half-ulp floor (fuzz_floor), not in the kernels.
REGRESSIONS = {
    "add_layer_norm fp16 8-wide, drop path": (fuzz_add_layer_norm, {
        "torch seed": 1, "dtype": torch.float16, "x batch": 3, "x tokens": 1, "hidden": 8,
        "param dtype": torch.float32, "residual": False, "weight": False, "bias": False, "gamma": False,
        "row_scale": True, "residual dtype": torch.float16, "residual_in_fp32": False, "eps": 1e-6,
        "layout": "contiguous"}),
    "flash_attention fp16 N=2 d=32": (fuzz_flash_attention, {
        "torch seed": 743209, "dtype": torch.float16, "batch": 2, "heads": 2, "head dim": 32, "N_q": 2,
        "layout": "packed qkv", "softmax_scale": 0.3, "dropout_p": 0.0, "deterministic": True, "dropout seed": 0,
        "entry": "flash_attention"}),
    "patch_embed bf16 one channel, P=1": (fuzz_patch_embed, {
        "torch seed": 441617583, "image dtype": torch.bfloat16, "batch": 1, "channels": 1, "patch": 1, "rows": 1,
        "cols": 3, "dim": 8, "layout": "nchw", "bias": True, "cls_token": False, "pos_embed": "none",
        "mean/std": False}),
}


@pytest.mark.parametrize("name", list(REGRESSIONS))
def test_fuzzing_regression(name):
    fuzz, values = REGRESSIONS[name]
    fuzz(Replay(values))


# ---- bad inputs ---------------------------------------------------------------------------------


def _valid_calls(data):
    """A valid call of each public op at a drawn size: (op, its function, its keyword arguments)."""
    batch = data.draw(st.sampled_from([1, 2, 3]), label="batch")
    tokens = data.draw(st.sampled_from([1, 17, 50]), label="tokens")
    hidden = data.draw(st.sampled_from([32, 64]), label="hidden")
    x = torch.randn(batch, tokens, hidden, device=DEVICE)
    vec = lambda n=hidden: torch.randn(n, device=DEVICE)  # noqa: E731
    qkv = [torch.randn(batch, tokens, 2, 32, device=DEVICE) for _ in range(3)]
    patch = 4
    return {
        "add_layer_norm": (add_layer_norm, dict(x=x, residual=torch.randn_like(x), weight=vec(), bias=vec(),
                                                eps=1e-6, gamma=vec(), row_scale=torch.ones(batch, device=DEVICE))),
        "flash_attention": (flash_attention, dict(q=qkv[0], k=qkv[1], v=qkv[2], softmax_scale=0.1, dropout_p=0.1)),
        "flash_attention_qkvpacked": (attention.flash_attention_qkvpacked,
                                      dict(qkv=torch.randn(batch, tokens, 3, 2, 32, device=DEVICE), dropout_p=0.1)),
        "bias_gelu": (bias_gelu, dict(x=x, bias=vec(), approximate="tanh")),
        "bias_gelu_linear": (bias_gelu_linear, dict(x=x, bias=vec(), weight=torch.randn(16, hidden, device=DEVICE),
                                                    linear_bias=vec(16), approximate="none")),
        "patch_embed": (patch_embed, dict(images=torch.randn(batch, 3, 2 * patch, 3 * patch, device=DEVICE),
                                          weight=torch.randn(hidden, 3, patch, patch, device=DEVICE), bias=vec(),
                                          cls_token=torch.randn(1, 1, hidden, device=DEVICE),
                                          pos_embed=torch.randn(1, 7, hidden, device=DEVICE),
                                          mean=vec(3), std=vec(3).abs() + 0.5)),
    }


def _to_int(t):
    return t.to(torch.int32)


def _to_other_device(t):
    return t.to("meta")


def _add_dim(t):
    return t.unsqueeze(0)


def _grow_last(t):
    return torch.cat([t, t.narrow(-1, 0, 1)], dim=-1)


def _grow_first(t):
    return torch.cat([t, t.narrow(0, 0, 1)], dim=0)


def _as_list(t):
    return t.tolist()


# (op, argument, how it is broken): each must raise TypeError/ValueError naming the argument.
# The first tensor argument is the one others are compared with, so it gets no device mutation;
# a rank change it accepts (add_layer_norm and bias_gelu take any leading shape) is left out.
BAD = {
    "add_layer_norm": {
        "x": [_to_int, _as_list],
        "residual": [_to_int, _to_other_device, _add_dim, _grow_last, _as_list],
        "weight": [_to_int, _to_other_device, _add_dim, _grow_last],
        "bias": [_to_int, _to_other_device, _add_dim, _grow_last],
        "gamma": [_to_int, _to_other_device, _add_dim, _grow_last],
        "row_scale": [_to_int, _to_other_device, _grow_first],
        "eps": ["a", -1.0, None],
    },
    "flash_attention": {
        "q": [_to_int, _add_dim, _grow_last, _as_list],
        "k": [_to_int, _to_other_device, _add_dim, _grow_last, _grow_first],
        "v": [_to_int, _to_other_device, _add_dim, _grow_last, _grow_first],
        "softmax_scale": ["a", -1.0, 0.0],
        "dropout_p": ["a", -0.1, 1.0],
    },
    "flash_attention_qkvpacked": {
        "qkv": [_to_int, _add_dim, lambda t: t[:, :, :2], lambda t: t[..., :20], _as_list],
        "dropout_p": ["a", 1.5],
    },
    "bias_gelu": {
        "x": [_to_int, _as_list],
        "bias": [_to_int, _to_other_device, _add_dim, _grow_last],
        "approximate": ["erf", None],
    },
    "bias_gelu_linear": {
        "x": [_to_int, _as_list],
        "bias": [_to_int, _to_other_device, _add_dim, _grow_last],
        "weight": [_to_int, _to_other_device, _add_dim, _grow_last],
        "linear_bias": [_to_int, _to_other_device, _add_dim, _grow_last],
        "approximate": ["erf"],
    },
    "patch_embed": {
        "images": [_to_int, _add_dim, _grow_last, _as_list],
        "weight": [_to_int, _to_other_device, _add_dim, lambda t: t[:, :2]],
        "bias": [_to_int, _to_other_device, _add_dim, _grow_last],
        "cls_token": [_to_int, _to_other_device, _grow_last],
        "pos_embed": [_to_int, _to_other_device, _grow_last, lambda t: t[:, 1:-1]],
        "mean": [_to_int, _to_other_device, _grow_last],
        "std": [_to_int, _to_other_device, _grow_last],
    },
}
CASES = [(op, arg, i) for op, args in BAD.items() for arg, breaks in args.items() for i in range(len(breaks))]


@pytest.mark.parametrize("op,arg,which", CASES, ids=[f"{op}-{arg}-{i}" for op, arg, i in CASES])
@fuzz_settings(3)
@given(data=st.data())
def test_bad_input_is_refused_naming_the_argument(data, op, arg, which):
    fn, kwargs = _valid_calls(data)[op]
    breaking = BAD[op][arg][which]
    kwargs[arg] = breaking(kwargs[arg]) if callable(breaking) else breaking
    with pytest.raises((TypeError, ValueError)) as raised:
        fn(**kwargs)
    assert arg in str(raised.value) or arg.replace("_", " ") in str(raised.value), (op, arg, str(raised.value))
