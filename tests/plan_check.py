"""What the launch plans (ops/_plans.py, csrc/launch_plan.cpp) hand Triton's C launcher, against
what the op bodies hand it, without a GPU.

Run by tests/test_launch_plans.py in a subprocess (TRITON_INTERPRET must be off: plans exist only
where launches are bound). vit_kernels/_fake_launch.py fakes the driver, the compile and the C
launcher; here each compiled specialization gets a name of its own (`kernel#n`), so a plan that
launched another specialization (another alignment, say) than the body would shows.

    python tests/plan_check.py ops
        per case (an op body the block step plans, and its arguments): four calls through the plan table (the first runs
        the body, the second records, the third and the fourth, with new inputs of the same
        signature, replay), then the body itself on the fourth call's inputs. Each call's
        launches are described with every pointer named after the argument it is the address of
        (`in i`) or the output it points into (`out j` and the byte offset), so two calls on
        different tensors compare.
    python tests/plan_check.py vit-step [--no-plans]
        three training steps and three inference calls of a swapped timm ViT and of our
        reference ViT; launches with each pointer described by its alignment only. Which tensor
        a pointer is cannot be told across two runs here: the CPU allocator reuses addresses in
        an order that follows the tensors' lifetimes, and those differ in Python's temporaries.
        `ops` checks the pointers themselves, at these signatures among others.

Prints one JSON object.
"""

import itertools
import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") == "0", "run without TRITON_INTERPRET"

import torch  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from vit_kernels import _fake_launch  # noqa: E402

_fake_launch.stub_out_kernels(triton_launch=True)
_specializations = itertools.count()


def _cache_named_stand_in(self, key, signature, device, constexprs, options, attrs, warmup):
    stand_in = _fake_launch.KernelStandIn(f"{self.fn.__name__}#{next(_specializations)}")
    self.device_caches[device][0][key] = stand_in
    return stand_in


JITFunction._do_compile = _cache_named_stand_in

from vit_kernels.nn import block_step  # noqa: E402
from vit_kernels.ops import _nodes  # noqa: E402
from vit_kernels.ops.attention import (_flash_attention_bwd, _flash_attention_fwd,  # noqa: E402
                                       flash_attention_bwd_packed)
from vit_kernels.ops.bias_gelu import _bias_gelu_fwd_impl, bias_gelu_backward_dbias  # noqa: E402
from vit_kernels.ops.layer_norm import _add_layer_norm_fwd, add_layer_norm_bwd_grads  # noqa: E402

SITES = {name: index for index, name in enumerate(_nodes.PLAN_SITES)}
BODIES = {"add_layer_norm_fwd": _add_layer_norm_fwd.impl, "attention_fwd": _flash_attention_fwd.impl,
          "bias_gelu_fwd": _bias_gelu_fwd_impl, "attention_bwd": flash_attention_bwd_packed,
          "flash_attention_bwd": _flash_attention_bwd.impl,
          "add_layer_norm_bwd": add_layer_norm_bwd_grads, "bias_gelu_bwd": bias_gelu_backward_dbias}


def _address(value):
    return value.data_ptr() if isinstance(value, torch.Tensor) else value


def _named(value, inputs, outputs):
    """A launch argument with a pointer named after what it points at."""
    if not isinstance(value, torch.Tensor) and not (type(value) is int and value > 2**32):
        return value  # a scalar (the kernels' int scalars are sizes and strides, far below any address)
    address = _address(value)
    for i, t in enumerate(inputs):
        if isinstance(t, torch.Tensor) and t.data_ptr() == address:
            return f"in {i}"
    for j, t in enumerate(outputs):
        start = t.data_ptr()
        if start <= address < start + max(t.untyped_storage().nbytes(), 1):
            return f"out {j} +{address - start}"
    return "elsewhere"


def _launches(run, inputs):
    launches = _fake_launch.KernelStandIn.launches = []
    outputs = run()
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    _fake_launch.KernelStandIn.launches = None
    described = [[function, list(grid), [_named(a, inputs, outputs) for a in args]] for function, grid, args in launches]
    return {"launches": described,
            "outputs": [[str(t.dtype), list(t.shape), list(t.stride()), str(t.device)] for t in outputs]}


def _misaligned(shape, dtype):
    """A tensor of `shape` whose address is 2 elements past a 16-byte boundary."""
    numel = 1
    for size in shape:
        numel *= size
    return torch.randn(numel + 2, dtype=dtype)[2:].view(shape)


def _cases():
    """(name, site, a function making fresh arguments of one signature)"""
    bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32

    def ln(dtype=bf16, residual=False, params=True, gamma=False, row_scale=False, eps=1e-6, rd=None, store=False,
           make=torch.randn, shape=(2, 5, 64)):
        def args():
            d = shape[-1]
            return (make(shape, dtype=dtype), torch.randn(shape, dtype=dtype) if residual else None,
                    torch.randn(d, dtype=f32) if params else None, torch.randn(d, dtype=f32) if params else None,
                    torch.randn(d, dtype=f32) if gamma else None, torch.rand(shape[0], dtype=f32) if row_scale else None,
                    eps, rd or dtype, store)
        return args

    def attn(dtype=bf16, n=5, dropout=0.0, heads=2, head_dim=32):
        def args():
            q, k, v = torch.randn(2, n, 3, heads, head_dim, dtype=dtype).unbind(2)
            seed = torch.randint(0, 2**31, (), dtype=torch.int64) if dropout else None
            return q, k, v, head_dim ** -0.5, dropout, seed, True
        return args

    def attn_bwd(dtype=bf16, n=5, dropout=0.0, heads=2, head_dim=32):
        def args():
            q, k, v = torch.randn(2, n, 3, heads, head_dim, dtype=dtype).unbind(2)
            seed = torch.randint(0, 2**31, (), dtype=torch.int64) if dropout else None
            return (torch.randn(2, n, heads * head_dim, dtype=dtype), q, k, v,
                    torch.randn(2, n, heads, head_dim, dtype=dtype), torch.randn(2, heads, n, dtype=f32),
                    head_dim ** -0.5, dropout, seed, True)
        return args

    def flash_attn_bwd(dtype=bf16, n=5, dropout=0.0, heads=2, head_dim=32, deterministic=True):
        def args():
            q, k, v = torch.randn(2, n, 3, heads, head_dim, dtype=dtype).unbind(2)
            seed = torch.randint(0, 2**31, (), dtype=torch.int64) if dropout else None
            return (torch.randn(2, n, heads, head_dim, dtype=dtype), q, k, v,
                    torch.randn(2, n, heads, head_dim, dtype=dtype), torch.randn(2, heads, n, dtype=f32),
                    head_dim ** -0.5, dropout, seed, deterministic)
        return args

    def ln_bwd(dtype=bf16, residual=False, gamma=False, shape=(2, 5, 64)):
        def args():
            d, rows = shape[-1], shape[0] * shape[1]
            return (torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype) if residual else None,
                    torch.randn(shape, dtype=dtype) if gamma else None, torch.randn(shape, dtype=dtype),
                    torch.randn(d, dtype=f32), torch.randn(d, dtype=f32), torch.randn(d, dtype=f32) if gamma else None,
                    torch.rand(shape[0], dtype=f32) if gamma else None, torch.randn(2, rows, dtype=f32),
                    f32 if residual else None)
        return args

    def gelu_bwd(in_place=True, bias=f32, y=True, approximate="none", shape=(10, 256)):
        def args():
            dy, x = torch.randn(shape, dtype=bf16), torch.randn(shape, dtype=bf16)
            dx = dy if in_place else torch.randn(shape, dtype=bf16)
            return (dy, x, torch.randn(shape[-1], dtype=bias) if bias else None, approximate, dx,
                    torch.empty(shape, dtype=bf16) if y else None)
        return args

    def gelu(dtype=bf16, bias=bf16, approximate="none", shape=(2, 5, 256)):
        def args():
            return (torch.randn(shape, dtype=dtype), torch.randn(shape[-1], dtype=bias) if bias else None, approximate)
        return args

    return [
        ("ln plain", "add_layer_norm_fwd", ln()),
        ("ln residual fp32 store", "add_layer_norm_fwd", ln(residual=True, rd=f32, store=True)),
        ("ln layer scale, drop path", "add_layer_norm_fwd", ln(residual=True, gamma=True, row_scale=True, store=True)),
        ("ln no params fp16", "add_layer_norm_fwd", ln(dtype=f16, params=False)),
        ("ln fp32 other eps", "add_layer_norm_fwd", ln(dtype=f32, eps=1e-5)),
        ("ln misaligned x", "add_layer_norm_fwd", ln(make=_misaligned)),
        ("ln non-contiguous x", "add_layer_norm_fwd",
         ln(make=lambda shape, dtype: torch.randn(shape[::-1], dtype=dtype).transpose(0, 2))),
        ("ln odd width", "add_layer_norm_fwd", ln(shape=(3, 7, 72), residual=True, store=True)),
        ("attention", "attention_fwd", attn()),
        ("attention dropout", "attention_fwd", attn(dropout=0.1)),
        ("attention N=17 fp16", "attention_fwd", attn(dtype=f16, n=17)),
        ("attention d=72", "attention_fwd", attn(heads=3, head_dim=72)),
        ("attention backward", "attention_bwd", attn_bwd()),
        ("attention backward dropout N=17", "attention_bwd", attn_bwd(dropout=0.1, n=17)),
        ("attention backward d=72 fp16", "attention_bwd", attn_bwd(dtype=f16, heads=3, head_dim=72)),
        ("per-op attention backward", "flash_attention_bwd", flash_attn_bwd()),
        ("per-op attention backward dropout N=17 fp16", "flash_attention_bwd",
         flash_attn_bwd(dtype=f16, dropout=0.1, n=17)),
        ("per-op attention backward, atomic dQ", "flash_attention_bwd", flash_attn_bwd(deterministic=False)),
        ("ln backward", "add_layer_norm_bwd", ln_bwd()),
        ("ln backward residual, layer scale", "add_layer_norm_bwd", ln_bwd(residual=True, gamma=True)),
        ("ln backward odd width fp16", "add_layer_norm_bwd", ln_bwd(dtype=f16, shape=(3, 7, 72))),
        ("bias gelu backward in place", "bias_gelu_bwd", gelu_bwd()),
        ("bias gelu backward not in place", "bias_gelu_bwd", gelu_bwd(in_place=False)),
        ("bias gelu backward no bias, no y", "bias_gelu_bwd", gelu_bwd(bias=None, y=False, approximate="tanh")),
        ("bias gelu", "bias_gelu_fwd", gelu()),
        ("bias gelu fp32 bias tanh", "bias_gelu_fwd", gelu(bias=f32, approximate="tanh")),
        ("bias gelu no bias", "bias_gelu_fwd", gelu(bias=None, approximate="quick")),
    ]


def ops():
    module = block_step.cpp_step()
    results = []
    for name, site, make in _cases():
        calls = []
        for _ in range(4):
            args = make()
            calls.append(_launches(lambda: module.call_planned(SITES[site], BODIES[site], *args), args))
        body = _launches(lambda: BODIES[site](*args), args)
        results.append({"name": name, "site": site, "calls": calls, "body": body,
                        "counts": module.launch_plan_counts()[site]})
    return {"cases": results, "counts": module.launch_plan_counts()}


def vit_step():
    import timm

    import vit_kernels
    from vit_kernels.models import VisionTransformer

    timm_model = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, embed_dim=64, depth=2,
                                   num_heads=2, num_classes=10, init_values=1e-5, drop_path_rate=0.1,
                                   attn_drop_rate=0.1)
    models = {"timm swapped": vit_kernels.swap_modules(timm_model)[0],
              "reference": VisionTransformer(img_size=32, patch_size=16, num_classes=10, embed_dim=64, depth=2,
                                             num_heads=2, init_values=1e-5, drop_path_rate=0.1, attn_drop_rate=0.1)}
    rounds = []
    for name, model in models.items():
        for mode in ("train", "eval"):
            model.train(mode == "train")
            for i in range(3):
                torch.manual_seed(i)
                images = torch.randn(2, 3, 32, 32)
                launches = _fake_launch.KernelStandIn.launches = []
                with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(mode == "train"):
                    out = model(images)
                if mode == "train":
                    out.float().square().mean().backward()
                _fake_launch.KernelStandIn.launches = None

                def named(value):  # an address by its 16-byte alignment only: see the module docstring
                    if isinstance(value, torch.Tensor) or (type(value) is int and value > 2**32):
                        return f"pointer{'' if _address(value) % 16 == 0 else ' misaligned'}"
                    return value

                rounds.append({"name": f"{name} {mode} {i + 1}",
                               "launches": [[f, list(g), [named(a) for a in args]] for f, g, args in launches]})
    return {"rounds": rounds, "counts": block_step.cpp_step().launch_plan_counts()}


def main():
    torch.manual_seed(0)
    if "--no-plans" in sys.argv:
        _nodes.set_launch_plans(block_step.cpp_step(), False)
    print(json.dumps({"ops": ops, "vit-step": vit_step}[sys.argv[1]](), default=str))


if __name__ == "__main__":
    main()
