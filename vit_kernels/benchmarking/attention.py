"""flash_attention: every provider starts from the packed qkv [B, N, 3, H, d] a ViT's qkv
Linear produces and ends with [B, N, H*d] for its proj Linear, so layout costs count on
both sides (timm permutes to [3, B, H, N, d] for SDPA and transposes back). Eager is
`reference.attention` (the materialized softmax, timm's fused_attn=False path).
TFLOP/s: forward 4·B·H·N²·d, forward + backward 3.5x that."""

from typing import Optional

import torch
import torch.nn.functional as F

from .. import reference
from . import timing
from .case import Case, OpBench, timed_case, worst_by_provider

SHAPES = {
    "ViT-S (256, 197, 6, 64)": (256, 197, 6, 64),
    "ViT-B (256, 197, 12, 64)": (256, 197, 12, 64),
    "ViT-L/16@384 (64, 577, 16, 64)": (64, 577, 16, 64),
    "ViT-H/14 (64, 257, 16, 80)": (64, 257, 16, 80),
    "SigLIP so400m@384 (32, 729, 16, 72)": (32, 729, 16, 72),
    "long (4, 4096, 16, 128)": (4, 4096, 16, 128),
    "long (1, 16384, 16, 64)": (1, 16384, 16, 64),
}
SMALL_SHAPES = {"small (2, 197, 3, 64)": (2, 197, 3, 64), "small d=80 (1, 257, 2, 80)": (1, 257, 2, 80),
                "small d=72 (1, 50, 2, 72)": (1, 50, 2, 72)}
# vit_kernels_atomic_dq: deterministic=False (dQ by float32 atomics), to measure what the
# bitwise-reproducible default costs (fwd+bwd rows).
PROVIDERS = ("vit_kernels", "vit_kernels_atomic_dq", "eager", "sdpa", "sdpa_flash", "sdpa_cudnn")
# The float64 oracle materializes B*H*N^2 scores; past 2^28 (2 GiB) agreement is checked on
# one sample and 2 heads at the same N and d.
AGREEMENT_MAX_SCORES = 2**28
_SDPA_BACKENDS = {"sdpa": None, "sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION"}


def _sdpa(backend: Optional[str]):
    def attend(qkv):
        b, n = qkv.shape[:2]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if backend is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(getattr(SDPBackend, backend)):
                out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(b, n, -1)

    return attend


def _eager(qkv):
    b, n = qkv.shape[:2]
    return reference.attention(*qkv.unbind(2)).reshape(b, n, -1)


def provider_fn(provider: str):
    """qkv [B, N, 3, H, d] -> [B, N, H*d] the provider's way."""
    if provider in ("vit_kernels", "vit_kernels_atomic_dq"):
        from ..ops import flash_attention_qkvpacked

        deterministic = provider == "vit_kernels"
        return lambda qkv: flash_attention_qkvpacked(qkv, deterministic=deterministic).reshape(
            qkv.shape[0], qkv.shape[1], -1)
    if provider == "eager":
        return _eager
    if provider in _SDPA_BACKENDS:
        return _sdpa(_SDPA_BACKENDS[provider])
    raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")


def case(provider: str, shape: str, dims: tuple, mode: str, dtype, device) -> Case:
    batch, n, heads, head_dim = dims
    backward = mode == "fwd+bwd"
    elem = torch.finfo(dtype).bits // 8

    def make_set():
        qkv = timing.randn(batch, n, 3, heads, head_dim, device=device, dtype=dtype, requires_grad=backward)
        return (qkv,), {}, [qkv], timing.randn(batch, n, heads * head_dim, device=device, dtype=dtype)

    flops = 4 * batch * heads * n * n * head_dim * (3.5 if backward else 1.0)
    return timed_case("flash_attention", shape, mode, provider, provider_fn(provider), make_set,
                      4 * batch * n * heads * head_dim * elem, device, flops=int(flops))


def agreement(dims: tuple, dtype, device, providers=None) -> dict:
    batch, n, heads, head_dim = dims
    if batch * heads * n * n > AGREEMENT_MAX_SCORES:
        batch, heads = 1, 2
    qkv = timing.randn(batch, n, 3, heads, head_dim, device=device, dtype=dtype)
    dout = timing.randn(batch, n, heads * head_dim, device=device, dtype=dtype)

    def outputs(fn, cast):
        leaf = cast(qkv).detach().requires_grad_()
        out = fn(leaf)
        (grad,) = torch.autograd.grad(out, leaf, cast(dout))
        return {"out": out, "dqkv": grad}

    providers = providers or ["vit_kernels", "vit_kernels_atomic_dq"] + (["sdpa"] if device.type == "cuda" else [])
    return worst_by_provider(outputs, provider_fn, providers)


# bf16 tl.dot is wrong under the interpreter, so attention's CPU numerics run in fp16.
BENCH = OpBench("flash_attention", SHAPES, SMALL_SHAPES, PROVIDERS, "sdpa", case, agreement, (torch.float16,))
