"""The main job: per-op speed and numerical agreement on this device.

    python -m vit_kernels.bench [--json FILE] [--markdown FILE] [--plot FILE.png] [--quick] [--ops ...]

On a CUDA device, for every op and ViT shape: median time of each provider
(vit_kernels, eager PyTorch, and the strongest PyTorch alternative: torch.compile,
SDPA), the speedups over eager and over that alternative, achieved GB/s or TFLOP/s as
a share of the device's measured copy bandwidth or bf16 matmul rate, and the numerics
rule (error against float64 relative to eager's error) checked at that shape before
anything is timed. Then end to end (`bench_vit`): ViT-B/16 and ViT-L/16 inference and
training step for timm, timm after swap_modules, torch.compile of each, and our reference
ViT fused: images/s, MFU, peak memory. Without CUDA the first line says so and only the numerics run, at
small shapes through Triton's interpreter.

The cases defined here are shared with `pytest benchmarks/ --benchmark-only`, so the
two report the same thing.

Timing: CUDA events around each call, after warm-up; median of the calls; each call
takes the next of several input sets whose total size is at least twice the L2
cache, so no call finds its inputs in cache. Inputs are random normal, never zeros.
"""

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import reference
from .testing import RuleCheck, check_rule

DEFAULT_L2_BYTES = 50 * 2**20  # H100's L2; used when the device does not report its own


# ---- measuring -------------------------------------------------------------------------------


def time_cuda_ms(fn: Callable[[], object], *, warmup: int = 10, reps: int = 50) -> float:
    """Median milliseconds of fn() on the current CUDA stream, each call between two events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def time_cuda_graph_ms(fn: Callable[[], object], *, reps: int = 50) -> float:
    """Median milliseconds of one replay of fn() captured in a CUDA graph: the GPU's time
    for the work, without the host's cost of launching it (Python, dispatch, Triton's
    launcher). Where the host takes longer per call than the GPU, time_cuda_ms reports the
    host; a ViT hides most of that behind its GEMMs, so both are reported. The graph
    replays one input set (no rotation), so operands that fit in L2 may stay there."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: autotuning, allocator
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_cuda_ms(graph.replay, warmup=3, reps=reps)


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 2**30) -> float:
    """Measured device-to-device copy bandwidth: (bytes read + bytes written) / median time."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = time_cuda_ms(lambda: dst.copy_(src), warmup=5, reps=30)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device, n: int = 8192) -> float:
    """Measured bf16 matmul rate (cuBLAS through torch.matmul, n x n x n), TFLOP/s."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = time_cuda_ms(lambda: a @ b, warmup=5, reps=30)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def n_input_sets(set_bytes: int, device: torch.device) -> int:
    """Enough input sets that cycling through them moves at least twice the L2 cache."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or DEFAULT_L2_BYTES
    return max(2, math.ceil(2 * l2 / max(set_bytes, 1)))


class Rotation:
    """Hands out input sets round-robin."""

    def __init__(self, make_set: Callable[[], tuple], set_bytes: int, device: torch.device):
        self.sets = [make_set() for _ in range(n_input_sets(set_bytes, device))]
        self.i = 0

    def next(self):
        s = self.sets[self.i]
        self.i = (self.i + 1) % len(self.sets)
        return s


def _randn(*shape, device, dtype, scale=1.0, shift=0.0, requires_grad=False):
    t = (torch.randn(*shape, device=device) * scale + shift).to(dtype)
    return t.requires_grad_() if requires_grad else t


# ---- cases -------------------------------------------------------------------------------------


@dataclass
class Case:
    """One op at one shape, mode and provider, ready to run."""

    op: str
    shape: str
    mode: str  # "fwd" or "fwd+bwd"
    provider: str
    run: Callable[[], object]  # one call on the next input set
    bytes_moved: int = 0  # memory-bound ops: the fewest bytes (each input read once, each output written once)
    flops: int = 0  # compute-bound ops: the FLOPs of the algorithm


def timed_case(op: str, shape: str, mode: str, provider: str, fn: Callable, make_set: Callable, set_bytes: int,
               device, **metric) -> Case:
    """A Case whose run() calls ``fn(*args, **kwargs)`` on the next input set, and in fwd+bwd mode
    also takes the gradients of ``leaves``. ``make_set()`` returns ``(args, kwargs, leaves, grad_out)``;
    ``metric`` is bytes_moved= or flops=."""
    backward = mode == "fwd+bwd"
    sets = Rotation(make_set, set_bytes, device)

    def run():
        args, kwargs, leaves, grad_out = sets.next()
        out = fn(*args, **kwargs)
        return torch.autograd.grad(out, leaves, grad_out) if backward else out

    return Case(op, shape, mode, provider, run, **metric)


def compile_fresh(fn, **kwargs):
    """torch.compile(fn) after dropping dynamo's caches: one eager function is compiled for
    every shape, mode and op that shares it (patch_embed and its uint8 variant), which would
    pass dynamo's recompile limit and, with fullgraph=True, fail instead of falling back."""
    torch._dynamo.reset()
    return torch.compile(fn, **kwargs)


def _provider_fn(provider: str, fused: Callable, eager: Callable) -> Callable:
    """vit_kernels -> the fused op, eager -> the PyTorch code, compile -> torch.compile of it."""
    if provider == "vit_kernels":
        return fused
    if provider == "eager":
        return eager
    if provider == "compile":
        return compile_fresh(eager, fullgraph=True)
    raise ValueError(f"provider must be one of vit_kernels, eager, compile; got {provider!r}")


# add_layer_norm: `y, h = add_layer_norm(x, residual, weight, bias)` against
# `h = x + residual; y = F.layer_norm(h)` and torch.compile of that.

LAYER_NORM_SHAPES = {
    "ViT-B (256*197, 768)": (256 * 197, 768),
    "ViT-L (128*197, 1024)": (128 * 197, 1024),
    "ViT-H (64*257, 1280)": (64 * 257, 1280),
}
LAYER_NORM_SMALL_SHAPES = {"small (2*197, 384)": (2 * 197, 384)}
LAYER_NORM_PROVIDERS = ("vit_kernels", "eager", "compile")


def _eager_add_layer_norm(x, residual, weight, bias, eps):
    h_new = x + residual
    return F.layer_norm(h_new, (x.shape[-1],), weight, bias, eps), h_new


def _layer_norm_fn(provider: str):
    from .ops import add_layer_norm

    return _provider_fn(provider, add_layer_norm, _eager_add_layer_norm)


def _layer_norm_inputs(rows: int, hidden: int, dtype, device, requires_grad: bool):
    def t(*shape, **kw):
        return _randn(*shape, device=device, dtype=dtype, **kw)

    return (
        t(rows, hidden, requires_grad=requires_grad),
        t(rows, hidden, scale=2.0, requires_grad=requires_grad),
        t(hidden, scale=0.3, shift=1.0, requires_grad=requires_grad),
        t(hidden, scale=0.3, requires_grad=requires_grad),
        t(rows, hidden),
        t(rows, hidden),
    )


def layer_norm_case(provider: str, shape: str, dims: tuple, mode: str, dtype, device) -> Case:
    rows, hidden = dims
    backward = mode == "fwd+bwd"
    elem = torch.finfo(dtype).bits // 8

    def make_set():
        x, residual, weight, bias, dy, dresidual = _layer_norm_inputs(rows, hidden, dtype, device, backward)
        return (x, residual, weight, bias, 1e-6), {}, [x, residual, weight, bias], [dy, dresidual]

    # forward: read x, residual; write y, h_new. backward: read dy, dh, h_new; write dx (= dresidual).
    tensor_passes = 4 + (4 if backward else 0)
    return timed_case("add_layer_norm", shape, mode, provider, _layer_norm_fn(provider), make_set,
                      6 * rows * hidden * elem, device, bytes_moved=tensor_passes * rows * hidden * elem)


def layer_norm_agreement(dims: tuple, dtype, device) -> dict:
    """{provider: worst RuleCheck over y, h_new and every gradient}, for vit_kernels (and compile on a GPU)."""
    rows, hidden = dims
    inputs = _layer_norm_inputs(rows, hidden, dtype, device, False)

    def outputs(fn, cast):
        leaves = [cast(t).detach().requires_grad_() for t in inputs[:4]]
        y, h_new = fn(*leaves, 1e-6)
        grads = torch.autograd.grad([y, h_new], leaves, [cast(inputs[4]), cast(inputs[5])])
        return dict(zip(("y", "h_new", "dx", "dresidual", "dweight", "dbias"), (y, h_new, *grads)))

    return _worst_by_provider(outputs, _layer_norm_fn, ["vit_kernels"] + (["compile"] if device.type == "cuda" else []))


# flash attention: every provider starts from the packed qkv [B, N, 3, H, d] a ViT's qkv
# Linear produces and ends with [B, N, H*d] for its proj Linear, so layout costs count on
# both sides (timm permutes to [3, B, H, N, d] for SDPA and transposes back).

ATTENTION_SHAPES = {
    "ViT-S (256, 197, 6, 64)": (256, 197, 6, 64),
    "ViT-B (256, 197, 12, 64)": (256, 197, 12, 64),
    "ViT-L/16@384 (64, 577, 16, 64)": (64, 577, 16, 64),
    "ViT-H/14 (64, 257, 16, 80)": (64, 257, 16, 80),
    "long (4, 4096, 16, 128)": (4, 4096, 16, 128),
    "long (1, 16384, 16, 64)": (1, 16384, 16, 64),
}
ATTENTION_SMALL_SHAPES = {"small (2, 197, 3, 64)": (2, 197, 3, 64), "small d=80 (1, 257, 2, 80)": (1, 257, 2, 80)}
# vit_kernels_atomic_dq: deterministic=False (dQ by float32 atomics), to measure what the
# bitwise-reproducible default costs (fwd+bwd rows).
ATTENTION_PROVIDERS = ("vit_kernels", "vit_kernels_atomic_dq", "eager", "sdpa", "sdpa_flash", "sdpa_cudnn")
# The float64 oracle materializes B*H*N^2 scores; past 2^28 (2 GiB) agreement is checked on
# one sample and 2 heads at the same N and d.
AGREEMENT_MAX_SCORES = 2**28


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


def _eager_attention(qkv):
    b, n = qkv.shape[:2]
    return reference.attention(*qkv.unbind(2)).reshape(b, n, -1)


def _attention_fn(provider: str):
    if provider in ("vit_kernels", "vit_kernels_atomic_dq"):
        from .ops import flash_attention_qkvpacked

        deterministic = provider == "vit_kernels"
        return lambda qkv: flash_attention_qkvpacked(qkv, deterministic=deterministic).reshape(
            qkv.shape[0], qkv.shape[1], -1)
    if provider == "eager":
        return _eager_attention
    backends = {"sdpa": None, "sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION"}
    if provider in backends:
        return _sdpa(backends[provider])
    raise ValueError(f"provider must be one of {ATTENTION_PROVIDERS}, got {provider!r}")


def attention_case(provider: str, shape: str, dims: tuple, mode: str, dtype, device) -> Case:
    batch, n, heads, head_dim = dims
    backward = mode == "fwd+bwd"
    elem = torch.finfo(dtype).bits // 8

    def make_set():
        qkv = _randn(batch, n, 3, heads, head_dim, device=device, dtype=dtype, requires_grad=backward)
        return (qkv,), {}, [qkv], _randn(batch, n, heads * head_dim, device=device, dtype=dtype)

    flops = 4 * batch * heads * n * n * head_dim * (3.5 if backward else 1.0)
    return timed_case("flash_attention", shape, mode, provider, _attention_fn(provider), make_set,
                      4 * batch * n * heads * head_dim * elem, device, flops=int(flops))


def attention_agreement(dims: tuple, dtype, device) -> dict:
    batch, n, heads, head_dim = dims
    if batch * heads * n * n > AGREEMENT_MAX_SCORES:
        batch, heads = 1, 2
    qkv = _randn(batch, n, 3, heads, head_dim, device=device, dtype=dtype)
    dout = _randn(batch, n, heads * head_dim, device=device, dtype=dtype)

    def outputs(fn, cast):
        leaf = cast(qkv).detach().requires_grad_()
        out = fn(leaf)
        (grad,) = torch.autograd.grad(out, leaf, cast(dout))
        return {"out": out, "dqkv": grad}

    providers = ["vit_kernels", "vit_kernels_atomic_dq"] + (["sdpa"] if device.type == "cuda" else [])
    return _worst_by_provider(outputs, _attention_fn, providers)


# bias + GELU and the MLP: the fc1 output [M, 4D] is the largest activation of a block.
# "bias_gelu" times the elementwise op alone; "fc1_bias_gelu" the fc1 GEMM with its bias
# and GELU; "mlp" the whole fc1 -> GELU -> fc2.

MLP_SHAPES = {
    "ViT-B (256*197, 768->3072)": (256 * 197, 768, 3072),
    "ViT-L (128*197, 1024->4096)": (128 * 197, 1024, 4096),
    "ViT-H (64*257, 1280->5120)": (64 * 257, 1280, 5120),
}
MLP_SMALL_SHAPES = {"small (2*197, 192->768)": (2 * 197, 192, 768)}
MLP_PROVIDERS = ("vit_kernels", "eager", "compile")
# fc1 + bias + GELU also times the Triton GEMM with the epilogue (forced), against which
# linear_bias_gelu's per-shape dispatch (vit_kernels) is to be set.
FC1_PROVIDERS = ("vit_kernels", "triton_gemm", "eager", "compile")


def _eager_bias_gelu(x, bias):
    return F.gelu(x + bias)


def _eager_fc1_gelu(x, weight, bias):
    return F.gelu(F.linear(x, weight, bias))


def _eager_mlp(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def _fused_fc1_gelu(x, weight, bias, backend="auto"):
    from .ops import linear_bias_gelu

    return linear_bias_gelu(x, weight, bias, backend=backend)


def _fused_mlp(x, w1, b1, w2, b2, backend="auto"):
    """As FusedMlp runs it: fc1 without its bias, then bias + GELU + fc2 keeping only the
    pre-activation; the Triton-GEMM provider keeps fc1 + bias + GELU in one GEMM instead."""
    from .ops import bias_gelu_linear

    if backend == "triton":
        return F.linear(_fused_fc1_gelu(x, w1, b1, backend), w2, b2)
    return bias_gelu_linear(F.linear(x, w1), b1, w2, b2)


def _mlp_fns(op: str):
    from .ops import bias_gelu

    return {
        "bias_gelu": (bias_gelu, _eager_bias_gelu),
        "fc1_bias_gelu": (_fused_fc1_gelu, _eager_fc1_gelu),
        "mlp": (_fused_mlp, _eager_mlp),
    }[op]


def _mlp_fn(op: str, provider: str):
    if provider == "triton_gemm":
        fused = _mlp_fns(op)[0]
        return lambda *inputs: fused(*inputs, backend="triton")
    return _provider_fn(provider, *_mlp_fns(op))


def _mlp_inputs(op: str, dims: tuple, dtype, device, requires_grad: bool):
    """(inputs..., upstream gradient) for `op` at (M, D, 4D); weights scaled like a trained ViT's."""
    rows, dim, hidden = dims

    def t(*shape, scale=1.0):
        return _randn(*shape, device=device, dtype=dtype, scale=scale, requires_grad=requires_grad)

    if op == "bias_gelu":
        inputs = (t(rows, hidden), t(hidden, scale=0.5))
    elif op == "fc1_bias_gelu":
        inputs = (t(rows, dim), t(hidden, dim, scale=dim**-0.5), t(hidden, scale=0.5))
    else:
        inputs = (t(rows, dim), t(hidden, dim, scale=dim**-0.5), t(hidden, scale=0.5),
                  t(dim, hidden, scale=hidden**-0.5), t(dim, scale=0.5))
    out_cols = dim if op == "mlp" else hidden
    return inputs + (_randn(rows, out_cols, device=device, dtype=dtype),)


def mlp_case(op: str):
    def case(provider: str, shape: str, dims: tuple, mode: str, dtype, device) -> Case:
        rows, dim, hidden = dims
        backward = mode == "fwd+bwd"
        elem = torch.finfo(dtype).bits // 8

        def make_set():
            *inputs, dy = _mlp_inputs(op, dims, dtype, device, backward)
            return tuple(inputs), {}, inputs, dy

        if op == "bias_gelu":
            # forward: read x, write y. backward: read dy, x; write dx.
            metric = dict(bytes_moved=(5 if backward else 2) * rows * hidden * elem)
        else:
            gemms = 1 if op == "fc1_bias_gelu" else 2
            metric = dict(flops=int(2 * rows * dim * hidden * gemms * (3 if backward else 1)))
        return timed_case(op, shape, mode, provider, _mlp_fn(op, provider), make_set, 3 * rows * hidden * elem,
                          device, **metric)

    return case


_MLP_GRAD_NAMES = {
    "bias_gelu": ("dx", "dbias"),
    "fc1_bias_gelu": ("dx", "dweight", "dbias"),
    "mlp": ("dx", "dfc1.weight", "dfc1.bias", "dfc2.weight", "dfc2.bias"),
}


def mlp_agreement(op: str):
    def agreement(dims: tuple, dtype, device) -> dict:
        *inputs, dy = _mlp_inputs(op, dims, dtype, device, False)

        def outputs(fn, cast):
            leaves = [cast(t).detach().requires_grad_() for t in inputs]
            y = fn(*leaves)
            grads = torch.autograd.grad(y, leaves, cast(dy))
            return {"y": y, **dict(zip(_MLP_GRAD_NAMES[op], grads))}

        providers = ["vit_kernels"] + (["triton_gemm"] if op != "bias_gelu" else [])
        providers += ["compile"] if device.type == "cuda" else []
        return _worst_by_provider(outputs, lambda provider: _mlp_fn(op, provider), providers)

    return agreement


# patch embedding: images -> [B, N+1, D] tokens with the class token and position
# embeddings; "patch_embed_uint8" starts from uint8 images and normalizes them first.

PATCH_EMBED_SHAPES = {
    "ViT-B/16 (256, 224, P16, D768)": (256, 224, 16, 768),
    "ViT-L/16@384 (64, 384, P16, D1024)": (64, 384, 16, 1024),
    "ViT-H/14 (64, 224, P14, D1280)": (64, 224, 14, 1280),
}
PATCH_EMBED_SMALL_SHAPES = {"small (2, 64, P16, D96)": (2, 64, 16, 96)}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _eager_patch_embed(images, weight, bias, cls_token, pos_embed, mean=None, std=None):
    if images.dtype == torch.uint8:
        images = ((images.float() / 255.0 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)).to(weight.dtype)
    x = F.conv2d(images, weight, bias, stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    return torch.cat([cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos_embed


def _fused_patch_embed(images, weight, bias, cls_token, pos_embed, mean=None, std=None):
    from .ops import patch_embed

    return patch_embed(images, weight, bias, cls_token=cls_token, pos_embed=pos_embed, mean=mean, std=std)


def _patch_embed_fn(provider: str):
    return _provider_fn(provider, _fused_patch_embed, _eager_patch_embed)


def _patch_embed_inputs(op: str, dims: tuple, dtype, device, requires_grad: bool):
    batch, size, patch, dim = dims
    n = (size // patch) ** 2

    def p(*shape, scale=1.0):
        return _randn(*shape, device=device, dtype=dtype, scale=scale, requires_grad=requires_grad)

    if op == "patch_embed_uint8":
        images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    else:
        images = _randn(batch, 3, size, size, device=device, dtype=dtype)
    params = (p(dim, 3, patch, patch, scale=(3 * patch * patch) ** -0.5), p(dim, scale=0.1), p(1, 1, dim), p(1, n + 1, dim))
    norm = {}
    if op == "patch_embed_uint8":
        norm = dict(mean=torch.tensor(IMAGENET_MEAN, device=device), std=torch.tensor(IMAGENET_STD, device=device))
    return images, params, norm, _randn(batch, n + 1, dim, device=device, dtype=dtype)


def patch_embed_case(op: str):
    def case(provider: str, shape: str, dims: tuple, mode: str, dtype, device) -> Case:
        batch, size, patch, dim = dims
        backward = mode == "fwd+bwd"

        def make_set():
            images, params, norm, dy = _patch_embed_inputs(op, dims, dtype, device, backward)
            return (images, *params), norm, list(params), dy

        flops = 2 * batch * (size // patch) ** 2 * 3 * patch * patch * dim * (3 if backward else 1)
        return timed_case(op, shape, mode, provider, _patch_embed_fn(provider), make_set,
                          batch * 3 * size * size * 2, device, flops=int(flops))

    return case


def patch_embed_agreement(op: str):
    def agreement(dims: tuple, dtype, device) -> dict:
        images, params, norm, dy = _patch_embed_inputs(op, dims, dtype, device, False)

        def outputs(fn, cast):
            leaves = [cast(t).detach().requires_grad_() for t in params]
            x = images if images.dtype == torch.uint8 else cast(images)
            y = fn(x, *leaves, **{k: cast(v) for k, v in norm.items()})
            grads = torch.autograd.grad(y, leaves, cast(dy))
            return {"tokens": y, **dict(zip(("dweight", "dbias", "dcls_token", "dpos_embed"), grads))}

        providers = ["vit_kernels"] + (["compile"] if device.type == "cuda" else [])
        return _worst_by_provider(outputs, _patch_embed_fn, providers)

    return agreement


def _worst_by_provider(outputs, fn_for, providers) -> dict:
    """Run `outputs(fn, cast)` for the float64 oracle, eager and each provider; the worst check per provider."""
    oracle = outputs(fn_for("eager"), lambda t: t.double())
    eager = outputs(fn_for("eager"), lambda t: t)
    worst = {}
    for provider in providers:
        got = outputs(fn_for(provider), lambda t: t)
        checks = [check_rule(name, got[name], oracle[name], eager[name]) for name in got]
        worst[provider] = max(checks, key=lambda c: (not c.ok, c.ratio))
    return worst


@dataclass
class OpBench:
    name: str
    shapes: dict  # GPU shapes
    small_shapes: dict  # numerics on CPU through the interpreter
    providers: tuple
    baseline: str  # the strongest PyTorch alternative, for the "x baseline" column
    case: Callable
    agreement: Callable
    cpu_dtypes: tuple  # dtypes whose numerics the interpreter can check


OPS = [
    OpBench("add_layer_norm", LAYER_NORM_SHAPES, LAYER_NORM_SMALL_SHAPES, LAYER_NORM_PROVIDERS, "compile",
            layer_norm_case, layer_norm_agreement, (torch.bfloat16, torch.float16)),
    # bf16 tl.dot is wrong under the interpreter, so attention's CPU numerics run in fp16.
    OpBench("flash_attention", ATTENTION_SHAPES, ATTENTION_SMALL_SHAPES, ATTENTION_PROVIDERS, "sdpa",
            attention_case, attention_agreement, (torch.float16,)),
    OpBench("bias_gelu", MLP_SHAPES, MLP_SMALL_SHAPES, MLP_PROVIDERS, "compile",
            mlp_case("bias_gelu"), mlp_agreement("bias_gelu"), (torch.bfloat16, torch.float16)),
    # vit_kernels = linear_bias_gelu's dispatch; triton_gemm = its Triton GEMM with the epilogue.
    OpBench("fc1_bias_gelu", MLP_SHAPES, MLP_SMALL_SHAPES, FC1_PROVIDERS, "compile",
            mlp_case("fc1_bias_gelu"), mlp_agreement("fc1_bias_gelu"), (torch.float16,)),
    OpBench("mlp", MLP_SHAPES, MLP_SMALL_SHAPES, FC1_PROVIDERS, "compile",
            mlp_case("mlp"), mlp_agreement("mlp"), (torch.float16,)),
    # The C++ CPU path checks its numerics in float32 here (CPU bf16 convolution is slow and
    # not what the GPU runs); on a GPU the agreement runs in bf16 like the timings.
    OpBench("patch_embed", PATCH_EMBED_SHAPES, PATCH_EMBED_SMALL_SHAPES, MLP_PROVIDERS, "compile",
            patch_embed_case("patch_embed"), patch_embed_agreement("patch_embed"), (torch.float32,)),
    OpBench("patch_embed_uint8", PATCH_EMBED_SHAPES, PATCH_EMBED_SMALL_SHAPES, MLP_PROVIDERS, "compile",
            patch_embed_case("patch_embed_uint8"), patch_embed_agreement("patch_embed_uint8"), (torch.float32,)),
]


# ---- the job ---------------------------------------------------------------------------------


@dataclass
class Row:
    op: str
    shape: str
    mode: str
    provider: str
    ms: float = float("nan")
    graph_ms: float = float("nan")  # CUDA-graph replay: GPU time without the host's launch cost
    gbps: float = float("nan")
    tflops: float = float("nan")
    pct_of_peak: float = float("nan")  # of copy bandwidth (memory-bound ops) or bf16 matmul rate (attention)
    speedup_vs_eager: float = float("nan")
    baseline: str = ""
    speedup_vs_baseline: float = float("nan")
    graph_speedup_vs_baseline: float = float("nan")
    error_vs_eager: float = float("nan")  # max error against float64 / eager's; <= 2 passes
    rule_ok: bool = True
    note: str = ""
    images_per_s: float = float("nan")  # end-to-end rows
    peak_memory_gib: float = float("nan")


@dataclass
class Report:
    device: str
    date: str
    torch: str
    triton: str
    python: str
    copy_bandwidth_gbps: float = float("nan")
    bf16_matmul_tflops: float = float("nan")
    host_load: str = ""
    rows: list = field(default_factory=list)


def host_load() -> str:
    """The host's CPU load when the run starts. Host-bound timings (a launch-bound op, a ViT
    step whose GPU waits for Python) slow down when other processes share the CPU, so a
    report says how busy it was."""
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"


def _triton_version() -> str:
    import triton

    return triton.__version__


def _numerics_row(op: OpBench, shape: str, mode: str, provider: str, check: RuleCheck) -> Row:
    return Row(op.name, shape, mode, provider, error_vs_eager=check.ratio, rule_ok=check.ok, note=f"worst: {check.name}")


def _time_into(row: Row, case: Case, report: Report, reps: int) -> None:
    row.ms = time_cuda_ms(case.run, reps=reps)
    try:
        row.graph_ms = time_cuda_graph_ms(case.run, reps=reps)
    except Exception as err:  # a provider that cannot be captured keeps its stream timing only
        torch.cuda.synchronize()
        row.note = f"no graph: {str(err).splitlines()[0][:60]}"
    if case.bytes_moved:
        row.gbps = case.bytes_moved / (row.ms * 1e-3) / 1e9
        row.pct_of_peak = 100 * row.gbps / report.copy_bandwidth_gbps
    if case.flops:
        row.tflops = case.flops / (row.ms * 1e-3) / 1e12
        row.pct_of_peak = 100 * row.tflops / report.bf16_matmul_tflops


def run_numerics(report: Report, op: OpBench, device: torch.device) -> None:
    """The numerics rule at op.small_shapes in each of op.cpu_dtypes; no timing (the no-GPU job)."""
    for dtype in op.cpu_dtypes:
        for shape, dims in op.small_shapes.items():
            check = op.agreement(dims, dtype, device)["vit_kernels"]
            report.rows.append(_numerics_row(op, f"{shape} {str(dtype)[6:]}", "fwd+bwd", "vit_kernels", check))


def run_timed(report: Report, op: OpBench, device: torch.device, shapes: dict, *, reps: int) -> None:
    """Agreement, then every provider timed in both modes, in bf16, at each shape."""
    for shape, dims in shapes.items():
        worst = _agreement_or_failure(lambda: op.agreement(dims, torch.bfloat16, device), op.providers)
        for mode in ("fwd", "fwd+bwd"):
            rows = {}
            for provider in op.providers:
                row = Row(op.name, shape, mode, provider, baseline=op.baseline)
                try:
                    case = op.case(provider, shape, dims, mode, torch.bfloat16, device)
                    _time_into(row, case, report, reps)
                except torch.cuda.OutOfMemoryError:
                    row.note = "out of memory"
                    torch.cuda.empty_cache()
                except RuntimeError as err:
                    # An SDPA backend that does not support this shape/device is a note; any
                    # other provider failing is a FAIL row.
                    row.note = f"unavailable: {str(err).splitlines()[0][:80]}"
                    row.rule_ok = provider.startswith("sdpa_")
                rows[provider] = row
            _settle_rows(report, rows, worst, "eager", op.baseline)


def _agreement_or_failure(agreement: Callable[[], dict], providers) -> dict:
    """{provider: worst RuleCheck}; a kernel that raises is a FAIL row for every provider
    (a NaN error: fails the rule and shows as not measured), not the end of the report."""
    from .testing import RuleCheck

    try:
        return agreement()
    except Exception as err:
        failed = RuleCheck(f"raised {type(err).__name__}: {str(err).splitlines()[0][:80]}", float("nan"), 1.0, 0.0)
        return {provider: failed for provider in providers}


def _settle_rows(report: Report, rows: dict, worst: dict, eager: str, baseline: str) -> None:
    """Fold each provider's agreement into its row, compute the speedups over `eager` and
    `baseline` (event and graph timings), print the rows and add them to the report."""
    for provider, row in rows.items():
        if provider in worst:
            row.error_vs_eager, row.rule_ok = worst[provider].ratio, worst[provider].ok and row.rule_ok
            row.note = row.note or f"worst: {worst[provider].name}"
    for row in rows.values():
        row.speedup_vs_eager = rows[eager].ms / row.ms
        row.speedup_vs_baseline = rows[baseline].ms / row.ms
        row.graph_speedup_vs_baseline = rows[baseline].graph_ms / row.graph_ms
        _progress(row)
    report.rows.extend(rows.values())


def _progress(row: Row) -> None:
    """One line per measured row as it comes, so a run cut short still shows what it measured."""
    print(f"[bench] {row.op} | {row.shape} | {row.mode} | {row.provider} | {row.ms:.3f} ms | graph {row.graph_ms:.3f} | "
          f"x eager {row.speedup_vs_eager:.2f} | x {row.baseline} {row.speedup_vs_baseline:.2f} | "
          f"{'ok' if row.rule_ok else 'FAIL'} {row.note}", file=sys.stderr, flush=True)


def run_vit_numerics(report: Report, device: torch.device) -> None:
    """The end-to-end rule on a tiny ViT in float32 (the no-GPU job; compile providers skipped)."""
    from .bench_vit import VIT_SMALL_MODELS, vit_agreement

    for label, spec in VIT_SMALL_MODELS.items():
        for provider, check in vit_agreement(spec, device, None, providers=("timm_swapped", "reference_fused")).items():
            report.rows.append(Row(label, "batch 4 float32", "train step", provider, error_vs_eager=check.ratio,
                                   rule_ok=check.ok, note=f"worst: {check.name}"))


def run_vit_timed(report: Report, device: torch.device, *, reps: int, models=None) -> None:
    """ViT-B/16 and ViT-L/16 (or `models`): agreement, then inference and a training step per
    provider (bf16 autocast)."""
    from .bench_vit import MODES, VIT_MODELS, VIT_PROVIDERS, measure_vit, vit_agreement, vit_case

    unknown = set(models or ()) - set(VIT_MODELS)
    if unknown:
        raise ValueError(f"--vit-models: unknown {sorted(unknown)}; choose from {list(VIT_MODELS)}")
    for label, spec in VIT_MODELS.items():
        if models and label not in models:
            continue
        worst = _agreement_or_failure(lambda: vit_agreement(spec, device, torch.bfloat16), VIT_PROVIDERS)
        for mode in MODES:
            rows = {}
            for provider in VIT_PROVIDERS:
                row = Row(label, f"batch {spec['batch'][mode]}, 224px", mode, provider, baseline="timm_compile")
                try:
                    case = vit_case(provider, label, mode, device)
                    measured = measure_vit(case, reps=reps)
                    del case
                    row.ms, row.tflops = measured["ms"], measured["tflops"]
                    row.images_per_s, row.peak_memory_gib = measured["images_per_s"], measured["peak_memory_gib"]
                    row.pct_of_peak = 100 * row.tflops / report.bf16_matmul_tflops  # MFU
                except torch.cuda.OutOfMemoryError:
                    row.note = "out of memory"
                except RuntimeError as err:
                    row.note, row.rule_ok = f"failed: {str(err).splitlines()[0][:80]}", False
                torch.cuda.empty_cache()
                rows[provider] = row
            _settle_rows(report, rows, worst, "timm", "timm_compile")


def plot(report: Report, path: str) -> None:
    """Speedup over eager of every fused provider (a bar per op, shape and mode); without
    timings (no CUDA), each op's error relative to eager's instead, against the rule's bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fused = ("vit_kernels", "timm_swapped", "timm_swapped_compile", "reference_fused")
    timed = [r for r in report.rows if r.provider in fused and not math.isnan(r.speedup_vs_eager)]
    if timed:
        rows, values, bound, xlabel = timed, [r.speedup_vs_eager for r in timed], 1.0, "speedup over eager (x)"
    else:
        rows = [r for r in report.rows if not math.isnan(r.error_vs_eager)]
        values, bound, xlabel = [r.error_vs_eager for r in rows], 2.0, \
            "error vs float64 / eager's error (rule: <= 2, or under its absolute floor)"
    labels = [f"{r.op} {r.shape} {r.mode}" + ("" if r.provider == "vit_kernels" else f" [{r.provider}]") for r in rows]
    figure, axes = plt.subplots(figsize=(10, 0.3 * len(rows) + 1.5))
    # Red: slower than eager, or failing the rule (whose absolute floor can pass a ratio above 2).
    colors = ["tab:green" if (v >= bound if timed else r.rule_ok) else "tab:red" for v, r in zip(values, rows)]
    axes.barh(range(len(rows)), values, color=colors)
    axes.axvline(bound, color="black", linewidth=0.8)
    axes.set_yticks(range(len(rows)), labels, fontsize=7)
    axes.invert_yaxis()
    axes.set_xlabel(xlabel)
    note = "" if timed else " (no CUDA device: numerics only)"
    axes.set_title(f"vit_kernels on {report.device}{note}; torch {report.torch}, triton {report.triton}; {report.date}",
                   fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def _fmt(v, spec):
    return "" if isinstance(v, float) and math.isnan(v) else format(v, spec)


def markdown(report: Report) -> str:
    if report.device == "cpu":
        header = "no CUDA device: timings skipped, numerics checked through Triton's interpreter"
    else:
        header = (
            f"measured copy bandwidth {_fmt(report.copy_bandwidth_gbps, '.0f')} GB/s, "
            f"bf16 matmul {_fmt(report.bf16_matmul_tflops, '.0f')} TFLOP/s (% of peak is of these)"
        )
    lines = [
        f"device: {report.device}; torch {report.torch}, triton {report.triton}, python {report.python}; {report.date}; "
        f"host {report.host_load}",
        "",
        header,
        "",
        "ms: CUDA events around each call (host launch cost included where it exceeds the GPU's); graph ms: "
        "one CUDA-graph replay (the GPU's time alone). GB/s, TFLOP/s and % of peak are from ms.",
        "",
        "| op | shape | mode | provider | ms | graph ms | GB/s | TFLOP/s | % of peak | x eager | x baseline "
        "| x baseline, graph | error / eager's | rule |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    op_names = {op.name for op in OPS}
    end_to_end = [r for r in report.rows if r.op not in op_names]
    for r in report.rows:
        if r in end_to_end:
            continue
        baseline = f"{_fmt(r.speedup_vs_baseline, '.2f')} ({r.baseline})" if r.baseline else ""
        lines.append(
            f"| {r.op} | {r.shape} | {r.mode} | {r.provider} | {_fmt(r.ms, '.3f')} | {_fmt(r.graph_ms, '.3f')} | "
            f"{_fmt(r.gbps, '.0f')} | {_fmt(r.tflops, '.0f')} | {_fmt(r.pct_of_peak, '.0f')} | "
            f"{_fmt(r.speedup_vs_eager, '.2f')} | {baseline} | {_fmt(r.graph_speedup_vs_baseline, '.2f')} | "
            f"{_fmt(r.error_vs_eager, '.2f')} | {'ok' if r.rule_ok else 'FAIL'} {r.note} |"
        )
    if end_to_end:
        lines += [
            "",
            "End to end (bf16 autocast on a GPU; a training step is forward + backward + AdamW; MFU = model "
            "FLOPs / time / the measured bf16 matmul rate):",
            "",
            "| model | batch | mode | provider | ms | images/s | MFU % | peak GiB | x timm eager | x timm_compile "
            "| error / eager's | rule |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in end_to_end:
            lines.append(
                f"| {r.op} | {r.shape} | {r.mode} | {r.provider} | {_fmt(r.ms, '.1f')} | {_fmt(r.images_per_s, '.0f')} | "
                f"{_fmt(r.pct_of_peak, '.1f')} | {_fmt(r.peak_memory_gib, '.1f')} | {_fmt(r.speedup_vs_eager, '.2f')} | "
                f"{_fmt(r.speedup_vs_baseline, '.2f')} | {_fmt(r.error_vs_eager, '.2f')} | "
                f"{'ok' if r.rule_ok else 'FAIL'} {r.note} |"
            )
    return "\n".join(lines) + "\n"


def _json_safe(value):
    """NaN (not measured) as null, so the file is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _has_timm() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        print("timm is not installed: end-to-end rows skipped")
        return False
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vit_kernels.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="vit_kernels_bench.json", help="where to write the results as JSON")
    parser.add_argument("--markdown", default=None, help="also write the table as markdown to this file")
    parser.add_argument("--quick", action="store_true", help="fewer timed repetitions")
    names = [op.name for op in OPS] + ["vit"]
    parser.add_argument("--ops", nargs="+", choices=names, default=names,
                        help="which ops to run; vit = end to end (default: all)")
    parser.add_argument("--vit-models", nargs="+", default=None, metavar="MODEL",
                        help="end-to-end models to run (default: all of vit_kernels.bench_vit.VIT_MODELS)")
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="draw the speedups (without CUDA: the numerics) as a bar chart (needs matplotlib)")
    args = parser.parse_args(argv)

    has_cuda = torch.cuda.is_available()
    if not has_cuda:
        print("No CUDA device: timings skipped; checking numerics at small shapes through Triton's interpreter.")
        # Must precede the first import of a kernel module (triton.jit reads it then).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device("cuda" if has_cuda else "cpu")
    report = Report(
        device=torch.cuda.get_device_name(device) if has_cuda else "cpu",
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        torch=torch.__version__,
        triton=_triton_version(),
        python=platform.python_version(),
        host_load=host_load(),
    )
    if has_cuda:
        report.copy_bandwidth_gbps = copy_bandwidth_gbps(device)
        report.bf16_matmul_tflops = matmul_tflops(device)
    def write_tables() -> str:
        # After every op, so that a run cut short keeps what it measured.
        table = markdown(report)
        with open(args.json, "w") as f:
            json.dump(_json_safe(asdict(report)), f, indent=2)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(table)
        return table

    interrupted = False
    try:
        for op in OPS:
            if op.name not in args.ops:
                continue
            if has_cuda:
                run_timed(report, op, device, op.shapes, reps=10 if args.quick else 50)
            else:
                run_numerics(report, op, device)
            write_tables()
        if "vit" in args.ops and _has_timm():
            if has_cuda:
                run_vit_timed(report, device, reps=5 if args.quick else 10, models=args.vit_models)
            else:
                run_vit_numerics(report, device)
    except KeyboardInterrupt:
        # A run stopped at its time cap (scripts/gpu_check.sh sends SIGINT) still leaves its
        # tables and chart of what it measured; the exit status says it was cut short.
        interrupted = True
        print(f"interrupted after {len(report.rows)} rows: the tables hold what was measured", file=sys.stderr)

    table = write_tables()
    print(table, end="")
    if args.plot:
        plot(report, args.plot)
    written = [args.json] + [path for path in (args.markdown, args.plot) if path]
    print("wrote " + ", ".join(written))
    return 0 if not interrupted and all(r.rule_ok for r in report.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
