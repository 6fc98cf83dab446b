"""bias_gelu: `gelu(x + bias)` on fc1's bias-free output [M, 4D], the largest activation of a
block, against eager (`reference.bias_gelu`) and torch.compile of it. Memory-bound: GB/s and
% of the measured copy bandwidth. Its SHAPES, (M, D, 4D) of each ViT's MLP, are shared with
bias_gelu_linear."""

import torch

from .. import reference
from . import timing
from .case import Case, OpBench, leaves_agreement, provider_fn, timed_case

SHAPES = {
    "ViT-B (256*197, 768->3072)": (256 * 197, 768, 3072),
    "ViT-L (128*197, 1024->4096)": (128 * 197, 1024, 4096),
    "ViT-H (64*257, 1280->5120)": (64 * 257, 1280, 5120),
}
SMALL_SHAPES = {"small (2*197, 192->768)": (2 * 197, 192, 768)}
PROVIDERS = ("vit_kernels", "eager", "compile")


def _fn(provider: str):
    from ..ops import bias_gelu

    return provider_fn(provider, bias_gelu, reference.bias_gelu)


def _inputs(dims: tuple, dtype, device, requires_grad: bool):
    rows, _, hidden = dims
    x = timing.randn(rows, hidden, device=device, dtype=dtype, requires_grad=requires_grad)
    bias = timing.randn(hidden, device=device, dtype=dtype, scale=0.5, requires_grad=requires_grad)
    return (x, bias), timing.randn(rows, hidden, device=device, dtype=dtype)


def case(provider: str, shape: str, dims: tuple, mode: str, dtype, device) -> Case:
    rows, _, hidden = dims
    backward = mode == "fwd+bwd"
    elem = torch.finfo(dtype).bits // 8

    def make_set():
        inputs, dy = _inputs(dims, dtype, device, backward)
        return inputs, {}, list(inputs), dy

    # forward: read x, write y. backward: read dy, x; write dx.
    return timed_case("bias_gelu", shape, mode, provider, _fn(provider), make_set, 3 * rows * hidden * elem, device,
                      bytes_moved=(5 if backward else 2) * rows * hidden * elem)


def agreement(dims: tuple, dtype, device, providers=None) -> dict:
    inputs, dy = _inputs(dims, dtype, device, False)
    providers = providers or ["vit_kernels"] + (["compile"] if device.type == "cuda" else [])
    return leaves_agreement(inputs, dy, "y", ("dx", "dbias"), _fn, providers)


BENCH = OpBench("bias_gelu", SHAPES, SMALL_SHAPES, PROVIDERS, "compile", case, agreement,
                (torch.bfloat16, torch.float16))
