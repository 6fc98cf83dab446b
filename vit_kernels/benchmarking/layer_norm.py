"""add_layer_norm: `y, h = add_layer_norm(x, residual, weight, bias)` against eager
(`reference.add_layer_norm`: `h = x + residual; y = F.layer_norm(h)`) and torch.compile of it.
Memory-bound: GB/s and % of the measured copy bandwidth."""

import torch

from .. import reference
from . import timing
from .case import Case, OpBench, provider_fn, timed_case, worst_by_provider

SHAPES = {
    "ViT-B (256*197, 768)": (256 * 197, 768),
    "ViT-L (128*197, 1024)": (128 * 197, 1024),
    "ViT-H (64*257, 1280)": (64 * 257, 1280),
}
SMALL_SHAPES = {"small (2*197, 384)": (2 * 197, 384)}
PROVIDERS = ("vit_kernels", "eager", "compile")
EPS = 1e-6


def _fn(provider: str):
    from ..ops import add_layer_norm

    return provider_fn(provider, add_layer_norm, reference.add_layer_norm)


def _inputs(rows: int, hidden: int, dtype, device, requires_grad: bool):
    """x, residual, weight, bias (the leaves) and the gradients of y and h_new."""
    def t(*shape, **kw):
        return timing.randn(*shape, device=device, dtype=dtype, **kw)

    return (
        t(rows, hidden, requires_grad=requires_grad),
        t(rows, hidden, scale=2.0, requires_grad=requires_grad),
        t(hidden, scale=0.3, shift=1.0, requires_grad=requires_grad),
        t(hidden, scale=0.3, requires_grad=requires_grad),
        t(rows, hidden),
        t(rows, hidden),
    )


def case(provider: str, shape: str, dims: tuple, mode: str, dtype, device) -> Case:
    rows, hidden = dims
    backward = mode == "fwd+bwd"
    elem = torch.finfo(dtype).bits // 8

    def make_set():
        x, residual, weight, bias, dy, dresidual = _inputs(rows, hidden, dtype, device, backward)
        return (x, residual, weight, bias, EPS), {}, [x, residual, weight, bias], [dy, dresidual]

    # forward: read x, residual; write y, h_new. backward: read dy, dh, h_new; write dx (= dresidual).
    tensor_passes = 4 + (4 if backward else 0)
    return timed_case("add_layer_norm", shape, mode, provider, _fn(provider), make_set,
                      6 * rows * hidden * elem, device, bytes_moved=tensor_passes * rows * hidden * elem)


def agreement(dims: tuple, dtype, device, providers=None) -> dict:
    """{provider: worst RuleCheck over y, h_new and every gradient}, for vit_kernels (and compile on a GPU)."""
    rows, hidden = dims
    inputs = _inputs(rows, hidden, dtype, device, False)

    def outputs(fn, cast):
        leaves = [cast(t).detach().requires_grad_() for t in inputs[:4]]
        y, h_new = fn(*leaves, EPS)
        grads = torch.autograd.grad([y, h_new], leaves, [cast(inputs[4]), cast(inputs[5])])
        return dict(zip(("y", "h_new", "dx", "dresidual", "dweight", "dbias"), (y, h_new, *grads)))

    providers = providers or ["vit_kernels"] + (["compile"] if device.type == "cuda" else [])
    return worst_by_provider(outputs, _fn, providers)


BENCH = OpBench("add_layer_norm", SHAPES, SMALL_SHAPES, PROVIDERS, "compile", case, agreement,
                (torch.bfloat16, torch.float16))
