"""vit_kernels.ops.linear_bias_gelu: the Triton GEMM with the bias + GELU epilogue.

Output, dx, dweight and dbias by the numerics rule against float64, with eager
(nn.Linear then nn.GELU in the same dtype) as the yardstick. The GEMM runs in fp32 and
fp16 on CPU (bf16 tl.dot is wrong under the interpreter); every M, N and K the issue
lists appears, paired so that CI stays within minutes (interpreted GEMMs cost ~3 s per
GFLOP here), each GELU form and dtype at several shapes.
"""

import pytest
import torch

from vit_kernels import reference
from vit_kernels.ops import linear_bias_gelu
from vit_kernels.testing import assert_rule, kernel_device, poisoned_allocations

DEVICE = kernel_device()
GEMM_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
# (M, N, K): M in {1, 197, 397}, N in {1000, 1536, 3072, 4096, 5120}, K in {384, 768, 1280}.
SHAPES = [(1, 1000, 384), (197, 1536, 768), (397, 3072, 384), (197, 4096, 1280), (397, 5120, 768),
          (1, 5120, 1280), (197, 1000, 1280)]


def check_linear_bias_gelu(x, weight, bias, approximate, **kwargs):
    dy = torch.randn((*x.shape[:-1], weight.shape[0]), device=DEVICE).to(x.dtype)
    leaves = [x, weight] + ([bias] if bias is not None else [])
    names = ["y", "dx", "dweight"] + (["dbias"] if bias is not None else [])

    def run(fn, cast):
        copies = [cast(t).detach().requires_grad_() for t in leaves]
        y = fn(copies[0], copies[1], copies[2] if bias is not None else None, approximate)
        return [y, *torch.autograd.grad(y, copies, cast(dy))]

    with poisoned_allocations():
        got = run(lambda *a: linear_bias_gelu(*a, **kwargs), lambda t: t)
    eager = run(reference.linear_bias_gelu, lambda t: t)
    oracle = run(reference.linear_bias_gelu, lambda t: t.double())
    for name, g, e, o in zip(names, got, eager, oracle):
        assert g.dtype == e.dtype and g.shape == e.shape, name
        assert_rule(name, g, o, e)


def _inputs(m, n, k, dtype, leading=()):
    x = torch.randn(*leading, m, k, device=DEVICE).to(dtype)
    weight = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)  # pre-activations of order 1
    bias = (0.5 * torch.randn(n, device=DEVICE)).to(dtype)
    return x, weight, bias


def _cases():
    """Every shape in every dtype with both GELU forms, except the three largest, which get
    one dtype/form pair each way (float32 + erf, float16 + tanh) under the interpreter."""
    for m, n, k in SHAPES:
        large = DEVICE.type == "cpu" and m * n * k > 3e8
        for dtype in GEMM_DTYPES:
            for approximate in ("none", "tanh"):
                if not large or (dtype, approximate) in ((torch.float32, "none"), (torch.float16, "tanh")):
                    yield pytest.param(dtype, m, n, k, approximate, id=f"{str(dtype)[6:]}-{m}x{n}x{k}-{approximate}")


@pytest.mark.parametrize("dtype, m, n, k, approximate", list(_cases()))
def test_matches_rule(seed, dtype, m, n, k, approximate):
    check_linear_bias_gelu(*_inputs(m, n, k, dtype), approximate, backend="triton")


def test_no_bias_leading_dims_and_strided_rows(seed):
    x, weight, _ = _inputs(17, 200, 96, torch.float32, leading=(2,))
    check_linear_bias_gelu(x, weight, None, "none", backend="triton")
    wide = torch.randn(33, 300, device=DEVICE)
    check_linear_bias_gelu(wide[:, 50:146], weight, None, "tanh", backend="triton")


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else []), ids=str)
def test_autocast_runs_in_the_autocast_dtype(seed, dtype):
    """float32 activations and parameters under autocast: the GEMM in the autocast dtype, the
    bias in float32 (as autocast runs nn.Linear); agreement with eager under autocast."""
    x = torch.randn(197, 384, device=DEVICE)
    weight = torch.randn(1000, 384, device=DEVICE) / 384**0.5
    bias = 0.5 * torch.randn(1000, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=dtype):
        y = linear_bias_gelu(x, weight, bias, backend="triton")
        eager = reference.linear_bias_gelu(x, weight, bias)
    oracle = reference.linear_bias_gelu(x.to(dtype).double(), weight.to(dtype).double(), bias.double())
    assert y.dtype == eager.dtype == dtype
    assert_rule("y", y, oracle, eager)


def test_backends_agree_and_inference_saves_nothing(seed):
    x, weight, bias = _inputs(45, 300, 64, torch.float32)
    triton_y = linear_bias_gelu(x, weight, bias, backend="triton")
    cublas_y = linear_bias_gelu(x, weight, bias, backend="cublas")
    torch.testing.assert_close(triton_y, cublas_y, rtol=1e-5, atol=1e-5)
    if DEVICE.type == "cpu":  # under the interpreter auto runs the Triton GEMM (so CI tests it)
        assert torch.equal(linear_bias_gelu(x, weight, bias), triton_y)
    with torch.no_grad():
        y, pre = torch.ops.vit_kernels.linear_bias_gelu_fwd(x, weight, bias, "none", False)
    assert pre.numel() == 0 and torch.equal(y, triton_y)


def test_empty_and_reproducible(seed):
    x = torch.randn(0, 64, device=DEVICE, requires_grad=True)
    weight = torch.randn(32, 64, device=DEVICE, requires_grad=True)
    bias = torch.randn(32, device=DEVICE, requires_grad=True)
    y = linear_bias_gelu(x, weight, bias, backend="triton")
    assert y.shape == (0, 32)
    y.sum().backward()
    assert torch.count_nonzero(weight.grad) == 0 and torch.count_nonzero(bias.grad) == 0
    x, weight, bias = [t.requires_grad_() for t in _inputs(197, 512, 128, torch.float16)]
    dy = torch.randn(197, 512, device=DEVICE).half()
    first = torch.autograd.grad(linear_bias_gelu(x, weight, bias, backend="triton"), [x, weight, bias], dy)
    second = torch.autograd.grad(linear_bias_gelu(x, weight, bias, backend="triton"), [x, weight, bias], dy)
    assert all(torch.equal(a, c) for a, c in zip(first, second))


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((torch.ones(3, 4, dtype=torch.int32), torch.randn(5, 4)), {}, TypeError, "x must have dtype"),
        ((torch.randn(3, 4), torch.randn(5, 3)), {}, ValueError, r"weight must have shape \[N, 4\]"),
        ((torch.randn(3, 4), torch.randn(4)), {}, ValueError, "weight must have shape"),
        ((torch.randn(3, 4), torch.randn(5, 4), torch.randn(4)), {}, ValueError, r"bias must have shape \(5,\)"),
        ((torch.randn(3, 4), torch.randn(5, 4), torch.ones(5, dtype=torch.int64)), {}, TypeError, "bias must have"),
        ((torch.randn(3, 4), torch.randn(5, 4, device="meta")), {}, ValueError, "weight is on meta"),
        ((torch.randn(3, 4), torch.randn(5, 4), None, "relu"), {}, ValueError, "approximate must be one of"),
        ((torch.randn(3, 4), torch.randn(5, 4)), {"backend": "cutlass"}, ValueError, "backend must be one of"),
        ((torch.tensor(1.0), torch.randn(5, 1)), {}, ValueError, "at least one dimension"),
    ],
)
def test_bad_input_is_named(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        linear_bias_gelu(*args, **kwargs)


@pytest.mark.inductor
def test_opcheck_and_compile(seed):
    x, weight, bias = [t.requires_grad_() for t in _inputs(9, 96, 64, torch.float32)]
    op = torch.ops.vit_kernels.linear_bias_gelu_fwd.default
    torch.library.opcheck(op, (x, weight, bias, "none", True))
    torch.library.opcheck(op, (x, weight, None, "tanh", True))
    torch.library.opcheck(op, (x.detach(), weight.detach(), bias.detach(), "none", False))
    fn = lambda x, w, b: linear_bias_gelu(x * 2, w, b, backend="triton") + 1  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(x, weight, bias)
    grads = torch.autograd.grad(out.sum(), [x, weight, bias])
    out_eager = fn(x, weight, bias)
    grads_eager = torch.autograd.grad(out_eager.sum(), [x, weight, bias])
    torch.testing.assert_close(out, out_eager, rtol=0, atol=0)
    for g, ge in zip(grads, grads_eager):
        torch.testing.assert_close(g, ge, rtol=0, atol=0)
