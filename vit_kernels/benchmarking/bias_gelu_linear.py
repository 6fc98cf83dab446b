"""bias_gelu_linear: the whole MLP, fc1 -> GELU -> fc2, as FusedMlp runs it (fc1 without its
bias, then bias + GELU + fc2 keeping only the pre-activation), against eager (fc1 with its
bias, GELU, fc2) and torch.compile of it. TFLOP/s of the two GEMMs and % of the measured
bf16 matmul rate."""

import torch
import torch.nn.functional as F

from . import timing
from .bias_gelu import SHAPES, SMALL_SHAPES
from .case import Case, OpBench, leaves_agreement, provider_fn, timed_case

PROVIDERS = ("vit_kernels", "eager", "compile")


def _eager(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def _fused(x, w1, b1, w2, b2):
    from ..ops import bias_gelu_linear

    return bias_gelu_linear(F.linear(x, w1), b1, w2, b2)


def _fn(provider: str):
    return provider_fn(provider, _fused, _eager)


def _inputs(dims: tuple, dtype, device, requires_grad: bool):
    """x, fc1's and fc2's weights and biases (scaled like a trained ViT's), and the gradient of y."""
    rows, dim, hidden = dims

    def t(*shape, scale=1.0):
        return timing.randn(*shape, device=device, dtype=dtype, scale=scale, requires_grad=requires_grad)

    inputs = (t(rows, dim), t(hidden, dim, scale=dim**-0.5), t(hidden, scale=0.5),
              t(dim, hidden, scale=hidden**-0.5), t(dim, scale=0.5))
    return inputs, timing.randn(rows, dim, device=device, dtype=dtype)


def case(provider: str, shape: str, dims: tuple, mode: str, dtype, device) -> Case:
    rows, dim, hidden = dims
    backward = mode == "fwd+bwd"
    elem = torch.finfo(dtype).bits // 8

    def make_set():
        inputs, dy = _inputs(dims, dtype, device, backward)
        return inputs, {}, list(inputs), dy

    return timed_case("bias_gelu_linear", shape, mode, provider, _fn(provider), make_set, 3 * rows * hidden * elem,
                      device, flops=int(2 * rows * dim * hidden * 2 * (3 if backward else 1)))


def agreement(dims: tuple, dtype, device, providers=None) -> dict:
    inputs, dy = _inputs(dims, dtype, device, False)
    providers = providers or ["vit_kernels"] + (["compile"] if device.type == "cuda" else [])
    return leaves_agreement(inputs, dy, "y", ("dx", "dfc1.weight", "dfc1.bias", "dfc2.weight", "dfc2.bias"), _fn,
                            providers)


BENCH = OpBench("bias_gelu_linear", SHAPES, SMALL_SHAPES, PROVIDERS, "compile", case, agreement, (torch.float16,))
