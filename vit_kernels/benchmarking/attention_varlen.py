"""flash_attention_varlen on a packed batch of images of mixed sizes (NaViT, SigLIP2's NaFlex,
Qwen2-VL's vision encoder): q, k, v [T, H, d] and int32 cumulative lengths, each image attending
to itself only. Against eager (`reference.attention_varlen`: each image's materialized softmax,
one image at a time), SDPA on jagged nested tensors (`sdpa`: PyTorch's own varlen path, its
flash-attention varlen kernel on CUDA) and SDPA over the batch padded to its longest image with a
key mask (`sdpa_padded`: what a model without varlen attention runs). Every provider starts from
the packed q, k, v and ends with [T, H*d]; the lengths are known on the host, as a data loader
knows its images' sizes. TFLOP/s: forward 4·H·d·Σ n_i² (the work inside the images), forward +
backward 3.5x that."""

import itertools

import torch
import torch.nn.functional as F

from .. import reference
from . import timing
from .case import OpBench, timed_case, worst_by_provider

# (images, mean tokens an image, heads, head dim). ~400 tokens: a 448-pixel image's 28 x 28
# patches at 16 pixels, or so400m's 27 x 27 at 14, and everything down to a quarter of it.
SHAPES = {
    "NaViT-B 64 images ~400 tokens (12, 64)": (64, 400, 12, 64),
    "NaFlex so400m 64 images ~400 tokens (16, 72)": (64, 400, 16, 72),
}
SMALL_SHAPES = {"small 3 images ~20 tokens (2, 64)": (3, 20, 2, 64),
                "small d=72 3 images ~20 tokens (2, 72)": (3, 20, 2, 72)}
PROVIDERS = ("vit_kernels", "eager", "sdpa", "sdpa_padded")


def image_lengths(n_images: int, mean_tokens: int) -> list:
    """Token counts of `n_images` images of mixed sizes: a fixed draw, uniform over
    [mean / 4, 7 * mean / 4], so every run of a shape times the same batch."""
    generator = torch.Generator().manual_seed(0)
    low, high = max(1, mean_tokens // 4), max(2, 7 * mean_tokens // 4)
    return torch.randint(low, high + 1, (n_images,), generator=generator).tolist()


def provider_fn(provider: str, lengths: list, device):
    """(q, k, v) [T, H, d] -> [T, H*d] the provider's way, for packed images of `lengths`. The
    cumulative lengths and the padded provider's indices are built here, once, not timed."""
    longest = max(lengths)
    offsets = [0, *itertools.accumulate(lengths)]
    if provider == "vit_kernels":
        from ..ops import cu_seqlens, flash_attention_varlen

        cu = cu_seqlens(lengths, device)
        return lambda q, k, v: flash_attention_varlen(q, k, v, cu, cu, longest, longest).flatten(1)
    if provider == "eager":
        cu = torch.tensor(offsets, dtype=torch.int32, device=device)
        return lambda q, k, v: reference.attention_varlen(q, k, v, cu, cu).flatten(1)
    if provider == "sdpa":
        jagged_offsets = torch.tensor(offsets, dtype=torch.int64, device=device)

        def nested(t):  # [B, H, j, d]; the lengths given, so SDPA reads none on the host
            return torch.nested.nested_tensor_from_jagged(t, jagged_offsets, min_seqlen=min(lengths),
                                                          max_seqlen=longest).transpose(1, 2)

        return lambda q, k, v: F.scaled_dot_product_attention(nested(q), nested(k), nested(v)).transpose(
            1, 2).values().flatten(1)
    if provider == "sdpa_padded":
        n_images = len(lengths)
        # Each token's row in the [B * longest] padded batch, and which padded keys are real.
        rows = torch.cat([torch.arange(n) + i * longest for i, n in enumerate(lengths)]).to(device)
        key_valid = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]).to(device)[:, None, None, :]

        def padded(t):  # [B, H, longest, d]
            out = t.new_zeros(n_images * longest, *t.shape[1:]).index_copy(0, rows, t)
            return out.view(n_images, longest, *t.shape[1:]).transpose(1, 2)

        def attend(q, k, v):
            out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=key_valid)
            return out.transpose(1, 2).reshape(n_images * longest, -1).index_select(0, rows)

        return attend
    raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")


def case(provider: str, shape: str, dims: tuple, mode: str, dtype, device):
    n_images, mean_tokens, heads, head_dim = dims
    lengths = image_lengths(n_images, mean_tokens)
    total = sum(lengths)
    backward = mode == "fwd+bwd"
    elem = torch.finfo(dtype).bits // 8

    def make_set():
        q, k, v = (timing.randn(total, heads, head_dim, device=device, dtype=dtype, requires_grad=backward)
                   for _ in range(3))
        return (q, k, v), {}, [q, k, v], timing.randn(total, heads * head_dim, device=device, dtype=dtype)

    flops = 4 * heads * head_dim * sum(n * n for n in lengths) * (3.5 if backward else 1.0)
    return timed_case("flash_attention_varlen", shape, mode, provider, provider_fn(provider, lengths, device),
                      make_set, 4 * total * heads * head_dim * elem, device, flops=int(flops))


def agreement(dims: tuple, dtype, device, providers=None) -> dict:
    n_images, mean_tokens, heads, head_dim = dims
    lengths = image_lengths(n_images, mean_tokens)
    total = sum(lengths)
    q, k, v = (timing.randn(total, heads, head_dim, device=device, dtype=dtype) for _ in range(3))
    dout = timing.randn(total, heads * head_dim, device=device, dtype=dtype)

    def outputs(fn, cast):
        leaves = [cast(t).detach().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        dq, dk, dv = torch.autograd.grad(out, leaves, cast(dout))
        return {"out": out, "dq": dq, "dk": dk, "dv": dv}

    providers = providers or ["vit_kernels"] + (["sdpa"] if device.type == "cuda" else [])
    return worst_by_provider(outputs, lambda provider: provider_fn(provider, lengths, device), providers)


# bf16 tl.dot is wrong under the interpreter, so the CPU numerics run in fp16 (as attention's).
BENCH = OpBench("flash_attention_varlen", SHAPES, SMALL_SHAPES, PROVIDERS, "sdpa", case, agreement,
                (torch.float16,))
