"""patch_embed: images -> [B, N+1, D] tokens with the class token and position embeddings,
against eager (`reference.patch_embed`: conv2d, flatten, transpose, cat, add) and
torch.compile of it; patch_embed_uint8 starts from uint8 images and normalizes them first.
TFLOP/s of the patch GEMM and % of the measured bf16 matmul rate."""

import torch

from .. import reference
from . import timing
from .case import Case, OpBench, provider_fn, timed_case, worst_by_provider

SHAPES = {
    "ViT-B/16 (256, 224, P16, D768)": (256, 224, 16, 768),
    "ViT-L/16@384 (64, 384, P16, D1024)": (64, 384, 16, 1024),
    "ViT-H/14 (64, 224, P14, D1280)": (64, 224, 14, 1280),
}
SMALL_SHAPES = {"small (2, 64, P16, D96)": (2, 64, 16, 96)}
PROVIDERS = ("vit_kernels", "eager", "compile")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _eager(images, weight, bias, cls_token, pos_embed, mean=None, std=None):
    return reference.patch_embed(images, weight, bias, cls_token=cls_token, pos_embed=pos_embed, mean=mean, std=std)


def _fused(images, weight, bias, cls_token, pos_embed, mean=None, std=None):
    from ..ops import patch_embed

    return patch_embed(images, weight, bias, cls_token=cls_token, pos_embed=pos_embed, mean=mean, std=std)


def _fn(provider: str):
    return provider_fn(provider, _fused, _eager)


def _inputs(op: str, dims: tuple, dtype, device, requires_grad: bool):
    """images, (weight, bias, cls_token, pos_embed), {mean, std} for uint8 images, the gradient of the tokens."""
    batch, size, patch, dim = dims
    n = (size // patch) ** 2

    def p(*shape, scale=1.0):
        return timing.randn(*shape, device=device, dtype=dtype, scale=scale, requires_grad=requires_grad)

    if op == "patch_embed_uint8":
        images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    else:
        images = timing.randn(batch, 3, size, size, device=device, dtype=dtype)
    params = (p(dim, 3, patch, patch, scale=(3 * patch * patch) ** -0.5), p(dim, scale=0.1), p(1, 1, dim), p(1, n + 1, dim))
    norm = {}
    if op == "patch_embed_uint8":
        norm = dict(mean=torch.tensor(IMAGENET_MEAN, device=device), std=torch.tensor(IMAGENET_STD, device=device))
    return images, params, norm, timing.randn(batch, n + 1, dim, device=device, dtype=dtype)


def _case(op: str):
    def case(provider: str, shape: str, dims: tuple, mode: str, dtype, device) -> Case:
        batch, size, patch, dim = dims
        backward = mode == "fwd+bwd"

        def make_set():
            images, params, norm, dy = _inputs(op, dims, dtype, device, backward)
            return (images, *params), norm, list(params), dy

        flops = 2 * batch * (size // patch) ** 2 * 3 * patch * patch * dim * (3 if backward else 1)
        return timed_case(op, shape, mode, provider, _fn(provider), make_set, batch * 3 * size * size * 2, device,
                          flops=int(flops))

    return case


def _agreement(op: str):
    def agreement(dims: tuple, dtype, device, providers=None) -> dict:
        images, params, norm, dy = _inputs(op, dims, dtype, device, False)

        def outputs(fn, cast):
            leaves = [cast(t).detach().requires_grad_() for t in params]
            x = images if images.dtype == torch.uint8 else cast(images)
            y = fn(x, *leaves, **{k: cast(v) for k, v in norm.items()})
            grads = torch.autograd.grad(y, leaves, cast(dy))
            return {"tokens": y, **dict(zip(("dweight", "dbias", "dcls_token", "dpos_embed"), grads))}

        providers = providers or ["vit_kernels"] + (["compile"] if device.type == "cuda" else [])
        return worst_by_provider(outputs, _fn, providers)

    return agreement


# The C++ CPU path checks its numerics in float32 here (CPU bf16 convolution is slow and
# not what the GPU runs); on a GPU the agreement runs in bf16 like the timings.
BENCH = OpBench("patch_embed", SHAPES, SMALL_SHAPES, PROVIDERS, "compile", _case("patch_embed"),
                _agreement("patch_embed"), (torch.float32,))
BENCH_UINT8 = OpBench("patch_embed_uint8", SHAPES, SMALL_SHAPES, PROVIDERS, "compile", _case("patch_embed_uint8"),
                      _agreement("patch_embed_uint8"), (torch.float32,))
