"""linear_bias_gelu: fc1 with its bias and GELU, `gelu(x @ W^T + b)`, against eager
(`reference.linear_bias_gelu`: F.linear then F.gelu) and torch.compile of it. TFLOP/s of the
GEMM and % of the measured bf16 matmul rate. triton_gemm forces the Triton GEMM with the
bias + GELU epilogue, against which the op's dispatch (vit_kernels) is set."""

import torch

from .. import reference
from . import timing
from .bias_gelu import SHAPES, SMALL_SHAPES
from .case import Case, OpBench, leaves_agreement, provider_fn, timed_case

PROVIDERS = ("vit_kernels", "triton_gemm", "eager", "compile")


def fused(x, weight, bias, backend="auto"):
    from ..ops import linear_bias_gelu

    return linear_bias_gelu(x, weight, bias, backend=backend)


def _fn(provider: str):
    if provider == "triton_gemm":
        return lambda *inputs: fused(*inputs, backend="triton")
    return provider_fn(provider, fused, reference.linear_bias_gelu)


def _inputs(dims: tuple, dtype, device, requires_grad: bool):
    """x, fc1's weight and bias (scaled like a trained ViT's), and the gradient of y."""
    rows, dim, hidden = dims

    def t(*shape, scale=1.0):
        return timing.randn(*shape, device=device, dtype=dtype, scale=scale, requires_grad=requires_grad)

    inputs = (t(rows, dim), t(hidden, dim, scale=dim**-0.5), t(hidden, scale=0.5))
    return inputs, timing.randn(rows, hidden, device=device, dtype=dtype)


def case(provider: str, shape: str, dims: tuple, mode: str, dtype, device) -> Case:
    rows, dim, hidden = dims
    backward = mode == "fwd+bwd"
    elem = torch.finfo(dtype).bits // 8

    def make_set():
        inputs, dy = _inputs(dims, dtype, device, backward)
        return inputs, {}, list(inputs), dy

    return timed_case("linear_bias_gelu", shape, mode, provider, _fn(provider), make_set, 3 * rows * hidden * elem,
                      device, flops=int(2 * rows * dim * hidden * (3 if backward else 1)))


def agreement(dims: tuple, dtype, device) -> dict:
    inputs, dy = _inputs(dims, dtype, device, False)
    providers = ["vit_kernels", "triton_gemm"] + (["compile"] if device.type == "cuda" else [])
    return leaves_agreement(inputs, dy, "y", ("dx", "dweight", "dbias"), _fn, providers)


BENCH = OpBench("linear_bias_gelu", SHAPES, SMALL_SHAPES, PROVIDERS, "compile", case, agreement, (torch.float16,))
