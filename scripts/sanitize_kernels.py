"""Every kernel's launches, forward and backward, at small shapes on the GPU: what
`scripts/gpu_check.sh sanitize` runs under compute-sanitizer (memcheck, racecheck, initcheck).

    compute-sanitizer --tool memcheck python scripts/sanitize_kernels.py [--attention-configs all|first]

Shapes are small (so the instrumented run takes seconds per tool) but never block multiples: 197
tokens (37 in the CPU smoke run), hidden sizes 768 and 1000, head dims 64 and 80, so every masked tail runs. Attention runs
every config its autotuner may choose, forced one at a time (forward, dQ and dK/dV), with and
without dropout, and the atomic-dQ backward; add_layer_norm with every optional input (its
partial-sum reduction included) and a float32 residual stream; bias_gelu; bias_gelu_linear;
the patch embedding's gather and epilogue for float, uint8 and channels_last images. Each result
is also checked to be finite (a sanitizer finds bad accesses; this script is not a numerics test:
the tests are). Run with PYTORCH_NO_CUDA_MEMORY_CACHING=1 (gpu_check.sh sets it), so that an
access past a tensor's end is past its allocation too.
"""

import argparse
import os
import sys

import torch

from vit_kernels.ops import add_layer_norm, attention, bias_gelu, bias_gelu_linear, flash_attention, patch_embed
from vit_kernels.testing import forcing_one_config

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: a smoke run under TRITON_INTERPRET=1
# Tokens per image (and keys of the cross-length case): 197 (130) on the GPU; 37 (29) on the CPU,
# no block multiples either, so that the interpreter's smoke run of every launch stays short.
TOKENS, KEY_TOKENS = (197, 130) if DEVICE.type == "cuda" else (37, 29)
launched = []


def _finite(name: str, *tensors):
    for t in tensors:
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise SystemExit(f"{name}: non-finite output")
    launched.append(name)


def _backward(name, outputs, leaves):
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    grads = torch.autograd.grad(outputs, leaves, [torch.randn_like(o) for o in outputs], allow_unused=True)
    _finite(name, *outputs, *grads)


def run_attention(configs: str):
    original = attention.launch_configs
    for head_dim in (64, 80):
        for dropout_p in (0.0, 0.1):
            for kind in attention.KERNEL_KINDS:
                choices = original(kind, head_dim, torch.bfloat16, attention._attn_fwd_kernel, dropout=dropout_p > 0)
                for config in choices if configs == "all" else choices[:1]:
                    attention.launch_configs = forcing_one_config(original, kind, config)
                    try:
                        qkv = torch.randn(1, TOKENS, 3, 2, head_dim, device=DEVICE, dtype=torch.bfloat16,
                                          requires_grad=True)
                        out = flash_attention(*qkv.unbind(2), dropout_p=dropout_p)
                        _backward(f"attention d={head_dim} p={dropout_p} {kind} {config}", out, [qkv])
                    finally:
                        attention.launch_configs = original
    for dtype in (torch.float32, torch.float16):
        q, k, v = (torch.randn(1, n, 2, 64, device=DEVICE, dtype=dtype, requires_grad=True)
                   for n in (TOKENS, KEY_TOKENS, KEY_TOKENS))
        _backward(f"attention {dtype} atomic dQ", flash_attention(q, k, v, deterministic=False), [q, k, v])


def run_layer_norm():
    for hidden, dtype, residual_dtype in ((768, torch.bfloat16, torch.bfloat16), (1000, torch.float16, torch.float32),
                                          (768, torch.float32, torch.float32)):
        x = torch.randn(3, TOKENS, hidden, device=DEVICE, dtype=dtype, requires_grad=True)
        residual = torch.randn(3, TOKENS, hidden, device=DEVICE, dtype=residual_dtype, requires_grad=True)
        weight, bias, gamma = (torch.randn(hidden, device=DEVICE, requires_grad=True) for _ in range(3))
        row_scale = torch.tensor([0.0, 1.25, 1.25], device=DEVICE, dtype=dtype)
        outputs = add_layer_norm(x, residual, weight, bias, gamma=gamma, row_scale=row_scale)
        _backward(f"add_layer_norm {hidden} {dtype}", outputs, [x, residual, weight, bias, gamma])
        outputs = add_layer_norm(x, None, weight, None, residual_in_fp32=True)
        _backward(f"layer_norm {hidden} {dtype} fp32 stream", outputs, [x, weight])


def run_bias_gelu():
    for hidden, dtype in ((3072, torch.bfloat16), (1000, torch.float16), (768, torch.float32)):
        x = torch.randn(3, TOKENS, hidden, device=DEVICE, dtype=dtype, requires_grad=True)
        bias = torch.randn(hidden, device=DEVICE, requires_grad=True)
        for approximate in ("none", "tanh", "quick"):
            _backward(f"bias_gelu {hidden} {dtype} {approximate}", bias_gelu(x, bias, approximate), [x, bias])
        weight = torch.randn(192, hidden, device=DEVICE, dtype=dtype, requires_grad=True)
        linear_bias = torch.randn(192, device=DEVICE, dtype=dtype, requires_grad=True)
        _backward(f"bias_gelu_linear {hidden} {dtype}", bias_gelu_linear(x, bias, weight, linear_bias),
                  [x, bias, weight, linear_bias])


def run_patch_embed():
    for dtype, layout, patch in ((torch.float32, "nchw", 16), (torch.bfloat16, "channels_last", 14),
                                 (torch.uint8, "nchw", 16), (torch.float16, "nchw", 16)):
        shape = (3, 3, 3 * patch, 5 * patch)
        images = (torch.randint(0, 256, shape, dtype=torch.uint8, device=DEVICE) if dtype == torch.uint8
                  else torch.randn(shape, device=DEVICE, dtype=dtype))
        if layout == "channels_last":
            images = images.contiguous(memory_format=torch.channels_last)
        weight_dtype = torch.bfloat16 if dtype == torch.uint8 else dtype
        weight = torch.randn(192, 3, patch, patch, device=DEVICE, dtype=weight_dtype, requires_grad=True)
        bias, cls_token = (torch.randn(*s, device=DEVICE, dtype=weight_dtype, requires_grad=True)
                           for s in ((192,), (1, 1, 192)))
        pos_embed = torch.randn(1, 16, 192, device=DEVICE, dtype=weight_dtype, requires_grad=True)
        mean, std = torch.rand(3, device=DEVICE), 0.5 + torch.rand(3, device=DEVICE)
        out = patch_embed(images, weight, bias, cls_token=cls_token, pos_embed=pos_embed, mean=mean, std=std)
        _backward(f"patch_embed {dtype} {layout} P={patch}", out, [weight, bias, cls_token, pos_embed])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attention-configs", choices=["all", "first"], default="all")
    args = parser.parse_args()
    if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("needs a CUDA device (or TRITON_INTERPRET=1 for a smoke run of the script on the CPU)")
    torch.manual_seed(0)
    run_attention(args.attention_configs)
    run_layer_norm()
    run_bias_gelu()
    run_patch_embed()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    print(f"sanitize_kernels: {len(launched)} forward + backward calls ran")


if __name__ == "__main__":
    main()
